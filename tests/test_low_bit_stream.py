"""Low-bit base weights streamed block by block, and saved inputs partly kept in place: on the CPU with the tiny
model (the streamer's CPU path makes a plain copy per fetch, so the bookkeeping is the one a GPU run does).

Exactness: bitwise. Streaming changes only where the bytes of each frozen tensor live (a copy of the same bytes
per use), and keeping an input in place changes only which buffer holds it; the ops and their order are those of
the reference, and the CPU kernels are deterministic, so nothing may differ. (On a GPU the same comparison
holds to fp32 rounding: test_pinned_slab's CUDA test.)
"""
from pathlib import Path

import pytest
import torch
from test_low_bit import tiny_batch  # tests/ is on sys.path under pytest
from peft import LoraConfig

from engine.config import check_config, load_config, with_value
from engine.models.block_stream import frozen_tensors
from engine.models.low_bit_linear import Int8Linear, LowBitLinear, quantize_base_linears
from engine.models.pinned_slab import slab_bytes, tensor_bytes, views_bytes
from engine.models.s2v_transformer import S2VTransformer3DModel
from engine.train.allowed import setting_problems
from s2v_tui.commands.demo import demo_config

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PRESETS = Path(__file__).resolve().parents[1] / "presets"


def _int8_model(folder, kind="int8", dtype=torch.bfloat16, dropout=0.1):
    model = S2VTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    model.requires_grad_(False)
    torch.manual_seed(0)  # the same LoRA initialisation in every model
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian",
                                 lora_dropout=dropout))
    for n, p in model.named_parameters():
        if ".lora_B" in n:  # non-zero, so that every LoRA gradient depends on the whole backward
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(n)))
    assert quantize_base_linears(model, kind=kind, device=torch.device("cpu")) == 10 * len(model.blocks)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def _batches(model):
    full = tiny_batch(model)
    short = {**full, "hidden_states": full["hidden_states"][:, :, :3], "audio_features": full["audio_features"][..., :12]}
    return [short, full, {**short, "drop_motion_frames": True}]  # a bucket change, and the first-clip mode


def _loss_and_grads(model, batch, params, autocast=True):
    torch.manual_seed(3)  # LoRA dropout: the recompute replays this RNG state
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).float().square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss.item(), grads


def _in(slab, t: torch.Tensor) -> bool:
    lo = slab._base.data_ptr()
    return lo <= t.data_ptr() < lo + slab.capacity


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_streamed_low_bit_blocks_with_inputs_partly_in_place_train_bitwise_like_resident_ones(tiny_model_dir, kind):
    model, params = _int8_model(tiny_model_dir, kind)
    model.enable_gradient_checkpointing(interval=1)  # reference: every saved input in place, nothing streamed
    batches = _batches(model)
    reference = [_loss_and_grads(model, b, params) for b in batches]

    model, params = _int8_model(tiny_model_dir, kind)
    model.enable_gradient_checkpointing(interval=1, offload_inputs=True, gpu_saved_inputs=2)
    host = model.enable_block_streaming(resident=1, device=torch.device("cpu"))
    streamer, store = model._streamer, model._host_store

    # Every frozen tensor of a streamed unit is in the slab, the low-bit storage (buffers) included, and the slab
    # is exactly their size.
    streamed = [t for unit in streamer.units[1:] for t, _ in unit.tensors]
    low_bit = [m for m in model.blocks[1:].modules() if isinstance(m, LowBitLinear)]
    assert len(low_bit) == 10 * (len(model.blocks) - 1)
    assert {id(m.weight_q) for m in low_bit} | {id(m.weight_scale) for m in low_bit} <= {id(t) for t in streamed}
    assert all(_in(streamer.slab, t) for t in streamed)
    assert host == slab_bytes(views_bytes(tensor_bytes(t.shape, t.dtype) for t in streamed))
    assert not any(_in(streamer.slab, t) for t in frozen_tensors([model.blocks[0]]))  # the resident unit
    assert not any(t.requires_grad for t in streamed) and all(p.requires_grad for p in params)

    # While a streamed block computes (forward and recompute), none of its tensors is the slab's copy.
    checked = []

    def not_from_slab(module, _args):
        assert not any(_in(streamer.slab, t) for t in frozen_tensors([module])), "a tensor was not fetched"
        checked.append(module)

    hooks = [model.blocks[i].register_forward_pre_hook(not_from_slab) for i in range(1, len(model.blocks))]
    for (ref_loss, ref_grads), b in zip(reference, batches):
        loss, grads = _loss_and_grads(model, b, params)
        assert loss == ref_loss
        assert all(torch.equal(a, g) for a, g in zip(grads, ref_grads))
    for h in hooks:
        h.remove()
    assert len(checked) == len(batches) * 2 * (len(model.blocks) - 1)  # forward + recompute, every step
    # Two of the four inputs were offloaded (blocks 0 and 1), the last two kept in place; all released after the
    # backward, and every streamed tensor back in the slab.
    assert len(store._slots) == 2 and store._first_kept == 2
    assert all(entry[0] is None or entry[2] is not None for entry in store._saved)
    assert all(_in(streamer.slab, t) for t in streamed)


def test_the_host_store_keeps_the_last_saves_in_place_and_offloads_the_rest():
    from engine.models.offload_checkpoint import HostActivationStore

    store = HostActivationStore(keep_last=2)
    with pytest.raises(ValueError, match="begin_step"):
        store.begin_step()
    xs = [torch.full((3, 4), float(i)) for i in range(5)]
    store.begin_step(saves=5)
    for x in xs:
        store.save(x)
    assert [store.kept_in_place(i) for i in range(5)] == [False, False, False, True, True]
    assert len(store._slots) == 3  # host slots for the offloaded three only
    assert store.load(4) is xs[4] and store.load(3) is xs[3]  # in place: the very tensors
    assert store._saved[4][0] is None  # let go of once loaded, so the backward frees it
    for i in (2, 1, 0):
        got = store.load(i)
        assert got is not xs[i] and torch.equal(got, xs[i])
    # keep_last larger than a step: everything stays in place.
    store.begin_step(saves=1)
    store.save(xs[0])
    assert store.kept_in_place(0) and len(store._slots) == 3
    with pytest.raises(ValueError, match=">= 0"):
        HostActivationStore(keep_last=-1)


def test_low_bit_with_block_streaming_is_no_longer_refused_but_the_fp8_probe_still_runs(monkeypatch):
    import engine.models.low_bit_linear as lbl

    config = load_config(PRESETS / "24gb-lowram.toml")
    assert (config.memory.base_weights, config.memory.block_offload) == ("int8", True)
    assert check_config(config) == []
    assert setting_problems(config, device=torch.device("cuda", 0)) == []
    monkeypatch.setattr(lbl, "_FP8_PROBED", {"cuda:0": "no row-wise fp8 here"})
    problems = setting_problems(with_value(config, "memory.base_weights", "fp8"), device=torch.device("cuda", 0))
    assert problems == ["no row-wise fp8 here"]
    # Streaming itself still needs a GPU in a run.
    assert any("CUDA GPU" in p for p in setting_problems(config, device=torch.device("cpu")))


def test_apply_memory_switches_quantises_on_the_cpu_then_streams(tiny_model_dir, monkeypatch):
    """The order a streamed low-bit run takes (engine.train.switches): the bf16 model the loader left in host
    memory is quantised there, then the streamer packs the low-bit storage into its slab."""
    import engine.train.switches as switches

    model = S2VTransformer3DModel.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    config = with_value(with_value(load_config(PRESETS / "24gb-lowram.toml"), "memory.gpu_saved_inputs", 1),
                        "memory.compile_blocks", False)
    monkeypatch.setattr(switches, "setting_problems", lambda config, device: [])  # the CPU stands in for a GPU
    done = switches.apply_memory_switches(model, config, torch.device("cpu"))
    assert any("40 frozen base Linears in int8" in line and "on cpu" in line for line in done), done
    assert any("last 1, kept in GPU memory" in line for line in done), done
    assert any(line.startswith("block streaming") and "int8 Linears" in line for line in done), done
    slab = model._streamer.slab
    int8 = [m for m in model.blocks.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 40 and all(_in(slab, m.weight_q) and _in(slab, m.weight_scale) for m in int8)
    assert model._host_store.keep_last == 1


def test_gpu_saved_inputs_rule_and_placement():
    from engine.config import PLACEMENT_KEYS, identity_hash

    config = with_value(demo_config("m", "r"), "memory.gradient_checkpointing", True)
    errors = check_config(with_value(config, "memory.gpu_saved_inputs", 3))
    assert [e.key for e in errors] == ["memory.gpu_saved_inputs"]
    assert "offload_checkpoint_inputs = false" in errors[0].message and "gpu_saved_inputs = 0" in errors[0].fix
    offloaded = with_value(config, "memory.offload_checkpoint_inputs", True)
    assert check_config(with_value(offloaded, "memory.gpu_saved_inputs", 3)) == []
    errors = check_config(with_value(offloaded, "memory.gpu_saved_inputs", -1))
    assert [e.key for e in errors] == ["memory.gpu_saved_inputs"] and "at least 0" in errors[0].message
    # A placement key: a run stopped for memory resumes with another value.
    assert "memory.gpu_saved_inputs" in PLACEMENT_KEYS
    assert identity_hash(with_value(offloaded, "memory.gpu_saved_inputs", 7)) == identity_hash(offloaded)


@pytest.mark.timeout(300)
def test_compiled_blocks_see_the_streamed_low_bit_storage_of_each_step(tiny_model_dir):
    """compile_blocks (as the preset runs it; inductor on the CPU here) over blocks whose int8 buffers the streamer
    swaps at every use: the compiled graphs must read the tensors of the moment, not ones captured when they were
    compiled, and must not recompile per step. The host copies are changed between steps: the result must follow.
    fp32 without autocast and without LoRA dropout (inductor draws other random numbers), so compiled and eager
    agree to fp32 summation order (inductor fuses)."""
    torch._dynamo.reset()
    model, params = _int8_model(tiny_model_dir, dtype=torch.float32, dropout=0.0)
    model.enable_gradient_checkpointing(interval=1, offload_inputs=True, gpu_saved_inputs=2)
    model.enable_block_streaming(resident=1, device=torch.device("cpu"))
    batch = _batches(model)[1]
    scales = [m.weight_scale for m in model.blocks[1:].modules() if isinstance(m, Int8Linear)]
    assert scales and all(_in(model._streamer.slab, t) for t in scales)  # at rest: the slab's copies

    def halve_then_restore(compute):
        before = compute()
        for t in scales:
            t.mul_(0.5)  # the host copy the next fetch takes
        halved = compute()
        for t in scales:
            t.mul_(2.0)  # exact in fp32
        return before, halved, compute()

    eager = halve_then_restore(lambda: _loss_and_grads(model, batch, params, autocast=False))
    model.compile_blocks()
    torch._dynamo.utils.counters.clear()
    compiled = [_loss_and_grads(model, batch, params, autocast=False)]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2  # blocks and injectors really compiled
    compiled = halve_then_restore(lambda: _loss_and_grads(model, batch, params, autocast=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile for new tensors
    assert eager[1][0] != eager[0][0]  # halving the scales changes the step
    for (ref_loss, ref_grads), (loss, grads) in zip(eager, compiled):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the lead's GPU machine)")


@cuda
@pytest.mark.timeout(600)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_streamed_int8_with_inputs_partly_on_the_gpu_trains_like_resident_int8_on_cuda(tiny_model_dir, compiled):
    """The preset's switches on a GPU: int8 quantised on the CPU, one unit resident, the rest streamed from a pinned
    slab, the last two saved inputs kept on the GPU and the others in pinned slots; against the same int8 LoRA model
    kept on the GPU, over a bucket change and the first-clip mode. fp32 (as test_pinned_slab's CUDA test): the
    same losses and gradients to fp32 rounding, the GPU's kernels not being bitwise reproducible between the two."""
    device = torch.device("cuda")

    def build(stream):
        torch._dynamo.reset()
        model, params = _int8_model(tiny_model_dir, dtype=torch.float32, dropout=0.0)
        if stream:
            model.enable_gradient_checkpointing(interval=1, offload_inputs=True, gpu_saved_inputs=2)
            model.enable_block_streaming(resident=1, device=device)
        else:
            model.enable_gradient_checkpointing(interval=1)
            model.to(device)
        if compiled:
            model.compile_blocks()
        return model, params

    cpu_batches = _batches(S2VTransformer3DModel.from_pretrained(tiny_model_dir))
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in cpu_batches]
    runs = {}
    for stream in (False, True):
        model, params = build(stream)
        runs[stream] = [_loss_and_grads(model, b, params, autocast=False) for b in batches]
    streamer, store = model._streamer, model._host_store
    assert streamer.slab.pinned and len(store._slots) == len(model.blocks) - 2
    assert all(slot.pinned for slot in store._slots)
    int8 = [m for m in model.blocks[1:].modules() if isinstance(m, Int8Linear)]
    assert int8 and all(_in(streamer.slab, m.weight_q) for m in int8)  # back in the slab after the step
    tol = dict(rtol=1e-4, atol=1e-6) if compiled else dict(rtol=0, atol=1e-6)
    for (ref_loss, ref_grads), (loss, grads) in zip(runs[False], runs[True]):
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for a, b in zip(ref_grads, grads):
            torch.testing.assert_close(b, a, **tol)
