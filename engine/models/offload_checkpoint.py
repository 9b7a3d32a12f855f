"""Activation checkpointing whose saved block inputs live in pinned host memory.

Per-block checkpointing keeps one [B, S, D] input per block on the GPU (13 GiB for the 14B model at 832x480x81).
Here each input is copied to a reusable pinned host buffer on a side CUDA stream while the block runs, and in the
backward pass the input of the next block to be recomputed is brought back ahead of use, so at most two block
inputs are on the GPU at a time and the copies overlap compute (about 7 ms per block at 55 GB/s, against ~100 ms
of block compute).

The recompute is the classic re-entrant one: the block runs without grad in the forward, and again with grad in
the backward from the restored input, under the same autocast state and RNG state, then back-propagates into the
block's trainable parameters (the LoRA weights) directly. Only the block input may require grad; every other
argument (modulation, RoPE tables, text and audio tokens) comes from frozen modules.

Part of the inputs on the GPU (`keep_last`, memory.gpu_saved_inputs): the inputs of the last N saves of a step
stay where they are and only the earlier ones go to host memory. The last ones, because the backward needs them
first: it starts without waiting for a host copy, and by the time it reaches the first offloaded input the copy
of that one was started one block earlier, as for every later one. Which N stay does not change the peak (all N
are alive when the backward starts); keeping the last ones also frees them first, as the backward passes them.

Host buffers: one exact-size pinned slab per save slot (the n-th saved input of a step always goes to slot n),
kept and refilled every step (slots exist for offloaded inputs only). torch's pinned tensors would round each 0.31-0.33 GiB input up to 0.5 GiB. A slot
is keyed by bytes, not shape, so bucketed variable-resolution training reuses the slots across buckets: a step
with a smaller window fills part of each slot; a larger one replaces a slot by one of the new size, once. The host
then holds (slots x the largest input trained so far), where a pool per shape would hold every bucket's inputs.
"""
from __future__ import annotations

import torch

from engine.models.pinned_slab import PinnedSlab, tensor_bytes


class HostActivationStore:
    """Pinned host copies of the saved block inputs of one step, with prefetch in backward order.

    offload=False keeps the inputs where they are (used when block streaming needs this re-entrant recompute but
    the inputs fit on the GPU). keep_last=N keeps the last N saves of each step where they are and offloads the
    rest; the caller says how many saves a step makes (`begin_step(saves)`)."""

    def __init__(self, offload: bool = True, keep_last: int = 0):
        if keep_last < 0:
            raise ValueError(f"keep_last={keep_last}: the number of saved inputs kept in place, >= 0")
        self.offload = offload
        self.keep_last = keep_last
        self._first_kept: int | None = None  # index of the first save of this step kept in place
        self._slots: list[PinnedSlab] = []  # one per offloaded input of a step, reused every step
        self._saved: list = []  # per forward call: (tensor, copy-done event or None, device or None = in place)
        self._loaded: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._offloaded = 0  # inputs of this step sent to host slots so far
        self._stream = None

    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def begin_step(self, saves: int | None = None) -> None:
        """Reset the per-step state (the host slots are kept and refilled). `saves`: how many inputs this step
        will save, needed with keep_last (which of them are the last ones)."""
        if self.keep_last and saves is None:
            raise ValueError("keep_last needs the number of saves of the step: begin_step(saves)")
        self._first_kept = None if saves is None else max(0, saves - self.keep_last)
        self._saved.clear()
        self._loaded.clear()
        self._offloaded = 0

    def kept_in_place(self, index: int) -> bool:
        """Whether save number `index` of this step stays where it is (not offloaded)."""
        if not self.offload:
            return True
        if self.keep_last and self._first_kept is None:
            raise RuntimeError("keep_last needs the number of saves of the step: call begin_step(saves) first")
        return self.keep_last > 0 and index >= self._first_kept

    def host_bytes(self) -> int:
        """Host memory held by the saved-input slots."""
        return sum(slot.nbytes for slot in self._slots)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        index = self._offloaded
        self._offloaded += 1
        need = tensor_bytes(like.shape, like.dtype)
        pin = like.is_cuda  # a CPU run copies nothing to a GPU: ordinary memory is right there
        if index == len(self._slots):
            self._slots.append(PinnedSlab(need, pin=pin))
        elif self._slots[index].capacity < need or self._slots[index].pinned != pin:
            # The old slot goes before the new one is made, so the host never holds both.
            self._slots[index].release()
            self._slots[index] = PinnedSlab(need, pin=pin)
        slot = self._slots[index]
        slot.reset()
        return slot.view(like.shape, like.dtype)

    def save(self, x: torch.Tensor) -> int:
        if self.kept_in_place(len(self._saved)):
            self._saved.append((x, None, None))
            return len(self._saved) - 1
        host = self._buffer(x)
        if x.is_cuda:
            stream = self._side_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                host.copy_(x, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            x.record_stream(stream)  # keep x's memory alive until the copy has read it
        else:
            host.copy_(x)
            done = None
        self._saved.append((host, done, x.device))
        return len(self._saved) - 1

    def _start_load(self, index: int) -> None:
        if index < 0 or index in self._loaded or index >= len(self._saved):
            return
        host, saved_event, device = self._saved[index]
        if device is None:  # kept in place: the store lets go of it once loaded, so the backward frees it
            if host is not None:
                self._loaded[index] = (host, None)
                self._saved[index] = (None, None, None)
            return
        if device.type != "cuda":
            self._loaded[index] = (host.clone(), None)
            return
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            if saved_event is not None:
                stream.wait_event(saved_event)
            gpu = host.to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        self._loaded[index] = (gpu, ready)

    def load(self, index: int) -> torch.Tensor:
        """The saved input of forward call `index`; also starts bringing back call `index - 1`."""
        self._start_load(index)
        gpu, ready = self._loaded.pop(index)
        if ready is not None:
            current = torch.cuda.current_stream(gpu.device)
            current.wait_event(ready)
            gpu.record_stream(current)
        self._start_load(index - 1)
        return gpu


class _HostCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, run, store, hooks, *args):
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise ValueError("host checkpoint: only the block input may require grad")
        ctx.run, ctx.store, ctx.args, ctx.hooks = run, store, args, hooks
        ctx.index = store.save(x)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.device = x.device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            return run(x, *args)

    @staticmethod
    def backward(ctx, grad_out):
        before, after = ctx.hooks
        if before is not None:
            before()
        x = ctx.store.load(ctx.index).detach().requires_grad_(True)
        enabled, dtype = ctx.autocast
        # Recompute with the forward's RNG state (LoRA dropout) and autocast state.
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(x, *ctx.args)
        torch.autograd.backward(out, grad_out)
        if after is not None:
            after()
        return (x.grad, None, None, None) + (None,) * len(ctx.args)


def host_checkpoint(run, x: torch.Tensor, store: HostActivationStore, *args, before_backward=None,
                    after_backward=None) -> torch.Tensor:
    """run(x, *args) with x kept in host memory until the backward pass recomputes the block.

    before_backward/after_backward run around the recompute + backward of this block (block streaming uses
    them to bring the block's weights in and out)."""
    if not x.requires_grad:
        # The trainable weights are inside `run`, not inputs of the autograd Function: the output only joins the
        # graph when an input requires grad (the first block's input comes from frozen embeddings).
        x = x.detach().requires_grad_(True)
    return _HostCheckpoint.apply(x, run, store, (before_backward, after_backward), *args)
