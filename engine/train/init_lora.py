"""`lora.init_from`: a new run starts from the weights of an existing LoRA file, in the peft or native layout.

The file must fit the run's [lora] settings exactly: its kind, rank and alpha are lora.kind, lora.rank and
lora.alpha, and it
holds a LoRA for exactly the modules that lora.targets match on this model, each of this model's shape. Anything
else is refused in the check phase, before any cache work, with the file, the key and the fix (check_init_from).
The weights are copied in after the adapter is added (apply_init_from); the optimizer, its schedule and the EMA
start fresh, the EMA from these weights. A resumed run never reads the file: its checkpoint holds the LoRA.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from engine.config import BadValueError, Config, ConfigError, ConflictError
from engine.models.loading import CheckpointError
from engine.models.lora import (LoraFileError, load_lora, lora_file_layout, lora_module_names, lora_rank_alpha,
                                matched_modules, set_lora_state)
from engine.models.lora_kinds import adapter_shapes, by_module

log = logging.getLogger(__name__)

KEY = "lora.init_from"


def _read(config: Config, origin: str) -> tuple[dict[str, torch.Tensor], dict[str, str], int, float]:
    path = str(Path(config.lora.init_from).expanduser())
    try:
        state, meta = load_lora(path)
        return (state, meta, *lora_rank_alpha(state, meta, path))
    except (OSError, LoraFileError, CheckpointError) as exc:  # CorruptWeightsError is a CheckpointError
        raise BadValueError(origin, KEY, str(exc), 'point it at a LoRA file in the peft or native layout, or set '
                            'init_from = "" to start from a fresh LoRA') from None


def init_from_file_errors(config: Config, origin: str = "<run config>") -> list[ConfigError]:
    """Whether lora.init_from names a LoRA file at all (it exists, is a file, its header is a LoRA's); only its
    header is read. Only a run about to start fresh asks: a resumed run never reads the file, so one moved or
    deleted since must not stop it."""
    path = config.lora.init_from
    if not path:
        return []
    fix = ('point it at a LoRA file in the peft or native layout (e.g. a run\'s NAME_peft.safetensors), or set '
           'init_from = ""')
    file = Path(path).expanduser()
    if not file.exists():
        return [BadValueError(origin, KEY, f"{path} does not exist", fix)]
    if not file.is_file():
        return [BadValueError(origin, KEY, f"{path} is a folder, not a LoRA file", fix)]
    try:
        lora_file_layout(file)
    except (ValueError, RuntimeError) as exc:  # LoraFileError, CorruptWeightsError
        return [BadValueError(origin, KEY, str(exc), fix)]
    return []


def check_init_from(config: Config, origin: str = "<run config>") -> None:
    """Refuse a lora.init_from file that is not a LoRA (init_from_file_errors) or does not fit the [lora] settings
    on this model (ConfigError). The module check needs the model's config.json; when it cannot be read here (a hub
    id not downloaded yet) the load phase finds a mismatch instead, by name (engine.models.lora.set_lora_state)."""
    errors = init_from_file_errors(config, origin)
    if errors:
        raise errors[0]
    state, meta, rank, alpha = _read(config, origin)
    lo, path = config.lora, config.lora.init_from
    if meta["lora_kind"] != lo.kind:
        raise ConflictError(origin, "lora.kind", f"is {lo.kind!r}, but lora.init_from ({path}) holds a "
                            f"{meta['lora_kind']!r} adapter", f"set lora.kind = \"{meta['lora_kind']}\" to start from "
                            "that file, or give lora.init_from a file of the kind you train")
    if rank != lo.rank:
        raise ConflictError(origin, "lora.rank", f"is {lo.rank}, but the LoRA of lora.init_from ({path}) has rank "
                            f"{rank}", f"set lora.rank = {rank} and lora.alpha = {alpha:g} to start from that file, "
                            f"or give lora.init_from a LoRA of rank {lo.rank}")
    if alpha != lo.alpha:
        raise ConflictError(origin, "lora.alpha", f"is {lo.alpha:g}, but the LoRA of lora.init_from ({path}) has "
                            f"alpha {alpha:g}: its update would be scaled by {lo.alpha / rank:g} instead of "
                            f"{alpha / rank:g}", f"set lora.alpha = {alpha:g} to start from that file as it was")
    model = _meta_model(config)
    if model is None:
        return
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    foreign = [m for m in lora_module_names(state) if m not in linears]
    if foreign:
        raise BadValueError(origin, KEY, f"{path} holds a LoRA for modules this model lacks (e.g. {foreign[:3]}): "
                            f"it was made for another model than {config.model.source}",
                            "give a LoRA trained on this base model")
    wanted, have = set(matched_modules(model, lo.targets)), set(lora_module_names(state))
    if wanted != have:
        extra, lacking = sorted(have - wanted), sorted(wanted - have)
        said = []
        if extra:
            said.append(f"the file adapts {len(extra)} module(s) that lora.targets do not match (e.g. {extra[:2]})")
        if lacking:
            said.append(f"lora.targets match {len(lacking)} module(s) the file has no LoRA for (e.g. {lacking[:2]})")
        trained = meta.get("lora_targets")
        fix = (f"set lora.targets = {trained}, the targets the file was trained with" if trained else
               "set lora.targets to full-match exactly the modules the file adapts")
        raise ConflictError(origin, "lora.targets", f"do not fit the LoRA of lora.init_from ({path}): "
                            + "; ".join(said), fix)
    expected: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
    for module, params in sorted(by_module(state).items()):
        layer = linears[module]
        sizes = (layer.in_features, layer.out_features)
        if sizes not in expected:  # what peft gives a layer of this size with these settings
            expected[sizes] = adapter_shapes(lo.kind, rank, *sizes)
        shapes = {p: tuple(v.shape) for p, v in params.items()}
        if any(expected[sizes].get(p) != s for p, s in shapes.items()):
            raise BadValueError(origin, KEY, f"{path}: the {lo.kind} of {module} has shapes {shapes}, this model's "
                                f"layer ({layer.in_features} -> {layer.out_features}) takes "
                                f"{ {p: s for p, s in expected[sizes].items() if p in shapes or p != 'dora_scale'} }: "
                                "it was made for another model (or another LoKr factorisation)",
                                "give a LoRA trained on this base model")


def _meta_model(config: Config) -> nn.Module | None:
    from engine.models.loading import meta_transformer
    from engine.models.s2v_transformer import S2VTransformer3DModel

    try:
        model, _ = meta_transformer(S2VTransformer3DModel, config.model.source,
                                    config.model.transformer_subfolder or "transformer")
    except (OSError, ValueError, CheckpointError):
        return None  # the load phase reports an unreadable model with its own message
    return model


def apply_init_from(model: nn.Module, config: Config) -> None:
    """Copy the weights of lora.init_from into the model's freshly added adapter."""
    state, meta, _, _ = _read(config, "<run config>")
    set_lora_state(model, state, source=f"lora.init_from {config.lora.init_from}")
    trained = f", trained {meta['steps']} steps" if meta.get("steps") else ""
    log.info("LoRA initialised from %s (%s layout%s); the optimizer starts fresh", config.lora.init_from,
             meta["layout"], trained)
