"""Issue 16: `lora.init_from`, a new run that starts from an existing LoRA file (peft or native layout).

On the tiny model (CPU): the run starts from exactly the file's weights with a fresh optimizer; a file that does not
fit the [lora] settings is refused in the check phase naming the file, the key and the fix; a resumed run never
reads the file, and another file on a trained run is refused like any other change.
"""
from __future__ import annotations

import pytest
import torch

from engine.config import check_config, with_value
from engine.models.lora import get_lora_state, load_lora, lora_metadata, native_reference_modules, save_lora
from engine.train.init_lora import init_from_file_errors
from test_run_folder_faults import one_line, train
from test_train_run import _config, _kinds


def _lora_file(tiny_model_dir, tmp_path, layout: str, rank: int = 8, **overrides):
    """A LoRA file of random weights (lora_B not zero, unlike a fresh adapter) for the tiny model; returns the path
    and its canonical state."""
    from engine.runner import _load_model

    config = _config(tiny_model_dir, tmp_path, lora__rank=rank, lora__alpha=float(rank), **overrides)
    model = _load_model(config, torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    state = get_lora_state(model)
    lo = config.lora
    meta = lora_metadata("tiny", lo.rank, lo.alpha, 40, "hash", layout, list(lo.targets))
    path = save_lora(tmp_path / f"start_r{rank}_{layout}.safetensors", state, layout, meta, lo.alpha,
                     native_reference_modules(model))
    return path, state


@pytest.mark.parametrize("layout", ["peft", "native"])
def test_a_new_run_starts_from_exactly_the_weights_of_the_file(tiny_model_dir, tmp_path, monkeypatch, layout):
    from engine.train.loop import Trainer

    path, weights = _lora_file(tiny_model_dir, tmp_path, layout)
    at_start, real = {}, Trainer.run

    def run(self):
        at_start.update(lora=get_lora_state(self.model), optimizer_state=len(self.optimizer.state),
                        scheduled=self.scheduler.last_epoch, step=self.step)
        return real(self)

    monkeypatch.setattr(Trainer, "run", run)
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2, lora__init_from=str(path))
    end = train(config, tmp_path / "run")
    assert end.status == "completed", end.reason
    assert at_start["lora"].keys() == weights.keys()
    assert all(torch.equal(at_start["lora"][k], weights[k]) for k in weights)
    assert at_start["optimizer_state"] == 0 and at_start["scheduled"] == 0 and at_start["step"] == 0  # fresh
    assert f"LoRA initialised from {path} ({layout} layout, trained 40 steps)" in (tmp_path / "run" / "train.log").read_text()
    trained, meta = load_lora(end.outputs["peft"])
    assert any(not torch.equal(trained[k], weights[k]) for k in weights)  # and it trained on from there
    assert meta["init_from"] == str(path)


def _refused_in_the_check_phase(end, run_dir) -> str:
    assert end.status == "failed"
    phases = [e.phase for e in _kinds(run_dir, "phase_changed")]
    assert phases == ["check"], phases  # before the cache, before any weight is loaded
    return one_line(end.reason)


def test_a_rank_mismatch_is_refused_naming_the_file_the_key_and_the_fix(tiny_model_dir, tmp_path):
    path, _ = _lora_file(tiny_model_dir, tmp_path, "native", rank=4)
    config = _config(tiny_model_dir, tmp_path, lora__init_from=str(path))  # rank 8, alpha 8
    reason = _refused_in_the_check_phase(train(config, tmp_path / "run"), tmp_path / "run")
    assert "lora.rank: is 8, but the LoRA of lora.init_from" in reason and str(path) in reason
    assert "has rank 4" in reason and "fix: set lora.rank = 4 and lora.alpha = 4" in reason


def test_an_alpha_mismatch_is_refused(tiny_model_dir, tmp_path):
    path, _ = _lora_file(tiny_model_dir, tmp_path, "peft")
    config = _config(tiny_model_dir, tmp_path, lora__init_from=str(path), lora__alpha=16.0)
    reason = _refused_in_the_check_phase(train(config, tmp_path / "run"), tmp_path / "run")
    assert "lora.alpha: is 16" in reason and "has alpha 8" in reason and "fix: set lora.alpha = 8" in reason


def test_targets_that_do_not_fit_the_file_are_refused_with_the_files_own(tiny_model_dir, tmp_path):
    path, _ = _lora_file(tiny_model_dir, tmp_path, "peft")
    only_self_attention = [r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)"]
    config = _config(tiny_model_dir, tmp_path, lora__init_from=str(path), lora__targets=only_self_attention)
    reason = _refused_in_the_check_phase(train(config, tmp_path / "run"), tmp_path / "run")
    assert "lora.targets: do not fit the LoRA of lora.init_from" in reason and "lora.targets do not match" in reason
    assert "fix: set lora.targets = [" in reason and "the targets the file was trained with" in reason


@pytest.mark.parametrize("what", ["missing", "not a LoRA"])
def test_a_file_that_is_not_a_lora_is_refused_by_the_rule(tiny_model_dir, tmp_path, what):
    target = tmp_path / "nothing.safetensors"
    if what == "not a LoRA":
        target = next((tiny_model_dir / "transformer").glob("*.safetensors"))  # the base weights
    config = _config(tiny_model_dir, tmp_path, lora__init_from=str(target))
    errors = [e for e in init_from_file_errors(config, "my.toml") if e.key == "lora.init_from"]
    assert len(errors) == 1 and str(target) in str(errors[0]) and "fix: point it at a LoRA file" in str(errors[0])
    assert ("does not exist" if what == "missing" else "not a LoRA") in str(errors[0])
    assert not check_config(config, "my.toml")  # only a run about to start fresh asks for the file
    reason = _refused_in_the_check_phase(train(config, tmp_path / "run"), tmp_path / "run")
    assert "lora.init_from" in reason and str(target) in reason


def test_a_resume_never_reads_the_file_and_another_file_is_refused(tiny_model_dir, tmp_path):
    first, _ = _lora_file(tiny_model_dir, tmp_path, "peft")
    other, _ = _lora_file(tiny_model_dir, tmp_path, "native")
    config = _config(tiny_model_dir, tmp_path, optim__max_steps=2, checkpoint__every_steps=0,
                     lora__init_from=str(first))
    run_dir = tmp_path / "run"
    assert train(config, run_dir).status == "completed"
    assert with_value(config, "lora.init_from", str(other)).identity_hash() != config.identity_hash()

    end = train(with_value(config, "lora.init_from", str(other)), run_dir)
    assert end.status == "refused" and "lora.init_from" in end.reason and str(other) in end.reason

    first.unlink()  # the checkpoint holds the LoRA now: the file is not needed to go on
    end = train(with_value(config, "optim.max_steps", 4), run_dir)
    assert end.status == "completed", end.reason
    assert _kinds(run_dir, "run_started")[-1].resumed_from_step == 2
