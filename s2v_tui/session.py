"""What the screens share: the config being edited, the preset it came from, the last dataset report."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from engine.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)


@dataclass
class Session:
    config: Config
    config_path: Path | None = None  # the file the Config screen saves to
    preset_path: Path | None = None  # what the Config screen diffs against
    report: object | None = None  # engine.data.doctor.DoctorReport of the last check
    report_folder: str = ""  # the folder that report is about
    vram_override_gb: float | None = None  # typed by the user when NVML cannot tell
    host_override_gb: float | None = None  # typed on the Presets screen to plan for another host
    attach_dir: Path | None = None  # `s2v-tui attach RUN_DIR`

    @property
    def dataset_blocking(self) -> bool:
        """True when the last check, of a folder the config trains on, found a problem that blocks training (or
        was cancelled). A report about a folder no longer in the config says nothing about this run."""
        report = self.report
        if report is None or self.report_folder not in [d.path for d in self.config.data.datasets]:
            return False
        return bool(report.blocking) or bool(report.cancelled)  # type: ignore[attr-defined]

    def preset_config(self) -> Config:
        if self.preset_path is None:
            return Config()
        try:
            return load_config(self.preset_path)
        except ConfigError:
            log.exception("preset %s no longer loads", self.preset_path)
            return Config()


def start_session(config_path: Path | None, presets_dir: Path) -> Session:
    """The config named on the command line, else the base preset, else the schema's defaults.

    A config that fails to load raises ConfigError: the caller prints it (file, key, fix) before any UI.
    """
    base = presets_dir / "base.toml"
    preset = base if base.is_file() else None
    if config_path is not None:
        return Session(config=load_config(config_path), config_path=config_path, preset_path=preset)
    config = load_config(preset) if preset is not None else Config()
    return Session(config=config, config_path=None, preset_path=preset)
