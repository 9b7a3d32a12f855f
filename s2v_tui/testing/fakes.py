"""Fixed fakes for the app's tests and snapshots: NVML, host memory, engine, and a dataset report.

Everything here is deterministic (no clocks, no real hardware) so an SVG snapshot is the same on any box.
"""
from __future__ import annotations

from pathlib import Path

from engine.data.discover import ClipSource, DatasetSpec
from engine.data.doctor import ClipPlan, ClipReport, DoctorReport
from engine.data.problems import make_problem
from engine.data.windows import CropPlan, Window
from engine.gpu import GpuProbe, HostMemory
from engine.gpu_fake import GIB, FakeGpu, FakeNvml

from s2v_tui.testing.fake_engine import FakeEngine, fixed_clock
from s2v_tui.services import MemoryNeed, Services, deviceless_setting_problems


def fake_host_memory() -> HostMemory:
    return HostMemory(total_bytes=256 * GIB, available_bytes=200 * GIB, used_bytes=56 * GIB,
                      process_rss_bytes=2 * GIB, ts=0.0)


def fake_probe(gpus: int = 1, no_driver: bool = False) -> GpuProbe:
    if no_driver:
        return GpuProbe(FakeNvml(init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    cards = [FakeGpu(name="NVIDIA H100 80GB HBM3", total_bytes=80 * GIB, used_bytes=(2 + 20 * i) * GIB,
                     util_percent=10 * i, temperature_c=40 + i) for i in range(gpus)]
    return GpuProbe(FakeNvml(cards))


def fake_services(tmp: Path, *, engine: FakeEngine | None = None, gpus: int = 1, no_driver: bool = False,
                  predict=None, presets_dir: Path | None = None, doctor=None,
                  runs_dir: Path | None = None) -> Services:
    return Services(probe=fake_probe(gpus, no_driver),
                    runner=engine if engine is not None else FakeEngine(steps=20, clock=fixed_clock()),
                    predict_memory=predict or (lambda config: None), host_memory=fake_host_memory,
                    presets_dir=presets_dir or tmp / "presets", runs_dir=runs_dir or tmp / "runs",
                    inspect_datasets=doctor, setting_problems=deviceless_setting_problems)


def measured_predictor(table: dict[str, tuple[float, float]]):
    """A memory model that knows some presets by output name (GiB of VRAM, GiB of host RAM)."""
    def predict(config) -> MemoryNeed | None:
        need = table.get(config.memory.base_weights + "/" + str(config.memory.block_offload))
        return MemoryNeed(int(need[0] * GIB), int(need[1] * GIB)) if need else None
    return predict


def _clip(root: Path, stem: str, width: int, height: int, fps: float, seconds: float, windows: int,
          problems=()) -> ClipReport:
    video = root / f"{stem}.mp4"
    source = ClipSource(video=video, dataset="clips", caption="a person talks", caption_source=video.with_suffix(".txt"),
                        audio=None, problems=())
    plan = ClipPlan(width=width, height=height, rotation=0, source_fps=fps, variable_rate=False,
                    fps_conversion=f"{fps:.3f} fps -> 16 fps", duration_s=seconds, frames=int(seconds * 16),
                    windows=tuple(Window(start=80 * i) for i in range(windows)), bucket="832x480",
                    crop=CropPlan(832, 480, 0, 0, 832, 480), reference="frame 0 (first)",
                    audio_source="embedded track -> 16 kHz mono")
    return ClipReport(clip=source, plan=plan, problems=tuple(make_problem(c, video, m) for c, m in problems))


def fixed_report(root: Path, blocking: bool = True) -> DoctorReport:
    """Four clips: two fine, one with a warning, one (optionally) blocking."""
    clips = [
        _clip(root, "clip_000", 1280, 720, 25.0, 12.0, 2),
        _clip(root, "clip_001", 1280, 720, 30.0, 8.5, 1),
        _clip(root, "clip_002", 1920, 1080, 29.97, 6.0, 1, [("variable-frame-rate", "frame intervals vary")]),
    ]
    if blocking:
        clips.append(_clip(root, "clip_003", 1280, 720, 25.0, 3.0, 0,
                           [("too-few-frames",
                             "48 frames at 16 fps (3.00 s); one window needs 80 frames at 16 fps (5.00 s)")]))
    return DoctorReport(datasets=(DatasetSpec(root),), clips=tuple(clips), problems=(), elapsed_s=0.5)


def fixed_doctor(blocking: bool = True):
    """An `inspect_datasets` stand-in returning `fixed_report` for whatever folder it is given."""
    def inspect(datasets, settings=None, *, progress=None, stop=None, on_file_read=None):
        root = Path(list(datasets)[0].path)
        report = fixed_report(root, blocking)
        if progress is not None:
            for i, clip in enumerate(report.clips, 1):
                progress(i, len(report.clips), clip.clip.video)
        return report
    return inspect


# -- the real engine on the tiny model (end-to-end tests and bench/tui_overhead.py) ----------------------------

# Long enough that a test always stops the run itself; no interval checkpoint, so the one on disk is the stop's.
TINY_RUN_STEPS = 100_000


def tiny_run_config(folder: Path, steps: int = TINY_RUN_STEPS, name: str = "tui-tiny"):
    """The demo's tiny model, synthetic clips and settings under `folder` (what exists is reused).

    Same recipe as `s2v-tui demo`, so what these tests drive is what users try first; only the length, the
    checkpoint interval and the run name differ. The feature cache fills in the run's cache phase (~4 s on a CPU).
    """
    from engine.config import with_value
    from engine.models.tiny import write_tiny_model

    from s2v_tui.commands.demo import demo_config, make_demo_clips

    model_dir = folder / "model"
    if not (model_dir / "model_index.json").exists():
        write_tiny_model(model_dir, seed=0)
    clips = make_demo_clips(folder / "clips")
    config = demo_config(model_dir, folder / "runs", clips, folder / "cache")
    for key, value in {"optim.max_steps": steps, "checkpoint.every_steps": 0, "output.name": name}.items():
        config = with_value(config, key, value, file="<tiny run>")
    return config


def write_tiny_run_preset(folder: Path, steps: int = TINY_RUN_STEPS, name: str = "tui-tiny") -> Path:
    """`tiny_run_config` saved as a complete TOML file, for `s2v-tui CONFIG` and `s2v-tui --run CONFIG`."""
    from engine.config import save_config

    return save_config(tiny_run_config(folder, steps, name), folder / f"{name}.toml", full=True)
