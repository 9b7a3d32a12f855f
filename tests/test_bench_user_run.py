"""bench/user_run.py on the CPU: the user's path (`s2v-tui --run` in a child process) on the tiny model, sampled
from outside, and the pieces it is made of (model-folder check, pre-flight parsing, tree memory sampling)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import user_run
from bench.report import peak, sample_memory, tree_rss_bytes


@pytest.mark.timeout(120)
def test_user_run_tiny_runs_the_cli_with_validation_and_reports_one_line(tmp_path, capsys):
    out = tmp_path / "user_run.jsonl"
    code = user_run.main(["--tiny", "--steps", "3", "--validation-steps", "2", "--scratch", str(tmp_path),
                          "--out", str(out)])
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    assert code == 0 and r["exit_code"] == 0 and r["status"] == "completed", r.get("output_tail")
    assert r["steps"] == 3 and len(r["s_all"]) == 3 and r["s_per_step"] > 0  # step 3: the one after the warm-up
    assert r["peak_rss_gib"] > 0 and r["peak_proc_rss_gib"] > 0 and r["samples"] > 0
    assert r["peak_system_used_gib"] >= r["baseline_system_used_gib"] > 0
    assert {"check", "cache", "load", "train", "validate", "export"} <= set(r["phases"])
    assert r["phases"]["cache"]["start_s"] < r["phases"]["load"]["start_s"] < r["phases"]["train"]["start_s"]
    assert r["phases"]["validate"]["s"] > 0 and r["validation"]
    assert r["model_written"] == ["transformer", "encoders"]
    # The pre-flight runs for the 14B model on a GPU only: nothing to compare with here.
    assert r["predicted_host_gib"] is None and r["host_measured_over_predicted"] is None
    assert list(tmp_path.iterdir()) == [out]  # the call's folder (model, clips, cache, run) is gone


def test_a_complete_model_folder_is_reused_and_a_missing_part_is_found(tmp_path):
    from engine.models.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "m", seed=0)
    assert user_run.missing_parts(model) == []
    assert user_run.ensure_model(model, tiny=True)["model_written"] == []
    shard = next((model / "text_encoder").glob("*.safetensors"))
    shard.unlink()
    assert user_run.missing_parts(model) == ["encoders"]
    index = next((model / "transformer").glob("*.index.json"))
    first = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    (model / "transformer" / first).write_bytes(b"")  # a write cut short
    assert user_run.missing_parts(model) == ["transformer", "encoders"]


def test_the_preflight_prediction_is_read_in_the_format_the_runner_logs():
    from engine.config import load_config
    from engine.memory import estimate

    est = estimate(load_config(user_run.REPO / "presets" / "24gb.toml"))
    log = (f"2026-12-01 10:00:00 INFO engine.runner: memory pre-flight: predicted {est.summary()}\n"
           "2026-12-01 10:00:01 INFO engine.runner: memory: blocks streamed\n")
    gpu, host = user_run.parse_preflight(log)
    assert gpu == round(est.vram_need_bytes / 2**30, 1) and host == round(est.host_bytes / 2**30, 1)
    assert user_run.parse_preflight("no such line") == (None, None)


def test_tree_sampling_counts_a_child_and_its_grandchild():
    # A child that starts a grandchild; each holds 64 MiB it has written (resident), then both wait.
    hold = "b = bytearray(64 << 20); import time; time.sleep(30)"
    code = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {hold!r}]); {hold}")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and tree_rss_bytes(proc.pid)[1] < 128 << 20:
            time.sleep(0.1)
        count = iter(range(3))
        samples = sample_memory(proc.pid, lambda: next(count, None) is None, 0.05)
    finally:
        import psutil

        for grandchild in psutil.Process(proc.pid).children(recursive=True):
            grandchild.kill()  # by its own pid: killing the child does not end it
        proc.kill()
        proc.wait()
    assert len(samples) == 3
    assert peak(samples, "tree_rss") >= 128 << 20 > peak(samples, "rss") >= 64 << 20
    assert peak(samples, "system_used") > 0 and peak(samples, "gpu_used") is None
    if Path("/proc/self/smaps_rollup").exists():
        # PSS splits the shared interpreter pages, so the tree's is under its RSS sum but holds both buffers;
        # the grandchild's 64 MiB are private to it.
        assert 128 << 20 <= peak(samples, "tree_pss") < peak(samples, "tree_rss")
        assert peak(samples, "children_uss") >= 64 << 20
    assert tree_rss_bytes(proc.pid) == (0, 0)  # gone
