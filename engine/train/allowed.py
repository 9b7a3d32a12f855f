"""`setting_problems(config, world_size, device)`: may these settings run here? The one answer.

The config file's own rules (a value out of range, two keys that contradict each other whatever the machine) are
in engine/config/rules.py and fail while the file is read, naming the file and the key. What is here depends on
where the run goes: the device (block streaming needs a CUDA GPU, fp8 matmuls need a kernel this GPU runs), the
number of processes (what the FSDP2 and DDP paths cannot share), and the switch combinations the model cannot
apply together. The runner's check phase, `s2v-tui check PRESET.toml` and the screens ask this function, so
each refuses the same settings, with the same message, before a weight is loaded.
"""
from __future__ import annotations

import torch

from engine.config import Config

# The transformer refuses the same combination when it is asked for directly (enable_gradient_checkpointing);
# this is the message a person sees, with the key to change.
SAVE_ATTENTION_CONFLICT = ("memory.checkpoint_policy = \"save_attention\" keeps tensors on the GPU; it does not "
                           "combine with offload_checkpoint_inputs or block_offload: set checkpoint_policy = \"full\"")


def setting_problems(config: Config, world_size: int = 1, device: torch.device | None = None) -> list[str]:
    """One message per setting of `config` that cannot run with `world_size` processes on `device` (None: the
    device is not known yet, so only the rules that do not depend on it are applied). Empty: all can run."""
    return _switch_problems(config, device) + _process_problems(config, world_size)


def _switch_problems(config: Config, device: torch.device | None) -> list[str]:
    m = config.memory
    problems = []
    if m.block_offload:
        if not (m.gradient_checkpointing and m.checkpoint_interval == 1):
            problems.append("memory.block_offload = true needs gradient_checkpointing = true and "
                            "checkpoint_interval = 1: a streamed block is recomputed in the backward pass")
        if device is not None and device.type != "cuda":
            problems.append(f"memory.block_offload = true streams weights to a CUDA GPU; this run is on "
                            f"{device.type}: set block_offload = false")
    if m.checkpoint_policy != "full" and (m.offload_checkpoint_inputs or m.block_offload):
        problems.append(SAVE_ATTENTION_CONFLICT)
    if m.base_weights == "fp8" and device is not None and device.type == "cuda":
        # Imported here: the probe runs a small fp8 product, and most checks never reach it.
        from engine.models.low_bit_linear import fp8_kernel_problem

        problem = fp8_kernel_problem(device)
        if problem:
            problems.append(problem)
    if device is not None:
        from engine.train.optim import cuda_only_problem

        problem = cuda_only_problem(config.optim.optimizer, device.type)
        if problem:
            problems.append(problem)
    if m.block_offload and config.train.mixed_precision == "no" and config.model.dtype != "fp32":
        problems.append("memory.block_offload with train.mixed_precision = \"no\" is not supported; use bf16")
    return problems


def _process_problems(config: Config, world_size: int) -> list[str]:
    if world_size <= 1:
        return []
    m, strategy = config.memory, config.distributed.strategy
    problems = []
    if m.block_offload:
        problems.append(
            f"memory.block_offload = true streams blocks from one process's pinned host memory; with {world_size} "
            "processes every rank would pin its own copy of the base. Set block_offload = false and "
            "distributed.strategy = \"fsdp\" (the base is then sharded across the GPUs)")
    if strategy == "fsdp" and m.offload_checkpoint_inputs:
        problems.append(
            "memory.offload_checkpoint_inputs = true recomputes blocks with a re-entrant checkpoint that FSDP2 "
            "cannot re-gather weights for; set offload_checkpoint_inputs = false with distributed.strategy = "
            "\"fsdp\" (it combines with \"ddp\")")
    if strategy == "fsdp" and m.base_weights != "bf16":
        problems.append(f"memory.base_weights = \"{m.base_weights}\" is not sharded by FSDP2; set base_weights = "
                        "\"bf16\" with distributed.strategy = \"fsdp\"")
    return problems
