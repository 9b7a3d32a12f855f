"""LoRA files users sample with: both export layouts re-load (apply_lora_file on a fresh base model) to identical
weights and an identical model output; keys outside the model are refused at save time in both layouts."""
from __future__ import annotations

import pytest
import torch

from engine.models.lora import (LoraFileError, add_lora, apply_lora_file, get_lora_state, lora_metadata,
                                native_reference_modules, save_lora)


def _base(model_dir):
    from engine.models.s2v_transformer import S2VTransformer3DModel

    return S2VTransformer3DModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([600.0]),
                encoder_hidden_states=torch.randn(1, 512, 32, generator=g),
                ref_latents=torch.randn(1, 16, 1, 8, 8, generator=g), audio_features=torch.randn(1, 3, 32, 8, generator=g),
                drop_motion_frames=True)


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A LoRA with non-trivial weights on the default targets, alpha != rank so the scale matters."""
    from engine.config.schema import DEFAULT_LORA_TARGETS

    model = _base(tiny_model_dir)
    add_lora(model, 4, 2.0, 0.0, list(DEFAULT_LORA_TARGETS), "default", seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    with torch.no_grad():
        reference = model(**_inputs())
    return model, reference


@pytest.mark.parametrize("layout", ["peft", "native"])
def test_exported_layout_reloads_to_identical_weights_and_output(trained, tiny_model_dir, tmp_path, layout):
    model, reference = trained
    state = get_lora_state(model)
    meta = lora_metadata("tiny", 4, 2.0, 10, "hash", layout, ["x"])
    path = save_lora(tmp_path / f"l_{layout}.safetensors", state, layout, meta, 2.0,
                     native_reference_modules(model))
    fresh = _base(tiny_model_dir)
    with torch.no_grad():
        base_out = fresh(**_inputs())
    loaded_meta = apply_lora_file(fresh, path)
    assert float(loaded_meta["alpha"]) == 2.0 and loaded_meta["layout"] == layout
    again = get_lora_state(fresh)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    with torch.no_grad():
        out = fresh(**_inputs())
    assert torch.equal(out, reference) and not torch.allclose(base_out, reference)


def test_a_module_outside_the_model_is_refused_in_both_layouts(trained, tmp_path):
    model, _ = trained
    state = dict(get_lora_state(model))
    state["blocks.99.attn1.to_q.lora_A.weight"] = torch.zeros(4, 48)
    state["blocks.99.attn1.to_q.lora_B.weight"] = torch.zeros(48, 4)
    for layout in ("peft", "native"):
        with pytest.raises(LoraFileError, match="blocks.99"):
            save_lora(tmp_path / f"bad_{layout}.safetensors", state, layout, {}, 2.0, native_reference_modules(model))
        assert not (tmp_path / f"bad_{layout}.safetensors").exists()


def test_a_lora_of_another_model_is_refused_by_name(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, 48),
               "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(48, 4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LoraFileError, match="another model"):
        apply_lora_file(_base(tiny_model_dir), tmp_path / "other.safetensors")
