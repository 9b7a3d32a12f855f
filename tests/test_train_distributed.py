"""Several processes on the CPU (gloo), started by `accelerate launch` as on a multi-GPU machine.

One launch per strategy (ddp, fsdp), 2 processes of batch 1 each, against one in-process run of batch 2, on the
user's path: clips on disk whose feature cache was filled once in one process (as `s2v-tui --gpus N` does before
launching), validation on (two cases, the eval loss). The LoRA and the eval loss must agree; the run folder must
hold what rank 0 wrote, with the samples of DDP's second case from rank 1; nothing is written to the cache; the
checkpoint must resume in one process; a SIGTERM to the launcher leaves a checkpoint that resumes there.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from engine.config import save_config, with_value
from engine.event_log import read_events
from engine.events import EVENTS_FILENAME
from engine.runner import run
from engine.train.checkpoint import list_checkpoints, load_checkpoint
from engine.models.lora import load_lora
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.demo import demo_config
from s2v_tui.commands.launch import accelerate_command, split_gpus

ROOT = Path(__file__).resolve().parents[1]
CLIPS = 4
STEPS = 4
# fp32 on the CPU; the runs differ only in the order of the gradient sums (two half-batch means averaged against
# one mean): a few ulps. AdamW divides by the gradient's own size, which turns those ulps into a visible part of
# lr for entries whose gradient is near zero (worst 4.8e-5 after 4 steps with eps 1e-8); optim.eps = 1e-4 in
# these runs keeps that out, and the measured worst is then 1.7e-6. atol 2e-5 leaves 10x of margin and is far
# below what a wrong shard, a missing reduction or an unscaled loss gives (> 1e-3).
TOLERANCE = dict(rtol=1e-4, atol=2e-5)

# Each rank: the headless run of the preset on in-memory clips, recording every file it opens for writing in
# the run folder (to show that rank 1 writes nothing there).
CHILD = r"""
import builtins, json, os, sys
import torch
torch.set_num_threads(1)
preset, run_dir, clips, witness, crepa_dim, cache_dir = sys.argv[1:7]
rank = int(os.environ["RANK"])
writes = []
real_open, real_os_open = builtins.open, os.open
watched = tuple(p for p in (run_dir, cache_dir) if p)

def spy_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and str(file).startswith(watched):
        writes.append(str(file))
    return real_open(file, mode, *args, **kwargs)

def spy_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR) and str(path).startswith(watched):
        writes.append(str(path))
    return real_os_open(path, flags, *args, **kwargs)

builtins.open, os.open = spy_open, spy_os_open
import engine.train.validation as validation  # PyAV opens the sample files in C, past the spies above
real_write_sample = validation.write_sample_mp4

def spy_write_sample(path, *args, **kwargs):
    writes.append(str(path))
    return real_write_sample(path, *args, **kwargs)

validation.write_sample_mp4 = spy_write_sample
from engine.train.synthetic import SyntheticLatentDataset
from s2v_tui.commands.headless import run_headless
# clips "0": the preset's clips through their filled cache (the user's path); else that many in-memory windows
dataset = None if clips == "0" else SyntheticLatentDataset(int(clips), crepa_dim=int(crepa_dim))
code = run_headless(preset, run_dir=run_dir, dataset=dataset, device="cpu")
real_open(f"{witness}/rank{rank}.json", "w").write(json.dumps({"code": code, "writes": writes}))
sys.exit(code)
"""




# Validation at the last step: two cases (one per rank under DDP), three eval triples (one rank has one more).
VALIDATION = {"validation.every_steps": STEPS, "validation.steps": 1, "validation.solver": "euler",
              "validation.eval_loss.enabled": True, "validation.eval_loss.num_triples": 3}


def _config(model_dir, runs, user_path=None, **overrides):
    """The tiny run; with `user_path` (the clips fixture) on clips and their cache, validation on."""
    if user_path is None:
        config = demo_config(Path(model_dir), Path(runs))
    else:
        clips, cache = user_path
        config = demo_config(Path(model_dir), Path(runs), clips, cache)
        cases = [{"reference": str(c), "audio": str(c), "prompt": "a person talks", "seed": i}
                 for i, c in enumerate(sorted(clips.glob("*.mp4")))]
        overrides = {**VALIDATION, "validation.cases": cases, **overrides}
    settings = {"optim.max_steps": STEPS, "optim.warmup_steps": 0, "checkpoint.every_steps": 2,
                "checkpoint.keep_last": 5, "memory.gradient_checkpointing": True, "optim.eps": 1e-4, **overrides}
    for key, value in settings.items():
        config = with_value(config, key, value)
    return config


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(tmp_path: Path, config, name: str, crepa_dim: int = 0, cached: bool = False):
    """(command, env, run folder, witness folder) of a 2-process launch of the child on `config`."""
    preset = save_config(config, tmp_path / f"{name}.toml")
    run_dir, witness = tmp_path / name, tmp_path / f"{name}-witness"
    witness.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    launcher = accelerate_command(2, [])[:-2]  # without "-m s2v_tui.cli": the child script instead
    command = [*launcher, "--main_process_port", str(_free_port()), str(script), str(preset), str(run_dir),
               "0" if cached else str(CLIPS), str(witness), str(crepa_dim), str(config.data.cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return command, env, run_dir, witness


def _launch(tmp_path: Path, config, name: str, crepa_dim: int = 0, cached: bool = False):
    command, env, run_dir, witness = _launch_command(tmp_path, config, name, crepa_dim, cached)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"accelerate launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return run_dir, {r: json.loads((witness / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.fixture(scope="module")
def user_path(tiny_model_dir, tmp_path_factory):
    """Two talking clips on disk and their feature cache, filled once in one process by `s2v-tui cache`, as
    `s2v-tui --gpus N` fills it before it launches N processes."""
    from s2v_tui.commands.cache import main as cache_main
    from s2v_tui.commands.demo import make_demo_clips

    tmp = tmp_path_factory.mktemp("clips")
    paths = make_demo_clips(tmp / "clips"), tmp / "cache"
    preset = save_config(_config(tiny_model_dir, tmp / "runs", paths), tmp / "cache.toml")
    assert cache_main([str(preset)]) == 0
    return paths


@pytest.fixture(scope="module")
def single_batch2(tiny_model_dir, tmp_path_factory, user_path):
    """The reference: one process, batch 2 (= 2 processes x batch 1), on the same cache, validation on."""
    tmp = tmp_path_factory.mktemp("single")
    config = _config(tiny_model_dir, tmp / "runs", user_path, **{"optim.batch_size": 2})
    end = run(config, [], threading.Event(), run_dir=tmp / "run", device="cpu")
    assert end.status == "completed", end.reason
    return tmp / "run", end


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory, user_path):
    tmp = tmp_path_factory.mktemp("ddp")
    return _launch(tmp, _config(tiny_model_dir, tmp / "runs", user_path), "ddp", cached=True)


def _validations(run_dir: Path) -> dict[int, tuple[float, list[str]]]:
    """step -> (eval loss, the sample files relative to the run folder) of the run's ValidationDone events."""
    return {e.step: (e.eval_loss, sorted(str(Path(p).relative_to(run_dir)) for p in e.sample_paths))
            for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "validation_done"}


def _validation_matches(run_dir: Path, reference: Path) -> None:
    got, want = _validations(run_dir), _validations(reference)
    assert got.keys() == want.keys() == {STEPS}
    for step, (loss, paths) in got.items():
        assert paths == want[step][1], step
        assert len(paths) == 4  # the base model's two samples (once a run), then the LoRA's two
        assert all((run_dir / p).stat().st_size > 0 for p in paths)
        # The LoRA differs from the reference's by the order of the gradient sums (TOLERANCE): so does the loss.
        assert abs(loss - want[step][0]) <= 1e-4 * abs(want[step][0]), (step, loss, want[step][0])


def _lora_matches(run_dir: Path, reference: Path) -> float:
    got, _ = load_lora(next(run_dir.glob("*_peft.safetensors")))
    want, _ = load_lora(next(reference.glob("*_peft.safetensors")))
    assert got.keys() == want.keys()
    worst = max(float((got[k] - want[k]).abs().max()) for k in got)
    for k in got:
        torch.testing.assert_close(got[k], want[k], **TOLERANCE, msg=lambda m, k=k: f"{k}: {m}")
    moved = max(float((want[k]).abs().max()) for k in want if ".lora_B." in k)
    assert moved > 1e-3  # the LoRA did train: B starts at zero
    return worst


def test_two_processes_of_batch_1_train_the_lora_of_one_of_batch_2(ddp_run, single_batch2):
    run_dir, _ = ddp_run
    print(f"largest LoRA difference, 2 x batch 1 (ddp) vs 1 x batch 2: {_lora_matches(run_dir, single_batch2[0]):.3g}")
    losses = {e.step: e.loss for e in read_events(run_dir / EVENTS_FILENAME) if e.kind == "step_end"}
    want = {e.step: e.loss for e in read_events(single_batch2[0] / EVENTS_FILENAME) if e.kind == "step_end"}
    assert losses.keys() == want.keys() == set(range(1, STEPS + 1))
    for step, loss in losses.items():  # the reported loss is the mean over both ranks' windows
        assert abs(loss - want[step]) <= 1e-5 * abs(want[step]), (step, loss, want[step])


def test_ddp_shares_the_validation_out_and_gives_one_process_numbers(ddp_run, single_batch2):
    run_dir, ranks = ddp_run
    _validation_matches(run_dir, single_batch2[0])
    # Case i renders (and is written) on rank i mod 2: rank 1 wrote case 1's samples and nothing else.
    ones = {"samples/base/case-01.mp4", f"samples/step-{STEPS:05d}/case-01.mp4"}
    assert {str(Path(p).relative_to(run_dir)) for p in ranks[1]["writes"]} == ones
    assert not any(str(Path(p).relative_to(run_dir)) in ones for p in ranks[0]["writes"] if p.startswith(str(run_dir)))


def test_only_rank_0_writes_and_it_reports_every_rank_memory(ddp_run, user_path):
    run_dir, ranks = ddp_run
    assert ranks[0]["code"] == ranks[1]["code"] == 0
    assert all(p.startswith(str(run_dir / "samples")) for p in ranks[1]["writes"]), ranks[1]["writes"][:5]
    assert not any(p.startswith(str(user_path[1])) for r in (0, 1) for p in ranks[r]["writes"])  # cache: read only
    written = {Path(p).name for p in ranks[0]["writes"]}
    assert {EVENTS_FILENAME, "train.log"} <= written
    events = read_events(run_dir / EVENTS_FILENAME)
    kinds = [e.kind for e in events]
    assert kinds.count("run_started") == kinds.count("run_ended") == 1  # not once per rank
    assert "2 processes (ddp)" in events[0].device
    steps = [e for e in events if e.kind == "step_end"]
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    assert all(len(e.rank_host_rss_bytes) == 2 and all(v and v > 0 for v in e.rank_host_rss_bytes) for e in steps)
    assert all(e.rank_peak_alloc_bytes == (None, None) for e in steps)  # no GPU memory on the CPU
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 2]


def test_a_two_process_checkpoint_resumes_in_one_process(ddp_run, tiny_model_dir, tmp_path, user_path):
    source, _ = ddp_run
    run_dir = tmp_path / "resumed"
    shutil.copytree(source, run_dir)
    for step, path in list_checkpoints(run_dir):
        if step > 2:
            path.unlink()
    for output in run_dir.glob("*.safetensors"):
        output.unlink()
    at_2 = load_checkpoint(run_dir / "checkpoints" / "step-00000002.pt")
    # The cache's sampler position is global: 2 steps of the global batch of 2 ranks x batch 1.
    assert at_2["world_size"] == 2 and at_2["data"]["batch_size"] == 2
    events = []
    config = _config(tiny_model_dir, tmp_path, user_path)  # the run folder's frozen copy of it is what resumes
    end = run(config, [events.append], threading.Event(), run_dir=run_dir, device="cpu")
    assert end.status == "completed", end.reason
    assert next(e for e in events if e.kind == "run_started").resumed_from_step == 2
    assert any(e.kind == "warning" and e.code == "world_size_changed" for e in events)
    final = load_checkpoint(run_dir / "checkpoints" / f"step-{STEPS:08d}.pt")
    assert final["world_size"] == 1 and final["data"]["batch_size"] == 1  # one window a step now


def test_fsdp2_shards_the_tiny_model_and_trains_the_same_lora(tiny_model_dir, tmp_path, single_batch2, user_path):
    from torch.distributed.fsdp import fully_shard  # noqa: F401 - the test needs FSDP2 itself

    # With the 80gb preset's selective checkpointing (exact on the CPU, so the reference's full policy still
    # gives the same LoRA): FSDP2 re-gathers each block for the recompute that keeps the attention outputs.
    config = _config(tiny_model_dir, tmp_path / "runs", user_path, **{"distributed.strategy": "fsdp",
                                                                     "memory.checkpoint_policy": "save_attention"})
    run_dir, ranks = _launch(tmp_path, config, "fsdp", cached=True)
    # Every sample rendered by both ranks together (each forward gathers the other's shards), written by rank 0.
    assert ranks[1]["writes"] == []
    _validation_matches(run_dir, single_batch2[0])
    log = (run_dir / "train.log").read_text()
    assert "FSDP2: " in log and "(save_attention)" in log
    print(f"largest LoRA difference, 2 x batch 1 (fsdp) vs 1 x batch 2: {_lora_matches(run_dir, single_batch2[0]):.3g}")
    # Its checkpoint holds full (gathered) tensors: it resumes in one process like a DDP one.
    state = load_checkpoint(run_dir / "checkpoints" / "step-00000002.pt")
    assert all(type(v) is torch.Tensor for v in state["lora"].values())
    exp_avg = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert exp_avg and all(type(t) is torch.Tensor for t in exp_avg)


def test_settings_that_do_not_combine_fail_with_the_key_and_the_fix(tiny_model_dir, tmp_path):
    from engine.train.allowed import setting_problems

    config = _config(tiny_model_dir, tmp_path)
    assert setting_problems(with_value(config, "memory.block_offload", True), 1) == []
    [problem] = setting_problems(with_value(config, "memory.block_offload", True), 2)
    assert "memory.block_offload" in problem and "fsdp" in problem
    fsdp = with_value(config, "distributed.strategy", "fsdp")
    assert setting_problems(with_value(config, "memory.offload_checkpoint_inputs", True), 2) == []
    [problem] = setting_problems(with_value(fsdp, "memory.offload_checkpoint_inputs", True), 4)
    assert "offload_checkpoint_inputs = false" in problem


def test_gpus_option_becomes_an_accelerate_launch_of_the_same_command():
    gpus, rest = split_gpus(["--gpus", "4", "--run", "p.toml", "--set", "optim.lr=1e-5"])
    assert gpus == 4 and rest == ["--run", "p.toml", "--set", "optim.lr=1e-5"]
    command = accelerate_command(4, rest, python="/venv/bin/python")
    assert command[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[-6:] == ["-m", "s2v_tui.cli", "--run", "p.toml", "--set", "optim.lr=1e-5"]
    assert split_gpus(["--gpus=2", "--run", "p.toml"]) == (2, ["--run", "p.toml"])


def test_ddp_with_crepa_trains_the_lora_and_projector_of_one_process(tiny_model_dir, tmp_path):
    """The projector's gradient is averaged with the LoRA's: 2 processes of batch 1 = 1 process of batch 2."""
    from engine.train.checkpoint import find_resume_state

    crepa = {"crepa.enabled": True, "crepa.block_index": 1, "crepa.encoder": str(Path(tiny_model_dir) / "dinov2")}
    single = _config(tiny_model_dir, tmp_path / "runs", **{"optim.batch_size": 2, **crepa})
    end = run(single, [], threading.Event(), run_dir=tmp_path / "single",
              dataset=SyntheticLatentDataset(CLIPS, crepa_dim=16), device="cpu")
    assert end.status == "completed", end.reason
    run_dir, _ = _launch(tmp_path, _config(tiny_model_dir, tmp_path / "runs", **crepa), "ddp-crepa", crepa_dim=16)
    _lora_matches(run_dir, tmp_path / "single")
    got, want = find_resume_state(run_dir)[0]["crepa"], find_resume_state(tmp_path / "single")[0]["crepa"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOLERANCE, msg=lambda m, k=k: f"projector {k}: {m}")


# `s2v-tui --gpus 2 --run PRESET` itself, on a machine whose 2 "GPUs" are CPU processes (gloo).
COMMAND = ("import sys; import s2v_tui.commands.launch as launch; launch._gpu_count = lambda: 2; "
           "from s2v_tui.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.timeout(300)
def test_a_stop_signal_to_the_command_leaves_a_checkpoint_that_resumes_in_one_process(tiny_model_dir, tmp_path,
                                                                                     user_path):
    """`s2v-tui --gpus 2 --run PRESET` (its cache phase in one process, then the launch) and a SIGTERM to it (a
    rented box's shutdown, `kill`; a Ctrl-C's SIGINT takes the same handler): it passes one stop to every rank
    (the launcher, in its own session, ignores them); the ranks agree on the step, rank 0 writes the checkpoint,
    the command exits 75, and one process resumes from the checkpoint."""
    import signal
    import time

    from s2v_tui.commands.headless import EXIT_STOPPED

    config = _config(tiny_model_dir, tmp_path / "runs", user_path,
                     **{"optim.max_steps": 24, "checkpoint.every_steps": 1000, "validation.every_steps": 0})
    preset = save_config(config, tmp_path / "term.toml")
    run_dir = tmp_path / "term"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, "--gpus", "2", "--run", str(preset), "--run-dir",
                             str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 200
    log = run_dir / EVENTS_FILENAME
    while not (log.exists() and any(e.kind == "step_end" and e.step >= 2 for e in read_events(log))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, (out[-2000:], err[-3000:])
    assert "filling the feature cache" in out and "SIGTERM: stopping 2 rank(s)" in err
    [end] = [e for e in read_events(log) if e.kind == "run_ended"]
    [(step, _)] = list_checkpoints(run_dir)
    assert end.status == "stopped" and 2 <= step < 24 and "2 processes (ddp)" in read_events(log)[0].device
    events = []
    end = run(config, [events.append], threading.Event(), run_dir=run_dir, device="cpu")
    assert end.status == "completed", end.reason
    assert next(e for e in events if e.kind == "run_started").resumed_from_step == step


def test_a_launch_that_accelerate_joins_as_single_processes_is_refused(monkeypatch):
    """WORLD_SIZE says 2 but accelerate made one process of this one (no device for the group): N ranks that each
    trained alone would share one run folder, so the rank stops, naming it."""
    import accelerate

    from engine.config import Config
    from engine.train import distributed

    class Alone:
        num_processes, process_index, device = 1, 0, torch.device("cpu")

        def __init__(self, cpu=False):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "PartialState", Alone)
    with pytest.raises(RuntimeError, match=r"launched as 2 processes \(WORLD_SIZE\), but accelerate joined 1"):
        distributed.setup(Config(), None)
