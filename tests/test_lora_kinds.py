"""LoRA kinds (lora.kind): DoRA, LoHa and LoKr next to plain LoRA, on the tiny model (CPU).

The native files are checked against ComfyUI's published formulas (comfy/weight_adapter/lora.py, loha.py,
lokr.py and base.py's weight_decompose), written out again here from those formulas, not from our export code:
a file that ComfyUI would apply differently from the model we trained fails here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.models.keymap import diffusers_to_native
from engine.models.lora import (NATIVE_PREFIX, add_lora, apply_lora_file, base_weight_reader, get_lora_state,
                                load_lora, lora_bytes, lora_metadata, native_reference_modules)
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
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


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
