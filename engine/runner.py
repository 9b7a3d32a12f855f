"""`run(config, subscribers, stop_event, run_dir=None) -> RunEnded`: one whole training job, any face.

Phases: check -> cache -> load -> train -> export. Every event goes to the subscribers and to
`run_dir/events.jsonl`; the engine's log goes to `run_dir/train.log` (and, as LogLine events, to the faces).
The run folder holds a frozen copy of the resolved config: when it exists the run resumes with that copy (the
config passed in is compared and a difference is reported), from the newest valid checkpoint.

`run` never raises for a failed run: it returns (and emits) RunEnded(status="failed") with a reason written for
a person; the traceback is in train.log. Only a broken call (e.g. a stop_event that is not an Event) raises.
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from engine.config import Config, ConfigError, read_frozen_config, validate_config
from engine.dtypes import AUTOCAST_DTYPES, TORCH_DTYPES
from engine.event_log import JsonlEventWriter
from engine.events import EventBus, LogRecordsToEvents, PhaseChanged, RunEnded, RunStarted, RunWarning, Subscriber
from engine.presets import smaller_preset_hint
from engine.run_folder import ConfigRefused
from engine.run_logs import HeldRecords, TrainLogHandler

log = logging.getLogger(__name__)
# Loggers whose records go to train.log only: step metrics (the faces show StepEnd events) and tracebacks (a
# face shows RunEnded's one-paragraph reason).
FILE_ONLY_LOGGERS = ("engine.train.metrics", "engine.runner.trace")
trace_log = logging.getLogger("engine.runner.trace")

LOG_FILENAME = "train.log"


class RunFailed(Exception):
    """A failure whose message is already written for a person (no traceback needed in the summary)."""


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


# ---- the phases ------------------------------------------------------------------------------------------------
def _resolve_config(config: Config, run_dir: Path, bus: EventBus, write: bool = True) -> Config:
    """The config this run uses in its folder (engine.run_folder); raises ConfigRefused before touching it."""
    from engine.run_folder import at_location, resolve

    if not write:  # ranks other than 0 read what rank 0 resolved and froze
        return at_location(read_frozen_config(run_dir), config)
    resolution = resolve(config, run_dir)
    for note in resolution.notes:
        log.info("%s", note)
    return resolution.config


def _check(config: Config, bus: EventBus, have_dataset: bool, device: torch.device, world_size: int = 1,
           fresh: bool = True) -> None:
    """`fresh`: no checkpoint to resume from, so lora.init_from (if set) is read and checked."""
    from engine.train.allowed import setting_problems

    validate_config(config, "<run config>", require_data=not have_dataset, require_model=not have_dataset)
    if fresh and config.lora.init_from:  # a resumed run takes its checkpoint and never reads the file
        from engine.train.init_lora import check_init_from

        check_init_from(config)
    problems = setting_problems(config, world_size, device)
    if problems:
        raise RunFailed(f"these settings cannot run here ({world_size} process(es) on {device.type}): "
                        + "; ".join(problems))
    if not have_dataset:
        _check_model_folder(config)
    if config.logging.tensorboard and not _installed("tensorboard"):
        bus.emit(RunWarning(code="tensorboard_missing", message=(
            "logging.tensorboard is on but the 'tensorboard' package is not installed: metrics are only in "
            "events.jsonl (pip install tensorboard, or set logging.tensorboard = false)")))
    from engine.train.trackers import preflight

    errors, warnings = preflight(config)
    if errors:
        raise RunFailed("; ".join(errors))
    for warning in warnings:
        bus.emit(warning)


def _check_model_folder(config: Config) -> None:
    """A local model folder must hold the transformer (its config and whole weight files) before the cache phase
    runs: that phase can take hours, and a folder without a transformer was found only at the load phase after it.
    Only headers are read here; a hub id is fetched in the load phase, so only its form is checked."""
    from engine.models.loading import CheckpointError, resolve_transformer_dir, shard_files
    from engine.model_source import require_source

    source = config.model.source
    try:
        require_source(source)
        if not Path(source).expanduser().exists():
            return
        folder = resolve_transformer_dir(source, config.model.transformer_subfolder or "transformer")
        shard_files(folder)
    except (FileNotFoundError, CheckpointError) as exc:
        raise RunFailed(f"model.source is not a usable model folder: {exc}. Nothing was cached or loaded") from None
    if config.tread.enabled:
        _check_tread_span(config, folder)


def _check_tread_span(config: Config, folder: Path) -> None:
    """The TREAD span against the model's block count, before the cache phase (the trainer checks it again, for a
    hub id or a caller's dataset)."""
    from engine.models.s2v_transformer import block_count
    from engine.models.tread import check_capture_outside, resolve_span

    layers = block_count(folder)
    try:
        first, last = resolve_span(config.tread.start_layer_idx, config.tread.end_layer_idx, layers)
        if config.crepa.enabled:
            check_capture_outside(first, last, config.crepa.block_index)
    except ValueError as exc:
        raise RunFailed(f"{exc} ({folder}). Nothing was cached or loaded") from None


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _tensorboard(config: Config, run_dir: Path, bus: EventBus):
    """Rank 0's TensorBoard subscriber; None when logging.tensorboard is off or the package is missing (the
    check phase then warns)."""
    if not (config.logging.tensorboard and _installed("tensorboard")):
        return None
    from engine.train.tensorboard import TensorBoardWriter

    board = TensorBoardWriter(run_dir)
    bus.subscribe(board)
    return board


def _cached_dataset(config: Config, bus: EventBus, device: torch.device, stop_event: threading.Event):
    """Fill the feature cache (only missing entries are computed) and open the dataset over it; None when the
    stop event interrupted the filling (the entries written so far are kept)."""
    import time

    from engine.data.dataset import CachedWindowDataset, fill_cache

    last = [0.0]

    def progress(p) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or p.done >= p.total:  # at most 2 events/s: a cache has many entries
            last[0] = now
            bus.emit(PhaseChanged(phase="cache", detail=f"{p.phase} {p.done}/{p.total} {p.detail}".rstrip()))

    plan = fill_cache(config, progress, device, stop=stop_event)
    for skipped in plan.skipped:
        bus.emit(RunWarning(code="clip_skipped", message=f"{skipped.video} is left out: "
                            + "; ".join(str(problem) for problem in skipped.problems)))
    for video, problem in plan.warnings:  # what `s2v-tui check` shows as non-blocking, a run shows too
        bus.emit(RunWarning(code="clip_warning", message=f"{video}: {problem.code}: {problem.message} "
                            f"(fix: {problem.fix})"))
    if not plan.complete:
        return None
    if not plan.records:
        raise RunFailed("no usable training window in the datasets (see the skipped clips above); run "
                        "`s2v-tui check PRESET.toml` for the details and fixes")
    return CachedWindowDataset(plan)


def _preflight(config: Config, device: torch.device) -> int | None:
    """Refuse a config predicted not to fit this GPU and host in the check phase, before any cache work or weight
    (14B models only: the memory model is calibrated on the 14B architecture). Returns the GPU memory the run may
    use (free or the budget) when the prediction applied, else None."""
    import json

    from engine.gpu import default_probe, host_memory
    from engine.models.loading import config_from_json, resolve_transformer_dir
    from engine.models.s2v_transformer import S2VTransformer3DModel
    from engine.presets import PreflightError, preflight, shipped_presets

    if device.type != "cuda":
        return None
    try:
        folder = resolve_transformer_dir(config.model.source, config.model.transformer_subfolder or "transformer")
        raw = json.loads((folder / "config.json").read_text())
        arch = config_from_json(raw, str(folder), S2VTransformer3DModel)
    except (OSError, ValueError):
        return None  # the load phase reports an unreadable model with its own message
    if (arch.get("num_layers"), arch.get("num_attention_heads")) != (40, 40):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    snapshot = default_probe().snapshot(index)
    free = snapshot.free_bytes if snapshot is not None else None
    if config.memory.vram_budget_gb > 0:
        budget = int(config.memory.vram_budget_gb * 1e9)
        free = budget if free is None else min(free, budget)
    host = host_memory()
    try:
        est = preflight(config, free, host.available_bytes if host else None, shipped_presets())
    except PreflightError as exc:
        raise RunFailed(f"memory pre-flight: {exc}") from None
    log.info("memory pre-flight: predicted %s", est.summary())
    return free


def _host_guard(config: Config, gpu_free: int | None):
    """The host-RAM guard; where the memory model applies (gpu_free known) its reason names a lighter preset."""
    from engine.presets import shipped_presets
    from engine.train.host_guard import HostMemoryGuard

    if gpu_free is None:
        return HostMemoryGuard.from_config(config)
    return HostMemoryGuard.from_config(config, presets=shipped_presets(), vram_bytes=gpu_free)


def _load_model(config: Config, device: torch.device, fresh: bool = False):
    """The transformer with its LoRA added; `fresh` (a run not resumed): the LoRA of lora.init_from, if set."""
    from engine.models.low_bit_linear import LowBitSpec
    from engine.models.s2v_transformer import S2VTransformer3DModel
    from engine.models.lora import add_lora
    from engine.train.switches import apply_memory_switches

    m = config.memory
    # With block streaming the weights go from disk to host memory and only the non-block part reaches the GPU,
    # so a 24 GB card never holds the whole 32 GB model. Low-bit base weights are quantised Linear by Linear as
    # they are read, where they load (the GPU; host memory when streamed, which the streamer then packs), so no
    # device holds the bf16 model; the LoRA is then added to the low-bit model (lora.add_lora), the same LoRA as
    # when it was added first.
    low_bit = (LowBitSpec(m.base_weights, tuple(m.low_bit_families), fp8_backward=m.fp8_input_grad)
               if m.base_weights != "bf16" else None)
    model = S2VTransformer3DModel.from_pretrained(
        config.model.source, subfolder=config.model.transformer_subfolder or "transformer",
        torch_dtype=TORCH_DTYPES[config.model.dtype], device=torch.device("cpu") if m.block_offload else device,
        low_bit=low_bit,
    )
    lo = config.lora
    add_lora(model, lo.rank, lo.alpha, lo.dropout, list(lo.targets), lo.init, config.train.seed, kind=lo.kind)
    if fresh and lo.init_from:
        from engine.train.init_lora import apply_init_from

        apply_init_from(model, config)
    for line in apply_memory_switches(model, config, device):
        log.info("memory: %s", line)
    return model


def _validation_set(config: Config, device: torch.device):
    """Validation cases encoded before the transformer loads (the encoders never share the GPU with it)."""
    if config.validation.every_steps <= 0:
        return None
    from engine.train.validation import prepare_validation

    try:
        return prepare_validation(config, device)
    except (OSError, ValueError) as exc:
        raise RunFailed(f"{exc}; fix the case in [[validation.cases]] or remove it") from exc


def _holdout_split(config: Config, dataset):
    """(training windows, held-out windows or None): the clips of validation.eval_loss.holdout and
    validation.eval_loss.datasets leave the training order here, before the trainer draws its first batch, and
    become the eval loss's windows."""
    from engine.data.holdout import HoldoutError, split_dataset

    labels: frozenset[str] = frozenset()
    if config.validation.eval_loss.datasets:
        # cache_plan reads the media modules (PyAV): a run on in-memory samples without eval datasets needs none
        from engine.data.cache_plan import eval_dataset_labels

        labels = eval_dataset_labels(config)
    try:
        train, held_out, clips = split_dataset(dataset, config.validation.eval_loss.holdout, config.train.seed,
                                               labels)
    except HoldoutError as exc:
        raise RunFailed(str(exc)) from None
    if clips:
        log.info("held out of training for the eval loss: %d clip(s), %d window(s): %s", len(clips), len(held_out),
                 ", ".join(sorted(clips)))
    return train, held_out


def _validator(config: Config, model, dataset, vset, run_dir: Path, device: torch.device, stop_event, dist):
    if vset is None:
        return None
    from engine.train.validation import Validator

    return Validator(config, model, dataset, vset, run_dir, device, AUTOCAST_DTYPES.get(config.train.mixed_precision),
                     stop_event, dist)


# ---- logging plumbing ------------------------------------------------------------------------------------------
class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(FILE_ONLY_LOGGERS)


def _attach_logging(run_dir: Path, bus: EventBus) -> Callable[[], None]:
    engine_log = logging.getLogger("engine")
    previous_level = engine_log.level
    if engine_log.getEffectiveLevel() > logging.INFO:
        engine_log.setLevel(logging.INFO)
    file_handler = TrainLogHandler(run_dir / LOG_FILENAME)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_events = LogRecordsToEvents(bus)
    to_events.addFilter(_NotFileOnly())
    engine_log.addHandler(file_handler)
    engine_log.addHandler(to_events)

    def detach() -> None:
        engine_log.removeHandler(to_events)
        engine_log.removeHandler(file_handler)
        file_handler.close()
        engine_log.setLevel(previous_level)

    return detach


# ---- run -----------------------------------------------------------------------------------------------------------
def run(config: Config, subscribers: Iterable[Subscriber] = (), stop_event: threading.Event | None = None,
        run_dir: str | Path | None = None, *, dataset=None, device: str | None = None) -> RunEnded:
    """Run (or resume) the training job of `config`; returns the RunEnded event it also emitted.

    `dataset` (tests, the demo): a map-style dataset of sample dicts used instead of the feature cache;
    `device`: e.g. "cpu" or "cuda:1" (default: the current CUDA device, else the CPU).
    """
    from engine.train.distributed import setup as setup_distributed

    stop_event = stop_event if stop_event is not None else threading.Event()
    run_dir = Path(run_dir) if run_dir is not None else config.run_path()
    # Under `accelerate launch` (one process per GPU) only rank 0 writes the run folder and talks to the
    # subscribers; the other ranks train silently (their warnings go to their stderr) and report their memory
    # through rank 0's StepEnd events.
    dist = setup_distributed(config, device)
    bus = EventBus()
    for fn in subscribers if dist.is_main else ():
        bus.subscribe(fn)
    writer = detach_logging = board = trackers = lock = None
    try:
        if dist.is_main:
            try:
                lock, writer, opening = _open_run_folder(run_dir)
            except RunFailed as exc:  # no event log of ours: tell the subscribers only
                end = RunEnded(status="refused", reason=str(exc))
                bus.emit(end)
                return end
            bus.subscribe(writer)
            detach_logging = _attach_logging(run_dir, bus)
            for record in opening:
                logging.getLogger(record.name).handle(record)
        dev = dist.device or pick_device(device)
        try:
            if not dist.is_main:
                dist.barrier()  # rank 0 first: it writes the frozen config and clears torn checkpoint files
            try:
                config = _resolve_config(config, run_dir, bus, write=dist.is_main)
            except ConfigRefused as exc:
                if dist.is_main:
                    dist.barrier()  # release the others, which then fail to read a config that was never frozen
                end = RunEnded(status="refused", reason=str(exc))
            else:
                if dist.is_main:  # after the resolve: a resumed run follows its frozen logging settings
                    from engine.train.trackers import subscribe_trackers

                    board = _tensorboard(config, run_dir, bus)
                    trackers = subscribe_trackers(config, run_dir, bus, stop_event)
                end = _run_phases(config, bus, stop_event, run_dir, dataset, dev, dist)
        except KeyboardInterrupt:  # a second Ctrl-C outside the training loop (which handles its own)
            # It may come before training or after it (the export): say only what stands.
            end = RunEnded(status="stopped", reason=f"aborted by Ctrl-C outside a training step; "
                           f"{_newest_note(run_dir)}; run the same command again to resume")
        except Exception as exc:
            end = _failure(exc, config, dev)
        bus.emit(end)
        return end
    finally:
        # The trackers first: their last messages and upload results still reach train.log and events.jsonl.
        _close_run([trackers and trackers.close, detach_logging, board and board.close, writer and writer.close,
                    lock and lock.release, dist.close])


def _close_run(steps: list[Callable[[], None] | None]) -> None:
    """Close what the run opened, every step even when one fails. A Ctrl-C now has nothing left to abort (the
    run's end is decided and written), so it is let go: the lock is still released, the end still returned."""
    error: BaseException | None = None
    for step in steps:
        if step is None:
            continue
        try:
            step()
        except KeyboardInterrupt:
            continue  # train.log may already be detached: nothing to tell it
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error


def _open_run_folder(run_dir: Path):
    """Create the run folder, take its lock and open its event log; returns them with the log records written
    meanwhile (for train.log, once it is open). RunFailed says why the folder cannot be used."""
    from engine.fsio import FIXES, write_error_cause
    from engine.train.run_lock import RunFolderBusy, RunLockUnsupported, acquire_run_lock

    if run_dir.exists() and not run_dir.is_dir():  # mkdir would only say "File exists"
        raise RunFailed(f"the run folder {run_dir} is a file, not a folder: choose another output.name or "
                        "output.run_dir (or --run-dir)")
    held = HeldRecords()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with held.capturing("engine.train.run_lock"):
            lock = acquire_run_lock(run_dir, "s2v-tui training run")
    except (RunFolderBusy, RunLockUnsupported) as exc:
        raise RunFailed(str(exc)) from None
    except OSError as exc:
        cause, text = write_error_cause(exc)
        raise RunFailed(f"cannot use the run folder {run_dir}: {text} ({exc.filename or run_dir}); "
                        f"{FIXES[cause]}, or choose another output.run_dir (or --run-dir)") from None
    try:
        return lock, JsonlEventWriter(run_dir), held.records
    except OSError as exc:
        lock.release()
        cause, text = write_error_cause(exc)
        raise RunFailed(f"cannot write the event log in {run_dir}: {text}; {FIXES[cause]}, or choose another "
                        "output.run_dir (or --run-dir)") from None


def _newest_note(run_dir: Path) -> str:
    from engine.train import checkpoint as ckpt

    found = ckpt.list_checkpoints(run_dir)
    return f"the newest checkpoint is step {found[0][0]} ({found[0][1]})" if found else "no checkpoint was written yet"


def _failure(exc: BaseException, config: Config, device: torch.device) -> RunEnded:
    from engine.fsio import FIXES, write_error_cause

    trace_log.error("run failed: %s\n%s", exc, "".join(traceback.format_exception(exc)))
    if isinstance(exc, torch.OutOfMemoryError):
        reason = f"CUDA ran out of memory before training started: {smaller_preset_hint(config, device)}"
    elif isinstance(exc, (RunFailed, ConfigError)):
        reason = str(exc)
    elif isinstance(exc, OSError) and write_error_cause(exc)[0] in ("no_space", "read_only"):
        # Told apart like a failed checkpoint write: the fix is the disk's, not the config's.
        cause, text = write_error_cause(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        reason = f"{text}{where}: {FIXES[cause]}, then run the same command again (details in {LOG_FILENAME})"
    else:
        reason = f"{type(exc).__name__}: {exc} (traceback in {LOG_FILENAME})"
    return RunEnded(status="failed", reason=reason)


def _run_phases(config: Config, bus: EventBus, stop_event: threading.Event, run_dir: Path, dataset,
                device: torch.device, dist=None) -> RunEnded:
    from engine.train import checkpoint as ckpt
    from engine.train.distributed import SINGLE
    from engine.train.host_trim import release_host_memory
    from engine.train.loop import Trainer

    dist = dist or SINGLE
    chash = config.config_hash()
    resume_state, resume_path, skipped = ckpt.find_resume_state(
        run_dir, chash, config.identity_hash(), keep_last=config.checkpoint.keep_last if dist.is_main else 0,
        tidy=dist.is_main)
    if dist.is_main:
        dist.barrier()  # the others may now read the frozen config and the checkpoints
    warnings = [RunWarning(code="checkpoint_skipped", message=f"skipped a {s.what} that cannot be used: {s.reason}")
                for s in skipped]
    short = ckpt.space_shortfall(run_dir, resume_path) if resume_path and dist.is_main else ""
    if dist.any(bool(short)):
        from engine.fsio import FIXES

        for warning in warnings:
            bus.emit(warning)
        step = int(resume_state["step"]) if resume_state else 0
        return RunEnded(status="refused", reason=(
            f"{run_dir}: {short or 'rank 0 found no space for the next checkpoint'} ({FIXES['no_space']}). Nothing "
            f"was trained; the run stands at step {step} ({resume_path}): run the same command again once there "
            "is room"))
    label = device_label(device) + (f" x {dist.describe()}" if dist.active else "")
    bus.emit(RunStarted(run_dir=str(run_dir), config_hash=chash, total_steps=config.optim.max_steps,
                        resumed_from_step=int(resume_state["step"]) if resume_state else 0,
                        name=config.output.name, device=label))
    for warning in warnings:
        bus.emit(warning)
    if resume_path:
        log.info("resuming from %s (step %d)", resume_path, resume_state["step"])

    bus.emit(PhaseChanged(phase="check"))
    _check(config, bus, dataset is not None, device, dist.world_size, fresh=resume_state is None)
    gpu_free = _preflight(config, device)
    host_guard = _host_guard(config, gpu_free)

    bus.emit(PhaseChanged(phase="cache", detail="" if dataset is None else "dataset given by the caller"))
    if dataset is None and dist.active:
        # Filling a cache takes hours on a large dataset, longer than a process group waits at a barrier:
        # `s2v-tui --gpus N` fills it in one process first; here every rank only opens the finished cache.
        from engine.data.dataset import CachedDataset

        try:
            dataset = CachedDataset(config)
        except ValueError as exc:
            raise RunFailed(f"{exc} (a multi-process run does not fill the cache: run `s2v-tui cache "
                            "PRESET.toml` once, or start with `s2v-tui --gpus N`, which does)") from None
    if dataset is None:
        dataset = _cached_dataset(config, bus, device, stop_event)
        if dataset is None:
            return RunEnded(status="stopped", reason="stopped while filling the cache; the entries written so "
                            "far are kept: run again to continue")
    dataset, held_out = _holdout_split(config, dataset)
    if len(dataset) < config.optim.batch_size:
        raise RunFailed(f"the dataset has {len(dataset)} windows, fewer than optim.batch_size = "
                        f"{config.optim.batch_size}: lower the batch size or add clips")

    bus.emit(PhaseChanged(phase="load", detail=config.model.source))
    from engine.train.switches import cap_gpu_memory

    cap_gpu_memory(config, device)  # before the validation encoders: the cap emulates the whole card
    vset = _validation_set(config, device)
    release_host_memory("the cache phase and the validation set-up")  # before the model's host copies
    # FSDP: each rank loads the whole model to host memory and keeps only its shards on the GPU.
    model = dist.prepare_model(_load_model(config, torch.device("cpu") if dist.sharded else device,
                                           fresh=resume_state is None))
    validator = _validator(config, model, dataset if held_out is None else held_out, vset, run_dir, device,
                           stop_event, dist)
    release_host_memory("loading the model")

    bus.emit(PhaseChanged(phase="train", detail=f"{config.optim.max_steps} steps"))
    trainer = Trainer(config, model, dataset, run_dir, bus.emit, stop_event, device, chash, resume_state, dist=dist,
                      validator=validator, host_guard=host_guard)
    del resume_state  # the trainer holds what it needs; the rest can be freed
    outcome = trainer.run()
    if outcome.status == "failed":
        reason = outcome.reason
        if outcome.oom:
            files = " and ".join(str(p) for p in outcome.emergency_loras)
            saved = f"the LoRA of step {outcome.step} was saved to {files}; " if files else ""
            reason = f"CUDA ran out of memory at step {outcome.step + 1}: {saved}{smaller_preset_hint(config, device)}"
        return RunEnded(status="failed", reason=reason)
    if outcome.status == "stopped":
        return RunEnded(status="stopped", reason=outcome.reason)

    bus.emit(PhaseChanged(phase="export", detail=", ".join(config.output.formats)))
    from engine.train.export import ExportFailed, export_final

    try:
        outputs = export_final(config, trainer, run_dir, chash)
    except ExportFailed as exc:
        raise RunFailed(str(exc)) from exc
    bus.emit(PhaseChanged(phase="done"))
    return RunEnded(status="completed", reason=f"trained {outcome.step} steps", outputs=outputs)
