"""A fast stand-in for `engine.runner.run` with the same signature, emitting real engine events.

For Pilot tests, snapshots and trying the UI without a GPU. It behaves like the engine's contract says:
every event goes to the subscribers and to `run_dir/events.jsonl`, `stop_event` is checked at each step
boundary, a stop writes a checkpoint before returning, and the run folder's config is resolved (frozen, or
refused when it differs from a trained run's) by the engine's own `engine.run_folder.resolve`.
Numbers are deterministic (seeded losses, fixed
speeds, an injectable clock) so snapshots do not change from run to run.
"""
from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from engine.config import Config
from engine.event_log import JsonlEventWriter
from engine.events import (CheckpointSaved, EventBus, LogLine, PhaseChanged, RunEnded, RunStarted, StepEnd, Subscriber,
                           ValidationDone)

GIB = 1024**3


class FakeEngine:
    """Call it like `engine.runner.run(config, subscribers, stop_event, run_dir=None)`.

    steps: total steps (default: config.optim.max_steps); step_delay_s: sleep per step (0 = as fast as
    possible); fail_at_step: raise RuntimeError there, to exercise the error path; clock: event timestamps;
    stop_after_steps: pause before this step until `stop_event` is set (a run that is reliably "running").
    """

    def __init__(self, steps: int | None = None, step_delay_s: float = 0.0, fail_at_step: int | None = None,
                 clock: Callable[[], float] = time.time, checkpoint_every: int = 0,
                 hold_at_step: int | None = None, seed: int = 0, host: str | None = None) -> None:
        self.steps = steps
        self.step_delay_s = step_delay_s
        self.fail_at_step = fail_at_step
        self.clock = clock
        self.checkpoint_every = checkpoint_every
        self.hold_at_step = hold_at_step
        self.seed = seed
        self.host = host  # None = this machine's name; snapshots pass a fixed one
        self.started = threading.Event()  # set once RunStarted is out: tests wait on it instead of sleeping

    def __call__(self, config: Config, subscribers: Sequence[Subscriber], stop_event: threading.Event,
                 run_dir: str | Path | None = None) -> RunEnded:
        run_dir = Path(run_dir) if run_dir is not None else config.run_path()
        run_dir.mkdir(parents=True, exist_ok=True)  # before the import below (torch): a follower waits for it
        from engine.run_folder import ConfigRefused, resolve

        try:
            config = resolve(config, run_dir).config
        except ConfigRefused as exc:
            end = RunEnded(status="refused", reason=str(exc))
            for fn in subscribers:
                fn(end)
            return end
        writer = JsonlEventWriter(run_dir)
        bus = EventBus()
        bus.subscribe(writer)
        for fn in subscribers:
            bus.subscribe(fn)
        try:
            return self._train(config, bus, stop_event, run_dir)
        finally:
            writer.close()

    def _train(self, config: Config, bus: EventBus, stop: threading.Event, run_dir: Path) -> RunEnded:
        total = self.steps or config.optim.max_steps
        ts = self.clock
        bus.emit(RunStarted(run_dir=str(run_dir), config_hash=config.config_hash(), total_steps=total,
                            name=config.output.name, device="cpu (fake engine)", ts=ts(),
                            **({"host": self.host} if self.host is not None else {})))
        self.started.set()
        bus.emit(PhaseChanged(phase="train", detail=f"{total} steps", ts=ts()))
        bus.emit(LogLine(level="info", message="fake engine: no model is loaded", ts=ts()))
        rng = random.Random(self.seed)
        smooth = None
        per_step = 1.25  # fixed, so the ETA in snapshots never moves
        batch = config.optim.batch_size * config.optim.grad_accum
        for step in range(1, total + 1):
            if self.hold_at_step is not None and step == self.hold_at_step:
                stop.wait()
            if stop.is_set():  # step boundary: checkpoint, then return, as the engine does
                path = self._checkpoint(run_dir, step - 1)
                bus.emit(CheckpointSaved(step=step - 1, path=str(path), reason="stop", ts=ts()))
                end = RunEnded(status="stopped", reason=f"stopped at step {step - 1}", ts=ts())
                bus.emit(end)
                return end
            if self.fail_at_step is not None and step == self.fail_at_step:
                raise RuntimeError(f"fake engine failure at step {step}")
            if self.step_delay_s:
                stop.wait(self.step_delay_s)
            loss = 0.05 + 0.45 * math.exp(-3.0 * step / total) + 0.04 * rng.random()
            smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
            bus.emit(StepEnd(step=step, total_steps=total, epoch=(step - 1) // 50, loss=loss, loss_smooth=smooth,
                             lr=config.optim.lr, grad_norm=0.5, samples_per_s=batch / per_step,
                             s_per_step=per_step, eta_s=(total - step) * per_step,
                             peak_alloc_bytes=38 * GIB + step % 3 * GIB // 10, peak_reserved_bytes=41 * GIB,
                             host_rss_bytes=12 * GIB, ts=ts()))
            if self.checkpoint_every and step % self.checkpoint_every == 0 and step < total:
                path = self._checkpoint(run_dir, step)
                bus.emit(CheckpointSaved(step=step, path=str(path), reason="interval", ts=ts()))
                bus.emit(ValidationDone(step=step, sample_paths=(str(run_dir / "samples" / f"step_{step:06d}.mp4"),),
                                        ts=ts()))
        path = self._checkpoint(run_dir, total)
        bus.emit(CheckpointSaved(step=total, path=str(path), reason="final", ts=ts()))
        lora = run_dir / f"{config.output.name}.safetensors"
        lora.write_text("fake LoRA\n")
        end = RunEnded(status="completed", reason=f"{total} steps", outputs={"peft": str(lora)}, ts=ts())
        bus.emit(end)
        return end

    @staticmethod
    def _checkpoint(run_dir: Path, step: int) -> Path:
        path = run_dir / "checkpoints" / f"step_{step:06d}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "state.txt").write_text(f"fake checkpoint at step {step}\n")
        return path


def fixed_clock(start: float = 1_700_000_000.0, tick: float = 1.25) -> Callable[[], float]:
    """A clock that advances `tick` seconds per call: deterministic timestamps for snapshots."""
    lock = threading.Lock()
    state = {"t": start - tick}

    def now() -> float:
        with lock:
            state["t"] += tick
            return state["t"]

    return now
