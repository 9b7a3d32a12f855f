"""Weights & Biases tracking of a run: the TensorBoard scalars at each step, the validation samples as videos with
their audio, and the resolved config (`logging.wandb_project`; the optional `wandb` extra).

Only rank 0 subscribes it (engine.train.trackers). Every wandb call runs on a background thread: `wandb.init` may
wait for the network for a minute and `log` may block on a full buffer, and neither may cost a training step.

A resumed run continues the same wandb run: the id is kept in `run_dir/wandb_run_id` and given back to
`wandb.init(id=..., resume="allow")`. wandb keeps one value per step, so the steps a resume trains again (those
after its last checkpoint) keep the values logged first; events.jsonl and TensorBoard hold the repeated ones.

Samples are logged as `wandb.Video(path)` of the mp4 the validation wrote: given a file path, wandb copies the file
as it is (it re-encodes only numpy frames, through moviepy, which drops audio), so the AAC track stays in it and
the W&B player plays it. `WANDB_MODE=offline` keeps everything under the wandb folder for `wandb sync` later.
"""
from __future__ import annotations

import logging
import os
import secrets
import string
from collections.abc import Callable
from pathlib import Path

from engine.config import Config, resolved_dict
from engine.events import Event, RunEnded, RunStarted, RunWarning, StepEnd, TrackerStatus, ValidationDone
from engine.train.background import BackgroundWorker
from engine.train.tensorboard import step_scalars

log = logging.getLogger(__name__)

RUN_ID_FILENAME = "wandb_run_id"
EXTRA_HINT = "pip install -e '.[wandb]' in a source checkout, or pip install 's2v-tui[wandb]'"
_MAX_PENDING = 10_000  # queued logs while wandb is slow: hours of steps at any real step time
FINISH_WAIT_S = 120.0  # what the end of a run waits for wandb to write (offline) or upload (online) the rest


def sample_key(path: str) -> str:
    """samples/step-00002/case-00-ema.mp4 -> "samples/case-00-ema"; the base model's -> "samples/base/case-00"."""
    p = Path(path)
    return f"samples/base/{p.stem}" if p.parent.name == "base" else f"samples/{p.stem}"


def logged_config(config: Config) -> dict:
    """The resolved config as wandb shows it; webhook URLs are cut to their host (their path is the secret)."""
    from engine.train.webhooks import shown_url

    tree = resolved_dict(config)
    tree["logging"]["webhooks"] = [shown_url(url) for url in config.logging.webhooks]
    return tree


def read_or_make_run_id(run_dir: Path) -> str:
    path = Path(run_dir) / RUN_ID_FILENAME
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if found:
        return found
    # wandb's own ids: 8 characters of [a-z0-9]
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


class WandbTracker:
    """Subscriber; `emit` puts its TrackerStatus and RunWarning events on the run's bus."""

    def __init__(self, config: Config, run_dir: str | Path, emit: Callable[[Event], None]) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.emit = emit
        self.worker = BackgroundWorker("wandb", _MAX_PENDING)
        self.run = None
        self._dropped = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._queue(lambda: self._start(event))
        elif isinstance(event, StepEnd):
            scalars = step_scalars(event)
            self._queue(lambda: self._log(scalars, event.step))
        elif isinstance(event, ValidationDone):
            self._queue(lambda: self._validation(event))
        elif isinstance(event, RunEnded):
            self._queue(lambda: self._finish(event))

    def _queue(self, job: Callable[[], None]) -> None:
        if not self.worker.submit(job):
            self._dropped += 1
            if self._dropped == 1:  # once a run: the remedy is the same for every dropped log
                self.emit(RunWarning(code="wandb_behind", message=(
                    f"wandb is not keeping up ({_MAX_PENDING} logs waiting): newer metrics are dropped until it "
                    "catches up; events.jsonl and TensorBoard have them all")))

    # ---- on the background thread ------------------------------------------------------------------------------
    def _start(self, event: RunStarted) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "online")
        try:
            # Never an interactive login prompt: the terminal belongs to the TUI or the progress bar.
            if mode not in ("offline", "dryrun", "disabled") and not wandb.login(prompt=False, verify=False):
                raise RuntimeError("not logged in to W&B: run `wandb login` or set WANDB_API_KEY (or "
                                   "WANDB_MODE=offline, then `wandb sync` later)")
            run_id = read_or_make_run_id(self.run_dir)
            # wandb's own files go into the run folder unless WANDB_DIR says otherwise. The folder and the mode are
            # passed on each time: wandb reads the environment once a process, and the TUI runs several runs.
            self.run = wandb.init(
                project=self.config.logging.wandb_project, id=run_id, resume="allow", name=self.config.output.name,
                config=logged_config(self.config), dir=os.environ.get("WANDB_DIR") or str(self.run_dir), mode=mode,
                settings=wandb.Settings(console="off", silent=True))
        except Exception as exc:  # wandb raises its own error types, and OSError for a bad folder
            self.run = None
            self.emit(TrackerStatus(tracker="wandb", state="failed", detail=str(exc)))
            self.emit(RunWarning(code="wandb_failed", message=f"wandb could not start, training goes on without "
                                 f"it: {type(exc).__name__}: {exc}"))
            return
        if self.run.url:
            detail = f"run {self.run.id} {self.run.url}"
        else:  # offline: nothing online yet, the folder to sync is the place to name
            detail = f"run {self.run.id} offline in {self.run.settings.sync_dir} (wandb sync it later)"
        log.info("wandb: %s", detail)
        self.emit(TrackerStatus(tracker="wandb", state="running", detail=detail))

    def _log(self, scalars: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(scalars, step=step)

    def _validation(self, event: ValidationDone) -> None:
        if self.run is None:
            return
        import wandb

        data: dict = {}
        if event.eval_loss is not None:
            data["eval/loss"] = event.eval_loss
        for path in event.sample_paths:
            if Path(path).is_file():
                data[sample_key(path)] = wandb.Video(path, caption=f"step {event.step}: {Path(path).name}")
        if data:
            # The StepEnd of this step was logged just before; wandb merges both into the row of the step.
            self.run.log(data, step=event.step)

    def _finish(self, event: RunEnded) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run.summary["status"] = event.status
        run.finish(exit_code=0 if event.status == "completed" else 1)
        self.emit(TrackerStatus(tracker="wandb", state="finished", detail=f"run {run.id} ({event.status})"))

    def close(self, stop=None) -> None:
        undone = self.worker.wait(FINISH_WAIT_S, stop)
        if undone:
            self.emit(RunWarning(code="wandb_unfinished", message=(
                f"wandb had not finished after {FINISH_WAIT_S:.0f} s; {undone} logs are left out of it (events.jsonl "
                "has everything)")))
