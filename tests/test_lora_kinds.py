"""LoRA kinds (lora.kind): DoRA, LoHa and LoKr next to plain LoRA, on the tiny model (CPU).

The native files are checked against ComfyUI's published formulas (comfy/weight_adapter/lora.py, loha.py,
lokr.py and base.py's weight_decompose), written out again here from those formulas, not from our export code:
a file that ComfyUI would apply differently from the model we trained fails here.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.models.keymap import diffusers_to_native
from engine.models.lora import (NATIVE_PREFIX, add_lora, apply_lora_file, base_weight_reader, get_lora_state,
                                load_lora, lora_bytes, lora_metadata, lora_parameter_names, native_reference_modules)
from engine.models.s2v_transformer import S2VTransformer3DModel

TARGETS = [r"blocks\.\d+\.attn1\.(to_q|to_out\.0)", r"audio_injector\.injector\.\d+\.to_v"]
MODULE = "blocks.1.attn1.to_q"


def _model(model_dir):
    return S2VTransformer3DModel.from_pretrained(model_dir, subfolder="transformer").eval()


def _trained_adapter(model_dir, kind, rank, alpha):
    """A model with an adapter of `kind` whose weights are all non-trivial (as after training: no zero factor,
    DoRA magnitudes away from the row norms), drawn from a fixed seed."""
    model = _model(model_dir)
    add_lora(model, rank, alpha, 0.0, TARGETS, "default", seed=0, kind=kind)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if "magnitude" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _write(model, kind, rank, alpha, layout, path):
    state = get_lora_state(model)
    meta = lora_metadata("tiny", rank, alpha, 1, "hash", layout, TARGETS, kind=kind)
    path.write_bytes(lora_bytes(state, layout, meta, alpha, native_reference_modules(model), base_weight_reader(model)))
    return path


def _native_tensors(path, module):
    prefix = f"{NATIVE_PREFIX}{diffusers_to_native(module)}."
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 - a safe_open handle is not iterable


def comfyui_weight(w: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The patched weight ComfyUI computes from one module's native keys `t` (strength 1, fp32 working copy)."""
    w = w.float()
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = up @ down
    elif "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        diff = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    else:
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim = t["lokr_w1_b"].shape[0]
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim = t["lokr_w2_b"].shape[0]
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2)
    diff = diff.reshape(w.shape)
    if "dora_scale" not in t:
        return w + scale * diff
    # weight_decompose, dora_scale of shape [out, 1] (the output axis): the norm is the base row's plus eps.
    dora = t["dora_scale"].float()
    assert dora.shape == (w.shape[0], 1)
    norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    return (w + scale * diff) * (dora / norm)


CASES = [("lora", 2, 3.0), ("dora", 2, 3.0), ("loha", 2, 3.0), ("lokr", 2, 3.0),
         ("lokr", 8, 12.0)]  # rank 8 keeps both LoKr sides of a 48-wide layer whole: ComfyUI then ignores alpha


@pytest.mark.parametrize(("kind", "rank", "alpha"), CASES)
def test_native_file_applied_by_the_comfyui_formula_gives_the_trained_layer(tiny_model_dir, tmp_path, kind, rank,
                                                                            alpha):
    model = _trained_adapter(tiny_model_dir, kind, rank, alpha)
    path = _write(model, kind, rank, alpha, "native", tmp_path / "native.safetensors")
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))
    checked = 0
    for name, layer in model.named_modules():
        if not hasattr(layer, "base_layer") or name.endswith("base_layer"):
            continue
        base = layer.get_base_layer()
        patched = comfyui_weight(base.weight.detach(), _native_tensors(path, name))
        with torch.no_grad():
            expected = layer(x[..., : base.in_features])
        got = F.linear(x[..., : base.in_features], patched, base.bias)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, base(x[..., : base.in_features]), atol=1e-3)  # the adapter acts
        checked += 1
    assert checked == 10  # 4 blocks x 2 self-attention modules + 2 audio injectors


@pytest.mark.parametrize(("kind", "rank", "alpha"), CASES)
def test_both_layouts_reload_to_the_trained_outputs(tiny_model_dir, tmp_path, kind, rank, alpha):
    model = _trained_adapter(tiny_model_dir, kind, rank, alpha)
    state = get_lora_state(model)
    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(3))
    for layout in ("peft", "native"):
        path = _write(model, kind, rank, alpha, layout, tmp_path / f"{layout}.safetensors")
        _, meta = load_lora(path)
        assert meta["lora_kind"] == kind and meta["layout"] == layout
        fresh = _model(tiny_model_dir)
        apply_lora_file(fresh, path)
        reloaded = get_lora_state(fresh)
        assert reloaded.keys() == state.keys()
        if layout == "peft":  # the same tensors, bit for bit
            assert all(torch.equal(reloaded[k], v) for k, v in state.items())
        for name in (MODULE, "audio_injector.injector.0.to_v"):
            with torch.no_grad():
                torch.testing.assert_close(fresh.get_submodule(name)(x), model.get_submodule(name)(x),
                                           rtol=1e-5, atol=1e-6)


# ---- runs through the runner -----------------------------------------------------------------------------------
def _run_config(model_dir, tmp_path, kind, **overrides):
    from engine.config import with_value
    from s2v_tui.commands.demo import demo_config

    settings = {"optim.warmup_steps": 0, "lora.kind": kind, "lora.rank": 2, "lora.alpha": 4.0, **overrides}
    config = demo_config(model_dir, tmp_path / "runs")
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def _run(config, run_dir, stop=None, subscribers=()):
    import threading

    from engine.runner import run
    from engine.train.synthetic import SyntheticLatentDataset

    return run(config, list(subscribers), stop or threading.Event(), run_dir=run_dir,
               dataset=SyntheticLatentDataset(2), device="cpu")


def _step_losses(run_dir) -> dict[int, float]:
    from engine.event_log import read_events
    from engine.events import EVENTS_FILENAME

    return {e.step: e.loss for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "step_end"}


def _reloads_agree(model_dir, run_dir, end, kind):
    """The final export in the peft layout holds the final checkpoint's adapter bit for bit, and both layouts,
    applied to a fresh base model (as `s2v-tui sample --lora` does), give the same layer outputs."""
    from engine.train.checkpoint import find_resume_state

    final, _, _ = find_resume_state(run_dir)
    peft_state, meta = load_lora(end.outputs["peft"])
    assert meta["lora_kind"] == kind and peft_state.keys() == final["lora"].keys()
    assert all(torch.equal(peft_state[k], v) for k, v in final["lora"].items())
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    outputs = {}
    for layout in ("peft", "native"):
        model = _model(model_dir)
        assert apply_lora_file(model, end.outputs[layout])["lora_kind"] == kind
        with torch.no_grad():
            outputs[layout] = [model.get_submodule(n)(x) for n in
                               ("blocks.0.attn1.to_q", "blocks.3.attn2.to_out.0", "audio_injector.injector.1.to_k")]
        base = _model(model_dir)
        assert not torch.allclose(outputs[layout][0], base.get_submodule("blocks.0.attn1.to_q")(x), atol=1e-4)
    for a, b in zip(outputs["peft"], outputs["native"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_lokr_run_trains_resumes_bit_for_bit_and_reloads_in_both_layouts(tiny_model_dir, tmp_path):
    import threading

    config = _run_config(tiny_model_dir, tmp_path, "lokr", **{"optim.max_steps": 40, "checkpoint.every_steps": 16})
    reference = _run(config, tmp_path / "ref")
    assert reference.status == "completed", reference.reason
    losses = [loss for _, loss in sorted(_step_losses(tmp_path / "ref").items())]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, f"loss {first:.3f} -> {last:.3f}"

    stop = threading.Event()

    def stop_at_21(event):
        if event.kind == "step_end" and event.step == 21:
            stop.set()

    stopped = _run(config, tmp_path / "resumed", stop, [stop_at_21])
    assert stopped.status == "stopped"
    resumed = _run(config, tmp_path / "resumed")
    assert resumed.status == "completed", resumed.reason
    assert _step_losses(tmp_path / "resumed") == _step_losses(tmp_path / "ref")
    a, _ = load_lora(reference.outputs["peft"])
    b, _ = load_lora(resumed.outputs["peft"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".lokr_w2_a") for k in a)  # rank 2 < 8 / 2: the Kronecker side w2 is factorised
    _reloads_agree(tiny_model_dir, tmp_path / "ref", reference, "lokr")


@pytest.mark.parametrize("kind", ["dora", "loha"])
def test_dora_and_loha_runs_train_export_and_reload(tiny_model_dir, tmp_path, kind):
    config = _run_config(tiny_model_dir, tmp_path, kind, **{"optim.max_steps": 12, "checkpoint.every_steps": 0})
    end = _run(config, tmp_path / kind)
    assert end.status == "completed", end.reason
    losses = [loss for _, loss in sorted(_step_losses(tmp_path / kind).items())]
    assert sum(losses[-4:]) < sum(losses[:4])
    _reloads_agree(tiny_model_dir, tmp_path / kind, end, kind)


# ---- which memory switches each kind combines with -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_peft_layers_of_the_other_kinds_cannot_wrap_a_low_bit_linear(tiny_model_dir, kind):
    """Why setting_problems refuses them with base_weights = fp8/int8: peft's DoRA, LoHa and LoKr layers read
    `base_layer.weight` in the forward, which a low-bit Linear does not have (plain LoRA does not)."""
    from engine.models.low_bit_linear import Int8Linear, quantize_base_linears

    model = _trained_adapter(tiny_model_dir, kind, 2, 4.0)
    assert quantize_base_linears(model, kind="int8") > 0
    layer = model.get_submodule(MODULE)
    assert isinstance(layer.get_base_layer(), Int8Linear)
    with pytest.raises(AttributeError, match="weight"):
        layer(torch.randn(2, 48))
    fresh = _model(tiny_model_dir).requires_grad_(False)
    quantize_base_linears(fresh, kind="int8")
    with pytest.raises(ValueError, match="base_weights"):
        add_lora(fresh, 2, 4.0, 0.0, TARGETS, "default", 0, kind=kind)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_block_streaming_trains_every_kind_bitwise_like_resident_blocks(tiny_model_dir, kind):
    """The streamer moves the frozen base tensors (DoRA's forward reads the base weight: it is in place while its
    block computes, in the forward and in the recompute); the adapter stays put. CPU path, bitwise."""
    from test_low_bit import tiny_batch  # tests/ is on sys.path under pytest

    def loss_and_grads(model):
        params = [p for p in model.parameters() if p.requires_grad]
        loss = model(**tiny_batch(model)).float().square().mean()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    reference = _trained_adapter(tiny_model_dir, kind, 2, 4.0).train()
    reference.enable_gradient_checkpointing(interval=1)
    streamed = _trained_adapter(tiny_model_dir, kind, 2, 4.0).train()
    streamed.enable_gradient_checkpointing(interval=1)
    streamed.enable_block_streaming(resident=1, device=torch.device("cpu"))
    (ref_loss, ref_grads), (loss, grads) = loss_and_grads(reference), loss_and_grads(streamed)
    assert loss == ref_loss and len(grads) == len(ref_grads)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def test_the_kinds_refuse_the_settings_they_cannot_honour(tiny_model_dir, tmp_path):
    from engine.config import check_config, with_value
    from engine.train.allowed import setting_problems

    def keys(kind, **settings):
        config = _run_config(tiny_model_dir, tmp_path, kind, **settings)
        return {e.key: str(e) for e in check_config(config)}

    assert "lora.dropout" in keys("loha", **{"lora.dropout": 0.1})
    assert "lora.dropout" not in keys("dora", **{"lora.dropout": 0.1})
    assert "lora.init" in keys("lokr", **{"lora.init": "gaussian"})
    assert "lora.init" not in keys("dora", **{"lora.init": "gaussian"})
    assert "validation.lora_scale" in keys("dora", **{"validation.lora_scale": 0.5})
    assert "validation.lora_scales" in keys("dora", **{"validation.lora_scales": [0.5, 1.0]})
    assert keys("loha", **{"validation.lora_scale": 0.5}) == {}

    for kind in ("lora", "dora", "loha", "lokr"):
        config = with_value(_run_config(tiny_model_dir, tmp_path, kind), "memory.base_weights", "int8")
        problems = [p for p in setting_problems(config) if "lora.kind" in p]
        assert bool(problems) == (kind != "lora"), problems
        fsdp = with_value(_run_config(tiny_model_dir, tmp_path, kind), "distributed.strategy", "fsdp")
        assert any("lora.kind = \"dora\"" in p for p in setting_problems(fsdp, world_size=2)) == (kind == "dora")


def test_a_dora_at_another_strength_is_refused_and_a_loha_at_strength_0_is_the_base(tiny_model_dir):
    from engine.infer.sampler import lora_scaled

    x = torch.randn(2, 48, generator=torch.Generator().manual_seed(6))
    loha = _trained_adapter(tiny_model_dir, "loha", 2, 4.0)
    base = _model(tiny_model_dir).get_submodule(MODULE)
    with torch.no_grad(), lora_scaled(loha, 0.0):
        torch.testing.assert_close(loha.get_submodule(MODULE)(x), base(x))
    dora = _trained_adapter(tiny_model_dir, "dora", 2, 4.0)
    with pytest.raises(ValueError, match="DoRA"), lora_scaled(dora, 0.5):
        pass


@pytest.mark.parametrize("layout", ["peft", "native"])
def test_init_from_starts_a_lokr_run_from_either_layout_and_refuses_another_kind(tiny_model_dir, tmp_path, layout):
    from engine.config import ConflictError, with_value
    from engine.runner import _load_model
    from engine.train.init_lora import check_init_from

    source = _trained_adapter(tiny_model_dir, "lokr", 2, 4.0)
    path = _write(source, "lokr", 2, 4.0, layout, tmp_path / f"start_{layout}.safetensors")
    config = _run_config(tiny_model_dir, tmp_path, "lokr", **{"lora.targets": TARGETS, "lora.init_from": str(path)})
    check_init_from(config)
    started = get_lora_state(_load_model(config, torch.device("cpu"), fresh=True))
    expected = get_lora_state(source)
    assert started.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0)  # w2 is factorised: nothing folded
    with pytest.raises(ConflictError, match="lora.kind"):
        check_init_from(with_value(config, "lora.kind", "loha"))
    with pytest.raises(ConflictError, match="lora.rank: is 4, but .* has rank 2"):
        check_init_from(with_value(config, "lora.rank", 4))


def test_init_from_refuses_a_lokr_of_another_factorisation_by_module_and_shape(tiny_model_dir, tmp_path):
    from engine.config import BadValueError
    from engine.train.init_lora import check_init_from

    state = get_lora_state(_trained_adapter(tiny_model_dir, "lokr", 2, 4.0))
    state[f"{MODULE}.lokr_w1"] = torch.zeros(4, 3)  # 48 = 4 * 12 and 3 * 16: another factorisation's w1
    path = tmp_path / "other.safetensors"
    path.write_bytes(lora_bytes(state, "peft", lora_metadata("tiny", 2, 4.0, 1, "h", "peft", TARGETS, kind="lokr"),
                                4.0))
    config = _run_config(tiny_model_dir, tmp_path, "lokr", **{"lora.targets": TARGETS, "lora.init_from": str(path)})
    with pytest.raises(BadValueError, match=rf"the lokr of {re.escape(MODULE)} has shapes .*'lokr_w1': \(4, 3\)"):
        check_init_from(config)


# ---- the 14B model ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_native_keys_of_every_kind_on_the_14b_model_map_onto_the_manifest(kind):
    from engine.config import DEFAULT_LORA_TARGETS
    from engine.memory import adapter_params
    from engine.models.lora import check_native_keys, lora_parameters, native_key_names

    with torch.device("meta"):
        model = S2VTransformer3DModel()
    modules = add_lora(model, 16, 16.0, 0.0, list(DEFAULT_LORA_TARGETS), "default", 0, kind=kind)
    assert len(modules) == 368
    state = {name: p for name, p in zip(lora_parameter_names(model), lora_parameters(model), strict=True)}
    keys = native_key_names(state)
    check_native_keys(keys, native_reference_modules(model))  # the 14B manifest
    per_module = {"dora": 4, "loha": 5, "lokr": 4}[kind]  # dora: down, up, dora_scale, alpha; lokr: w1, w2_a, w2_b
    assert len(keys) == per_module * 368
    assert sum(p.numel() for p in lora_parameters(model)) == adapter_params(kind, 16)  # the memory model's count


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_the_memory_model_counts_the_parameters_peft_builds_at_any_rank(kind):
    import math

    from engine.memory import LORA_MODULES, adapter_params
    from engine.models.lora_kinds import adapter_shapes

    for rank in (1, 4, 16, 39, 40, 64):
        shapes = adapter_shapes(kind, rank, 5120, 5120)
        expected = LORA_MODULES * sum(math.prod(s) for p, s in shapes.items() if p != "dora_scale")
        assert adapter_params(kind, rank) == expected, rank
