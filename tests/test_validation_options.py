"""Validation and sampling options on the tiny model (CPU): LoRA strength (0 = the base model, restored after),
the configured negative prompt and chunk count reaching the sampler's conditions, `s2v-tui sample --lora-scale`."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import with_value
from engine.infer.sampler import SampleOptions, lora_scaled
from s2v_tui.commands.demo import demo_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image

    from engine.data.synth import speech_audio, write_audio_file

    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8)).save(d / "face.png")
    write_audio_file(d / "long.wav", speech_audio(5.2, seed=1), 16000)
    return d


@pytest.fixture(scope="module")
def lora_pipe(tiny_model_dir):
    """The tiny model in fp32 with a LoRA whose weights change the output (B is not zero)."""
    from engine.infer import S2VPipeline
    from engine.models.lora import add_lora

    pipe = S2VPipeline.load(tiny_model_dir, "cpu", "fp32")
    add_lora(pipe.model, 4, 4.0, 0.0, [r"blocks\.\d+\.attn1\.to_q", r"blocks\.\d+\.attn2\.to_v"], "default", 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return pipe


def _scalings(model) -> list[dict]:
    return [dict(m.scaling) for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)]


def test_lora_scale_zero_renders_the_base_model_and_the_scale_is_restored(lora_pipe, inputs):
    pipe = lora_pipe
    cond = pipe.prepare(inputs / "face.png", inputs / "long.wav", "a man talks", max_area=64 * 64, max_chunks=1)
    options = SampleOptions(steps=2, solver="euler", seed=3)
    before = _scalings(pipe.model)
    assert before and all(v == 1.0 for s in before for v in s.values())  # alpha / rank = 4 / 4
    pipe.model.disable_adapters()
    try:
        base = pipe.render(cond, options)
    finally:
        pipe.model.enable_adapters()
    full = pipe.render(cond, options)
    zero = pipe.render(cond, SampleOptions(steps=2, solver="euler", seed=3, lora_scale=0.0))
    half = pipe.render(cond, SampleOptions(steps=2, solver="euler", seed=3, lora_scale=0.5))
    assert torch.equal(zero, base)
    assert not torch.equal(full, base) and not torch.equal(half, full) and not torch.equal(half, base)
    assert _scalings(pipe.model) == before  # restored exactly, also after an exception inside the block
    with pytest.raises(RuntimeError), lora_scaled(pipe.model, 3.0):
        raise RuntimeError("boom")
    assert _scalings(pipe.model) == before


def test_negative_prompt_and_chunks_reach_the_validation_conditions(tiny_model_dir, inputs, tmp_path):
    from engine.infer import NEGATIVE_PROMPT
    from engine.train.validation import prepare_validation

    config = demo_config(tiny_model_dir, tmp_path / "runs")
    config = with_value(config, "validation.cases", [{"reference": str(inputs / "face.png"),
                                                      "audio": str(inputs / "long.wav"), "prompt": "a man talks"}])
    assert config.validation.negative_prompt == NEGATIVE_PROMPT and config.validation.chunks == 1
    default = prepare_validation(config, torch.device("cpu")).cases[0]
    mine = prepare_validation(with_value(with_value(config, "validation.negative_prompt", "blurry"),
                                         "validation.chunks", 2), torch.device("cpu"))
    cond = mine.cases[0]
    assert default.chunks == 1 and cond.chunks == 2  # the 5.2 s of audio hold two chunks
    assert torch.equal(cond.text, default.text)
    assert not torch.equal(cond.text_negative, default.text_negative)
    # It is the encoding of exactly the configured words.
    from engine.infer import FrozenParts, S2VPipeline

    parts = FrozenParts.load(tiny_model_dir, torch.device("cpu"))
    assert torch.equal(cond.text_negative, S2VPipeline(None, parts, "cpu").encode_prompt("blurry"))


def test_config_rules_for_the_validation_keys(tiny_model_dir, tmp_path):
    from engine.config import check_config

    config = demo_config(tiny_model_dir, tmp_path / "runs")
    keys = lambda c: {e.key for e in check_config(c)}
    assert "validation.chunks" in keys(with_value(config, "validation.chunks", 0))
    assert "validation.lora_scales[2]" in keys(with_value(config, "validation.lora_scales", [0.5, 1.0, 0.50]))
    assert not keys(with_value(config, "validation.lora_scales", [0.0, 0.5, 1.5]))


def test_sample_command_refuses_a_non_finite_lora_scale(inputs, tmp_path, capsys):
    from s2v_tui.commands.sample import main

    rc = main(["--model", "x", "--image", str(inputs / "face.png"), "--audio", str(inputs / "long.wav"),
               "--prompt", "p", "--out", str(tmp_path / "o.mp4"), "--lora-scale", "nan"])
    assert rc == 2 and "--lora-scale" in capsys.readouterr().err


def _frames(path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def test_sample_command_lora_scale_zero_is_the_base_model(lora_pipe, tiny_model_dir, inputs, tmp_path, capsys):
    from engine.models.lora import get_lora_state, lora_metadata, save_lora
    from s2v_tui.commands.sample import main

    targets = [r"blocks\.\d+\.attn1\.to_q", r"blocks\.\d+\.attn2\.to_v"]
    lora = save_lora(tmp_path / "l_peft.safetensors", get_lora_state(lora_pipe.model), "peft",
                     lora_metadata(str(tiny_model_dir), 4, 4.0, 1, "0" * 16, "peft", targets), 4.0)
    common = ["--model", str(tiny_model_dir), "--image", str(inputs / "face.png"), "--audio", str(inputs / "long.wav"),
              "--prompt", "a man talks", "--device", "cpu", "--steps", "2", "--size", "64x64", "--max-chunks", "1",
              "--solver", "euler"]
    outs = {}
    for name, extra in (("base", []), ("zero", ["--lora", str(lora), "--lora-scale", "0"]),
                        ("full", ["--lora", str(lora)])):
        outs[name] = tmp_path / f"{name}.mp4"
        assert main([*common, *extra, "--out", str(outs[name])]) == 0, capsys.readouterr().err
    base, zero, full = (_frames(outs[n]) for n in ("base", "zero", "full"))
    assert len(base) == len(zero) and all(np.array_equal(a, b) for a, b in zip(base, zero))
    assert not all(np.array_equal(a, b) for a, b in zip(base, full))
    assert "LoRA at 0" in capsys.readouterr().err
