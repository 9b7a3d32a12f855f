"""Upload of a run to the Hugging Face Hub: `output.push_to_hub = "owner/name"` during a run, `s2v-tui push RUN_DIR`
after one.

What goes up, in one commit each time: the exported LoRA files (`NAME_LAYOUT.safetensors`), a model card
(README.md: base model, captions, settings, how to use) with a still of each validation sample (the middle frame,
PNG, decoded with PyAV) and, with `output.push_checkpoints`, each checkpoint's LoRA files
(`checkpoints/step-NNNNNNNN_LAYOUT.safetensors`), uploaded as each checkpoint is written. The full-state .pt
checkpoints stay local. Nothing local is ever deleted or changed: the card and the stills are made in memory.

During a run the uploads run on a background thread (`HubUploader`), retried RETRY_ATTEMPTS times with doubling
waits; the end of the run waits for the last one (at most FINAL_WAIT_S, less if the stop event is set). A failed
upload is a RunWarning and a TrackerStatus that give the command to retry, `s2v-tui push RUN_DIR`.
"""
from __future__ import annotations

import io
import logging
import os
import re
import shlex
import threading
from collections.abc import Callable
from pathlib import Path

from engine.config import Config
from engine.events import CheckpointSaved, Event, RunEnded, RunWarning, TrackerStatus
from engine.train.background import BackgroundWorker, with_retries

log = logging.getLogger(__name__)

RETRY_ATTEMPTS = 4
RETRY_WAIT_S = 10.0
FINAL_WAIT_S = 3600.0  # a 14B LoRA in two layouts is ~250 MB: minutes on a slow uplink, not an hour
MAX_CAPTIONS = 5
_CHECKPOINT_LORA = re.compile(r"^step-(\d{8})_([a-z0-9]+)\.safetensors$")


class NothingToPush(Exception):
    """The run folder holds no export (and no checkpoint LoRA, when those were asked for)."""


def retry_command(run_dir: str | Path) -> str:
    return f"s2v-tui push {shlex.quote(str(run_dir))}"


# ---- what goes up ----------------------------------------------------------------------------------------------
def export_files(config: Config, run_dir: Path) -> list[tuple[str, Path]]:
    found = [Path(run_dir) / f"{config.output.name}_{layout}.safetensors" for layout in config.output.formats]
    return [(p.name, p) for p in found if p.is_file()]


def checkpoint_lora_files(config: Config, run_dir: Path, step: int | None = None) -> list[tuple[str, Path]]:
    """The LoRA files written beside the checkpoints (all, or those of `step`), in the layouts of output.formats.
    A build or a checkpoint without them gives an empty list."""
    from engine.train.checkpoint import checkpoint_dir

    out = []
    for path in sorted(checkpoint_dir(run_dir).glob("step-*_*.safetensors")):
        m = _CHECKPOINT_LORA.match(path.name)
        if m and m.group(2) in config.output.formats and (step is None or int(m.group(1)) == step):
            out.append((f"checkpoints/{path.name}", path))
    return out


def still_png(video: Path) -> bytes | None:
    """The middle frame of `video` as PNG bytes; None (logged) when it cannot be decoded."""
    import av

    try:
        with av.open(str(video)) as container:
            stream = container.streams.video[0]
            middle, frame = (stream.frames or 1) // 2, None
            for i, frame in enumerate(container.decode(stream)):
                if i >= middle:
                    break
            if frame is None:
                raise ValueError("no frame")
            image = frame.to_image()
    except Exception as exc:  # PyAV's errors, or an empty file: a card without this still is still a card
        log.warning("no still of %s for the model card: %s", video, exc)
        return None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_stills(run_dir: Path) -> list[tuple[str, bytes]]:
    """A still of each sample of the newest validation and of the base model, named samples/FOLDER/CASE.png."""
    from engine.train.validation import SAMPLES_DIR

    root = Path(run_dir) / SAMPLES_DIR
    steps = sorted(root.glob("step-*"))
    folders = steps[-1:] + [root / "base"]
    out = []
    for folder in folders:
        for video in sorted(folder.glob("case-*.mp4")):
            png = still_png(video)
            if png is not None:
                out.append((f"samples/{folder.name}/{video.stem}.png", png))
    return out


def _captions(config: Config) -> tuple[int, list[str]]:
    """How many clips have a caption, and the first few of them; (0, []) when the datasets are not here."""
    from engine.data.cache_plan import dataset_specs
    from engine.data.discover import discover

    try:
        clips = discover(dataset_specs(config)).clips
    except (OSError, ValueError):
        return 0, []
    captions = [c.caption.strip() for c in clips if c.caption and c.caption.strip()]
    return len(captions), [c if len(c) <= 200 else c[:199] + "…" for c in captions[:MAX_CAPTIONS]]


def _lora_step(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("steps", "?")
    except Exception:  # an unreadable header only loses the number on the card
        return "?"


def model_card(config: Config, run_dir: Path, exports: list[tuple[str, Path]],
               stills: list[tuple[str, bytes]]) -> str:
    from engine.model_source import is_hub_id

    src, lo, o = config.model.source, config.lora, config.optim
    base = src if is_hub_id(src) and not Path(src).expanduser().is_dir() else ""
    front = ["---", "library_name: diffusers", "tags:", "- lora", "- speech-to-video", "- wan2.2", "- s2v-tui"]
    front += [f"base_model: {base}"] if base else []
    front += ["---", ""]
    steps = _lora_step(exports[0][1]) if exports else "?"
    width, height = config.data.resolution
    named = f"[{base}](https://huggingface.co/{base})" if base else "Wan 2.2 S2V 14B"
    lines = [f"# {config.output.name}", "",
             f"A LoRA for {named} (speech-to-video), trained {steps} steps with s2v-tui.", ""]
    if not base:
        lines += [f"Base model: the local folder `{Path(src).name}`.", ""]
    lines += ["## Files", "", "| file | layout |", "| --- | --- |"]
    layouts = {"peft": "diffusers / PEFT", "native": "native (ComfyUI)"}
    for name, _ in exports:
        layout = name.rsplit("_", 1)[-1].removesuffix(".safetensors")
        lines.append(f"| `{name}` | {layouts.get(layout, layout)} |")
    count, examples = _captions(config)
    lines += ["", "## Captions", ""]
    if examples:
        lines += [f"{count} captioned clips; the first {len(examples)}:", ""] + [f"- {c}" for c in examples]
    else:
        lines.append("The training captions were not available when this card was written.")
    lines += ["", "## Settings", "", "| setting | value |", "| --- | --- |"]
    settings = {
        "LoRA kind": lo.kind, "LoRA rank / alpha": f"{lo.rank} / {lo.alpha:g}", "LoRA targets": ", ".join(f"`{t}`" for t in lo.targets),
        "optimizer": f"{o.optimizer}, lr {o.lr:g}, {o.schedule} schedule, warmup {o.warmup_steps}",
        "steps": f"{steps} of {o.max_steps}", "batch": f"{o.batch_size} x {o.grad_accum} accumulation",
        "resolution": f"{width}x{height}, {config.data.frames} frames at 16 fps, {config.data.motion_frames} "
                      f"motion frames (dropped with p={config.data.motion_drop_prob:g})",
        "flow shift / seed": ("auto (by frame size)" if config.train.flow_schedule_auto_shift
                              else f"{config.train.flow_shift:g}") + f" / {config.train.seed}",
        "EMA": f"decay {o.ema.decay:g}" if o.ema.enabled else "off",
    }
    lines += ["| " + k + " | " + v.replace("|", "\\|") + " |" for k, v in settings.items()]
    if stills:
        prompts = {f"case-{i:02d}": c.prompt for i, c in enumerate(config.validation.cases)}
        lines += ["", "## Samples", "", "A frame of each validation sample (`samples/base`: the model without the LoRA).",
                  ""]
        for name, _ in stills:
            prompt = prompts.get(Path(name).stem[:len("case-00")], "")  # -ema, -scale-S
            lines += [f"![{name}]({name})", f"*{name}*" + (f": {prompt}" if prompt else ""), ""]
    peft = next((n for n, _ in exports if n.endswith("_peft.safetensors")), exports[0][0] if exports else "LORA")
    lines += ["", "## Use", "", "```bash",
              f"s2v-tui sample --model {base or 'Wan-AI/Wan2.2-S2V-14B'} --lora {peft} --image face.png "
              "--audio speech.wav --prompt \"a person talks\" --out talk.mp4", "```", ""]
    return "\n".join(front + lines)


# ---- the upload ------------------------------------------------------------------------------------------------
def _may_succeed_later(exc: Exception) -> bool:
    """Not for a refusal by the Hub (bad token, no write access, bad request) or a local problem."""
    if isinstance(exc, (ValueError, FileNotFoundError, NothingToPush)):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return not (status is not None and 400 <= status < 500 and status not in (408, 429))


def upload(repo: str, items: list[tuple[str, Path | bytes]], message: str, private: bool,
           cancelled: threading.Event | None = None) -> str:
    """Create `repo` if needed and commit `items` (path in the repo, local file or bytes); returns the commit URL.
    Files that disappeared meanwhile (a checkpoint pruned by keep_last) are left out."""
    from huggingface_hub import CommitOperationAdd, HfApi

    # The endpoint is read here, not at import time, so HF_ENDPOINT set by the caller counts.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)

    def attempt() -> str:
        api.create_repo(repo, private=private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
               for name, src in items if not isinstance(src, Path) or src.is_file()]
        if not ops:
            raise NothingToPush("the files to upload are gone")
        return api.create_commit(repo, operations=ops, commit_message=message).commit_url

    return with_retries(attempt, RETRY_ATTEMPTS, RETRY_WAIT_S, cancelled=cancelled, retry_if=_may_succeed_later,
                        what=f"upload to {repo}")


def push_run(config: Config, run_dir: str | Path, repo: str, *, checkpoints: bool, skip: frozenset[str] = frozenset(),
             cancelled: threading.Event | None = None) -> str:
    """Upload what the run folder holds: its exports with the card and stills, and (`checkpoints`) its checkpoints'
    LoRA files except those named in `skip`; returns the commit URL. NothingToPush when there is nothing."""
    run_dir = Path(run_dir)
    exports = export_files(config, run_dir)
    ckpts = [(n, p) for n, p in checkpoint_lora_files(config, run_dir) if n not in skip] if checkpoints else []
    if not exports and not ckpts:
        what = "no exported LoRA" + (" and no checkpoint LoRA file" if checkpoints else "")
        raise NothingToPush(f"{run_dir} holds {what} to upload (a run exports its LoRA when it completes)")
    items: list[tuple[str, Path | bytes]] = [*exports, *ckpts]
    if exports:
        stills = sample_stills(run_dir)
        items += [("README.md", model_card(config, run_dir, exports, stills).encode("utf-8")), *stills]
    step = _lora_step(exports[0][1]) if exports else "checkpoints"
    return upload(repo, items, f"s2v-tui: {config.output.name} (step {step})", config.output.hub_private, cancelled)


class HubUploader:
    """Subscriber; `emit` puts its TrackerStatus and RunWarning events on the run's bus."""

    def __init__(self, config: Config, run_dir: str | Path, emit: Callable[[Event], None]) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.repo = config.output.push_to_hub
        self.emit = emit
        self.worker = BackgroundWorker("hub", 1000)
        self.pushed: set[str] = set()  # checkpoint files already up: the final commit leaves them out
        self.failures: list[str] = []
        self.last_url = ""
        self._closed = False  # after close: an upload that outlived it says nothing more (the final line stands)

    def __call__(self, event: Event) -> None:
        if isinstance(event, CheckpointSaved) and self.config.output.push_checkpoints:
            self._submit(f"the LoRA of checkpoint {event.step}", lambda: self._checkpoint(event.step))
        elif isinstance(event, RunEnded) and event.status == "completed":
            self._submit("the final LoRA and model card", lambda: push_run(
                self.config, self.run_dir, self.repo, checkpoints=self.config.output.push_checkpoints,
                skip=frozenset(self.pushed), cancelled=self.worker.cancelled))

    def _submit(self, what: str, job: Callable[[], str | None]) -> None:
        if self.worker.submit(lambda: self._run(what, job)):
            self._status("uploading", f"{what} to {self.repo}")
        else:
            self._failed(what, "too many uploads waiting")

    def _checkpoint(self, step: int) -> str | None:
        files = checkpoint_lora_files(self.config, self.run_dir, step)
        if not files:
            log.info("checkpoint %d has no LoRA file beside it: nothing of it to upload", step)
            return None
        url = upload(self.repo, list(files), f"s2v-tui: {self.config.output.name} checkpoint {step}",
                     self.config.output.hub_private, self.worker.cancelled)
        self.pushed.update(name for name, _ in files)
        return url

    def _run(self, what: str, job: Callable[[], str | None]) -> None:
        try:
            url = job()
        except Exception as exc:  # huggingface_hub's errors, the network's, a vanished file: all reported alike
            self._failed(what, f"{type(exc).__name__}: {exc}")
            return
        if url:
            self.last_url = url
            log.info("uploaded %s to %s: %s", what, self.repo, url)
        self._status("uploading" if self.worker.pending else "done", f"{what}: {url or 'nothing to upload'}")

    def _failed(self, what: str, cause: str) -> None:
        if self._closed:
            return
        self.failures.append(what)
        retry = retry_command(self.run_dir)
        log.warning("upload of %s to %s failed (%s); the local files are kept: retry with %s", what, self.repo,
                    cause, retry)
        self.emit(RunWarning(code="hub_upload_failed", message=(
            f"upload of {what} to {self.repo} failed ({cause}); the local files are kept: retry with {retry}")))
        self._status("failed", f"{what}; retry: {retry}")

    def _status(self, state: str, detail: str) -> None:
        if not self._closed:
            self.emit(TrackerStatus(tracker="hub", state=state, detail=detail))

    def close(self, stop: threading.Event | None = None) -> None:
        undone = self.worker.wait(FINAL_WAIT_S, stop)
        if undone:
            why = "the run was stopped" if stop is not None and stop.is_set() else f"{FINAL_WAIT_S:.0f} s passed"
            self._failed(f"{undone} upload(s) still running when {why}", "not finished")
        elif not self.failures and self.last_url:
            self._status("done", f"{self.repo}: {self.last_url}")
        self._closed = True
