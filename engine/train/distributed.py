"""Several processes (one per GPU) started by `accelerate launch`: who we are, what we share, what we write.

    dist = setup(config, device_name)      # one process: SINGLE, and every method below is a no-op
    ... Trainer(..., dist=dist)

Data: every rank draws the same seeded global batch of world_size x optim.batch_size windows and keeps its own
slice (`batches.shard_bounds`), and the sigmas and noise are drawn for the whole global batch too, so N ranks of
batch b train exactly as one process of batch N*b. The data position in a checkpoint is therefore global and a
run resumes on any number of GPUs.

Gradients (strategy "ddp"): the flattened LoRA gradients are all-reduced once per optimizer step, after the
accumulation, rather than by wrapping the model in DistributedDataParallel. Both ran on the tiny model (2 CPU
processes, gloo, per-block checkpointing): 0.146 s/step here against 0.200 with DDP (non-reentrant checkpoint),
0.055 against 0.075 (our re-entrant host_checkpoint). It is picked because a rank that skips a non-finite
micro-batch cannot desynchronise a collective hidden in backward, gradient accumulation needs no `no_sync`, the
model stays unwrapped (export, EMA and LoRA state code unchanged) and the block-streaming hooks never meet DDP's.
The lost compute/communication overlap is small: the LoRA of the 14B model is ~0.2 GB of fp32 gradients
against steps of seconds.

Strategy "fsdp": torch.distributed.fsdp.fully_shard on each transformer block and audio injector, then the root;
the frozen base and the LoRA are sharded (DTensor parameters), FSDP reduce-scatters the gradients. States that
leave the process (checkpoint, export) are gathered to full CPU tensors on every rank; only rank 0 writes them.

Every decision that changes the control flow (stop, skip a non-finite step) is agreed by all ranks through a
collective, so no rank waits forever for a step the others skipped.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


def launched_world_size() -> int:
    """The number of processes `accelerate launch` (torchrun underneath) started; 1 outside it."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@dataclass
class Distributed:
    """This process's place in the job. The defaults describe a single process (nothing to share)."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "single"  # "single", "ddp" or "fsdp"
    device: torch.device | None = None
    _mesh: Any = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.active

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.strategy})" if self.active else ""

    # ---- collectives (no-ops in one process) ------------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL reduces only CUDA tensors, gloo CPU tensors: use the device the process group speaks.
        backend = torch.distributed.get_backend()
        return self.device if backend == "nccl" else torch.device("cpu")

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: stop requests, non-finite steps."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_ints(self, values: Sequence[int | None]) -> list[list[int | None]]:
        """Every rank's `values` (None travels as -1), in rank order; [values] in one process."""
        if not self.active:
            return [list(values)]
        t = torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.int64,
                         device=self._comm_device())
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, t)
        return [[None if v < 0 else v for v in o.tolist()] for o in out]

    def reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average the LoRA gradients over the ranks in one flat all-reduce ("ddp"; FSDP reduced them already).
        A parameter without a gradient on this rank counts as zeros, so every rank sends the same layout."""
        if not self.active or self.sharded:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    # ---- sharded state in and out ------------------------------------------------------------------------
    def full(self, value: Any) -> Any:
        """A copy of `value` (tensor, dict, list) whose sharded tensors are gathered to full CPU tensors; the same
        object in an unsharded run. Collective under fsdp: every rank must call it in the same order."""
        if not self.sharded:
            return value
        from torch.distributed.tensor import DTensor

        if isinstance(value, DTensor):
            return value.full_tensor().cpu()
        if isinstance(value, Mapping):
            return {k: self.full(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.full(v) for v in value)
        return value

    def like(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A full tensor laid out like `param` (sharded under fsdp), on its device."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
        return value

    def lora_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from engine.models.lora import _canonical, get_lora_state, is_lora_parameter

        if not self.sharded:
            return get_lora_state(model)
        return {_canonical(n): p.detach().full_tensor().to("cpu", torch.float32)
                for n, p in model.named_parameters() if is_lora_parameter(n)}

    def set_lora_state(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
        from engine.models.lora import _canonical, is_lora_parameter, set_lora_state

        if not self.sharded:
            set_lora_state(model, state, source)
            return
        params = {_canonical(n): p for n, p in model.named_parameters() if is_lora_parameter(n)}
        if set(params) != set(state):
            from engine.models.lora import LoraFileError

            raise LoraFileError(f"{source}: LoRA keys do not match the model's adapter; was it trained with other "
                                "lora.targets or another model?")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(self.like(state[key].to(p.dtype), p))

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After `optimizer.load_state_dict(full state)`: lay each per-parameter tensor out like its parameter."""
        if not self.sharded:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                for name, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and tuple(value.shape) == tuple(p.shape) and value.dim() > 0:
                        optimizer.state[p][name] = self.like(value, p)

    # ---- the model ---------------------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard the model under fsdp (each block with its audio injector is one unit, then the root); the same
        model otherwise. Call after the LoRA is added and the memory switches are set."""
        if not self.sharded:
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        injected = {blk: inj for blk, inj in getattr(model, "injector_of_block", {}).items()}
        for i, block in enumerate(model.blocks):
            unit = [block]
            if i in injected:
                unit.append(model.audio_injector.injector[injected[i]])
                adain = model.audio_injector.injector_adain_layers
                if adain is not None:
                    unit.append(adain[injected[i]])
            fully_shard(unit if len(unit) > 1 else block, mesh=self._mesh)
        fully_shard(model, mesh=self._mesh)
        log.info("FSDP2: %d blocks sharded over %d ranks", len(model.blocks), self.world_size)
        return model

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 may still be writing the export the others wait for
            torch.distributed.destroy_process_group()


SINGLE = Distributed()


def setup(config, device_name: str | None = None) -> Distributed:
    """The Distributed of this process: under `accelerate launch` it joins the process group through accelerate
    (NCCL on GPUs, gloo on CPU) and takes the GPU of its local rank; SINGLE otherwise."""
    world = launched_world_size()
    if world <= 1:
        return SINGLE
    from accelerate import PartialState

    # The device the run would pick (engine.runner.pick_device): a CPU-only machine joins with gloo.
    cpu = torch.device(device_name).type == "cpu" if device_name is not None else not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes != world:
        # N processes that each trained alone would share one run folder and data order: never start so.
        raise RuntimeError(f"launched as {world} processes (WORLD_SIZE), but accelerate joined {state.num_processes} "
                           f"on {state.device}: each GPU needs its own process and CUDA must see the GPUs "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    strategy = config.distributed.strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy = {strategy!r}: use one of {', '.join(STRATEGIES)}")
    device = torch.device("cpu") if cpu else state.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log.info("rank %d of %d on %s (%s)", state.process_index, state.num_processes, device, strategy)
    return Distributed(state.process_index, state.num_processes, strategy, device)
