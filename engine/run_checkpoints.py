"""The checkpoints of a run folder as a person picks among them: step, files, health, losses and samples.

Pure functions over the folder: nothing is written and no process is asked. The terminal app lists a run's
checkpoints with `list_run_checkpoints`; `s2v-tui sample --lora` resolves a checkpoint reference with
`checkpoint_lora`. A checkpoint is named `RUN_DIR@STEP` (e.g. `runs/my-lora@1500`); its LoRA file in one layout is
`RUN_DIR/checkpoints/step-00001500_peft.safetensors` (or `_native`).

The training loss is the smoothed one of the checkpoint's digest record; the eval loss and the validation samples
come from the ValidationDone event of that step in events.jsonl (validation runs before the checkpoint of the same
step), so a checkpoint written at a step without validation has neither.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from engine.events import EVENTS_FILENAME, event_from_json

LAYOUT_ORDER = ("peft", "native")  # the layout a reference picks when the checkpoint has both
_VALIDATION = b'"kind":"validation_done"'
_LORA_NAME = re.compile(r"^step-(\d{8})_(\w+)\.safetensors$")


class LoraReferenceError(ValueError):
    """A --lora value that names no usable LoRA file; the message says what was found and what to give."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path  # the full-state checkpoint (.pt)
    loras: tuple[tuple[str, Path], ...]  # (layout, file) of its LoRA files on disk
    healthy: bool  # a finite state, and each LoRA file its record lists is there at its size
    problem: str  # why not healthy, in words ("" when it is)
    loss: float | None  # the smoothed training loss when it was written
    eval_loss: float | None
    samples: tuple[Path, ...]
    reason: str  # why it was written: interval, stop, signal, final, host_memory
    model: str  # the base model of the run (model.source), for the sample command

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def reference(self) -> str:
        return reference(self.run_dir, self.step)


def reference(run_dir: str | Path, step: int) -> str:
    return f"{run_dir}@{step}"


def validations(run_dir: str | Path) -> dict[int, tuple[float | None, tuple[Path, ...]]]:
    """step -> (eval loss, sample files that exist) of each validation in the run's event log (the last one of a
    step a resumed run validated again)."""
    found: dict[int, tuple[float | None, tuple[Path, ...]]] = {}
    try:
        with open(Path(run_dir) / EVENTS_FILENAME, "rb") as f:
            for line in f:
                if _VALIDATION not in line:  # most lines are steps: skip them unparsed
                    continue
                try:
                    event = event_from_json(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    continue  # a torn last line
                # The base model's renders (samples/base/, with the first validation) are not the step's.
                samples = tuple(Path(p) for p in event.sample_paths
                                if Path(p).parent.name.startswith("step-") and Path(p).is_file())
                found[event.step] = (event.eval_loss, samples)
    except OSError:
        pass
    return found


def list_run_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Every checkpoint of `run_dir` (a .pt in checkpoints/, not the rejected ones), newest first. Health is judged
    from the digest record and the files' sizes, without reading them (`checkpoint_lora` checks a file's bytes
    when it is used)."""
    from engine.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    checked = validations(run_dir)
    listed = []
    for step, path in ckpt.list_checkpoints(run_dir):
        record = ckpt.read_digest(path) or {}
        problems = []
        if record.get("healthy") is False:
            problems.append("its state is not finite (NaN/inf steps)")
        try:
            problems += ckpt.lora_problems(path, record, verify=False).values()
        except OSError as exc:
            problems.append(f"unreadable ({exc.strerror or exc})")
        layouts = dict.fromkeys([*(record.get("loras") or {}), *LAYOUT_ORDER])
        loras = tuple((layout, file) for layout in layouts if (file := ckpt.lora_path(path, layout)).is_file())
        eval_loss, samples = checked.get(step, (None, ()))
        loss = record.get("loss_smooth")
        listed.append(CheckpointInfo(
            step=step, path=path, loras=loras, healthy=not problems, problem="; ".join(problems),
            loss=float(loss) if isinstance(loss, (int, float)) else None, eval_loss=eval_loss, samples=samples,
            reason=str(record.get("reason", "")),
            model=str(((record.get("config") or {}).get("model") or {}).get("source", ""))))
    return listed


def checkpoint_lora(text: str) -> Path:
    """The LoRA file that a --lora value names: a LoRA file as it is, or a checkpoint, `RUN_DIR@STEP` or its path
    `RUN_DIR/checkpoints/step-N` (with or without .pt), in the peft layout if it has one, else native. A
    checkpoint's LoRA file is checked against the SHA-256 of its record. LoraReferenceError says what is wrong."""
    from engine.train import checkpoint as ckpt

    given = Path(text).expanduser()
    if given.is_file() and given.suffix != ".pt":
        match = _LORA_NAME.match(given.name)
        if match:
            _verify(ckpt.checkpoint_path(given.parent.parent, int(match.group(1))), match.group(2), given)
        return given
    run_dir, step = _split(text, given)
    path = ckpt.checkpoint_path(run_dir, step)
    for layout in LAYOUT_ORDER:
        file = ckpt.lora_path(path, layout)
        if file.is_file():
            _verify(path, layout, file)
            return file
    steps = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    have = (f"its checkpoints are at steps {', '.join(map(str, sorted(steps)))}: e.g. "
            f"--lora {reference(run_dir, max(steps))}" if steps else "it has no checkpoint")
    if path.exists():
        raise LoraReferenceError(f"the checkpoint of step {step} in {run_dir} has no LoRA file (written before "
                                 "checkpoints had them); resuming the run writes them; or use its final export")
    raise LoraReferenceError(f"{run_dir} has no checkpoint of step {step}; {have}")


def _split(text: str, given: Path) -> tuple[Path, int]:
    named = re.fullmatch(r"step-(\d+)(\.pt)?", given.name)
    if named and given.parent.name == "checkpoints":
        return given.parent.parent, int(named.group(1))
    run, at, step = text.rpartition("@")
    if at and step.isdigit() and Path(run).expanduser().is_dir():
        return Path(run).expanduser(), int(step)
    raise LoraReferenceError(f"{text} is neither a LoRA file nor a checkpoint: give a .safetensors file, or a "
                             "checkpoint as RUN_DIR@STEP (e.g. runs/my-lora@1500)")


def _verify(path: Path, layout: str, file: Path) -> None:
    from engine.train import checkpoint as ckpt

    record = ckpt.read_digest(path)
    if record is None or layout not in (record.get("loras") or {}):
        return  # no record vouches for it: the LoRA loader checks what it can
    problems = ckpt.lora_problems(path, record)
    if layout in problems:
        problem = problems[layout]
        others = [ckpt.lora_path(path, other) for other in record["loras"] if other not in problems]
        instead = f"use {others[0]} instead, " if others else ""
        raise LoraReferenceError(f"{file}: {problem}; {instead}or run the training command again: it sets the "
                                 "damaged file aside and writes it again from the checkpoint, when that is the "
                                 "checkpoint it resumes from")
