"""The [memory] switches of a preset, applied to the model; a switch the model does not have yet is an error.

`unsupported_switches` runs in the check phase, before any weight is loaded, so a preset asking for block
offload or int8 base weights fails in a second with a message, instead of training silently without them.
"""
from __future__ import annotations

import logging
import math

import torch

from engine.config import Config
from engine.models.attention import set_attention_backend

log = logging.getLogger(__name__)


class UnsupportedSwitch(RuntimeError):
    pass


def unsupported_switches(config: Config) -> list[str]:
    """One message per [memory] setting this build cannot honour (empty: all can be applied)."""
    m = config.memory
    problems = []
    if m.block_offload:
        problems.append("memory.block_offload = true: block offload is not built into the S2V transformer yet; "
                        "set block_offload = false (and use a preset for a larger card) until it lands")
    if m.offload_checkpoint_inputs:
        problems.append("memory.offload_checkpoint_inputs = true: not built yet; set it to false")
    if m.base_weights != "bf16":
        problems.append(f"memory.base_weights = \"{m.base_weights}\": low-bit base weights are not built yet; "
                        "set base_weights = \"bf16\"")
    return problems


def ffn_chunk_tokens(config: Config, patch_size=(1, 2, 2)) -> int | None:
    """memory.chunked_ffn is a number of chunks; the model takes a chunk length in tokens. The length is cut
    from the video tokens of a window at data.resolution (reference and motion tokens add a last, short chunk)."""
    chunks = config.memory.chunked_ffn
    if not chunks:
        return None
    width, height = config.data.resolution
    latent_t = config.data.frames // 4
    tokens = (latent_t // patch_size[0]) * (height // 8 // patch_size[1]) * (width // 8 // patch_size[2])
    return max(1, math.ceil(tokens / chunks))


def apply_memory_switches(model: torch.nn.Module, config: Config, device: torch.device) -> list[str]:
    """Set every [memory] switch on `model`; returns what was done, one line each, for the log."""
    problems = unsupported_switches(config)
    if problems:
        raise UnsupportedSwitch("; ".join(problems))
    m = config.memory
    done = []
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing(m.checkpoint_interval)
        done.append(f"gradient checkpointing every {m.checkpoint_interval} block(s)")
    else:
        model.disable_gradient_checkpointing()
    chunk = ffn_chunk_tokens(config, tuple(model.config.patch_size))
    model.set_ffn_chunk_size(chunk)
    if chunk:
        done.append(f"feed-forward in chunks of {chunk} tokens ({m.chunked_ffn} chunks per window)")
    set_attention_backend(m.attention_backend)
    done.append(f"attention backend {m.attention_backend}")
    if m.vram_budget_gb > 0:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, m.vram_budget_gb * 1e9 / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            done.append(f"GPU memory capped at {m.vram_budget_gb:g} GB ({fraction:.0%} of the card)")
        else:
            done.append(f"memory.vram_budget_gb = {m.vram_budget_gb:g} has no effect on {device.type}")
    return done
