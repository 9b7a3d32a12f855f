"""Low-bit frozen base Linears (fp8 e4m3, int8 weight-only) on the CPU: the kernels (fp8 emulated), the storage,
the model-level effect, the run.

Tolerances (measured on the tiny model, bf16 weights, 2026-11-25): the loss of one forward moves by about 0.1%,
the LoRA gradients by a few percent (relative L2); a 24-step run's per-step loss by under 1% of bf16's. The
bounds below leave 3-5x of margin and fail for a missing scale (errors of order 1) or a transposed weight.
"""
import threading

import pytest
import torch
from peft import LoraConfig

from engine.config import check_config, with_value
from engine.models.low_bit_linear import (E4M3, Fp8Linear, Int8Linear, fp8_input_grad, quantize_base_linears,
                                          quantize_rows, quantize_rows_int8)
from engine.models.s2v_transformer import S2VTransformer3DModel
from engine.runner import run
from engine.train.allowed import setting_problems
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]



def tiny_batch(model) -> dict:
    """One fixed window of inputs for the tiny model (5 latent frames of 8x12, motion latents, 20 audio frames)."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    return dict(hidden_states=torch.randn(1, 16, 5, 8, 12, generator=g), timestep=torch.tensor([640.0]),
                encoder_hidden_states=torch.randn(1, 9, cfg.text_dim, generator=g),
                ref_latents=torch.randn(1, 16, 1, 8, 12, generator=g),
                audio_features=torch.randn(1, cfg.num_weighted_avg_layers, cfg.audio_dim, 20, generator=g),
                motion_latents=torch.randn(1, 16, 19, 8, 12, generator=g))

def test_row_quantisation_keeps_e4m3_relative_precision():
    w = torch.randn(64, 96) * torch.logspace(-3, 2, 64).unsqueeze(1)  # rows of very different size
    q, scale = quantize_rows(w)
    assert q.dtype == E4M3 and scale.shape == (64, 1)
    back = q.float() * scale
    # 3 mantissa bits: half an ulp is 1/16 of the value; values far below a row's max lose more (subnormals).
    big = w.abs() > w.abs().amax(dim=1, keepdim=True) / 64
    assert ((back - w).abs()[big] <= w.abs()[big] / 16 + 1e-12).all()
    assert torch.equal(quantize_rows(torch.zeros(3, 16))[0].float(), torch.zeros(3, 16))


def test_low_bit_linear_forward_and_input_gradient_are_the_dequantised_products():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).requires_grad_(False)
    f8 = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = f8(x)
    xq, xs = quantize_rows(x.detach().reshape(-1, 32))
    expected = (xq.float() * xs) @ f8.dequantized().t() + lin.bias.to(torch.bfloat16).float()
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y.detach().reshape(-1, 48), expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ f8.dequantized(), rtol=1e-6, atol=1e-6)
    # And close to the bf16/fp32 Linear it replaces (e4m3 on both operands: a few percent).
    ref = lin(x.detach())
    assert float((y.detach() - ref).norm() / ref.norm()) < 0.06


def test_fp8_input_gradient_quantises_the_scaled_gradient_per_token():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).requires_grad_(False)
    f8 = Fp8Linear.from_linear(lin)
    f8.fp8_backward = True
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = f8(x)
    g = torch.randn_like(y) * torch.logspace(-2, 2, 5).view(1, 5, 1)  # tokens of very different size
    y.backward(g)
    # The weight's row scales go into the gradient's columns before the per-token e4m3 rounding.
    gq, gs = quantize_rows(g.reshape(-1, 48) * f8.weight_scale.t())
    expected = (gq.float() * gs) @ f8.stored_weight().float()
    torch.testing.assert_close(x.grad.reshape(-1, 32), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fp8_input_grad(g.reshape(-1, 48), f8.stored_weight(), f8.weight_scale, False),
                               expected)
    # Every token keeps its relative precision, small ones included (a single tensor-wide scale would not).
    exact = g @ f8.dequantized()
    rel = (x.grad - exact).norm(dim=-1) / exact.norm(dim=-1)
    assert float(rel.max()) < 0.06 and float(rel.min()) > 0  # rounded, not skipped


def test_fp8_backward_options_are_for_fp8_only(tiny_model_dir):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="fp8 base weights only"):
        quantize_base_linears(model, kind="int8", fp8_backward=True)
    quantize_base_linears(model, ("ffn",), kind="fp8", fp8_backward=True)
    assert model.blocks[0].ffn.net[2].fp8_backward and model.blocks[0].ffn.net[2].fast_accum
    config = with_value(demo_config("m", "r"), "model.dtype", "bf16")
    errors = check_config(with_value(config, "memory.fp8_input_grad", True))
    assert [e.key for e in errors] == ["memory.fp8_input_grad"] and "base_weights" in errors[0].message
    assert check_config(with_value(with_value(config, "memory.fp8_input_grad", True), "memory.base_weights", "fp8")) == []


def test_int8_linear_is_weight_only_and_closer_to_bf16_than_fp8():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).requires_grad_(False)
    i8, f8 = Int8Linear.from_linear(lin), Fp8Linear.from_linear(lin)
    q, scale = quantize_rows_int8(lin.weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale - lin.weight).abs() <= scale / 2 + 1e-7).all()  # half a step, per row
    x = torch.randn(3, 7, 64, requires_grad=True)
    y = i8(x)
    # The activations are not quantised: exactly x @ dequantised weight + bias.
    expected = x.detach() @ i8.dequantized().t() + lin.bias.to(torch.bfloat16).float()
    torch.testing.assert_close(y.detach(), expected, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ i8.dequantized(), rtol=1e-6, atol=1e-6)
    ref = lin(x.detach())
    err_i8 = float((y.detach() - ref).norm() / ref.norm())
    err_f8 = float((f8(x.detach()) - ref).norm() / ref.norm())
    assert err_i8 < err_f8 / 2 and err_i8 < 0.02


def test_dtype_casts_keep_the_low_bit_storage():
    f8 = Fp8Linear.from_linear(torch.nn.Linear(16, 16))
    i8 = Int8Linear.from_linear(torch.nn.Linear(16, 16))
    f8.to(torch.bfloat16)
    i8.to(torch.bfloat16)
    assert f8.weight_q.dtype == torch.uint8 and f8.stored_weight().dtype == E4M3
    assert i8.weight_q.dtype == torch.int8 and i8.weight_scale.dtype == torch.bfloat16  # scales may follow


def test_only_frozen_linears_of_known_families_are_replaced(tiny_model_dir):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="unknown low-bit module families"):
        quantize_base_linears(model, ("attention",))
    model.blocks[0].ffn.net[2].requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        quantize_base_linears(model, ("ffn",))
    with pytest.raises(ValueError, match="low-bit kind"):
        quantize_base_linears(model, ("self_attn",), kind="int4")


def _loss_and_lora_grads(model, batch):
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).float().square().mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("kind,fp8_backward", [("fp8", False), ("fp8", True), ("int8", False)])
def test_tiny_model_loss_and_lora_gradients_stay_close_to_bf16(tiny_model_dir, kind, fp8_backward):
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    for n, p in model.named_parameters():
        if ".lora_B" in n:  # a non-zero B, so that the LoRA gradients depend on the whole block
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    batch = tiny_batch(model)
    loss_ref, grads_ref = _loss_and_lora_grads(model, batch)
    model.zero_grad(set_to_none=True)
    # q k v o twice and two FFN Linears a block
    assert quantize_base_linears(model, kind=kind, fp8_backward=fp8_backward) == 10 * len(model.blocks)
    loss, grads = _loss_and_lora_grads(model, batch)
    assert loss != loss_ref  # the weights did change
    assert abs(loss - loss_ref) / loss_ref < 0.01
    assert float((grads - grads_ref).norm() / grads_ref.norm()) < 0.25


def test_low_bit_runs_train_like_bf16_on_synthetic_windows(tiny_model_dir, tmp_path):
    losses = {}
    for weights in ("bf16", "fp8", "int8", "fp8-grad"):
        config = demo_config(tiny_model_dir, tmp_path / weights)
        for key, value in {"optim.max_steps": 24, "model.dtype": "bf16", "train.mixed_precision": "bf16",
                           "memory.base_weights": weights.removesuffix("-grad"), "checkpoint.every_steps": 0,
                           "memory.fp8_input_grad": weights.endswith("-grad"),
                           "validation.every_steps": 0}.items():
            config = with_value(config, key, value)
        events = []
        end = run(config, [events.append], threading.Event(), tmp_path / weights / "run",
                  dataset=SyntheticLatentDataset(4, seed=0), device="cpu")
        assert end.status == "completed", end.reason
        losses[weights] = [e.loss for e in events if e.kind == "step_end"]
    a = losses["bf16"]
    assert losses["fp8-grad"] != losses["fp8"]  # the input gradients were rounded too
    for weights in ("fp8", "int8", "fp8-grad"):
        b = losses[weights]
        assert len(a) == len(b) == 24 and a != b, weights
        assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.03, weights
        assert sum(b[-6:]) < 0.8 * sum(b[:6]), weights  # and it learns


def test_switch_combinations_and_config_checks():
    config = with_value(with_value(demo_config("m", "r"), "model.dtype", "bf16"), "memory.base_weights", "fp8")
    assert setting_problems(config) == []
    # Low-bit base weights stream as bf16 ones do (tests/test_low_bit_stream.py).
    streamed = config
    for key, value in {"memory.block_offload": True, "memory.gradient_checkpointing": True,
                       "train.mixed_precision": "bf16"}.items():
        streamed = with_value(streamed, key, value)
    assert setting_problems(streamed) == []
    assert setting_problems(with_value(config, "memory.base_weights", "int8")) == []
    assert setting_problems(with_value(streamed, "memory.base_weights", "int8")) == []
    assert check_config(config) == []
    for bad in (["attention"], []):
        errors = check_config(with_value(config, "memory.low_bit_families", bad))
        assert [e.key for e in errors] == ["memory.low_bit_families"], errors


@pytest.mark.parametrize("kind,fp8_backward", [("fp8", False), ("fp8", True), ("int8", False)])
def test_a_block_with_low_bit_base_and_lora_traces_as_one_graph(tiny_model_dir, kind, fp8_backward):
    """torch.compile compiles each block (compile_blocks): low-bit Linears must not split it into several graphs."""
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    quantize_base_linears(model, kind=kind, fp8_backward=fp8_backward)
    block = model.blocks[0]
    seen = {}
    hook = block.register_forward_pre_hook(lambda _m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                           with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(hidden_states=torch.randn(1, 16, 5, 8, 12, generator=g), timestep=torch.tensor([640.0]),
              encoder_hidden_states=torch.randn(1, 9, cfg.text_dim, generator=g),
              ref_latents=torch.randn(1, 16, 1, 8, 12, generator=g),
              audio_features=torch.randn(1, cfg.num_weighted_avg_layers, cfg.audio_dim, 20, generator=g),
              drop_motion_frames=True)
    hook.remove()
    explained = torch._dynamo.explain(block)(*seen["args"], **seen["kwargs"])
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_int8_weight_error_is_about_a_third_of_fp8s_on_gaussian_weights():
    """The figure in low_bit_linear's docstring (0.9% against 2.6% at 5120x5120), at a test-sized matrix."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)) * 1024**-0.5
    q8, s8 = quantize_rows(w)
    qi, si = quantize_rows_int8(w)
    e8 = float((q8.float() * s8 - w).norm() / w.norm())
    ei = float((qi.float() * si - w).norm() / w.norm())
    assert 0.02 < e8 < 0.03 and 0.006 < ei < 0.011 and ei < 0.4 * e8


def test_a_gpu_without_row_wise_fp8_kernels_is_refused_before_loading(monkeypatch):
    """A card whose torch has no row-wise fp8 kernel (Ampere, and Ada or Blackwell in some releases) gets a
    message naming the card and the setting to use, from the check phase, instead of failing mid-step."""
    import engine.models.low_bit_linear as lbl

    def no_kernel(device):
        raise RuntimeError("torch._scaled_mm is only supported on CUDA devices with compute capability >= 9.0\nmore")

    monkeypatch.setattr(lbl, "_FP8_PROBED", {})
    monkeypatch.setattr(lbl, "_probe_fp8_kernels", no_kernel)
    monkeypatch.setattr(lbl, "_gpu_label", lambda d: "NVIDIA GeForce RTX 3090, compute capability 8.6")
    config = with_value(with_value(demo_config("m", "r"), "model.dtype", "bf16"), "memory.base_weights", "fp8")
    problems = setting_problems(config, device=torch.device("cuda", 0))
    assert len(problems) == 1
    assert "RTX 3090, compute capability 8.6" in problems[0] and 'base_weights = "int8"' in problems[0]
    assert "compute capability >= 9.0" in problems[0] and "more" not in problems[0]
    assert setting_problems(with_value(config, "memory.base_weights", "int8"), device=torch.device("cuda", 0)) == []
    assert lbl.fp8_kernel_problem("cpu") is None  # the CPU emulates fp8


def test_the_fp8_probe_runs_forward_and_fp8_backward_and_catches_a_wrong_product(monkeypatch):
    """On the CPU the probe takes the emulation path: its own code runs, and a broken product is reported."""
    import engine.models.low_bit_linear as lbl

    lbl._probe_fp8_kernels(torch.device("cpu"))
    # The product and its reference part ways (as a kernel computing the wrong thing would make them).
    monkeypatch.setattr(lbl.Fp8Linear, "dequantized", lambda self: 2 * lbl._dequantize(self.stored_weight(),
                                                                                        self.weight_scale))
    with pytest.raises(RuntimeError, match="disagrees"):
        lbl._probe_fp8_kernels(torch.device("cpu"))


# ---- quantised while loading ---------------------------------------------------------------------------------
def _low_bit_config(model_dir, runs, kind, families, fp8_backward=False):
    config = demo_config(model_dir, runs)
    for key, value in {"model.dtype": "bf16", "train.mixed_precision": "bf16", "memory.base_weights": kind,
                       "memory.low_bit_families": list(families), "memory.fp8_input_grad": fp8_backward,
                       "lora.init": "gaussian"}.items():  # the default targets: q k v o of every attention
        config = with_value(config, key, value)
    return config


def _old_low_bit_path(config, device):
    """How the runner loaded a low-bit base before: the bf16 model in full into host memory, the LoRA, then
    quantize_base_linears onto `device` through the memory switches."""
    from engine.models.lora import add_lora
    from engine.train.switches import apply_memory_switches

    model = S2VTransformer3DModel.from_pretrained(config.model.source, torch_dtype=torch.bfloat16)
    lo = config.lora
    add_lora(model, lo.rank, lo.alpha, lo.dropout, list(lo.targets), lo.init, config.train.seed)
    lines = apply_memory_switches(model, config, device)
    assert any("after loading" in line and "while loading" not in line for line in lines), lines
    return model


def _forward_and_lora_grads(model, device):
    """One bf16-autocast forward with every LoRA B made non-zero (the same values in every model), and the LoRA
    gradients of its mean square."""
    for n, p in model.named_parameters():
        if ".lora_B" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    batch = tiny_batch(model)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(**{k: v.to(device) for k, v in batch.items()})
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine)")


@pytest.mark.parametrize("kind,families,fp8_backward,device", [
    ("int8", ("self_attn", "cross_attn", "ffn"), False, "cpu"),
    ("fp8", ("self_attn", "cross_attn", "ffn"), True, "cpu"),
    ("int8", ("self_attn", "cross_attn", "ffn", "audio_attn"), False, "cpu"),
    ("fp8", ("ffn", "audio_attn"), False, "cpu"),
    pytest.param("int8", ("self_attn", "cross_attn", "ffn"), False, "cuda", marks=_CUDA),
    pytest.param("fp8", ("self_attn", "cross_attn", "ffn"), True, "cuda", marks=_CUDA),
])
def test_quantising_while_loading_trains_the_same_model_as_quantising_after_the_lora(tiny_model_dir, tmp_path,
                                                                                     kind, families, fp8_backward,
                                                                                     device):
    """The runner's load (engine.runner._load_model: quantised as read, LoRA added to the low-bit model) against
    the old order (bf16 load, LoRA, quantize_base_linears): every buffer and parameter, the module tree, the
    fp8 options, one forward and its LoRA gradients, bit for bit (fp8 emulated on the CPU; on CUDA the fp8 kernels,
    quantised on the GPU in both orders)."""
    from engine.runner import _load_model

    device = torch.device(device)
    config = _low_bit_config(tiny_model_dir, tmp_path, kind, families, fp8_backward)
    old = _old_low_bit_path(config, device)
    new = _load_model(config, device)
    assert str(new) == str(old)  # the same modules, peft's LoRA layers holding the low-bit base_layer
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    low_bit = [k for k in a if k.endswith(".weight_q")]
    assert len(low_bit) == len(low_bit_targets_of(old, families)) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    lora_a = {n: p for n, p in old.named_parameters() if p.requires_grad}
    lora_b = {n: p for n, p in new.named_parameters() if p.requires_grad}
    assert list(lora_a) == list(lora_b) and all(".lora_" in n for n in lora_a)
    assert len(lora_a) == 2 * 4 * (2 * len(old.blocks) + 2)  # A and B of q k v o: 2 attentions a block, 2 injectors
    assert all(p.dtype == torch.float32 for p in lora_b.values())
    for m_old, m_new in zip(old.modules(), new.modules()):
        assert type(m_old) is type(m_new)
        if isinstance(m_new, Fp8Linear):
            assert (m_new.fp8_backward, m_new.fast_accum) == (m_old.fp8_backward, m_old.fast_accum) == (
                fp8_backward, True)
    out_old, grads_old = _forward_and_lora_grads(old, device)
    out_new, grads_new = _forward_and_lora_grads(new, device)
    assert torch.equal(out_old, out_new)
    for n in grads_old:
        if device.type == "cpu":
            assert torch.equal(grads_old[n], grads_new[n]), n
        else:  # a CUDA attention backward may sum in another order from run to run
            torch.testing.assert_close(grads_new[n], grads_old[n], msg=n)


def low_bit_targets_of(model, families):
    from engine.models.low_bit_linear import FAMILIES

    names = {n.removesuffix(".base_layer") for n, m in model.named_modules()
             if isinstance(m, (Fp8Linear, Int8Linear))}
    assert all(any(FAMILIES[f].match(n) for f in families) for n in names)
    return names


def test_the_load_holds_at_most_one_bf16_linear_of_the_low_bit_families(tiny_model_dir, monkeypatch):
    """The host (or GPU) never holds the bf16 model: after every tensor placed, at most one Linear of the chosen
    families has bf16 weights (the one being read); the others are meta (not read yet) or low-bit already."""
    import engine.models.loading as loading
    from engine.models.low_bit_linear import FAMILIES, LowBitSpec

    place, most, model_seen = loading._place, [0], []

    def counting_place(model, name, tensor):
        place(model, name, tensor)
        model_seen[:] = [model]
        pending = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not m.weight.is_meta
                   and any(FAMILIES[f].match(n) for f in ("self_attn", "cross_attn", "ffn"))]
        most[0] = max(most[0], len(pending))

    monkeypatch.setattr(loading, "_place", counting_place)
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16,
                                                  low_bit=LowBitSpec("int8"))
    assert most[0] == 1 and model_seen[0] is model
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 10 * len(model.blocks)
    # Without the spec the same count reaches every Linear of those families: the test sees the difference.
    most[0] = 0
    S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert most[0] == 10 * len(model.blocks)


def test_memory_switches_never_quantise_a_low_bit_model_again(tiny_model_dir, tmp_path):
    from engine.models.low_bit_linear import LowBitSpec
    from engine.train.switches import UnsupportedSwitch, apply_memory_switches

    config = _low_bit_config(tiny_model_dir, tmp_path, "int8", ("self_attn", "cross_attn", "ffn"))
    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16,
                                                  low_bit=LowBitSpec("int8"))
    model.requires_grad_(False)
    stored = {n: b for n, b in model.named_buffers() if n.endswith("weight_q")}
    lines = apply_memory_switches(model, config, torch.device("cpu"))
    assert "40 frozen base Linears in int8 (self_attn, cross_attn, ffn; 40 quantised while loading) on cpu" in lines
    assert all(b is stored[n] for n, b in model.named_buffers() if n.endswith("weight_q"))  # untouched
    with pytest.raises(UnsupportedSwitch, match=r'40 int8 Linears, memory.base_weights = "fp8"'):
        apply_memory_switches(model, with_value(config, "memory.base_weights", "fp8"), torch.device("cpu"))


@pytest.mark.parametrize("cls", [Fp8Linear, Int8Linear])
def test_from_linear_quantises_in_row_chunks_to_the_same_bits(cls, monkeypatch):
    import engine.models.low_bit_linear as lbl

    lin = torch.nn.Linear(40, 23).to(torch.bfloat16)
    whole = cls.from_linear(lin)
    q, scale = cls.quantize(lin.weight.detach())
    assert torch.equal(whole.weight_q, q) and torch.equal(whole.weight_scale, scale)
    monkeypatch.setattr(lbl, "_QUANTIZE_CHUNK", 40 * 5)  # 5 rows at a time: 4 full chunks and a short one
    chunked = cls.from_linear(lin)
    assert torch.equal(chunked.weight_q, q) and torch.equal(chunked.weight_scale, scale)
    assert torch.equal(chunked.bias, whole.bias) and chunked.source_dtype == torch.bfloat16
