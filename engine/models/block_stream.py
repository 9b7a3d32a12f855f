"""Block streaming: the frozen base weights of transformer blocks live in pinned host memory and are copied to
the GPU on a side CUDA stream just ahead of use, in the forward pass and in the backward recompute.

A unit is one block plus the audio injector that follows it. Every tensor a unit holds that is not trained
travels: its frozen parameters (requires_grad False) and its buffers, which is where a low-bit Linear keeps its
storage (engine/models/low_bit_linear.py: `weight_q`, int8 or fp8-as-uint8, `weight_scale`, fp32 row scales, and
a bf16 `bias`), so a low-bit base streams in its own bytes, half of bf16's. What such a Linear makes from its
storage per use (the dequantised weight of the int8 matmul, the fp8 input gradient's column-major copy) is made on
the GPU from the streamed copy and never held here. LoRA weights and everything outside the blocks stay on the
GPU. The first `resident` units never leave the GPU (the knob a preset turns to trade VRAM for copies). At 0.70 GB
per bf16 14B block and about 55 GB/s for pinned copies a unit arrives in ~13 ms while the previous one computes
for ~100 ms, so the copies hide behind compute.

Host memory: the host copies of all streamed units are views into one exact-size slab (pinned_slab.py), not one
torch pinned tensor each, which torch rounds up to a power of two (29.7 GiB of 14B weights took ~44 GiB that way).
The slab is filled before it is page-locked, so each source tensor is freed as soon as it is copied and the host
never holds the model twice.

Memory safety: a unit's GPU copies are allocated on the side stream and read on the compute stream, so each copy
is marked with `record_stream` on the compute stream before it is dropped; the caching allocator then keeps the
memory until the compute stream has passed that point.

On the CPU (tests only: the run config refuses block_offload without a GPU) nothing is pinned and a fetch is a
plain copy of the host tensor, so the same swaps happen and a test can see which tensor a block computes with.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.models.pinned_slab import PinnedSlab, tensor_bytes, views_bytes


def frozen_tensors(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The tensors of `modules` that block streaming moves: frozen parameters and buffers (each once)."""
    seen, out = set(), []
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen and not t.requires_grad:
                seen.add(id(t))
                out.append(t)
    return out


class _Unit:
    def __init__(self, modules: list[nn.Module]):
        # (the module's tensor, its pinned host copy). A swap assigns `.data`, which parameters and buffers both
        # take, so the modules keep the same tensor objects (and compiled graphs the same inputs) wherever the
        # bytes are.
        self.tensors: list[tuple[torch.Tensor, torch.Tensor | None]] = [(t, None) for t in frozen_tensors(modules)]
        self.ready: torch.cuda.Event | None = None
        self.on_gpu = False


def pack_into_slab(params: list[torch.Tensor], pin: bool) -> PinnedSlab:
    """Move each tensor's data into a view of one new slab sized for all of them, then page-lock the slab when
    `pin` (pin=False: the CPU case, where nothing is copied to a GPU). Each old tensor is dropped as soon as it is
    copied, and the pages are locked only once filled, so the host peak stays near one copy of the weights."""
    slab = PinnedSlab(views_bytes(tensor_bytes(p.shape, p.dtype) for p in params), pin=False)
    for p in params:
        host = slab.view(p.shape, p.dtype)
        host.copy_(p.data)
        p.data = host
    if pin:
        slab.pin()
    return slab


class BlockStreamer:
    def __init__(self, units: list[list[nn.Module]], device: torch.device, resident: int = 0):
        if device.index is None and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"block streaming moves weights between host and GPU memory, not to {device.type}")
        self.device = device
        self.cuda = device.type == "cuda"
        self.resident = max(0, resident)
        self.units = [_Unit(mods) for mods in units]
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        for unit in self.units[:self.resident]:
            for p, _ in unit.tensors:
                p.data = p.data.to(device)
            unit.on_gpu = True
        self.slab = pack_into_slab([p for unit in self.units[self.resident:] for p, _ in unit.tensors],
                                   pin=self.cuda)
        for unit in self.units[self.resident:]:
            unit.tensors = [(p, p.data) for p, _ in unit.tensors]

    def host_bytes(self) -> int:
        """Host memory held by the streamed weights (the slab, alignment included)."""
        return self.slab.nbytes

    def fetch(self, i: int) -> None:
        """Start copying unit i to the GPU (no-op if resident, loaded, or out of range)."""
        if not 0 <= i < len(self.units):
            return
        unit = self.units[i]
        if unit.on_gpu:
            return
        if not self.cuda:
            for p, host in unit.tensors:
                p.data = host.clone()
            unit.on_gpu = True
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # its memory may be reused after frees
        with torch.cuda.stream(self.stream):
            for p, host in unit.tensors:
                p.data = host.to(self.device, non_blocking=True)
            unit.ready = torch.cuda.Event()
            unit.ready.record(self.stream)
        unit.on_gpu = True

    def ensure(self, i: int) -> None:
        """Make unit i usable on the compute stream (waiting for its copy) and prefetch nothing else."""
        self.fetch(i)
        unit = self.units[i]
        if unit.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(unit.ready)
            for p, host in unit.tensors:
                if host is not None:
                    p.data.record_stream(current)
            unit.ready = None

    def release(self, i: int) -> None:
        if i < self.resident or not 0 <= i < len(self.units):
            return
        unit = self.units[i]
        for p, host in unit.tensors:
            p.data = host
        unit.on_gpu = False
        unit.ready = None
