"""The services outside the run folder that follow a run: wandb (`logging.wandb_project`), webhooks
(`logging.webhooks`) and the Hugging Face Hub upload (`output.push_to_hub`).

Each is an event subscriber like the TensorBoard writer, subscribed by rank 0 only, after the run's config is
resolved (a resumed run follows its frozen settings). Each does its talking on its own background thread and says
where it stands with TrackerStatus events, which the faces show on a status line. `close` (called by the runner
once RunEnded is out, before the event log closes) lets them finish: the last webhook messages, wandb's final
write, the final upload.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

from engine.config import Config
from engine.events import EventBus, RunWarning

log = logging.getLogger(__name__)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def preflight(config: Config) -> tuple[list[str], list[RunWarning]]:
    """For the check phase: what stops the run (a service asked for whose package is missing) and what only warns
    (no Hub token: the run trains, its upload will fail and can be retried)."""
    from engine.train.hub_push import retry_command
    from engine.train.wandb_log import EXTRA_HINT

    errors, warnings = [], []
    if config.logging.wandb_project and not _installed("wandb"):
        errors.append(f"logging.wandb_project is set but the wandb package is not installed: {EXTRA_HINT} (or set "
                      "logging.wandb_project = \"\" to train without it; a resume may change it)")
    if config.output.push_to_hub:
        from huggingface_hub import get_token

        if not get_token():
            warnings.append(RunWarning(code="hub_token_missing", message=(
                f"output.push_to_hub is {config.output.push_to_hub} but no Hugging Face token is set (HF_TOKEN, or "
                f"`hf auth login`): the upload at the end will fail; log in before then, or later run "
                f"{retry_command(config.run_path())}")))
    return errors, warnings


class Trackers:
    """The subscribed services of one run; `close` never raises."""

    def __init__(self, members: list, stop_event: threading.Event | None) -> None:
        self.members = members
        self.stop_event = stop_event

    def close(self) -> None:
        # A stop asked for while they finish cuts the waits short; one that ended the run did not ask for that
        # (a stopped run still sends its last messages and finishes its wandb run).
        stop = self.stop_event if self.stop_event is not None and not self.stop_event.is_set() else None
        for member in self.members:  # their threads run meanwhile: the waits overlap
            try:
                member.close(stop)
            except Exception:
                log.exception("closing %s failed", type(member).__name__)


def subscribe_trackers(config: Config, run_dir: Path, bus: EventBus,
                       stop_event: threading.Event | None = None) -> Trackers | None:
    """Subscribe the services `config` asks for; None when it asks for none. A missing wandb package is left to
    the check phase, which fails the run naming the extra."""
    members: list = []
    if config.logging.wandb_project and _installed("wandb"):
        from engine.train.wandb_log import WandbTracker

        members.append(WandbTracker(config, run_dir, bus.emit))
    if config.logging.webhooks:
        from engine.train.webhooks import WebhookSender

        members.append(WebhookSender(config, run_dir, bus.emit))
    if config.output.push_to_hub:
        from engine.train.hub_push import HubUploader

        members.append(HubUploader(config, run_dir, bus.emit))
    for member in members:
        bus.subscribe(member)
    return Trackers(members, stop_event) if members else None
