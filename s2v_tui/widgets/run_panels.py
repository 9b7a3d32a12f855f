"""The live panels shared by the Run and Attach screens: loss, throughput, GPU memory, host RAM, outputs, log.

They repaint only from a `RunSnapshot` plus the latest hardware readings, called by the screen's timer at a
few hertz; nothing here listens to the engine. Sparklines get new lists, never mutated ones.
"""
from __future__ import annotations

from statistics import fmean

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import Log, Sparkline, Static

from engine.gpu import GpuSnapshot, HostMemory

from s2v_tui.app_logic.fmt import duration, gib, number
from s2v_tui.app_logic.run_model import RunSnapshot

STATUS_STYLE = {"running": "bold green", "completed": "bold cyan", "stopped": "bold yellow",
                "failed": "bold red", "idle": "dim"}


def _mean(values) -> float:
    return fmean(values) if values else 0.0


class RunPanels(Widget):
    DEFAULT_CSS = """
    RunPanels { height: 1fr; }
    RunPanels #run-status { height: 1; padding: 0 1; }
    RunPanels #run-trackers { height: 1; padding: 0 1; display: none; text-wrap: nowrap; text-overflow: ellipsis; }
    RunPanels .row { height: 6; }
    RunPanels .panel { border: round $primary-darken-1; padding: 0 1; height: 6; }
    RunPanels .panel Static { text-wrap: nowrap; text-overflow: ellipsis; height: 1fr; }
    RunPanels #loss-panel { width: 1fr; }
    RunPanels #speed-panel { width: 30; }
    RunPanels #gpu-panel { width: 1fr; }
    RunPanels #out-panel { width: 1fr; }
    RunPanels Sparkline { height: 2; margin: 0; }
    RunPanels #loss-smooth { height: 1; }
    RunPanels #loss-values { height: 1; }
    RunPanels #run-log { height: 1fr; min-height: 3; border: round $primary-darken-1; }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's own name
        super().__init__(id=id)
        self._painted = -1
        self._painted_hw: object = None
        self._log_seen = 0
        self._texts: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Static("no run yet", id="run-status", markup=True)
        yield Static("", id="run-trackers", markup=False)  # wandb, webhooks, Hub upload: shown once one reports
        with Horizontal(classes="row"):
            with Vertical(id="loss-panel", classes="panel") as loss:
                loss.border_title = "loss"
                yield Sparkline([], id="loss-raw", summary_function=_mean)
                yield Sparkline([], id="loss-smooth", summary_function=_mean)
                yield Static("-", id="loss-values")
            with Vertical(id="speed-panel", classes="panel") as speed:
                speed.border_title = "throughput"
                yield Static("-", id="speed")
        with Horizontal(classes="row"):
            with Vertical(id="gpu-panel", classes="panel") as gpu:
                gpu.border_title = "memory"
                yield Static("-", id="gpu-memory")
            with Vertical(id="out-panel", classes="panel") as out:
                out.border_title = "outputs"
                yield Static("-", id="outputs", markup=False)
        log = Log(id="run-log", max_lines=2000, auto_scroll=True)
        log.border_title = "log"
        yield log

    def on_resize(self) -> None:
        # A smaller terminal leaves the log's view above its last line: bring the newest lines back into view.
        self.query_one("#run-log", Log).scroll_end(animate=False)

    def reset(self) -> None:
        """Forget what was painted (another run is about to be shown)."""
        self._painted = -1
        self._painted_hw = None
        self._log_seen = 0
        self._texts.clear()
        self.query_one("#run-log", Log).clear()

    def _set(self, widget_id: str, text: str) -> None:
        """Update a Static only when its text changed, and without a layout pass: every Static here has a fixed
        height (CSS above), and a relayout of the screen at each paint cost the training run ~5% of its speed."""
        if self._texts.get(widget_id) != text:
            self._texts[widget_id] = text
            self.query_one(f"#{widget_id}", Static).update(text, layout=False)

    def paint(self, snap: RunSnapshot, gpus: tuple[GpuSnapshot, ...], host: HostMemory | None) -> None:
        if (gpus, host) != self._painted_hw or snap.version != self._painted:
            self._paint_memory(snap, gpus, host)
            self._painted_hw = (gpus, host)
        if snap.version == self._painted:
            return
        self._painted = snap.version
        style = STATUS_STYLE.get(snap.status, "")
        where = f"  [dim]{snap.run_dir}[/]" if snap.run_dir else ""
        reason = f" ({snap.reason})" if snap.reason and snap.status != "running" else ""
        phase = f"  phase {snap.phase}" if snap.phase else ""
        self._set("run-status", f"[{style}]{snap.status}[/]{reason}{phase}{where}")
        self._paint_trackers(snap)
        self.query_one("#loss-raw", Sparkline).data = list(snap.losses)
        self.query_one("#loss-smooth", Sparkline).data = list(snap.smoothed)
        self._set("loss-values",
                  f"last {number(snap.last_loss)}  min {number(snap.min_loss)}  smooth {number(snap.last_smoothed)}")
        self._set("speed", self._speed_text(snap))
        self._set("outputs", self._outputs_text(snap))
        self._paint_log(snap)

    def _paint_trackers(self, s: RunSnapshot) -> None:
        """One line per service that follows the run; the height changes only when one appears (rare)."""
        lines = [f"{name} {state}" + (f": {detail}" if detail else "") for name, state, detail in s.trackers]
        widget = self.query_one("#run-trackers", Static)
        if widget.display != bool(lines) or (lines and widget.styles.height.value != len(lines)):
            widget.styles.height = max(1, len(lines))
            widget.display = bool(lines)
        self._set("run-trackers", "\n".join(lines))

    @staticmethod
    def _speed_text(s: RunSnapshot) -> str:
        pct = f" {100 * s.step / s.total_steps:.0f}%" if s.total_steps else ""
        lines = [f"step {s.step}/{s.total_steps or '-'}{pct}",
                 f"{number(s.s_per_step, 3)} s/step  {number(s.samples_per_s, 3)} samples/s",
                 f"ETA {duration(s.eta_s)}  lr {number(s.lr, 3)}"]
        if s.skipped_nonfinite:
            lines.append(f"[yellow]{s.skipped_nonfinite} non-finite steps skipped[/]")
        return "\n".join(lines)

    @staticmethod
    def _outputs_text(s: RunSnapshot) -> str:
        """Paths relative to the run folder (shown on the status line) so they fit the panel."""
        def rel(path: str) -> str:
            if s.run_dir and path.startswith(s.run_dir.rstrip("/") + "/"):
                return path[len(s.run_dir.rstrip("/")) + 1:]
            return path

        ckpt = f"{rel(s.checkpoint_path)} (step {s.checkpoint_step})" if s.checkpoint_path else "none yet"
        samples = ", ".join(rel(p) for p in s.sample_paths) if s.sample_paths else "none yet"
        lines = [f"checkpoint {ckpt}", f"samples {samples}"]
        lines += [f"{fmt} {rel(path)}" for fmt, path in s.outputs]
        return "\n".join(lines)

    def _paint_memory(self, s: RunSnapshot, gpus: tuple[GpuSnapshot, ...], host: HostMemory | None) -> None:
        lines = []
        for g in gpus:
            lines.append(f"GPU{g.index} used {gib(g.used_bytes)}/{gib(g.total_bytes)} GiB"
                         f"  util {g.util_percent if g.util_percent is not None else '-'}%")
        if not gpus:
            lines.append("GPU: no NVML readings")
        lines.append(f"run peak {gib(s.peak_alloc_bytes)} alloc, {gib(s.peak_reserved_bytes)} resv GiB")
        if host is not None:
            rss = f", run {gib(s.host_rss_bytes)}" if s.host_rss_bytes is not None else ""
            lines.append(f"host {gib(host.used_bytes)}/{gib(host.total_bytes)} GiB{rss}")
        self._set("gpu-memory", "\n".join(lines))

    def _paint_log(self, s: RunSnapshot) -> None:
        log = self.query_one("#run-log", Log)
        new = s.log_total - self._log_seen
        if new <= 0:
            if s.log_total < self._log_seen:  # a fresh model (new run): start over
                log.clear()
                log.write_lines(s.log)
                self._log_seen = s.log_total
            return
        # Scroll after the next refresh, not at once: right after a resize the log's scrollable height is still
        # the old one, and an immediate scroll to the end stopped short (the log no longer followed new lines).
        log.write_lines(s.log[-min(new, len(s.log)):], scroll_end=False)
        log.scroll_end(animate=False)
        self._log_seen = s.log_total
