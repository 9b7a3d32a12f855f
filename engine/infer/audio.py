"""The driving audio of a sample: 16 kHz mono, wav2vec2 hidden states, one vector per video frame, chunks.

The official pipeline encodes the whole file once and cuts it into chunks of 80 frames at 16 fps
(spec/S2V_MODEL.md §4.1): the number of chunks is int(L30 / 150) + 1 with L30 = int(T_a / 50 * 30) the length at
30 fps, the features are laid out over chunks * 80 frames (zeros past the audio), and chunk r reads frames
[80 r, 80 r + 80). The per-frame mapping is `engine.data.windows.audio_features_per_frame`, the same one the
training cache uses, so training and sampling see the audio on one time base.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.windows import AUDIO_FEATURE_FPS, MODEL_FPS, WAV2VEC_RATE_HZ, audio_features_per_frame

CHUNK_FRAMES = 80
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class DrivingAudio:
    waveform: np.ndarray  # float32 mono at 16 kHz, the whole file (also what the mp4 carries)
    features: torch.Tensor  # [layers, channels, chunks * 80] fp32, one column per video frame
    chunks: int

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / SAMPLE_RATE

    def chunk(self, r: int) -> torch.Tensor:
        """[1, layers, channels, 80]: the model's audio input of chunk r."""
        return self.features[None, ..., r * CHUNK_FRAMES:(r + 1) * CHUNK_FRAMES]


def chunk_count(wav2vec_steps: int, chunk_frames: int = CHUNK_FRAMES, fps: int = MODEL_FPS) -> int:
    """Chunks the official pipeline renders for `wav2vec_steps` 50 Hz feature steps (always at least one)."""
    len30 = int(wav2vec_steps / WAV2VEC_RATE_HZ * AUDIO_FEATURE_FPS)
    return int(len30 / (chunk_frames * AUDIO_FEATURE_FPS / fps)) + 1


def load_waveform(path: str | Path) -> np.ndarray:
    from engine.data.media import decode_audio

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file {path} does not exist: give a speech file (wav, mp3, m4a, a video)")
    samples = decode_audio(path, rate=SAMPLE_RATE).samples
    if samples.size == 0:
        raise ValueError(f"{path} holds no audio samples: give a file with speech")
    return samples


def encode_driving_audio(waveform: np.ndarray, processor, encoder, max_chunks: int | None = None) -> DrivingAudio:
    """Features of the whole waveform, cut to at most `max_chunks` chunks (None: as many as the audio needs)."""
    from engine.models.components import wav2vec2_hidden_states

    hidden = wav2vec2_hidden_states(processor, encoder, waveform).cpu()
    chunks = chunk_count(hidden.shape[1])
    if max_chunks is not None:
        chunks = max(1, min(chunks, max_chunks))
    features = audio_features_per_frame(hidden, 0, chunks * CHUNK_FRAMES)
    return DrivingAudio(waveform=waveform, features=features, chunks=chunks)
