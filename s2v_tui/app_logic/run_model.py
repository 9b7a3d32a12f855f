"""What the run panels show, accumulated from engine events; no Textual here, so it is tested directly.

Data rate and paint rate are separate: events are applied as they arrive (any rate), the panels take a
`snapshot()` a few times a second. The snapshot copies the bounded histories into tuples, so a painter never
sees a deque change under it, and `version` lets a painter skip a frame when nothing happened.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from engine.events import (TRACKERS, CheckpointSaved, Event, LogLine, PhaseChanged, RunEnded, RunStarted,
                           RunWarning, StepEnd, TrackerStatus, ValidationDone)

from s2v_tui.app_logic.fmt import clock, number

LOSS_HISTORY = 512  # points kept for the sparklines: more than any panel is wide
LOG_HISTORY = 500


@dataclass(frozen=True)
class RunSnapshot:
    version: int = 0
    status: str = "idle"  # idle, running, completed, stopped, failed
    reason: str = ""
    run_dir: str = ""
    name: str = ""
    device: str = ""
    pid: int | None = None
    host: str = ""
    phase: str = ""
    phase_detail: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    losses: tuple[float, ...] = ()
    smoothed: tuple[float, ...] = ()
    min_loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    s_per_step: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    peak_alloc_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    host_rss_bytes: int | None = None
    skipped_nonfinite: int = 0
    checkpoint_path: str = ""
    checkpoint_step: int | None = None
    sample_paths: tuple[str, ...] = ()
    eval_loss: float | None = None
    outputs: tuple[tuple[str, str], ...] = ()
    warnings: int = 0
    trackers: tuple[tuple[str, str, str], ...] = ()  # (wandb | webhooks | hub, state, detail), in TRACKERS order
    log: tuple[str, ...] = ()
    log_total: int = 0  # lines ever logged, so a log pane can append only what is new

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def last_smoothed(self) -> float | None:
        return self.smoothed[-1] if self.smoothed else None

    @property
    def active(self) -> bool:
        return self.status == "running"


@dataclass
class RunModel:
    """Mutable accumulator; owned by the UI thread (the bridge hands events over, see bridge.py)."""

    version: int = 0
    fields: dict = field(default_factory=dict)
    losses: deque = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY))
    smoothed: deque = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY))
    loss_steps: deque = field(default_factory=lambda: deque(maxlen=LOSS_HISTORY))  # the step of each loss
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_HISTORY))
    log_total: int = 0
    min_loss: float | None = None
    warnings: int = 0

    def reset(self) -> None:
        self.__init__(version=self.version + 1)

    def _say(self, ts: float, text: str) -> None:
        self.log.append(f"{clock(ts)} {text}")
        self.log_total += 1

    def _add_loss(self, step: int, loss: float, smoothed: float) -> None:
        if math.isfinite(loss):  # a skipped NaN step is counted, not drawn
            self.losses.append(loss)
            self.smoothed.append(smoothed)
            self.loss_steps.append(step)
            self.min_loss = loss if self.min_loss is None else min(self.min_loss, loss)

    def _losses_until(self, step: int) -> list[tuple[int, float, float]]:
        """The losses of steps up to `step`: what a run resumed at `step` keeps of the curve (later steps of an
        earlier process are trained again, from the checkpoint)."""
        return [(s, loss, smooth) for s, loss, smooth in zip(self.loss_steps, self.losses, self.smoothed) if s <= step]

    def load_history(self, events: list[Event]) -> None:
        """The loss curve of the earlier processes of a run folder (its events.jsonl), before a run resumes there,
        so the chart shows the whole run and not only the resumed part."""
        self.version += 1
        for event in events:
            if isinstance(event, RunStarted):
                kept = self._losses_until(event.resumed_from_step) if event.resumed_from_step else []
                for history in (self.losses, self.smoothed, self.loss_steps):
                    history.clear()
                self.min_loss = None
                for point in kept:
                    self._add_loss(*point)
            elif isinstance(event, StepEnd):
                self._add_loss(event.step, event.loss, event.loss_smooth)

    def apply(self, event: Event) -> None:
        self.version += 1
        f = self.fields
        if isinstance(event, RunStarted):
            # A new run in the same folder starts its panels afresh, keeping the log; a resumed one keeps the
            # loss curve up to the step it resumes from.
            log, total = self.log, self.log_total
            kept = self._losses_until(event.resumed_from_step) if event.resumed_from_step else []
            self.reset()
            self.log, self.log_total, f = log, total, self.fields
            for point in kept:
                self._add_loss(*point)
            f.update(status="running", run_dir=event.run_dir, name=event.name, device=event.device,
                     pid=event.pid, host=event.host, total_steps=event.total_steps,
                     step=event.resumed_from_step)
            resumed = f" (resumed at step {event.resumed_from_step})" if event.resumed_from_step else ""
            self._say(event.ts, f"run started on {event.device or 'unknown device'}{resumed}")
        elif isinstance(event, StepEnd):
            f.update(status="running", step=event.step, total_steps=event.total_steps, epoch=event.epoch,
                     lr=event.lr, grad_norm=event.grad_norm, s_per_step=event.s_per_step,
                     samples_per_s=event.samples_per_s, eta_s=event.eta_s,
                     skipped_nonfinite=event.skipped_nonfinite)
            for name in ("peak_alloc_bytes", "peak_reserved_bytes", "host_rss_bytes"):
                if getattr(event, name) is not None:
                    f[name] = getattr(event, name)
            self._add_loss(event.step, event.loss, event.loss_smooth)
        elif isinstance(event, PhaseChanged):
            f.update(phase=event.phase, phase_detail=event.detail)
            self._say(event.ts, f"phase {event.phase}" + (f": {event.detail}" if event.detail else ""))
        elif isinstance(event, CheckpointSaved):
            f.update(checkpoint_path=event.path, checkpoint_step=event.step)
            self._say(event.ts, f"checkpoint ({event.reason}) at step {event.step}: {event.path}")
        elif isinstance(event, ValidationDone):
            f.update(sample_paths=tuple(event.sample_paths), eval_loss=event.eval_loss)
            self._say(event.ts, f"validation at step {event.step}: {len(event.sample_paths)} samples")
        elif isinstance(event, RunWarning):
            self.warnings += 1
            self._say(event.ts, f"WARNING {event.code}: {event.message}")
        elif isinstance(event, LogLine):
            prefix = "" if event.level == "info" else f"{event.level.upper()} "
            self._say(event.ts, prefix + event.message)
        elif isinstance(event, TrackerStatus):
            known = {name: (state, detail) for name, state, detail in f.get("trackers", ())}
            if known.get(event.tracker, ("",))[0] != event.state:  # the log gets changes, the status line counts
                self._say(event.ts, f"{event.tracker} {event.state}" + (f": {event.detail}" if event.detail else ""))
            known[event.tracker] = (event.state, event.detail)
            f["trackers"] = tuple((name, *known[name]) for name in TRACKERS if name in known)
        elif isinstance(event, RunEnded):
            # No ETA once the run has ended, however it ended: a stopped run is not on its way anywhere.
            f.update(status=event.status, reason=event.reason, outputs=tuple(sorted(event.outputs.items())),
                     eta_s=None)
            self._say(event.ts, f"run {event.status}" + (f": {event.reason}" if event.reason else ""))

    def fail(self, reason: str) -> None:
        """The worker died without a RunEnded (an exception in the engine or the follower)."""
        self.version += 1
        self.fields.update(status="failed", reason=reason, eta_s=None)
        self.log.append(f"FAILED {reason}")
        self.log_total += 1

    def snapshot(self) -> RunSnapshot:
        return RunSnapshot(version=self.version, losses=tuple(self.losses), smoothed=tuple(self.smoothed),
                           min_loss=self.min_loss, warnings=self.warnings, log=tuple(self.log),
                           log_total=self.log_total, **self.fields)


def describe_last_loss(s: RunSnapshot) -> str:
    return f"last {number(s.last_loss)}  min {number(s.min_loss)}  smooth {number(s.last_smoothed)}"
