"""Which config a run folder runs with: a new run, a resume, a continuation, or a refusal before anything changes.

A run folder's trained state (checkpoints, exported LoRAs) was made by one configuration. The newest checkpoint's
digest record carries that configuration; `config.resolved.toml` is the folder's frozen copy of it. `resolve`
compares the config given now against it, by keys, with the folder's location keys (`output.run_dir`,
`output.name`, `data.cache_dir`) left out, since a copied folder or a moved cache is the same run:
- nothing trained yet (no checkpoint past step 0, no export): the given config is frozen (replacing a frozen copy
  that never trained: a corrected config after a failed start must not be held to the wrong one);
- the same configuration: the run resumes;
- only `optim.max_steps` changed, to at least the step reached: the run continues from its newest checkpoint with
  the new step count (the learning-rate schedule is re-planned over it, see engine.train.loop); memory placement
  keys (engine.config.PLACEMENT_KEYS: checkpointing, offloading, streaming, the VRAM budget) may change too, so a
  run stopped by memory resumes on another card or preset; so may the reporting keys (REPORTING_KEYS: logging,
  checkpoint interval and count, export layouts), which no tensor or random draw depends on;
- anything else: ConfigRefused lists the keys and the ways forward; nothing in the folder was touched.
A hand edit of `config.resolved.toml` counts as the request when the config given is the run's own, so editing
the frozen copy to train longer works like `--set optim.max_steps=N`; an edit that leaves it unreadable is refused
(deleting the file resumes with the newest checkpoint's settings).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.config import (CONTINUE_KEYS, FROZEN_FILENAME, LOCATION_KEYS, PLACEMENT_KEYS, REPORTING_KEYS, Config,
                           ConfigChange,
                           ConfigError, config_from_dict_tree, diff, read_frozen_config, write_frozen_config)
from engine.train import checkpoint as ckpt

log = logging.getLogger(__name__)


# What a trained run may change and still resume from its checkpoints.
RESUMABLE = frozenset((*CONTINUE_KEYS, *PLACEMENT_KEYS, *REPORTING_KEYS))
_RESUMABLE_TEXT = "the memory placement, logging, checkpoint and export settings"


class ConfigRefused(Exception):
    """The config given cannot run in this folder; the message lists the changed keys and the ways forward."""

    def __init__(self, message: str, changes: tuple[ConfigChange, ...] = ()) -> None:
        super().__init__(message)
        self.changes = changes


class FolderUnwritable(ConfigRefused):
    """The frozen config could not be written (a full or read-only disk): refused like a config, nothing changed."""


def _freeze(config: Config, run_dir: Path) -> None:
    from engine.fsio import FIXES, write_error_cause

    try:
        write_frozen_config(config, run_dir)
    except OSError as exc:  # the write is atomic: the previous copy, if any, is as it was
        cause, text = write_error_cause(exc)
        raise FolderUnwritable(
            f"cannot write {run_dir / FROZEN_FILENAME}: {text} ({FIXES[cause]}). Nothing was trained or changed; "
            "run the same command again once that is fixed") from exc


@dataclass(frozen=True)
class Resolution:
    config: Config
    action: str  # "new", "resume", "continue" or "replace"
    notes: tuple[str, ...] = field(default_factory=tuple)
    # What a face asks the user about before it starts (resolve with write=False): the keys a continuation
    # changes, and the step the folder is trained to (-1: no checkpoint).
    changes: tuple[ConfigChange, ...] = ()
    step: int = -1


def exported_loras(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*.safetensors"))


def at_location(config: Config, given: Config) -> Config:
    """`config` at the location of `given`: the folder and cache the run is started with now."""
    return replace(config, output=replace(config.output, run_dir=given.output.run_dir, name=given.output.name),
                   data=replace(config.data, cache_dir=given.data.cache_dir))


def _changes(old: Config, new: Config) -> list[ConfigChange]:
    return [c for c in diff(old, new) if c.key not in LOCATION_KEYS]


def _trained_config(run_dir: Path) -> tuple[Config | None, int]:
    """The configuration of the newest checkpoint (from its digest record) and its step; (None, step) when the
    newest has no record with a config (written before records carried one); (None, -1) without checkpoints."""
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        return None, -1
    step, path = found[0]
    record = ckpt.read_digest(path) or {}
    tree = record.get("config")
    if not isinstance(tree, dict):
        return None, step
    try:
        return config_from_dict_tree(Config, tree, lambda _key: str(ckpt.digest_path(path))), step
    except ConfigError:
        return None, step  # a record from another build's schema: fall back to the frozen copy


def _read_frozen(run_dir: Path) -> tuple[Config | None, str]:
    if not (run_dir / FROZEN_FILENAME).exists():
        return None, ""
    try:
        return read_frozen_config(run_dir), ""
    except ConfigError as exc:
        return None, str(exc)


def _describe(changes: list[ConfigChange], limit: int = 8) -> str:
    shown = [f"{c.key} {c.old!r} -> {c.new!r}" for c in changes[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(shown) + more


def free_run_name(run_dir: Path) -> str:
    """A run folder name beside `run_dir` that is not taken yet: NAME-2, NAME-3, ..."""
    n = 2
    while (run_dir.parent / f"{run_dir.name}-{n}").exists():
        n += 1
    return f"{run_dir.name}-{n}"


def resolve(given: Config, run_dir: Path, write: bool = True) -> Resolution:
    """The config this run uses in `run_dir` (writing the frozen copy when `write`); raises ConfigRefused."""
    frozen, frozen_error = _read_frozen(run_dir)
    trained, step = _trained_config(run_dir)
    # A checkpoint of step 0 holds nothing trained (a stop while the model loaded, by a build that wrote one,
    # or the host-RAM guard tripping then): it must not hold the folder to a config that never trained.
    has_state = step > 0 or bool(exported_loras(run_dir))
    if not has_state:
        notes = ()
        if frozen is not None and _changes(frozen, given):
            notes = (f"{run_dir} has no checkpoint or LoRA yet: its {FROZEN_FILENAME} is replaced by the config "
                     f"given ({_describe(_changes(frozen, given))})",)
        if write:
            _freeze(given, run_dir)
        return Resolution(given, "replace" if notes else "new", notes)

    if frozen_error and trained is not None:
        # Most likely a hand edit gone wrong (a user extending the run); restoring the file from the checkpoint
        # would throw that request away and quietly resume with the old settings.
        raise ConfigRefused(
            f"{run_dir} holds a run trained to step {max(step, 0)}, but its {FROZEN_FILENAME} cannot be read: "
            f"{frozen_error}. Nothing was changed. Fix that file (to train longer, change only optim.max_steps), "
            "or delete it to resume with the settings of the newest checkpoint")
    reference = trained or frozen
    if reference is None:
        why = f"its {FROZEN_FILENAME} is unreadable ({frozen_error})" if frozen_error else \
            f"its {FROZEN_FILENAME} is missing"
        return _resolve_unknown(given, run_dir, why, step, write)
    requested, source = given, "the config given"
    if frozen is not None and trained is not None and _changes(trained, frozen) and not _changes(trained, given):
        requested, source = at_location(frozen, given), f"the edited {FROZEN_FILENAME}"
    changes = _changes(reference, requested)
    use = at_location(reference, given)
    notes: list[str] = []
    if not changes:
        if frozen is None or _changes(frozen, use):
            notes.append(f"{FROZEN_FILENAME} restored from the newest checkpoint's record")
            if write:
                _freeze(use, run_dir)
        return Resolution(use, "resume", tuple(notes), step=step)
    if all(c.key in RESUMABLE for c in changes):
        new_steps = requested.optim.max_steps
        if new_steps < step:
            raise ConfigRefused(
                f"{run_dir} is trained to step {step}; optim.max_steps = {new_steps} ({source}) would end it before "
                f"that. Nothing was changed. Give optim.max_steps >= {step} to continue it, or set another "
                f"output.name (e.g. --set output.name={free_run_name(run_dir)}) for a new run", tuple(changes))
        use = at_location(requested, given)
        if write:
            _freeze(use, run_dir)
        placement = [c for c in changes if c.key in PLACEMENT_KEYS]
        if placement:
            notes.append(f"resuming with other memory settings ({source}): {_describe(placement)}; they change "
                         "where tensors live, not what is trained")
        reporting = [c for c in changes if c.key in REPORTING_KEYS]
        if reporting:
            notes.append(f"resuming with other logging, checkpoint or export settings ({source}): "
                         f"{_describe(reporting)}")
        if new_steps != reference.optim.max_steps and step < 0:  # only exports left: they are kept aside
            notes.append(f"no checkpoint is left in {run_dir}: training starts over, to optim.max_steps "
                         f"{new_steps} ({source}); the earlier exports are kept beside the new one")
        elif new_steps != reference.optim.max_steps:
            notes.append(f"continuing the run from step {step}: optim.max_steps {reference.optim.max_steps} -> "
                         f"{new_steps} ({source}); the learning-rate schedule is re-planned over {new_steps} steps")
        return Resolution(use, "continue", tuple(notes), tuple(changes), step)
    undo = (f"undo the edit of {run_dir / FROZEN_FILENAME}" if requested is not given else
            f"undo those changes, or run `s2v-tui --run {run_dir / FROZEN_FILENAME}`")
    raise ConfigRefused(
        f"{run_dir} already holds a run (trained to step {max(step, 0)}) with other settings than {source}: "
        f"{_describe(changes)}. Nothing was changed. To resume it, use its own settings ({undo}); to train it "
        f"longer, change only optim.max_steps (a resume may also change {_RESUMABLE_TEXT}); for a new run with "
        f"these settings, set another output.name (e.g. --set output.name={free_run_name(run_dir)})",
        tuple(changes))


def _resolve_unknown(given: Config, run_dir: Path, why: str, step: int, write: bool) -> Resolution:
    """Trained state without a readable record of its configuration (checkpoints from before records, the frozen
    copy deleted or broken): the newest checkpoint's config hash decides."""
    theirs = _checkpoint_hash(run_dir)
    if theirs is not None and theirs == given.config_hash():
        if write:
            _freeze(given, run_dir)
        return Resolution(given, "resume", (f"{FROZEN_FILENAME} rewritten from the config given, which matches the "
                                            "newest checkpoint's config hash",))
    raise ConfigRefused(
        f"{run_dir} holds trained state (checkpoints up to step {max(step, 0)} or exported LoRAs) but {why}, and "
        f"the config given (hash {given.config_hash()}) is not the one its checkpoints were written with "
        f"({theirs or 'unknown'}). Nothing was changed. Restore {FROZEN_FILENAME} from a copy of the run folder, or "
        f"set another output.name (e.g. --set output.name={free_run_name(run_dir)}) for a new run")


def _checkpoint_hash(run_dir: Path) -> str | None:
    for _, path in ckpt.list_checkpoints(run_dir):
        record = ckpt.read_digest(path)
        if record is not None:
            return str(record.get("config_hash"))
        try:
            return str(ckpt.load_checkpoint(path)["config_hash"])
        except ckpt.InvalidCheckpoint:
            continue
    return None
