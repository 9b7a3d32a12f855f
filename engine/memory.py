"""Memory model: what a run config needs in GPU memory and host RAM, calibrated on measured 14B steps.

Peak GPU memory of a LoRA step = frozen weights on the GPU + LoRA state + saved block inputs kept on the GPU +
the working set of one block's recompute and backward (+ allocator slack, for the reserved figure):

- frozen weights: all of them, or with block streaming the non-block part plus the resident units plus two
  units in flight (a unit = one block and the audio injector after it), each unit in the bytes it streams in;
- LoRA state: fp32 weight, gradient and two AdamW moments per LoRA parameter (+ one with EMA);
- saved block inputs: one [S, D] tensor per checkpointed block (bf16 residual); when offloaded, the
  `memory.gpu_saved_inputs` kept on the GPU plus two in flight;
- checkpoint_policy = save_attention: one more [S, D] bf16 tensor per checkpointed block (its self-attention
  output; measured +12.96 GiB at 34,320 tokens against 40 x 0.327 GiB counted);
- fp8 / int8 base weights: the Linears of memory.low_bit_families at 1 byte a weight (measured -13.08 GiB for
  self_attn + cross_attn + ffn: 14.04 B weights), streamed or not; int8 adds its forward's dequantised copy
  (`INT8_DEQUANT_BYTES`, the measured int8-over-fp8 difference);
- working set: `WORK_BYTES_PER_TOKEN_DIM` x S x D, measured (BENCHMARKS.md), S the longest sequence the config
  trains (continuation mode with motion tokens when motion frames are on).

What the card must have free is the allocated peak plus 5% (`NEED_OVER_ALLOCATED`): under a memory cap the caching
allocator hands cached blocks back before it fails (the capped runs reserved the whole cap, 24.0 of 24 GiB and
32.0 of 32 GiB, and trained without an out-of-memory error); the uncapped reserved figure (x1.19) is shown too.

Host RAM = pinned streamed weights (low-bit Linears at 1 byte a weight + row scales) + pinned saved inputs (those
offloaded) + the process baseline (a bare bench process; an engine run holds 2 GiB more while it trains); an
engine run also peaks while it loads the model (6.9 GiB measured straight to the GPU, which is also how a low-bit
base loads: each Linear is quantised on the GPU as it is read; with streamed low-bit weights the low-bit model in
host memory, measured at reduced depth on the CPU by bench/load_host.py: `low_bit_load_host_bytes`; a loader that
held the bf16 model first needed it once). `HOST_CALIBRATION` holds the measured host peaks.

How the pinned buffers are counted: the engine keeps both kinds in exact-size slabs (engine.models.pinned_slab:
each tensor rounded up to 4 KiB, plus one page a slab), so configs are predicted with `pinned="slab"`. Every
measured host row ran before the slabs, with torch's pinned allocator, which rounds each buffer up to a power of
two; those rows are reproduced with that rounding (`pinned="torch"`, `pinned_bytes`). The slab figures are sums of
tensor sizes. What is measured of them so far is the slab alone: bench/pinned_slab_check.py on the H200 machine
grew the process by 5.591 GiB for 5.587 GiB of 14B block tensors and saved inputs (torch's pinned tensors 8.379).
On the user's path with the slabs (bench/user_run.py, H200, 2026-12-01) the 24gb preset peaked at 47.46 GiB against
46.9 predicted; the 48gb preset's 17.2 GiB is not measured with slabs yet. Nothing streamed in low bit or with saved
inputs partly on the GPU has been measured: the 24gb-lowram preset's figures (26.8 GiB host, 21.4 GiB GPU
allocated) are these terms added up, and its run joins HOST_CALIBRATION and CALIBRATION.

The constants are fitted to the rows of `CALIBRATION` (each a run in BENCHMARKS.md) and a test holds every
prediction within 10% of its measured peak. No figure here is a guess: a config far outside the calibrated
range (another resolution class, no checkpointing) is predicted by the same terms, and said to be extrapolated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine.config.schema import LOW_BIT_DEFAULT_FAMILIES

GIB = 2**30

# The 14B architecture (spec section 11.1).
DIM = 5120
LAYERS = 40
PARAMS_TOTAL = 16_295_755_609
PARAMS_BLOCK = 351_394_304
PARAMS_INJECTOR = 104_888_320 + 52_439_040  # cross-attention + AdaLN linear
INJECTORS = 12
LORA_MODULES = 368  # the attention Linears the default lora.targets adapt, each 5120 -> 5120

# Working set of one block's recompute + backward, bytes per (token x model dim); fitted on CALIBRATION.
WORK_BYTES_PER_TOKEN_DIM = {"gpu_inputs": 52.2, "host_inputs": 62.0}
# Reserved / allocated at the peak (allocator slack), measured uncapped with expandable segments: 1.18-1.20.
RESERVED_OVER_ALLOCATED = 1.19
# What a card must have free over the allocated peak: the 5% spare the presets keep.
NEED_OVER_ALLOCATED = 1.05
# Host memory of the process besides pinned buffers (Python, torch, CUDA context, compiled kernels).
HOST_BASELINE_BYTES = int(1.8 * GIB)
# What an engine run holds besides that while it trains (runner, dataset, loader state): its 24 GiB-cap run
# peaked 2.04 GiB above the bare bench with the same pinned buffers (68.49 against 66.45 GiB).
ENGINE_HOST_EXTRA_BYTES = int(2.04 * GIB)
# Host peak of a run whose model goes straight to the GPU, on the user's path (`s2v-tui --run`, model folder on
# disk, cache phase, validation on; bench/user_run.py --preset 80gb on the H200, 2026-12-01: 6.88 GiB, the CLI
# process alone). The engine bench's 5.61 GiB (in-memory samples, no cache phase, no validation) was 18% short.
# Measured before the loader mapped its shards afresh every engine.models.loading.REMAP_BYTES (a 5 GB shard's pages
# then stayed in RSS until it was read to the end): it may now be lower.
ENGINE_LOAD_HOST_BYTES = int(6.88 * GIB)
# int8's forward dequantises each weight before its bf16 matmul; fp8's does not. Measured at the same weight bytes
# (BENCHMARKS.md, compiled, first clip, full policy): int8 40.36 GiB against fp8 39.80. The 0.56 GiB is about two
# fp32 copies (`w_q.float() * w_scale`) of the largest low-bit Linear, an FFN Linear of 70.8 M weights (0.53 GiB).
INT8_DEQUANT_BYTES = int(0.56 * GIB)
# What a quantising load into host memory holds in RSS beyond the low-bit model: the mapped checkpoint pages of the
# stretch being read (at most engine.models.loading.REMAP_BYTES, 1 GiB, and the tensor that crosses it), the
# quantisation's temporaries and the heap's free pages between two trims. bench/load_host.py --path new at the
# 14B's width on the CPU (BENCHMARKS.md, 2026-12-01): 0.54 GiB with 6 blocks (whose last shard is 0.57 GB), 1.02
# GiB with 12, the figure used; no term grows with depth, the 40-block load is not measured.
LOADER_WINDOW_BYTES = int(1.02 * GIB)


PINNED_KINDS = ("slab", "torch")


def pinned_bytes(nbytes: int) -> int:
    """What torch's pinned host allocator takes for a buffer: the size rounded up to a power of two."""
    return 1 << max(0, int(nbytes - 1).bit_length())


def unit_tensor_shapes_named(i: int) -> list[tuple[str, tuple[int, ...]]]:
    """(module name.leaf, shape) of the frozen tensors of one streamed 14B unit (block i and the audio injector
    after it), in the diffusers layout."""
    from engine.models.keymap import manifest_14b

    inj = _INJECT_LAYERS.index(i) if i in _INJECT_LAYERS else None
    prefixes = [f"blocks.{i}."] + ([f"audio_injector.injector.{inj}.", f"audio_injector.injector_adain_layers.{inj}."]
                                   if inj is not None else [])
    return [(name, tuple(shape)) for _, name, shape in manifest_14b() if name.startswith(tuple(prefixes))]


def unit_tensor_shapes(i: int) -> list[tuple[int, ...]]:
    """Shapes of the frozen tensors of one streamed 14B unit (block i and the audio injector after it)."""
    return [shape for _, shape in unit_tensor_shapes_named(i)]


def unit_tensor_bytes(i: int, weight_bytes: float, low_bit_families=()) -> list[int]:
    """Bytes of each frozen tensor of one streamed unit, as the streamer holds them. A Linear of
    `low_bit_families` (engine.models.low_bit_linear) is two tensors there, its 1-byte weight and its fp32 row
    scales; its bias is kept in bf16."""
    patterns = []
    if low_bit_families:  # (torch is imported only for a low-bit config)
        from engine.models.low_bit_linear import FAMILIES

        patterns = [FAMILIES[f] for f in low_bit_families]
    sizes = []
    for name, shape in unit_tensor_shapes_named(i):
        module, _, leaf = name.rpartition(".")
        low_bit = any(pattern.match(module) for pattern in patterns)
        if low_bit and leaf == "weight" and len(shape) == 2:
            sizes += [shape[0] * shape[1], shape[0] * 4]
        elif low_bit and leaf == "bias":
            sizes.append(shape[0] * 2)
        else:
            sizes.append(int(math.prod(shape) * weight_bytes))
    return sizes


def unit_bytes(i: int, weight_bytes: float, low_bit_families=()) -> int:
    """Bytes of the frozen tensors of one streamed unit (what one copy to the GPU moves)."""
    return sum(unit_tensor_bytes(i, weight_bytes, low_bit_families))


def streamed_host_bytes(units, weight_bytes: float, pinned: str = "slab", low_bit_families=()) -> int:
    """Pinned host bytes of the streamed units: one slab for all their tensors (block_stream.py), or with torch's
    pinned allocator one power-of-two buffer per tensor."""
    sizes = [n for i in units for n in unit_tensor_bytes(i, weight_bytes, low_bit_families)]
    if pinned == "torch":
        return sum(pinned_bytes(n) for n in sizes)
    from engine.models.pinned_slab import slab_bytes, views_bytes

    return slab_bytes(views_bytes(sizes))


def saved_inputs_host_bytes(count: int, one_input: int, pinned: str = "slab") -> int:
    """Pinned host bytes of `count` saved block inputs: one slab each (offload_checkpoint.py), or torch's
    power-of-two buffers."""
    if pinned == "torch":
        return count * pinned_bytes(one_input)
    from engine.models.pinned_slab import slab_bytes

    return count * slab_bytes(one_input)


@dataclass(frozen=True)
class Calibration:
    """One measured step (BENCHMARKS.md), the ground truth of the model."""
    label: str
    tokens: int
    offload_inputs: bool
    stream_resident: int | None  # None = no block streaming
    peak_alloc_gib: float
    low_bit: str = ""  # "fp8" or "int8": self_attn + cross_attn + ffn in that kind
    save_attention: bool = False


CALIBRATION = (
    Calibration("compiled, first clip, inputs on GPU", 34_320, False, None, 52.97),
    Calibration("compiled, continuation, inputs on GPU", 36_634, False, None, 54.24),
    Calibration("compiled, first clip, inputs in host RAM", 34_320, True, None, 41.79),
    Calibration("compiled, continuation, inputs in host RAM", 36_634, True, None, 42.25),
    Calibration("compiled, first clip, blocks streamed, 24 GiB cap", 34_320, True, 0, 13.70),
    Calibration("compiled, continuation, blocks streamed, 24 GiB cap", 36_634, True, 0, 14.16),
    Calibration("compiled, save_attention, first clip", 34_320, False, None, 65.84, save_attention=True),
    Calibration("compiled, fp8, first clip", 34_320, False, None, 39.80, low_bit="fp8"),
    Calibration("compiled, fp8, save_attention, first clip", 34_320, False, None, 52.77, low_bit="fp8",
                save_attention=True),
    Calibration("compiled, fp8, save_attention, continuation", 36_634, False, None, 54.92, low_bit="fp8",
                save_attention=True),
    Calibration("compiled, fp8, inputs in host RAM, 32 GiB cap, first clip", 34_320, True, None, 29.39, low_bit="fp8"),
    Calibration("compiled, fp8, inputs in host RAM, 32 GiB cap, continuation", 36_634, True, None, 29.89, low_bit="fp8"),
    Calibration("compiled, inputs in host RAM, 48 GiB cap, first clip", 34_320, True, None, 42.46),
    Calibration("compiled, inputs in host RAM, 45 GiB cap, continuation", 36_634, True, None, 42.97),
    Calibration("compiled, int8, first clip", 34_320, False, None, 40.36, low_bit="int8"),
    Calibration("compiled, save_attention, continuation", 36_634, False, None, 68.00, save_attention=True),
    Calibration("engine, full policy, 80-frame windows", 32_760, False, None, 52.20),
    Calibration("engine, 80gb preset (save_attention), 80-frame windows", 32_760, False, None, 64.58,
                save_attention=True),
    Calibration("engine, 80gb preset (save_attention), 80-frame windows, continuation", 35_074, False, None, 66.73,
                save_attention=True),
    Calibration("engine, 24gb preset, 80-frame windows, 24 GiB cap", 32_760, True, 0, 13.63),
)


@dataclass(frozen=True)
class HostCalibration:
    """One measured host RSS peak (BENCHMARKS.md): a bare bench process or a whole engine run."""
    label: str
    tokens: int
    offload_inputs: bool
    stream_resident: int | None
    engine: bool
    peak_rss_gib: float
    pinned: str = "torch"  # the rows that ran before the slabs; "slab" for the rows measured with them


HOST_CALIBRATION = (
    HostCalibration("bench, blocks streamed, inputs in host RAM, first clip", 34_320, True, 0, False, 66.45),
    HostCalibration("bench, blocks streamed, inputs in host RAM, continuation", 36_634, True, 0, False, 66.38),
    HostCalibration("bench, inputs in host RAM, 48 GiB cap, first clip", 34_320, True, None, False, 22.86),
    HostCalibration("bench, inputs in host RAM, 45 GiB cap, continuation", 36_634, True, None, False, 22.87),
    HostCalibration("bench, fp8, inputs in host RAM, 32 GiB cap, first clip", 34_320, True, None, False, 22.05),
    HostCalibration("engine, 24gb preset, 24 GiB cap", 32_760, True, 0, True, 68.49),
    # The user's path (bench/user_run.py: `s2v-tui --run`, model folder on disk, three 11 s clips through the cache
    # phase, one validation case), H200, 2026-12-01, with the slabs; the CLI process's own RSS (its inductor
    # compile workers are separate processes, reported beside it in BENCHMARKS.md).
    HostCalibration("real path, 24gb preset, 24 GiB cap, validation on", 35_074, True, 0, True, 47.46, "slab"),
    HostCalibration("real path, 80gb preset, validation on", 35_074, False, None, True, 6.88, "slab"),
)


@dataclass(frozen=True)
class MemoryEstimate:
    vram_bytes: int  # peak allocated
    vram_reserved_bytes: int  # what the caching allocator reserves when nothing caps it
    vram_need_bytes: int  # what the card must have free
    host_bytes: int
    tokens: int
    parts: dict

    def summary(self) -> str:
        return (f"{self.vram_need_bytes / GIB:.1f} GiB GPU, {self.host_bytes / GIB:.1f} GiB host RAM "
                f"({self.tokens:,} tokens)")


def sequence_tokens(width: int, height: int, frames: int, motion: bool) -> int:
    """Tokens of one training window: video latents + one reference latent (+ framepack motion tokens)."""
    latents = frames // 4 if frames % 4 == 0 else 1 + (frames - 1) // 4
    per_frame = (height // 16) * (width // 16)
    tokens = latents * per_frame + per_frame
    if motion:
        tokens += per_frame + (height // 32) * (width // 32) + 4 * (height // 64) * (width // 64)
    return tokens


_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


def _unit_params(i: int) -> int:
    return PARAMS_BLOCK + (PARAMS_INJECTOR if i in _INJECT_LAYERS else 0)


def low_bit_params(families) -> int:
    """Weights of the 14B model's Linears in these low-bit families (engine.models.low_bit_linear.FAMILIES)."""
    if not families:
        return 0
    from engine.models.low_bit_linear import FAMILIES
    from engine.models.keymap import manifest_14b

    total = 0
    for _, name, shape in manifest_14b():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and any(FAMILIES[f].match(module) for f in families):
            total += shape[0] * shape[1]
    return total


def adapter_params(kind: str, rank: int) -> int:
    """Trainable parameters of an adapter of lora.kind `kind` on the default targets (each Linear 5120 x 5120), as
    peft builds it (tests/test_lora_kinds.py holds this against peft's own shapes)."""
    if kind == "loha":  # two rank-r products
        per = 4 * DIM * rank
    elif kind == "lokr":  # peft factorises 5120 as 64 x 80: w1 64 x 64 whole, w2 80 x 80 factorised below r = 40
        per = 64 * 64 + (80 * 80 if 2 * rank >= 80 else 2 * 80 * rank)
    else:  # lora, and dora with one magnitude per output row
        per = 2 * DIM * rank + (DIM if kind == "dora" else 0)
    return LORA_MODULES * per


def estimate_parts(tokens: int, *, weight_bytes: float = 2.0, lora_rank: int = 16, lora_kind: str = "lora",
                   ema: bool = False,
                   checkpoint_interval: int = 1, offload_inputs: bool = False, gpu_saved_inputs: int = 0,
                   stream_resident: int | None = None, batch: int = 1, low_bit: str = "",
                   low_bit_families=LOW_BIT_DEFAULT_FAMILIES, save_attention: bool = False, engine: bool = False,
                   pinned: str = "slab") -> MemoryEstimate:
    """The terms of the module docstring; `low_bit`: "" (bf16 base), "fp8" or "int8", for `low_bit_families`;
    `gpu_saved_inputs`: with offload_inputs, the saved inputs that stay on the GPU; `engine`: host RAM of a whole
    engine run (load peak and the runner's own memory) rather than of a bare bench process; `pinned`: how pinned
    host buffers are held, "slab" (the engine's exact-size slabs) or "torch" (torch's power-of-two pinned
    allocator, as the measured host rows)."""
    if pinned not in PINNED_KINDS:
        raise ValueError(f"pinned={pinned!r}: choose one of {PINNED_KINDS}")
    families = tuple(low_bit_families) if low_bit else ()
    units = [_unit_params(i) for i in range(LAYERS)]
    rest = PARAMS_TOTAL - sum(units)  # embeddings, head, ...: never low-bit, never streamed
    if stream_resident is None:
        gpu_weights = PARAMS_TOTAL * weight_bytes - low_bit_params(families) * (weight_bytes - 1.0)
        host_weights = 0.0
    else:
        # Each unit in the bytes the streamer holds (low-bit Linears at 1 byte a weight + row scales).
        resident = min(stream_resident, LAYERS)
        sizes = [unit_bytes(i, weight_bytes, families) for i in range(LAYERS)]
        in_flight = sorted(sizes[resident:], reverse=True)[:2]
        gpu_weights = rest * weight_bytes + sum(sizes[:resident]) + sum(in_flight)
        host_weights = streamed_host_bytes(range(resident, LAYERS), weight_bytes, pinned, families)
    dequant = INT8_DEQUANT_BYTES if low_bit == "int8" else 0
    lora = adapter_params(lora_kind, lora_rank) * 4 * (4 + (1 if ema else 0))
    saved = -(-LAYERS // checkpoint_interval)
    one_input = batch * tokens * DIM * 2
    if offload_inputs:
        kept = min(max(0, gpu_saved_inputs), saved)
        # The kept inputs, plus the two offloaded ones in flight that the calibrated rows carried (counted even
        # when the kept ones are alive: at the backward's start no offloaded one is loaded yet, so this is
        # conservative by up to two inputs).
        gpu_inputs = (kept + min(2, saved - kept)) * one_input
        host_inputs = saved_inputs_host_bytes(saved - kept, one_input, pinned)
    else:
        gpu_inputs, host_inputs = saved * one_input, 0
    work_key = "host_inputs" if offload_inputs else "gpu_inputs"
    work = WORK_BYTES_PER_TOKEN_DIM[work_key] * batch * tokens * DIM * checkpoint_interval
    attention = saved * one_input if save_attention else 0
    parts = {"weights": gpu_weights, "lora_state": lora, "saved_inputs": gpu_inputs, "saved_attention": attention,
             "working_set": work, "low_bit_dequant": dequant}
    vram = sum(parts.values())
    host = host_weights + host_inputs + HOST_BASELINE_BYTES
    if engine:
        host = max(host + ENGINE_HOST_EXTRA_BYTES, ENGINE_LOAD_HOST_BYTES)
    parts.update(host_pinned_weights=host_weights, host_pinned_inputs=host_inputs)  # host terms, not in `vram`
    return MemoryEstimate(int(vram), int(vram * RESERVED_OVER_ALLOCATED), int(vram * NEED_OVER_ALLOCATED), int(host),
                          tokens, {k: int(v) for k, v in parts.items()})


def loader_quantises_while_loading() -> bool:
    """Whether the model loader makes the low-bit Linears as it reads them (a `low_bit` argument of
    engine.models.loading.load_transformer), so the host never holds the bf16 model; else the runner loads the
    bf16 model into host memory and quantises it from there. Asked of the code rather than assumed, so the
    prediction follows whichever loader this build has."""
    import inspect

    from engine.models.loading import load_transformer

    return "low_bit" in inspect.signature(load_transformer).parameters


def low_bit_load_host_bytes(config) -> int:
    """Host peak of loading a low-bit config (engine.runner._load_model), before training pins anything."""
    mem = config.memory
    process = HOST_BASELINE_BYTES + ENGINE_HOST_EXTRA_BYTES
    if loader_quantises_while_loading():
        if not mem.block_offload:
            # Quantised on the GPU as it is read (engine.runner._load_model): the host side is that of any load
            # to the GPU.
            return ENGINE_LOAD_HOST_BYTES
        # The low-bit model in host memory (its streamed units as the slab will hold them, the rest in bf16) and
        # what the loader holds beyond it while it reads (LOADER_WINDOW_BYTES, measured). The streamer then moves
        # the tensors into its slab one by one, freeing each.
        units = streamed_host_bytes(range(LAYERS), 2.0, "slab", tuple(mem.low_bit_families))
        rest = (PARAMS_TOTAL - sum(_unit_params(i) for i in range(LAYERS))) * 2
        return int(units + rest + LOADER_WINDOW_BYTES + process)
    # A loader that leaves the bf16 model in host memory, the low-bit Linears made from it one by one: the host
    # holds the whole bf16 model once, before training pins anything (also when the blocks are then streamed).
    return int(PARAMS_TOTAL * 2 + process)


def estimate(config, pinned: str = "slab") -> MemoryEstimate:
    """The estimate for a run config (engine.config.Config); `pinned` as in estimate_parts (the engine uses slabs;
    "torch" gives what the same config took before them)."""
    mem = config.memory
    width, height = config.data.resolution
    motion = config.data.motion_frames > 0
    tokens = sequence_tokens(width, height, config.data.frames, motion)
    est = estimate_parts(
        tokens,
        low_bit="" if mem.base_weights == "bf16" else mem.base_weights,
        low_bit_families=tuple(mem.low_bit_families),
        save_attention=mem.gradient_checkpointing and mem.checkpoint_policy == "save_attention",
        lora_rank=config.lora.rank,
        lora_kind=config.lora.kind,
        ema=config.optim.ema.enabled,
        checkpoint_interval=mem.checkpoint_interval if mem.gradient_checkpointing else 1,
        offload_inputs=mem.offload_checkpoint_inputs,
        gpu_saved_inputs=mem.gpu_saved_inputs,
        stream_resident=mem.blocks_resident if mem.block_offload else None,
        batch=config.optim.batch_size,
        engine=True,
        pinned=pinned,
    )
    if mem.base_weights != "bf16":
        load_host = low_bit_load_host_bytes(config)
        if load_host > est.host_bytes:
            est = replace(est, host_bytes=load_host, parts={**est.parts, "host_load": load_host})
    return est


def predict(config) -> tuple[int, int]:
    """(GPU bytes the card must have free, host RAM bytes) for the preset picker."""
    est = estimate(config)
    return est.vram_need_bytes, est.host_bytes


def host_calibration_errors() -> list[tuple[str, float, float]]:
    """(label, predicted GiB, measured GiB) for each host calibration row."""
    rows = []
    for c in HOST_CALIBRATION:
        est = estimate_parts(c.tokens, offload_inputs=c.offload_inputs, stream_resident=c.stream_resident,
                             engine=c.engine, pinned=c.pinned)
        rows.append((c.label, est.host_bytes / GIB, c.peak_rss_gib))
    return rows


def calibration_errors() -> list[tuple[str, float, float]]:
    """(label, predicted GiB, measured GiB) for each calibration row."""
    rows = []
    for c in CALIBRATION:
        est = estimate_parts(c.tokens, offload_inputs=c.offload_inputs, stream_resident=c.stream_resident,
                             low_bit=c.low_bit,
                             save_attention=c.save_attention)
        rows.append((c.label, est.vram_bytes / GIB, c.peak_alloc_gib))
    return rows
