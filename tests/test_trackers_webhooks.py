"""Webhooks (`logging.webhooks`) against a real HTTP server on 127.0.0.1: what each event kind sends, the Discord
and Slack text forms, and endpoints that are slow or dead, which must never slow or stop the training steps."""
from __future__ import annotations

import threading
import time

import pytest
from local_http import dead_port, serve

from engine.config import BadValueError, check_config, with_value
from engine.events import (CheckpointSaved, RunEnded, RunStarted, RunWarning, StepEnd, TrackerStatus, ValidationDone,
                           event_from_dict)
from engine.runner import run
from engine.train import webhooks
from engine.train.synthetic import SyntheticLatentDataset
from engine.train.webhooks import WebhookSender, resolve_format, shown_url
from s2v_tui.commands.demo import demo_config


def _ok(request):
    return 200, {}


def _config(model_dir, tmp_path, **settings):
    config = with_value(demo_config(model_dir, tmp_path / "runs"), "optim.warmup_steps", 0)
    settings = {"optim.max_steps": 4, "checkpoint.every_steps": 2, "logging.tensorboard": False, **settings}
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def _run(config, tmp_path, name="run"):
    events = []
    end = run(config, [events.append], threading.Event(), run_dir=tmp_path / name,
              dataset=SyntheticLatentDataset(2), device="cpu")
    return end, events


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(webhooks, "RETRY_WAIT_S", 0.05)


def test_a_run_posts_json_at_start_checkpoints_and_end(tiny_model_dir, tmp_path):
    with serve(_ok) as server:
        config = _config(tiny_model_dir, tmp_path, **{"logging.webhooks": [server.url + "/hook"]})
        end, events = _run(config, tmp_path)
    assert end.status == "completed", end.reason
    bodies = [r.json() for r in server.requests]
    assert [r.path for r in server.requests] == ["/hook"] * len(bodies)
    assert [b["event"] for b in bodies] == ["run_started", "checkpoint_saved", "checkpoint_saved", "run_ended"]
    assert all(b["source"] == "s2v-tui" and b["run"] == "demo-lora" for b in bodies)
    assert bodies[0]["run_dir"] == str(tmp_path / "run")
    # The data is the event itself, as events.jsonl has it.
    sent = [event_from_dict(b["data"]) for b in bodies]
    logged = [e for e in events if isinstance(e, (RunStarted, CheckpointSaved, RunEnded))]
    assert sent == logged
    assert [b["data"]["step"] for b in bodies[1:3]] == [2, 4]
    assert "checkpoint (interval) at step 2/4" in bodies[1]["text"]
    assert bodies[3]["text"].startswith("[s2v-tui] demo-lora: completed, trained 4 steps; LoRA: ")
    status = [e for e in events if isinstance(e, TrackerStatus) and e.tracker == "webhooks"]
    assert status[-1].state == "done" and status[-1].detail == "4 sent, 0 failed"


def test_a_failed_run_says_so(tiny_model_dir, tmp_path):
    with serve(_ok) as server:
        # Three windows per batch from a dataset of two: the run fails after it started.
        config = _config(tiny_model_dir, tmp_path, **{"logging.webhooks": [server.url], "optim.batch_size": 3})
        end, _ = _run(config, tmp_path)
    assert end.status == "failed"
    last = server.requests[-1].json()
    assert last["event"] == "run_ended" and last["data"]["status"] == "failed"
    assert last["text"].startswith("[s2v-tui] demo-lora: FAILED: the dataset has 2 windows")


def test_discord_and_slack_get_their_text_forms_and_validation_is_sent(tmp_path):
    with serve(_ok) as server:
        for fmt in ("discord", "slack", "json"):
            config = with_value(with_value(demo_config(tmp_path, tmp_path), "logging.webhooks", [f"{server.url}/{fmt}"]),
                                "logging.webhook_format", fmt)
            sender = WebhookSender(config, tmp_path / "run", lambda e: None)
            sender(RunStarted(run_dir=str(tmp_path), config_hash="h", total_steps=10, device="cpu", host="box"))
            sender(StepEnd(step=1, total_steps=10, epoch=0, loss=1.0, loss_smooth=1.0, lr=1e-4))  # not sent
            sender(ValidationDone(step=5, sample_paths=(str(tmp_path / "samples/step-00005/case-00.mp4"),),
                                  eval_loss=0.125))
            sender.close()
    by_path = {}
    for r in server.requests:
        by_path.setdefault(r.path, []).append(r.json())
    assert [b["content"] for b in by_path["/discord"]] == [
        "[s2v-tui] demo-lora: run started, 10 steps on cpu (box)",
        f"[s2v-tui] demo-lora: validation at step 5: 1 samples in {tmp_path}/samples/step-00005, eval loss 0.125"]
    assert all(b["username"] == "s2v-tui" and set(b) == {"content", "username"} for b in by_path["/discord"])
    assert [b["text"] for b in by_path["/slack"]] == [b["content"] for b in by_path["/discord"]]
    assert all(set(b) == {"text"} for b in by_path["/slack"])
    assert [b["event"] for b in by_path["/json"]] == ["run_started", "validation_done"]
    assert by_path["/json"][1]["data"]["sample_paths"] == [str(tmp_path / "samples/step-00005/case-00.mp4")]


def test_a_long_text_is_cut_to_what_discord_accepts(tmp_path):
    with serve(_ok) as server:
        config = with_value(demo_config(tmp_path, tmp_path), "logging.webhooks", [server.url])
        config = with_value(config, "logging.webhook_format", "discord")
        sender = WebhookSender(config, tmp_path, lambda e: None)
        sender(RunEnded(status="failed", reason="x" * 5000))
        sender.close()
    content = server.requests[0].json()["content"]
    assert len(content) == webhooks.TEXT_LIMIT and content.endswith("…")


def test_a_slow_endpoint_never_slows_the_steps(tiny_model_dir, tmp_path, quick_retries, monkeypatch):
    """Each request sleeps 3 s and the timeout is 1 s: a sender on the training thread would add over 3 s to each
    step with a checkpoint (3 tries of 1 s). The steps keep their pace; the end waits at most CLOSE_WAIT_S."""
    monkeypatch.setattr(webhooks, "CLOSE_WAIT_S", 2.0)

    def slow(request):
        time.sleep(3.0)
        return 200, {}

    with serve(slow) as server:
        # 12 steps (at least 3.6 s) and the end's 2 s: longer than the first message's 3 tries of 1 s, so the
        # failure is reported before the run closes (with 6 steps a fast run could end first: seen once).
        config = _config(tiny_model_dir, tmp_path, **{
            "logging.webhooks": [server.url], "logging.webhook_timeout_s": 1.0, "optim.max_steps": 12,
            "checkpoint.every_steps": 1})
        started = time.monotonic()
        end, events = _run(config, tmp_path)
        wall = time.monotonic() - started
    assert end.status == "completed", end.reason
    steps = [e for e in events if isinstance(e, StepEnd)]
    gaps = [b.ts - a.ts for a, b in zip(steps, steps[1:], strict=False)]
    # A step with its checkpoint takes ~0.3 s on a quiet machine (more on a loaded one); a sender on the training
    # thread adds at least 3 s (3 tries of the 1 s timeout): measured 3.4 s gaps with one.
    assert max(gaps) < 2.5, gaps
    assert wall < 20, wall
    codes = [e.code for e in events if isinstance(e, RunWarning)]
    assert "webhook_failed" in codes
    failed = next(e for e in events if isinstance(e, RunWarning) and e.code == "webhook_failed")
    assert failed.message.startswith(f"webhook {shown_url(server.url)} failed (timed out) after 3 tries")
    assert "training goes on" in failed.message
    final = [e for e in events if isinstance(e, TrackerStatus) and e.tracker == "webhooks"][-1]
    assert final.state == "done" and "0 sent" in final.detail and "dropped" in final.detail


def test_a_dead_port_only_warns(tiny_model_dir, tmp_path, quick_retries):
    url = f"http://127.0.0.1:{dead_port()}/hook/secret-token"
    config = _config(tiny_model_dir, tmp_path, **{"logging.webhooks": [url]})
    end, events = _run(config, tmp_path)
    assert end.status == "completed", end.reason
    warnings = [e for e in events if isinstance(e, RunWarning) and e.code == "webhook_failed"]
    assert len(warnings) == 1  # once per failing episode, not once per message
    assert "refused" in warnings[0].message.lower() and "secret-token" not in warnings[0].message
    final = [e for e in events if isinstance(e, TrackerStatus) and e.tracker == "webhooks"][-1]
    assert final.detail.startswith("0 sent, 4 failed") and "secret-token" not in final.detail
    assert "secret-token" not in (tmp_path / "run" / "train.log").read_text()


def test_a_full_queue_drops_with_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(webhooks, "MAX_PENDING", 2)
    release = threading.Event()

    def held(request):
        release.wait(10)
        return 200, {}

    emitted = []
    with serve(held) as server:
        config = with_value(demo_config(tmp_path, tmp_path), "logging.webhooks", [server.url])
        sender = WebhookSender(config, tmp_path, emitted.append)
        sender(CheckpointSaved(step=1, path="c1"))
        deadline = time.monotonic() + 10
        while not server.requests and time.monotonic() < deadline:  # the first is on the wire, held there
            time.sleep(0.01)
        for step in range(2, 7):  # two of these wait in the queue, three find it full
            sender(CheckpointSaved(step=step, path=f"c{step}"))
        release.set()
        sender.close()
    dropped = [e for e in emitted if isinstance(e, RunWarning) and e.code == "webhook_dropped"]
    assert len(dropped) == 1 and "messages behind" in dropped[0].message
    assert emitted[-1].detail == "3 sent, 0 failed, 3 dropped"
    assert [r.json()["data"]["step"] for r in server.requests] == [1, 2, 3]


def test_a_client_error_is_not_retried(tmp_path):
    with serve(lambda r: (404, {"message": "Unknown Webhook"})) as server:
        config = with_value(demo_config(tmp_path, tmp_path), "logging.webhooks", [server.url])
        emitted = []
        sender = WebhookSender(config, tmp_path, emitted.append)
        sender(RunEnded(status="completed", reason="r"))
        sender.close()
    assert len(server.requests) == 1
    assert "HTTP 404" in next(e.message for e in emitted if isinstance(e, RunWarning))


def test_formats_by_host_urls_shown_without_their_secret_and_config_rules(tmp_path):
    assert resolve_format("https://discord.com/api/webhooks/1/abc", "auto") == "discord"
    assert resolve_format("https://hooks.slack.com/services/T/B/x", "auto") == "slack"
    assert resolve_format("https://example.org/hook", "auto") == "json"
    assert resolve_format("https://example.org/hook", "slack") == "slack"
    assert shown_url("https://user:pw@discord.com:8443/api/webhooks/1/abc?x=1") == "https://discord.com:8443/…"
    config = demo_config(tmp_path, tmp_path)
    with pytest.raises(BadValueError, match=r"logging.webhooks\[1\]: is not an http:// or https:// URL"):
        with_value(config, "logging.webhooks", ["https://example.org/ok", "discord.com/api/webhooks/1"])
    assert [e.key for e in check_config(with_value(config, "logging.webhook_timeout_s", 0.0))] == [
        "logging.webhook_timeout_s"]
    with pytest.raises(Exception, match="webhook_format"):
        with_value(config, "logging.webhook_format", "teams")
