"""The [memory] switches of a preset, applied to the model; a switch the model does not have yet is an error.

Which switches may run here is decided by engine.train.allowed.setting_problems, in the check phase before any
weight is loaded; `apply_memory_switches` asks it again, so a switch it refuses is never applied half-way.
"""
from __future__ import annotations

import logging
import math

import torch

from engine.config import Config
from engine.models.attention import attach_fp8_ratios, resolve_attention_backend, set_attention_backend
from engine.train.allowed import setting_problems

log = logging.getLogger(__name__)


class UnsupportedSwitch(RuntimeError):
    pass


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
    """Set every [memory] switch on `model` (LoRA already added); returns what was done, one line each."""
    problems = setting_problems(config, device=device)
    if problems:
        raise UnsupportedSwitch("; ".join(problems))
    m = config.memory
    done = []
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing(m.checkpoint_interval, offload_inputs=m.offload_checkpoint_inputs,
                                            policy=m.checkpoint_policy, gpu_saved_inputs=m.gpu_saved_inputs)
        where = "GPU memory"
        if m.offload_checkpoint_inputs:
            where = ("pinned host memory" if not m.gpu_saved_inputs else
                     f"pinned host memory but the last {m.gpu_saved_inputs}, kept in GPU memory")
        done.append(f"gradient checkpointing every {m.checkpoint_interval} block(s) ({m.checkpoint_policy}), "
                    f"saved inputs in {where}")
    else:
        model.disable_gradient_checkpointing()
    model.residual_fp32 = m.residual_dtype == "fp32"
    done.append(f"residual stream in {m.residual_dtype}")
    if config.train.mixed_precision != "no":
        # Under autocast the fp32 LoRA weights are cast per op; peft's own cast would add (and save for the
        # backward) an fp32 copy of every LoRA input, 4 GB a block at 832x480x81.
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    chunk = ffn_chunk_tokens(config, tuple(model.config.patch_size))
    model.set_ffn_chunk_size(chunk)
    if chunk:
        done.append(f"feed-forward in chunks of {chunk} tokens ({m.chunked_ffn} chunks per window)")
    backend, why = resolve_attention_backend(m.attention_backend, device, config.model.dtype)
    set_attention_backend(backend)
    if "cudnn_fp8" in (backend, config.validation.attention_backend):
        # the per-layer delayed scales of the fp8 backward, on the compute device whatever the blocks' placement
        attach_fp8_ratios(model, device)
    done.append(f"attention backend {backend}" +
                (f" (memory.attention_backend = \"fastest\": {why})" if why else "") +
                (" (e4m3 self-attention, per-tensor scales; cross-attention cuDNN bf16)"
                 if backend == "cudnn_fp8" else ""))
    if m.base_weights != "bf16":
        # Before anything moves. The runner's loader made the low-bit Linears as it read them; a model loaded in
        # bf16 is quantised here Linear by Linear, onto the device when the whole model goes there (the GPU never
        # holds the bf16 model), onto the CPU when the blocks are streamed (the streamer then packs the low-bit
        # storage into its host slab).
        done.append(_low_bit_base(model, config, torch.device("cpu") if m.block_offload else device))
    if m.block_offload:
        host = model.enable_block_streaming(resident=m.blocks_resident, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        done.append(f"block streaming: {m.blocks_resident} block(s) resident, {host / 2**30:.1f} GiB of frozen "
                    f"weights ({m.base_weights} Linears) in pinned host memory")
    else:
        model.to(device)
    if m.compile_blocks:
        model.compile_blocks(routed=config.tread.enabled)
        done.append("blocks compiled (torch.compile, regional" + (", dynamic lengths for TREAD)" if config.tread.enabled else ")"))
    cap = cap_gpu_memory(config, device)
    if cap:
        done.append(cap)
    return done


def _low_bit_base(model: torch.nn.Module, config: Config, device: torch.device) -> str:
    """The frozen base Linears of memory.low_bit_families in low bit; one line for the log. Linears already in low
    bit (the runner loads them so) are never quantised again, ones in the other kind are an error; the rest are
    made on `device`, which the line names."""
    from engine.models.low_bit_linear import held_low_bit, quantize_base_linears

    m = config.memory
    held = held_low_bit(model)
    other = {kind: n for kind, n in held.items() if kind != m.base_weights}
    if other:
        raise UnsupportedSwitch(f"the model holds {', '.join(f'{n} {k}' for k, n in other.items())} Linears, "
                                f'memory.base_weights = "{m.base_weights}": load it with that kind')
    count = quantize_base_linears(model, tuple(m.low_bit_families), device, kind=m.base_weights,
                                  fp8_backward=m.fp8_input_grad)
    loaded = held.get(m.base_weights, 0)
    how = [f"{loaded} quantised while loading"] if loaded else []
    if count or not loaded:
        how.append(f"{count} after loading")
    grad = ", input gradients in fp8" if m.fp8_input_grad else ""
    return (f"{loaded + count} frozen base Linears in {m.base_weights} ({', '.join(m.low_bit_families)}; "
            f"{', '.join(how)}) on {device.type}{grad}")


def cap_gpu_memory(config, device: torch.device) -> str | None:
    """memory.vram_budget_gb: cap this process's GPU memory (emulates a smaller card). The runner calls it before
    anything reaches the GPU (validation encoders included); calling it again sets the same cap."""
    m = config.memory
    if m.vram_budget_gb <= 0:
        return None
    if device.type != "cuda":
        return f"memory.vram_budget_gb = {m.vram_budget_gb:g} has no effect on {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, m.vram_budget_gb * 1e9 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return f"GPU memory capped at {m.vram_budget_gb:g} GB ({fraction:.0%} of the card)"
