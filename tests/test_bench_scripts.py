"""CPU proofs of the GPU benchmark scripts: each runs its `--tiny` mode in-process (same code path as the 14B
run, tiny model and samples) and must print and append one well-formed JSON line. Bench-script tests: they guard
the scripts the GPU sessions run in one call each, where a crash costs device time."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import cache_speed, engine_step, load_host, pinned_slab_check


def _one_line(path, capsys) -> dict:
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    return result


@pytest.mark.timeout(120)
def test_bench_engine_step_tiny_trains_through_the_runner(tmp_path, capsys):
    out = tmp_path / "engine_step.jsonl"
    code = engine_step.main(["--tiny", "--preset", "24gb", "--mode", "continuation", "--steps", "4",
                             "--json", str(out), "--scratch", str(tmp_path), "--host-budget-gib", "0.01",
                             "--set", "tread.enabled=true", "--set", "tread.selection_ratio=0.5"])
    r = _one_line(out, capsys)
    # It trained, but the process took more than the 10 MiB host budget: the check says so and the exit code fails.
    assert code == 2 and r["status"] == "completed", r["reason"]
    assert r["host_budget_gib"] == 0.01 and r["host_within_budget"] is False
    assert r["steps"] == 4 and len(r["s_all"]) == 4 and all(t > 0 for t in r["s_all"])
    assert r["s_per_step"] > 0 and r["peak_host_rss_gib"] > 0
    assert r["switches"]["residual_dtype"] == "bf16" and not r["switches"]["block_offload"]  # CPU overrides
    assert r["tread"] == {"enabled": True, "selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}
    assert list(tmp_path.iterdir()) == [out]  # the scratch model and run folder are gone


@pytest.mark.timeout(120)
def test_bench_engine_step_trains_with_crepa(tmp_path, capsys):
    out = tmp_path / "engine_step.jsonl"
    code = engine_step.main(["--tiny", "--preset", "24gb", "--steps", "3", "--json", str(out), "--scratch",
                             str(tmp_path), "--set", "crepa.enabled=true", "--set", "crepa.block_index=1"])
    r = _one_line(out, capsys)
    assert code == 0 and r["status"] == "completed", r["reason"]
    assert r["crepa"] == {"enabled": True, "block_index": 1, "feature_dim": 16}  # the tiny model's own DINOv2


def test_bench_writes_the_dinov2_giant_configuration_for_crepa(tmp_path):
    from engine.config import Config, with_value

    config, dim = engine_step.crepa_encoder(with_value(Config(), "crepa.enabled", True), tmp_path)
    assert dim == 1536 and config.crepa.encoder == str(tmp_path / "dinov2")
    assert [p.name for p in (tmp_path / "dinov2").iterdir()] == ["config.json"]  # the features are the bench's own


@pytest.mark.timeout(120)
def test_bench_cache_speed_tiny_fills_a_cache_with_timed_passes(tmp_path, capsys):
    out = tmp_path / "cache_speed.jsonl"
    code = cache_speed.main(["--tiny", "--json", str(out), "--scratch", str(tmp_path)])
    r = _one_line(out, capsys)
    assert code == 0 and r["complete"] and r["skipped"] == 0
    assert r["clips"] == 2 and r["windows"] == 4 and r["windows_with_motion"] == 2
    assert list(r["phases"]) == ["plan", "vae", "audio", "text"]
    assert r["phases"]["vae"]["items"] == 6  # 2 references + 4 windows
    assert r["windows_per_min"] > 0 and r["clips_per_min"] > 0
    from engine.data import cache_fill

    assert cache_fill._release.__name__ == "_release"  # the timing wrappers were taken off again
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.timeout(120)
def test_bench_sample_speed_tiny_renders_one_validation_sample(tmp_path, capsys):
    from bench import sample_speed

    out = tmp_path / "sample_speed.jsonl"
    code = sample_speed.main(["--tiny", "--steps", "3", "--json", str(out), "--scratch", str(tmp_path)])
    r = _one_line(out, capsys)
    assert code == 0 and r["steps"] == 3 and r["solver"] == "unipc"
    # One 80-frame chunk minus the 3 frames the first chunk drops, at 16 fps, with that much driving audio.
    assert r["mp4"]["frames"] == 77 and r["mp4"]["fps"] == 16.0
    assert abs(r["mp4"]["audio_s"] - 77 / 16) < 0.1
    assert r["denoise_s"] > 0 and r["step_s_median"] > 0 and r["sample_s"] >= r["denoise_s"]
    assert list(tmp_path.iterdir()) == [out]


@pytest.mark.timeout(120)
def test_host_budget_check_records_the_budget_and_the_verdict():
    from bench.report import check_host_budget

    r = {"peak_host_rss_gib": 22.05}
    assert check_host_budget(r, 0) and "host_budget_gib" not in r
    assert check_host_budget(r, 24) and r["host_within_budget"] is True
    assert not check_host_budget(r, 16) and r == {"peak_host_rss_gib": 22.05, "host_budget_gib": 16,
                                                  "host_within_budget": False}


def test_bench_engine_step_refuses_bare_with_tread(capsys):
    with pytest.raises(SystemExit):
        engine_step.main(["--tiny", "--bare", "--steps", "4", "--set", "tread.enabled=true"])
    assert "does not route tokens" in capsys.readouterr().err


def test_bench_engine_step_bare_command_carries_the_speed_switches():
    config = engine_step.build_config(argparse.Namespace(
        preset="32gb", mode="first", steps=3, vram_budget_gb=0, strategy=None, tiny=False,
        set=['memory.checkpoint_policy="save_attention"', "memory.fp8_input_grad=true"]), Path("m"), Path("r"))
    cmd = engine_step.bare_command(config, "first", 3)
    assert cmd[cmd.index("--policy") + 1] == "save_attention"
    assert cmd[cmd.index("--base-weights") + 1] == "fp8" and "--fp8-backward" in cmd
    lowram = engine_step.build_config(argparse.Namespace(
        preset="24gb-lowram", mode="first", steps=3, vram_budget_gb=0, strategy=None, tiny=False, set=[]),
        Path("m"), Path("r"))
    cmd = engine_step.bare_command(lowram, "first", 3)
    assert cmd[cmd.index("--base-weights") + 1] == "int8" and cmd[cmd.index("--stream-blocks") + 1] == "0"
    assert "--offload-inputs" in cmd and cmd[cmd.index("--gpu-saved-inputs") + 1] == "21"


@pytest.mark.timeout(120)
def test_bench_engine_step_reuses_a_written_model_folder(tmp_path, capsys):
    model = tmp_path / "model"
    assert engine_step.main(["--tiny", "--write-model", str(model)]) == 0
    assert (model / "transformer" / "config.json").is_file()
    capsys.readouterr()
    out = tmp_path / "engine_step.jsonl"
    code = engine_step.main(["--tiny", "--model-dir", str(model), "--steps", "3", "--json", str(out),
                             "--scratch", str(tmp_path / "new"), "--set", 'memory.checkpoint_policy="save_attention"'])
    r = _one_line(out, capsys)
    assert code == 0 and r["status"] == "completed" and r["write_model_s"] == 0.0
    assert r["switches"]["checkpoint_policy"] == "save_attention"
    assert r["world_size"] == 1 and r["strategy"] == "single" and r["samples_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine_step.jsonl", "model", "new"]  # the model stays
    assert list((tmp_path / "new").iterdir()) == []  # a missing scratch folder is made; the run in it is removed


@pytest.mark.timeout(120)
def test_bench_load_host_tiny_measures_the_low_bit_load_in_a_fresh_process(tmp_path, capsys):
    out = tmp_path / "load_host.jsonl"
    assert load_host.main(["--tiny", "--scratch", str(tmp_path / "s"), "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == ["old", "new"]  # one fresh process each
    assert [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:]] == rows
    for r in rows:
        assert r["tiny"] and r["kind"] == "fp8" and r["linears"] == 40 and r["params"] > 0
        assert 0 < r["baseline_rss_gib"] <= r["peak_rss_total_gib"] and 0 < r["low_bit_model_gib"] < 0.01
        assert 0 < r["peak_rss_anon_gib"] and 0 < r["baseline_rss_file_gib"] <= r["peak_rss_file_gib"]
        assert 0 < r["baseline_used_gib"] and 0 < r["peak_used_gib"]
    assert rows[0]["bf16_model_gib"] >= rows[0]["low_bit_model_gib"] == rows[1]["low_bit_model_gib"]
    assert list((tmp_path / "s").iterdir()) == []  # the written model is removed


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer without CUDA")
def test_bench_pinned_slab_check_says_it_needs_a_gpu_and_what_it_expects(tmp_path, capsys):
    out = tmp_path / "pinned.jsonl"
    assert pinned_slab_check.main(["--units", "4", "--inputs", "8", "--json", str(out)]) == 1
    r = _one_line(out, capsys)
    assert "no CUDA device" in r["status"] and r["expected"]["tensors"] == 128
    # The memory model's two counts for the same tensors: exact slabs, and torch's power-of-two buffers.
    assert r["expected"]["slab_gib"] == 5.587 and r["expected"]["torch_rounded_gib"] == 8.376


def test_bench_attention_backends_cpu_proof_times_math_and_reports_the_rest_as_errors(tmp_path, capsys):
    from bench import attention_backends as ab

    out = tmp_path / "attention.jsonl"
    assert ab.main(["--device", "cpu", "--tokens", "64", "--heads", "2", "--head-dim", "32", "--warmup", "1",
                    "--iters", "2", "--backends", "sdpa_math,sdpa_cudnn,fa4,sage,cudnn_fp8", "--out", str(out)]) == 0
    header, *lines = (json.loads(line) for line in out.read_text().splitlines())
    assert header["shape"] == [1, 64, 2, 32] and header["fwd_flops"] == 4 * 2 * 64 * 64 * 32
    by_name = {line["backend"]: line for line in lines}
    assert list(by_name) == ["sdpa_math", "sdpa_cudnn", "fa4", "sage", "cudnn_fp8"]
    math = by_name["sdpa_math"]
    assert "error" not in math and math["fwd_ms"] > 0 and math["bwd_ms"] == math["fwd_bwd_ms"] - math["fwd_ms"]
    assert math["bwd_tflops"] == pytest.approx(2.5 * header["fwd_flops"] / (math["bwd_ms"] * 1e-3) / 1e12)
    for name in ("o", "dq", "dk", "dv"):  # bf16 inputs and outputs against the fp32 reference
        assert 0 < math[f"vs_fp32_{name}_rel_l2"] < 1e-2 and math[f"vs_fp32_{name}_cos"] > 0.9999
    assert all(by_name[n]["error"] for n in ("sdpa_cudnn", "fa4", "sage", "cudnn_fp8"))  # a line each, no crash
    assert "sdpa_math  fwd" in capsys.readouterr().out


def test_bench_attention_fp8_quantisation_maps_the_amax_to_the_e4m3_maximum():
    import torch

    from bench.attention_backends import FP8_MAX, CudnnFp8

    x = torch.randn(1, 64, 2, 32, dtype=torch.bfloat16)
    q8, descale = CudnnFp8.quantize(x)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == (1, 2, 64, 32) and q8.is_contiguous()
    assert float(q8.float().abs().max()) == FP8_MAX
    back = q8.float().transpose(1, 2) * descale
    assert float((back - x.float()).norm() / x.float().norm()) < 0.05  # e4m3: 3 mantissa bits


@pytest.mark.timeout(120)
def test_bench_engine_step_runs_without_pyav(tmp_path, tiny_model_dir):
    """The GPU machine has no PyAV unless a wheel is carried: the engine's training loop on in-memory samples (no
    clip to decode, no eval dataset) must not import it. An `av` that refuses to import stands first on the path."""
    import subprocess
    import sys

    (tmp_path / "noav" / "av").mkdir(parents=True)
    (tmp_path / "noav" / "av" / "__init__.py").write_text("raise ImportError('PyAV imported by the training loop')\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path / 'noav'}:{repo}"}
    proc = subprocess.run([sys.executable, str(repo / "bench" / "engine_step.py"), "--tiny", "--steps", "3",
                           "--model-dir", str(tiny_model_dir), "--scratch", str(tmp_path / "s")],
                          capture_output=True, text=True, env=env, cwd=repo)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["status"] == "completed", result["reason"]
