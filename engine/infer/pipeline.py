"""S2V sampling from a model folder: load the parts, prepare the conditions, render, write the mp4.

    pipe = S2VPipeline.load("Wan-AI/Wan2.2-S2V-14B", device="cuda", lora="my_lora.safetensors")
    cond = pipe.prepare(image_path, audio_path, "a woman talks", max_area=832 * 480)
    frames = pipe.render(cond, SampleOptions(seed=1))
    write_sample_mp4("out.mp4", frames.numpy(), cond.audio.waveform)

Training validation builds the same object around the model it trains (`S2VPipeline(model, parts, ...)`), so a
validation sample and a `s2v-tui sample` render run one code path.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The official negative prompt, defined once in the config schema (which the config offers as a default).
from engine.config.schema import OFFICIAL_NEGATIVE_PROMPT as NEGATIVE_PROMPT
from engine.dtypes import TORCH_DTYPES
from engine.infer.audio import encode_driving_audio, load_waveform
from engine.infer.reference import generation_size, load_reference_image, reference_pixels
from engine.infer.sampler import Conditioning, SampleOptions, sample_frames
from engine.models.components import (encode_text, encode_video, load_audio_encoder, load_text_encoder,
                                      load_vae)

DEFAULT_MAX_AREA = 832 * 480


@dataclass
class FrozenParts:
    """The encoders and the VAE (never trained)."""

    vae: object
    tokenizer: object
    text_encoder: object
    audio_processor: object
    audio_encoder: object

    @classmethod
    def load(cls, source, device: torch.device, text_dtype: torch.dtype = torch.float32) -> FrozenParts:
        tokenizer, text_encoder = load_text_encoder(source, dtype=text_dtype, device=device)
        processor, audio_encoder = load_audio_encoder(source, device=device)
        # The VAE runs in fp32, as the official pipeline's Wan2_1_VAE does.
        return cls(load_vae(source, torch.float32, device), tokenizer, text_encoder, processor, audio_encoder)

    def drop_encoders(self) -> None:
        """Free UMT5 and wav2vec2 once every condition is encoded (validation keeps only the VAE)."""
        self.tokenizer = self.text_encoder = self.audio_processor = self.audio_encoder = None


def parse_size(text: str) -> int:
    """'832x480' (or 832*480) -> the max area 399,360 that the official --size flag means."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {text!r}: expected WIDTHxHEIGHT, e.g. 832x480")
    return int(parts[0]) * int(parts[1])


class S2VPipeline:
    def __init__(self, model, parts: FrozenParts, device: torch.device | str,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.parts = parts
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    @classmethod
    def load(cls, source, device: str | torch.device = "cpu", dtype: str = "bf16", lora: str | Path | None = None,
             transformer_subfolder: str = "transformer") -> S2VPipeline:
        from engine.models.s2v_transformer import S2VTransformer3DModel

        device = torch.device(device)
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
        model = S2VTransformer3DModel.from_pretrained(source, subfolder=transformer_subfolder,
                                                      torch_dtype=TORCH_DTYPES[dtype], device=device)
        if lora:
            from engine.models.lora import apply_lora_file

            apply_lora_file(model, lora)
        model.eval().requires_grad_(False)
        amp = TORCH_DTYPES[dtype] if dtype != "fp32" else None
        parts_dtype = TORCH_DTYPES[dtype] if device.type == "cuda" else torch.float32
        return cls(model, FrozenParts.load(source, device, parts_dtype), device, amp)

    # ---- conditions ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return encode_text(self.parts.tokenizer, self.parts.text_encoder, [prompt]).float().cpu()

    def prepare(self, image, audio, prompt: str, *, negative_prompt: str = NEGATIVE_PROMPT,
                max_area: int = DEFAULT_MAX_AREA, max_chunks: int | None = None) -> Conditioning:
        """Conditions of one sample. `image`: a path (image, or video whose first frame is used) or uint8
        [H, W, 3]; `audio`: a path (audio, or a video's track) or float32 16 kHz mono samples."""
        image = load_reference_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
        waveform = load_waveform(audio) if isinstance(audio, (str, Path)) else np.asarray(audio, np.float32)
        height, width = generation_size(image.shape[0], image.shape[1], max_area)
        ref = encode_video(self.parts.vae, reference_pixels(image, height, width)).float().cpu()
        driving = encode_driving_audio(waveform, self.parts.audio_processor, self.parts.audio_encoder, max_chunks)
        return Conditioning(text=self.encode_prompt(prompt), text_negative=self.encode_prompt(negative_prompt),
                            ref_latents=ref, audio=driving, height=height, width=width)

    # ---- rendering -------------------------------------------------------------------------------------------
    def render(self, cond: Conditioning, options: SampleOptions = SampleOptions(),
               progress: Callable[[int, int], None] | None = None,
               stop: threading.Event | None = None) -> torch.Tensor:
        """uint8 frames [F, H, W, 3] (F = 80 chunks - 3) at 16 fps."""
        return sample_frames(self.model, self.parts.vae, cond, options, self.device, self.autocast_dtype,
                             progress, stop)
