"""Exact-size pinned host memory: one ordinary host allocation, page-locked with cudaHostRegister, cut into
aligned tensor views by a bump pointer.

Why not torch's pinned tensors: `torch.empty(..., pin_memory=True)` goes through the CUDA caching host allocator,
which rounds every request up to a power of two before it allocates (`CachingHostAllocatorImpl::allocate` in
aten/src/ATen/core/CachingHostAllocator.h: `roundSize = c10::llvm::PowerOf2Ceil(size)`, and the free lists are
indexed by that power). The 14B model's streamed block weights (29.7 GiB in 1,224 tensors) took about 44 GiB that
way, its 40 saved block inputs (0.31-0.33 GiB each) 20 GiB. The allocator setting
`PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True` does not help: it changes only how a block is
obtained (`allocWithCudaHostRegister` in aten/src/ATen/cuda/CachingHostAllocator.cpp mallocs the already rounded
size, writes one byte to every page of it, then registers it), so the rounded size is still resident. Neither does
`pinned_reserve_segment_size_mb`: requests are carved from the reserve segment at their rounded size too. One big
`pin_memory=True` tensor cut into views would be rounded once (30 GiB of weights into 32 GiB). Registering memory
we allocate ourselves is exact; torch does the same for its own checkpoint staging
(torch/cuda/_pin_memory_utils.py, used by torch.distributed.checkpoint), through the same
`torch.cuda.cudart().cudaHostRegister(ptr, size, flags)` binding used here.

Layout: the host allocation is one page larger than asked, so that the registered range can start on a page
boundary inside it (torch's CPU allocator aligns to 64 bytes only) and never shares a page with anything else.
Each view starts at a multiple of `align` (4 KiB by default: page-aligned DMA sources, and an offset every dtype
can be viewed at); the host memory used is the sum of the views' sizes rounded up to `align`, plus that one page.

Measured on the H200 machine (torch 2.11, bench/pinned_slab_check.py, 2.91 GiB of 14B block tensors + 8 saved
inputs): the process grew by 5.591 GiB for 5.587 GiB of tensors (torch's pinned tensors: 8.379 GiB, 8.381 with
pinned_use_cuda_host_register), and copies from and to the views ran at the speed of torch's pinned memory (55 GB/s
both ways; 8.3 GB/s host-to-GPU from ordinary memory). torch's `Tensor.is_pinned()` answered False for these views
there (it does not recognise memory registered outside its allocator). Nothing in the engine asks it; the copy
speed is what shows the driver treats the pages as locked.

Without CUDA the slab stays ordinary memory. That is only right when the tensors it holds never meet a GPU (the
CPU tests and CPU runs): callers pass `pin=False` for that case, and `pin()` refuses to run without CUDA rather than
hand out unpinned memory to code that will make asynchronous copies from it.
"""
from __future__ import annotations

import math
import weakref

import torch

PAGE = 4096
ALIGN = 4096
_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process, not just one


def aligned(nbytes: int, align: int = ALIGN) -> int:
    """nbytes rounded up to a multiple of align."""
    return -(-nbytes // align) * align


def views_bytes(sizes, align: int = ALIGN) -> int:
    """The total_bytes a slab needs for views of these byte sizes, made in this order: each rounded up to `align`."""
    return sum(aligned(int(n), align) for n in sizes)


def slab_bytes(total_bytes: int, align: int = ALIGN) -> int:
    """Host bytes a slab of total_bytes holds: its capacity (rounded up to a page, the unit that is locked) plus the
    page it gives up to start the locked range on a page boundary (nothing for an empty slab)."""
    return aligned(total_bytes, max(align, PAGE)) + PAGE if total_bytes > 0 else 0


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _cuda_error(err) -> str:
    return f"{torch.cuda.cudart().cudaGetErrorString(err)} (CUDA error {int(err)})"


def _unregister(ptr: int, size: int, memory: torch.Tensor | None = None) -> None:
    # `memory` is only held: the finalizer owns a reference to it, so it cannot be freed while still locked.
    # The memory may still be the source or target of an asynchronous copy, and the CUDA documentation does not
    # promise that unregistering waits for those: wait for the device first (a release is rare, at the end of a
    # run or when a saved-input slot grows).
    torch.cuda.synchronize()
    err = torch.cuda.cudart().cudaHostUnregister(ptr)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostUnregister of {size} bytes failed: {_cuda_error(err)}")


class PinnedSlab:
    """`total_bytes` of host memory handed out as aligned, non-overlapping tensor views.

    pin=True page-locks the whole slab at once (for buffers that are written by asynchronous copies); pin=False
    leaves it ordinary memory until `pin()` is called, so a caller can fill it first and free the tensors it copies
    from as it goes (locking makes every page resident at once).
    """

    def __init__(self, total_bytes: int, align: int = ALIGN, pin: bool = True):
        if align <= 0 or align & (align - 1):
            raise ValueError(f"align={align}: use a power of two")
        self.align = align
        self.capacity = aligned(max(0, int(total_bytes)), max(align, PAGE))
        # One page more than the capacity, so that the range from the first page boundary is ours alone.
        self._raw = torch.empty(self.capacity + PAGE, dtype=torch.uint8)
        start = (-self._raw.data_ptr()) % PAGE
        self._base = self._raw[start:start + self.capacity]
        self.used = 0
        self.pinned = False
        self._finalizer = None
        if pin:
            self.pin()

    @property
    def nbytes(self) -> int:
        """Host bytes this slab holds (the capacity plus the alignment page)."""
        return slab_bytes(self.capacity, self.align) if self._base is not None else 0

    def view(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """A new contiguous tensor of `shape` and `dtype` in the slab, at the next aligned offset (contents
        undefined)."""
        if self._base is None:
            raise RuntimeError("the pinned slab was released")
        shape = tuple(int(d) for d in shape)
        need = tensor_bytes(shape, dtype)
        start = aligned(self.used, self.align)
        if start + need > self.capacity:
            raise RuntimeError(f"pinned slab full: {need} bytes asked at offset {start} of {self.capacity}")
        self.used = start + need
        return self._base[start:start + need].view(dtype).view(shape)

    def reset(self) -> None:
        """Hand out views from the start again; views given before alias the new ones (for buffers refilled every
        step)."""
        self.used = 0

    def pin(self) -> None:
        """Page-lock the slab (no-op when it already is)."""
        if self.pinned or self._base is None:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("pinned host memory needs CUDA; without it keep the slab unpinned (pin=False), "
                               "which is right only when its tensors stay on the CPU")
        if self.capacity == 0:
            self.pinned = True
            return
        ptr = self._base.data_ptr()
        # Fault the pages in with torch's threaded fill first: the driver would otherwise touch them one by one on a
        # single thread while it locks them (the reason torch's own register path pre-faults in parallel). A slab
        # the caller has filled already (block streaming) is resident and keeps its contents.
        if self.used == 0:
            self._base.zero_()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.capacity, _REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {self.capacity / 2**30:.2f} GiB of host memory failed: "
                               f"{_cuda_error(err)}")
        self.pinned = True
        # Unlock on garbage collection too; the finalizer holds the memory so that it is unlocked before it can be
        # freed. Not at interpreter exit: the CUDA context may already be gone, and the process frees it anyway.
        self._finalizer = weakref.finalize(self, _unregister, ptr, self.capacity, self._raw)
        self._finalizer.atexit = False

    def release(self) -> None:
        """Unlock and drop the slab's own reference to its memory. Views still alive keep the memory (as ordinary,
        unpinned memory) until they are dropped; no further views can be made."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.pinned = False
        self._raw = self._base = None
        self.used = 0
