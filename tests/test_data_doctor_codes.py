"""One test per doctor problem code: build the bad input, run `s2v-tui check`, check code, file and exit."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.data import problems, synth_broken
from engine.data.doctor import DoctorSettings, inspect_datasets
from s2v_tui.commands import check as check_cmd


def run_check(capsys, args: list[str]) -> tuple[int, dict]:
    code = check_cmd.main(args + ["--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def reported(doc: dict) -> list[dict]:
    return doc["problems"] + [p for c in doc["clips"] for p in c["problems"]]


def test_every_code_has_a_maker():
    assert set(synth_broken.MAKERS) == set(problems.KINDS)


@pytest.mark.parametrize("code", sorted(problems.KINDS))
def test_problem_code(code, tmp_path, capsys, monkeypatch):
    case = synth_broken.make_broken(code, tmp_path)
    if case.on_file_read is not None:
        # The scanner's hook simulates a file that changes while it is being checked.
        monkeypatch.setattr(check_cmd, "inspect_datasets",
                            functools.partial(inspect_datasets, on_file_read=case.on_file_read))
    exit_code, doc = run_check(capsys, [str(case.dataset), *case.args])
    hits = [p for p in reported(doc) if p["code"] == code]
    assert hits, f"{code} not reported; got {[p['code'] for p in reported(doc)]}"
    assert any(Path(p["path"]) == case.path for p in hits), (case.path, hits)
    assert all(p["fix"] and p["message"] for p in hits)
    if problems.KINDS[code].severity == problems.BLOCKING:
        assert exit_code == 1
    else:
        # Warnings alone do not fail the check, except with --strict.
        assert exit_code == 0, [p for p in reported(doc) if p["severity"] == "blocking"]
        strict_code, _ = run_check(capsys, [str(case.dataset), *case.args, "--strict"])
        assert strict_code == 1


def test_clean_dataset_passes(tmp_path, capsys):
    for i in range(2):
        synth_broken.good_clip(tmp_path / "ds", f"ok_{i}", seed=i)
    exit_code, doc = run_check(capsys, [str(tmp_path / "ds"), *synth_broken.BASE_ARGS])
    assert exit_code == 0
    assert reported(doc) == []
    assert doc["summary"]["usable_clips"] == 2
    plan = doc["clips"][0]["plan"]
    assert plan["windows"][0] == {"start": 0, "end": 80, "frames": 80, "motion_frames": 0, "latents": 20,
                                  "motion_latents": 0}
    assert "25.000 fps -> 16 fps" in plan["fps_conversion"]


def test_silent_audio_allowed_turns_blocking_into_warning(tmp_path):
    case = synth_broken.make_broken("no-audio-stream", tmp_path)
    report = inspect_datasets([case.dataset], DoctorSettings(min_side=40, allow_silent_audio=True))
    assert [p.code for p in report.warnings] == ["no-audio-stream"]
    assert report.blocking == []
    assert report.clips[0].usable


def test_file_symlink_loop_is_reported(tmp_path):
    d = tmp_path / "ds"
    synth_broken.good_clip(d)
    os.symlink("self.mp4", d / "self.mp4")
    report = inspect_datasets([d], DoctorSettings(min_side=40))
    assert [(p.code, p.path) for p in report.all_problems] == [("symlink-loop", d / "self.mp4")]


def _tree_state(root: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            state[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return state


def test_check_never_modifies_user_files(tmp_path, capsys):
    roots = []
    for code in ("corrupt-container", "caption-undecodable", "duplicate-stem", "metadata-invalid"):
        case = synth_broken.make_broken(code, tmp_path / code)
        roots.append(case.dataset)
    before = _tree_state(tmp_path)
    check_cmd.main([str(r) for r in roots] + list(synth_broken.BASE_ARGS))
    capsys.readouterr()
    assert _tree_state(tmp_path) == before


def test_plain_output_names_file_and_fix(tmp_path, capsys):
    case = synth_broken.make_broken("caption-missing", tmp_path)
    assert check_cmd.main([str(case.dataset), *case.args]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "caption-missing" in l)
    assert str(case.path) in line and "fix:" in line


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert check_cmd.main([str(tmp_path), "--bucket", "830x480"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_process_pool_gives_the_same_report_and_progress(tmp_path, monkeypatch):
    from engine.data import doctor

    synth_broken.good_clip(tmp_path, "a")
    synth_broken.good_clip(tmp_path, "b", caption=None)
    synth_broken.good_clip(tmp_path, "c", silent=True)
    settings = DoctorSettings(min_side=40, workers=2)
    threads = inspect_datasets([tmp_path], settings)
    monkeypatch.setattr(doctor, "PROCESS_POOL_MIN_CLIPS", 2)
    seen = []
    procs = inspect_datasets([tmp_path], settings, progress=lambda d, t, p: seen.append((d, t)))
    assert [c.to_dict() for c in procs.clips] == [c.to_dict() for c in threads.clips]
    assert sorted(p.code for p in procs.all_problems) == ["caption-missing", "mostly-silent"]
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_stop_event_cancels_the_check(tmp_path):
    import threading

    for i in range(3):
        synth_broken.good_clip(tmp_path, f"c{i}")
    stop = threading.Event()
    stop.set()
    report = inspect_datasets([tmp_path], DoctorSettings(min_side=40, workers=1), stop=stop)
    assert report.cancelled and len(report.clips) < 3


def test_late_audio_start_is_a_duration_mismatch(tmp_path):
    from engine.data import synth

    synth.make_talking_clip(tmp_path, "late", audio="pcm", duration_s=6.0, audio_duration_s=5.0, use_espeak=False)
    # Rewrite with the audio placed 1 s late on the container timeline.
    frames = synth.render_faces(np.zeros(150), 64, 48)
    synth.write_video(tmp_path / "late.mkv", frames, 25, audio=synth.speech_like_audio(5.0), audio_codec="pcm_s16le",
                      audio_start_s=1.0)
    report = inspect_datasets([tmp_path], DoctorSettings(min_side=40))
    (p,) = report.all_problems
    assert p.code == "duration-mismatch" and "starts 1.00 s after" in p.message


def test_exact_token_count_with_a_tokenizer_folder(tmp_path, capsys):
    from engine.models.tiny import _write_tokenizer  # the tiny model's tokenizer alone, without weights

    _write_tokenizer(tmp_path)
    case = synth_broken.make_broken("caption-too-long", tmp_path / "case")
    code, doc = run_check(capsys, [str(case.dataset), *case.args, "--tokenizer", str(tmp_path / "tokenizer")])
    (hit,) = [p for p in reported(doc) if p["code"] == "caption-too-long"]
    assert "about" not in hit["message"] and code == 0


def _one_frame_clips(folder: Path) -> list[Path]:
    from engine.data import synth

    return [synth.make_talking_clip(folder, stem, fps=25, duration_s=1 / 25, audio=audio, use_espeak=False).video
            for stem, audio in (("still", "aac"), ("still_pcm", "pcm"))]


def _check_in_a_new_process(args: list[str]) -> str:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "s2v_tui.cli", "check", *args], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 1, done.stderr  # too short to train: blocking
    return done.stdout


def test_one_frame_clip_has_one_length_everywhere(tmp_path):
    """The plain check, its --json and the problems all give a 1-frame clip the same length in the same unit,
    its frame rate from the header (one frame has no interval), and no made-up audio/video mismatch. In new
    processes: the scan used to read the stream's rate after closing the file, which gave garbage there."""
    videos = _one_frame_clips(tmp_path / "ds")
    length = "1 frame at 16 fps (0.04 s)"
    args = [str(tmp_path / "ds"), *synth_broken.BASE_ARGS]
    plain = _check_in_a_new_process(args)
    doc = json.loads(_check_in_a_new_process([*args, "--json"]))
    for video in videos:
        (line,) = [l for l in plain.splitlines() if l.startswith(f"clip {video}:")]
        assert f"; {length}, 0 windows" in line and "25.000 fps -> 16 fps" in line
        (clip,) = [c for c in doc["clips"] if c["video"] == str(video)]
        plan = clip["plan"]
        assert (plan["length"], plan["frames_16fps"], plan["duration_s"], plan["source_fps"]) == (length, 1, 0.04, 25.0)
        (short,) = [p for p in clip["problems"] if p["code"] == "too-few-frames"]
        assert short["message"] == f"{length}; one window needs 80 frames at 16 fps (5.00 s)"
        assert "80 frames at 16 fps (5.00 s)" in short["fix"]
        assert f"too-few-frames {video}: {length};" in plain
    assert "duration-mismatch" not in plain and all(p["code"] != "duration-mismatch" for p in reported(doc))


def test_one_frame_clip_scans_the_same_length_every_time(tmp_path):
    import subprocess
    import sys

    videos = _one_frame_clips(tmp_path)
    code = ("import sys\nfrom engine.data.scan import scan_media\n"
            "print([scan_media(p).timing.video_duration_s for p in sys.argv[1:] for _ in range(3)])")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, *map(str, videos)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120, check=True)
    assert json.loads(done.stdout) == [0.04] * 6
