"""The frozen encoders of S2V through their own libraries, and the encodings the official pipeline applies.

All load with `from_pretrained` on a model folder in the diffusers layout (or a hub id): `vae/`
(AutoencoderKLWan), `text_encoder/` + `tokenizer/` (UMT5), `audio_encoder/` + `audio_processor/`
(wav2vec2 CTC model + processor, the checkpoint's own).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from engine.model_source import require_source

TEXT_LEN = 512


def _root(source) -> str:
    """The folder to load from, or the hub id; a missing local folder is said so here, because the libraries
    would report it as a malformed hub id."""
    require_source(source)
    path = Path(source).expanduser()
    return str(path) if path.exists() else str(source)


def _checked(root: str, subfolder: str) -> str:
    """`root`, after checking the weight files of its local `subfolder`: diffusers and transformers report a
    truncated file without naming it (or not as truncated)."""
    from engine.models.loading import check_weights_folder

    if Path(root).is_dir():
        check_weights_folder(Path(root) / subfolder)
    return root


def load_vae(source, dtype=torch.float32, device="cpu"):
    from diffusers import AutoencoderKLWan

    root = _checked(_root(source), "vae")
    return AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=dtype).to(device).eval()


def load_text_encoder(source, dtype=torch.float32, device="cpu"):
    from transformers import AutoTokenizer, UMT5EncoderModel

    root = _checked(_root(source), "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype).to(device).eval()
    return tokenizer, encoder


def load_audio_encoder(source, device="cpu"):
    """wav2vec2 in fp32 (as every S2V implementation runs it) with its processor."""
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    root = _checked(_root(source), "audio_encoder")
    processor = Wav2Vec2Processor.from_pretrained(root, subfolder="audio_processor")
    model = Wav2Vec2ForCTC.from_pretrained(root, subfolder="audio_encoder", dtype=torch.float32).to(device).eval()
    return processor, model


@torch.no_grad()
def encode_text(tokenizer, encoder, prompts: list[str], text_len: int = TEXT_LEN) -> torch.Tensor:
    """UMT5 states [B, text_len, D]: each prompt trimmed to its true token length, then zero-padded."""
    tok = tokenizer(
        prompts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
        return_attention_mask=True, return_tensors="pt",
    )
    device = next(encoder.parameters()).device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return states * mask.unsqueeze(-1).to(states.dtype)


def count_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt, add_special_tokens=True).input_ids)


@torch.no_grad()
def wav2vec2_hidden_states(processor, model, waveform_16k) -> torch.Tensor:
    """All hidden states of the wav2vec2 model for one 16 kHz mono waveform: [num_layers+1, T_a, hidden] fp32."""
    values = processor(waveform_16k, sampling_rate=16000, return_tensors="pt").input_values
    device = next(model.parameters()).device
    out = model(values.to(device), output_hidden_states=True)
    return torch.cat(out.hidden_states, dim=0).float()


def latent_stats(vae, device, dtype=torch.float32):
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, -1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_video(vae, frames: torch.Tensor) -> torch.Tensor:
    """frames [B, 3, F, H, W] in [-1, 1] -> normalised posterior mode [B, 16, 1 + (F-1)//4, H/8, W/8]."""
    param = next(vae.parameters())
    mode = vae.encode(frames.to(param.device, param.dtype)).latent_dist.mode()
    mean, std = latent_stats(vae, mode.device, mode.dtype)
    return (mode - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> frames [B, 3, F, H, W] in [-1, 1]."""
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype)
    mean, std = latent_stats(vae, latents.device, latents.dtype)
    return vae.decode(latents * std + mean).sample.clamp(-1, 1)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
