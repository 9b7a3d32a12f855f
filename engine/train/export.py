"""The LoRA files a run writes, built by one function so that they all carry the same metadata and layouts:

    RUN/NAME_LAYOUT.safetensors                      the final export
    RUN/checkpoints/step-N_LAYOUT.safetensors        each checkpoint's (engine.train.checkpoint writes them)
    RUN/NAME_emergency_stepN_LAYOUT.safetensors      the save after a CUDA out-of-memory error

one file per layout of `output.formats`. The weights are the ones Trainer.export_weights gives: the EMA average
when optim.ema is on, a schedule-free optimizer's evaluation weights, else the trained weights; the header's
`weights` key says which (and `ema` whether the EMA was on), beside the base model, rank, alpha, targets, steps,
config hash and run identity.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from engine.config import Config
from engine.fsio import FIXES, atomic_write_bytes, write_error_cause
from engine.models.lora import lora_bytes, lora_metadata

log = logging.getLogger(__name__)


class ExportFailed(RuntimeError):
    """The final export could not be written; the message says so and where the trained state is safe."""


def lora_files(config: Config, weights: Mapping[str, torch.Tensor], kind: str, modules: frozenset[str],
               step: int, config_hash: str, base_weight=None) -> dict[str, bytes]:
    """layout -> the bytes of the LoRA file of `weights` (named `kind`: "ema", "trained" or "schedulefree_eval")
    at `step`, for every layout of output.formats; `modules` are the native module names the keys are checked
    against (engine.models.lora.native_reference_modules); `base_weight` (module -> base weight) is what a
    native DoRA file is computed against (engine.models.lora.base_weight_reader)."""
    lo = config.lora
    extra = {"ema": str(kind == "ema"), "weights": kind, "identity": config.identity_hash()}
    if lo.init_from:
        extra["init_from"] = lo.init_from
    files = {}
    for layout in config.output.formats:
        meta = lora_metadata(config.model.source, lo.rank, lo.alpha, step, config_hash, layout, list(lo.targets),
                             extra, kind=lo.kind)
        files[layout] = lora_bytes(weights, layout, meta, lo.alpha, modules, base_weight)
    return files


def export_final(config: Config, trainer, run_dir: Path, config_hash: str) -> dict[str, str]:
    """Write the final export of a finished run (every rank calls it: gathering a sharded LoRA is collective);
    returns layout -> path on rank 0. An earlier export at the same path from another step or configuration is
    kept aside first (keep_previous_export). Raises ExportFailed."""
    weights, kind = trainer.export_weights()
    if not trainer.dist.is_main:
        return {}  # rank 0 writes the files
    identity = config.identity_hash()
    outputs = {}
    for layout, blob in lora_files(config, weights, kind, trainer.native_modules, trainer.step,
                                   config_hash, trainer.base_weight).items():
        path = run_dir / f"{config.output.name}_{layout}.safetensors"
        keep_previous_export(path, trainer.step, identity)
        try:
            atomic_write_bytes(path, blob)
        except OSError as exc:
            raise ExportFailed(_export_failure(path, exc, trainer)) from exc
        outputs[layout] = str(path)
        log.info("exported the LoRA (%s layout) to %s", layout, path)
    return outputs


def _export_failure(path: Path, exc: OSError, trainer) -> str:
    cause, text = write_error_cause(exc)
    saved = trainer.last_checkpoint
    return (f"training finished but the LoRA could not be exported to {path}: {text} ({FIXES[cause]}). The trained "
            f"state is safe in the checkpoint of step {trainer.step} ({saved}), with its LoRA files beside it: run "
            "the same command again to export it")


def keep_previous_export(path: Path, step: int, identity: str) -> None:
    """An export already at `path` from another step or configuration (a continued run's earlier end) is moved
    to NAME.stepN[.HASH].safetensors beside it: an export never overwrites trained state it did not make."""
    from safetensors import safe_open

    if not path.exists():
        return
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # unreadable header: keep the file aside rather than judge it
        meta = {}
    if meta.get("identity") == identity and meta.get("steps") == str(step):
        return  # the same LoRA written again (an export retried after a failure)
    aside = path.with_name(f"{path.stem}.step{meta.get('steps', 'unknown')}{path.suffix}")
    if aside.exists():
        aside = aside.with_name(f"{aside.stem}.{meta.get('identity') or meta.get('config_hash', 'other')}{path.suffix}")
    path.replace(aside)
    log.info("kept the earlier export %s as %s", path.name, aside.name)


def emergency_paths(config: Config, run_dir: Path, step: int) -> dict[str, Path]:
    return {layout: run_dir / f"{config.output.name}_emergency_step{step}_{layout}.safetensors"
            for layout in config.output.formats}
