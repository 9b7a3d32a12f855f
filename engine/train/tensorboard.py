"""TensorBoard scalars of a run: a subscriber that turns StepEnd and ValidationDone events into
`run_dir/tensorboard/events.out.tfevents.*` files (`tensorboard --logdir RUN_DIR/tensorboard`).

Only the process that owns the run folder (rank 0) subscribes it; the runner does that when
`logging.tensorboard` is on and the package is installed. events.jsonl stays the complete record: this file
holds the same numbers in the form TensorBoard plots.
"""
from __future__ import annotations

import logging
from pathlib import Path

from engine.events import Event, RunEnded, RunStarted, StepEnd, ValidationDone

log = logging.getLogger(__name__)

TENSORBOARD_DIRNAME = "tensorboard"


def step_scalars(event: StepEnd) -> dict[str, float]:
    """The scalars of one step, by TensorBoard tag; fields not measured here (None) are left out."""
    scalars = {
        "train/loss": event.loss,
        "train/loss_smooth": event.loss_smooth,
        "train/lr": event.lr,
        "speed/s_per_step": event.s_per_step,
        "speed/step_s": event.step_s,
        "speed/samples_per_s": event.samples_per_s,
    }
    optional = {
        "train/grad_norm": event.grad_norm,
        "memory/peak_alloc_gb": None if event.peak_alloc_bytes is None else event.peak_alloc_bytes / 1e9,
        "memory/peak_reserved_gb": None if event.peak_reserved_bytes is None else event.peak_reserved_bytes / 1e9,
    }
    scalars.update({tag: value for tag, value in optional.items() if value is not None})
    return scalars


class TensorBoardWriter:
    """Subscriber writing the run's scalars with torch's SummaryWriter.

    The writer is opened on RunStarted rather than at construction: a resumed run then passes
    `purge_step`, so TensorBoard drops the steps the earlier process logged after its last checkpoint (they
    are trained again) instead of drawing two curves over the same steps.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.log_dir = Path(run_dir) / TENSORBOARD_DIRNAME
        self._writer = None

    def _open(self, resumed_from_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        purge = resumed_from_step + 1 if resumed_from_step > 0 else None
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        log.info("TensorBoard scalars in %s", self.log_dir)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._open(event.resumed_from_step)
            return
        if self._writer is None:
            return
        if isinstance(event, StepEnd):
            for tag, value in step_scalars(event).items():
                self._writer.add_scalar(tag, value, event.step, walltime=event.ts)
        elif isinstance(event, ValidationDone) and event.eval_loss is not None:
            self._writer.add_scalar("eval/loss", event.eval_loss, event.step, walltime=event.ts)
            # Flushed at once: validations are rare, and a follower watching the plot wants them promptly.
            self._writer.flush()
        elif isinstance(event, RunEnded):
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
