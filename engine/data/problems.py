"""The catalogue of dataset problems: stable codes, their default severity and the fix we suggest.

Codes are part of the public interface (the `--json` output of `s2v-tui check`, scripts, the TUI): never
rename one; add new ones instead. Every code here has a test that builds a file showing it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BLOCKING = "blocking"
WARNING = "warning"


@dataclass(frozen=True)
class ProblemKind:
    code: str
    severity: str
    summary: str
    fix: str


def _kinds(*kinds: ProblemKind) -> dict[str, ProblemKind]:
    return {k.code: k for k in kinds}


KINDS: dict[str, ProblemKind] = _kinds(
    ProblemKind("dataset-empty", BLOCKING, "no video files found",
                "point the command at the folder that holds the clips (mp4, mov, mkv, webm, avi, m4v)"),
    ProblemKind("zero-length-file", BLOCKING, "the file is empty (0 bytes)",
                "re-copy or re-export the file, or move it out of the dataset folder"),
    ProblemKind("corrupt-container", BLOCKING, "the container cannot be read",
                "re-export or re-download the file (a truncated copy is the usual cause), or move it out"),
    ProblemKind("unsupported-codec", BLOCKING, "no decoder for this codec",
                "re-encode the clip to H.264 video with AAC or PCM audio"),
    ProblemKind("no-video-stream", BLOCKING, "the file has no video stream",
                "remove the file from the dataset folder, or replace it with the video it belongs to"),
    ProblemKind("no-audio-stream", BLOCKING, "the clip has no audio",
                "add the audio track, put <stem>.wav in the audio folder, or allow silent audio explicitly"),
    ProblemKind("duration-mismatch", WARNING, "audio and video durations differ",
                "trim both tracks to the same length; windows are only taken where both exist"),
    ProblemKind("variable-frame-rate", WARNING, "the video has a variable frame rate",
                "nothing is required: frames are picked by timestamp; re-encode at a constant rate to be sure"),
    ProblemKind("too-few-frames", BLOCKING, "the clip is shorter than one training window",
                "use clips of at least 5 s (80 frames at 16 fps), or move this one out"),
    ProblemKind("tiny-resolution", BLOCKING, "the video is too small for the smallest bucket",
                "use a higher-resolution source, or, if this size is intended, lower data.resolution in the run "
                "config (the smallest side accepted follows it; `s2v-tui check DIR --min-side PX` for a folder)"),
    ProblemKind("extreme-aspect-ratio", WARNING, "a large part of the frame will be cropped away",
                "crop the clip around the speaker before training"),
    ProblemKind("caption-missing", BLOCKING, "no caption for this clip",
                "write <stem>.txt next to the clip, or add a row to metadata.jsonl / metadata.csv"),
    ProblemKind("caption-default", WARNING, "no caption file: the dataset's default_caption is used",
                "write <stem>.txt next to the clip if this clip needs its own words"),
    ProblemKind("caption-empty", WARNING, "the caption is empty",
                "write a caption, or leave it empty on purpose (the clip then trains unconditioned on text)"),
    ProblemKind("caption-undecodable", BLOCKING, "the caption is not valid UTF-8 text",
                "re-save the caption as UTF-8"),
    ProblemKind("caption-too-long", WARNING, "the caption is longer than the text encoder's 512 tokens",
                "shorten the caption; the text encoder would cut it at 512 tokens"),
    ProblemKind("duplicate-stem", BLOCKING, "several clips share a name, so pairing is ambiguous",
                "rename the clips so that each stem (file name without extension) is unique"),
    ProblemKind("audio-missing", BLOCKING, "the paired audio file does not exist",
                "put <stem>.wav (or .flac, .mp3, .ogg, .m4a) in the audio folder, or allow silent audio"),
    ProblemKind("audio-ambiguous", BLOCKING, "several audio files match this clip",
                "keep exactly one <stem>.<ext> audio file per clip in the audio folder"),
    ProblemKind("symlink-loop", BLOCKING, "a symbolic link loops back on itself",
                "remove the link or point it at a real file or folder outside the loop"),
    ProblemKind("broken-symlink", BLOCKING, "a symbolic link points at nothing",
                "remove the link or restore the file it points at"),
    ProblemKind("file-changed", BLOCKING, "the file changed while it was being checked",
                "wait until copies or exports into the dataset folder have finished, then check again"),
    ProblemKind("mostly-silent", WARNING, "the audio is almost entirely silent",
                "check that the right audio track is used; silent clips teach the model to ignore audio"),
    ProblemKind("metadata-invalid", BLOCKING, "a metadata row cannot be read",
                "fix the row: it needs a file_name column plus a caption (text) column"),
    ProblemKind("missing-file", BLOCKING, "a file named by the metadata does not exist",
                "fix the path in the metadata file (paths are relative to the dataset folder)"),
)


@dataclass(frozen=True)
class Problem:
    """One finding about one file; `code` is stable, `message` says what was seen, `fix` what to do."""

    code: str
    severity: str
    path: Path
    message: str
    fix: str

    @property
    def blocking(self) -> bool:
        return self.severity == BLOCKING

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "path": str(self.path),
                "message": self.message, "fix": self.fix}

    def __str__(self) -> str:
        return f"{self.severity} {self.code}: {self.path}: {self.message} (fix: {self.fix})"


def make_problem(code: str, path: Path | str, message: str | None = None, *,
                 fix: str | None = None, severity: str | None = None) -> Problem:
    """Build a Problem from the catalogue; unknown codes are a programming error, not user input."""
    kind = KINDS[code]
    return Problem(code=code, severity=severity or kind.severity, path=Path(path),
                   message=message or kind.summary, fix=fix or kind.fix)


class DataError(Exception):
    """Bad input that stops an operation; carries the Problem so callers can report it like the doctor."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem
