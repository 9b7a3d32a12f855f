"""`setting_problems(config, world_size, device)`: may these settings run here? The one answer.

The config file's own rules (a value out of range, two keys that contradict each other whatever the machine) are
in engine/config/rules.py and fail while the file is read, naming the file and the key. What is here depends on
where the run goes: the device (block streaming needs a CUDA GPU, fp8 matmuls need a kernel this GPU runs, the
fa4 and sage attention backends their package and a GPU they run on), the
number of processes (what the FSDP2 and DDP paths cannot share), and the switch combinations the model cannot
apply together. The runner's check phase, `s2v-tui check PRESET.toml` and the screens ask this function, so
each refuses the same settings, with the same message, before a weight is loaded.

[tread] (token routing) has no refusal here: it gathers and scatters tokens between blocks, outside every
checkpointed, streamed, sharded or compiled unit, so it runs with each memory switch and process count
(tests/test_tread.py trains it under each switch). Its own rules are the config's (rules.py) and, for a span
with mixed-sign indices, the model's block count (checked in the check phase for a local model folder, and by the
trainer before the first step).
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
    return (_switch_problems(config, device) + _process_problems(config, world_size)
            + _crepa_problems(config, world_size))


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
        problems += _attention_problems(config, device)
    if m.block_offload and config.train.mixed_precision == "no" and config.model.dtype != "fp32":
        problems.append("memory.block_offload with train.mixed_precision = \"no\" is not supported; use bf16")
    kind = config.lora.kind
    if m.base_weights != "bf16" and kind != "lora":
        # A low-bit Linear holds no `weight`: DoRA needs its values (the magnitude at init, the row norms at every
        # step), peft's LoHa and LoKr its shape at every forward (engine.models.lora.add_lora refuses it too).
        problems.append(f"lora.kind = \"{kind}\" does not combine with memory.base_weights = \"{m.base_weights}\": "
                        "peft's layer reads the base Linear's weight, which a low-bit Linear does not have; set "
                        "base_weights = \"bf16\" or kind = \"lora\"")
    return problems


def _attention_problems(config: Config, device: torch.device) -> list[str]:
    """The attention backends of training and of the samples that need a package and a GPU of their own (fa4,
    sage), each tried once on `device`; the samples' one only when validation renders samples."""
    from engine.models.attention import PROBED, attention_backend_problem

    v = config.validation
    asked = [("memory.attention_backend", config.memory.attention_backend)]
    if v.every_steps > 0 and v.cases:
        asked.append(("validation.attention_backend", v.attention_backend))
    problems = []
    for key, name in asked:
        problem = attention_backend_problem(name, device) if name in PROBED else None
        if problem:
            fix = "cudnn" if key.startswith("memory.") else "same"
            problems.append(f'{key} = "{name}": {problem}; set {key} = "{fix}"')
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
    if strategy == "fsdp" and config.lora.kind == "dora":
        problems.append(
            "lora.kind = \"dora\" with distributed.strategy = \"fsdp\": the native DoRA file's dora_scale is computed "
            "from each adapted layer's whole base weight, which FSDP2 shards; use strategy = \"ddp\" or another kind")
    if strategy == "fsdp" and m.base_weights != "bf16":
        problems.append(f"memory.base_weights = \"{m.base_weights}\" is not sharded by FSDP2; set base_weights = "
                        "\"bf16\" with distributed.strategy = \"fsdp\"")
    return problems


def _model_blocks(config: Config) -> int | None:
    """The block count of a local model.source's transformer (its config.json); None when it cannot be read here
    (a hub id not fetched yet): the trainer checks crepa.block_index against the loaded model again."""
    from pathlib import Path

    from engine.models.loading import resolve_transformer_dir
    from engine.models.s2v_transformer import block_count

    if not Path(config.model.source).expanduser().is_dir():
        return None
    try:
        return block_count(resolve_transformer_dir(config.model.source,
                                                   config.model.transformer_subfolder or "transformer"))
    except (OSError, ValueError):
        return None  # the load phase reports an unreadable model with its own message


def _crepa_problems(config: Config, world_size: int) -> list[str]:
    r = config.crepa
    if not r.enabled:
        return []
    problems = []
    blocks = _model_blocks(config)
    if blocks is not None and r.block_index >= blocks:
        problems.append(f"crepa.block_index = {r.block_index}, but the transformer of model.source has {blocks} "
                        f"blocks (0 .. {blocks - 1}): choose one of them (the seed uses 8)")
    if world_size > 1 and config.distributed.strategy == "fsdp":
        # Under FSDP the gradients are reduced inside the sharded backward, which the projector is no part of.
        problems.append("crepa.enabled = true trains a projector that FSDP does not shard or reduce; use "
                        "distributed.strategy = \"ddp\" (its gradients are averaged with the LoRA's there) or "
                        "crepa.enabled = false")
    return problems
