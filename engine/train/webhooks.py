"""Webhooks (`logging.webhooks`): a message to each URL at run start, each checkpoint, each validation and the end.

Each URL gets JSON (`{"source": "s2v-tui", "event": KIND, "run": ..., "text": ..., "data": EVENT}`, the event as
events.jsonl has it) or the text form a chat takes: Discord's `{"content": ...}`, Slack's `{"text": ...}`
(`logging.webhook_format`; "auto" picks by the URL's host). Sending uses the standard library only.

An endpoint that is slow or down never touches training: each URL has its own background thread and a queue of
at most MAX_PENDING messages; a request gives up after `logging.webhook_timeout_s`, is tried RETRY_ATTEMPTS
times with doubling waits, and a message that still fails (or finds the queue full) is dropped with a RunWarning.
The end of the run waits at most CLOSE_WAIT_S for the last messages. Warnings and status lines show a URL as its
host only: the path of a Discord or Slack webhook is its secret.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from engine.config import Config
from engine.events import (CheckpointSaved, Event, RunEnded, RunStarted, RunWarning, TrackerStatus,
                           ValidationDone)
from engine.train.background import BackgroundWorker, with_retries

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 3
RETRY_WAIT_S = 1.0
MAX_PENDING = 100  # per URL: a night of checkpoints and validations
CLOSE_WAIT_S = 30.0
TEXT_LIMIT = 1900  # Discord refuses content over 2000 characters
_DISCORD_HOSTS = ("discord.com", "discordapp.com", "ptb.discord.com", "canary.discord.com")


def shown_url(url: str) -> str:
    """The URL without its path, query or credentials: safe to write into logs and warnings."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def resolve_format(url: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    parts = urlsplit(url)
    if parts.hostname in _DISCORD_HOSTS and parts.path.startswith("/api/webhooks/"):
        return "discord"
    if parts.hostname == "hooks.slack.com":
        return "slack"
    return "json"


def message_text(event: Event, name: str, total_steps: int) -> str | None:
    """The one-paragraph text of an event that is sent, or None for the events that are not."""
    head = f"[s2v-tui] {name}:"
    if isinstance(event, RunStarted):
        how = f"resumed at step {event.resumed_from_step} of {event.total_steps}" if event.resumed_from_step \
            else f"started, {event.total_steps} steps"
        return f"{head} run {how} on {event.device or 'an unknown device'} ({event.host})"
    if isinstance(event, CheckpointSaved):
        of = f"/{total_steps}" if total_steps else ""
        return f"{head} checkpoint ({event.reason}) at step {event.step}{of}: {event.path}"
    if isinstance(event, ValidationDone):
        loss = f", eval loss {event.eval_loss:.5g}" if event.eval_loss is not None else ""
        where = f" in {Path(event.sample_paths[-1]).parent}" if event.sample_paths else ""
        return f"{head} validation at step {event.step}: {len(event.sample_paths)} samples{where}{loss}"
    if isinstance(event, RunEnded):
        if event.status == "completed":
            files = "; LoRA: " + ", ".join(event.outputs.values()) if event.outputs else ""
            return f"{head} completed, {event.reason}{files}"
        return f"{head} {event.status.upper() if event.status == 'failed' else event.status}: {event.reason}"
    return None


def payload(event: Event, fmt: str, text: str, name: str, run_dir: str) -> dict:
    text = text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT - 1] + "…"
    if fmt == "discord":
        return {"content": text, "username": "s2v-tui"}
    if fmt == "slack":
        return {"text": text}
    return {"source": "s2v-tui", "event": event.kind, "run": name, "run_dir": run_dir, "text": text,
            "data": json.loads(event.to_json())}


class _Refused(Exception):
    """The endpoint answered with a client error: the same request will not succeed later."""


def post_json(url: str, body: dict, timeout_s: float) -> None:
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    # Discord's front end refuses urllib's default user agent.
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "s2v-tui webhook"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            raise _Refused(f"HTTP {exc.code} {exc.reason}") from None
        raise


def _cause(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class _Target:
    def __init__(self, url: str, fmt: str) -> None:
        self.url = url
        self.shown = shown_url(url)
        self.fmt = resolve_format(url, fmt)
        self.worker = BackgroundWorker(f"webhook {self.shown}", MAX_PENDING)
        self.failing = False  # between a failed message and the next one that goes through
        self.dropping = False


class WebhookSender:
    """Subscriber; `emit` puts its TrackerStatus and RunWarning events on the run's bus."""

    def __init__(self, config: Config, run_dir: str | Path, emit: Callable[[Event], None]) -> None:
        lg = config.logging
        self.name = config.output.name
        self.run_dir = str(run_dir)
        self.timeout_s = lg.webhook_timeout_s
        self.emit = emit
        self.targets = [_Target(url, lg.webhook_format) for url in lg.webhooks]
        self.total_steps = 0
        self.sent = self.failed = self.dropped = 0
        self._lock = threading.Lock()
        self._last_error = ""
        self._closed = False  # after close: a job that outlived it says nothing more (the final line stands)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.total_steps = event.total_steps
        text = message_text(event, self.name, self.total_steps)
        if text is None:
            return
        for target in self.targets:
            body = payload(event, target.fmt, text, self.name, self.run_dir)
            if target.worker.submit(lambda t=target, b=body, k=event.kind: self._send(t, b, k)):
                continue
            with self._lock:
                self.dropped += 1
                first, target.dropping = not target.dropping, True
            if first:
                self.emit(RunWarning(code="webhook_dropped", message=(
                    f"webhook {target.shown} is {MAX_PENDING} messages behind: new messages to it are dropped until "
                    "it catches up; training goes on")))
            self._status()

    def _send(self, target: _Target, body: dict, kind: str) -> None:
        try:
            with_retries(lambda: post_json(target.url, body, self.timeout_s), RETRY_ATTEMPTS, RETRY_WAIT_S,
                         cancelled=target.worker.cancelled, retry_if=lambda exc: not isinstance(exc, _Refused),
                         what=f"webhook {target.shown}")
        except Exception as exc:  # OSError from the socket, _Refused, and anything odd urllib raises
            cause = _cause(exc)
            with self._lock:
                self.failed += 1
                self._last_error = f"{target.shown}: {cause}"
                first, target.failing = not target.failing, True
            log.info("webhook %s: the %s message was not delivered (%s)", target.shown, kind, cause)
            if first:
                self.emit(RunWarning(code="webhook_failed", message=(
                    f"webhook {target.shown} failed ({cause}) after {RETRY_ATTEMPTS} tries: its {kind} message is "
                    "dropped; training goes on and later messages are tried again")))
        else:
            with self._lock:
                self.sent += 1
                target.failing = target.dropping = False
        self._status()

    def _status(self, final: bool = False) -> None:
        if self._closed:
            return
        with self._lock:
            failing = any(t.failing for t in self.targets)
            detail = f"{self.sent} sent, {self.failed} failed" + (f", {self.dropped} dropped" if self.dropped else "")
            if failing:
                detail += f" (last: {self._last_error})"
        state = "done" if final else ("failing" if failing else "ok")
        self.emit(TrackerStatus(tracker="webhooks", state=state, detail=detail))

    def close(self, stop=None) -> None:
        for target in self.targets:  # they drain together, each on its own thread, within one deadline
            target.worker.finish()
        deadline, left = time.monotonic() + CLOSE_WAIT_S, 0
        for target in self.targets:
            left += target.worker.wait(max(0.0, deadline - time.monotonic()), stop)
        if left:
            with self._lock:
                self.dropped += left
            self.emit(RunWarning(code="webhook_dropped", message=(
                f"{left} webhook messages were still unsent {CLOSE_WAIT_S:.0f} s after the run ended and are dropped")))
        self._status(final=True)
        self._closed = True
