"""LoRA on the S2V transformer through peft, and the LoRA files we write and read.

Inside the engine a LoRA is a "canonical" state dict keyed like peft's saved files without the adapter name, e.g.
`<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r], module names in the diffusers layout
(`blocks.3.attn1.to_q`). The kind (lora.kind: lora, dora, loha, lokr) decides the parameter names
(engine/models/lora_kinds.py). It is exported in two layouts (spec/S2V_MODEL.md §2.3), e.g. for a plain LoRA:

    peft / diffusers   transformer.<module>.lora_A.weight, transformer.<module>.lora_B.weight
    native (ComfyUI)   diffusion_model.<native module>.lora_down.weight, .lora_up.weight, .alpha

Both carry the same header metadata (base model, kind, rank, alpha, steps, config hash). A native file is checked
at save time: every module must exist in the 14B checkpoint manifest (or, for another architecture such as the
tiny test model, among the model's own modules), so a file that ComfyUI would silently ignore is never written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from engine.fsio import atomic_write_bytes
from engine.models import lora_kinds as kinds
from engine.models.keymap import diffusers_to_native, native_modules_14b, native_to_diffusers
from engine.models.loading import check_weights_file
from engine.models.low_bit_linear import LowBitLinear

log = logging.getLogger(__name__)

ADAPTER = kinds.ADAPTER
PEFT_PREFIX = "transformer."
NATIVE_PREFIX = "diffusion_model."
LAYOUTS = ("peft", "native")
# lora.init -> peft's init_lora_weights (lora, dora) or init_weights (loha, lokr: no gaussian init there). PiSSA
# and OLoRA rewrite the base weights at init, so a LoRA trained that way does not apply to the stock checkpoint
# users load in ComfyUI; they are refused until export folds the base change back in.
_INITS = {"default": True, "gaussian": "gaussian"}


class LoraFileError(ValueError):
    """A LoRA file or state that does not fit: the message names the file or key and the fix."""


def _kind_of(state: Mapping[str, torch.Tensor], source: str) -> str:
    try:
        return kinds.state_kind(list(state), source)
    except kinds.KindError as exc:
        raise LoraFileError(str(exc)) from None


def targets_regex(targets: Iterable[str]) -> str:
    """One full-match regex from the configured ones (peft full-matches a string target against module names)."""
    return "|".join(f"(?:{t})" for t in targets)


def matched_modules(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The Linear modules of `model` (low-bit ones too) that `targets` match (as peft matches them: in full)."""
    pattern = targets_regex(targets)
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LowBitLinear)) and re.fullmatch(pattern, n)]


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], init: str,
             seed: int, kind: str = "lora", lokr_decompose_both: bool = False) -> list[str]:
    """Freeze the base, inject an adapter of `kind` into the Linear modules matching `targets`; returns the
    adapted names. `lokr_decompose_both`: a LoKr whose w1 is factorised too (only to rebuild such a file).

    Adapter weights are kept in fp32 whatever the base dtype: bf16 updates of small LoRA steps round to nothing.
    """
    if init not in _INITS:
        raise ValueError(
            f"lora.init = {init!r} is not supported: PiSSA/OLoRA change the base weights, so the exported LoRA "
            "would not apply to the stock model; use init = \"default\" or \"gaussian\""
        )
    if init == "gaussian" and kind in ("loha", "lokr"):
        raise ValueError(f"lora.init = \"gaussian\" is an init of LoRA's A matrix; lora.kind = {kind!r} has its "
                         "own init: set init = \"default\"")
    linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LowBitLinear))]
    matched = matched_modules(model, targets)
    if not matched:
        raise ValueError(
            f"lora.targets match no Linear module of the transformer (e.g. {linear_names[:3]}); "
            "check the regexes in [lora] targets, or remove the key to use the defaults"
        )
    low_bit = [n for n in matched if isinstance(model.get_submodule(n), LowBitLinear)]
    if low_bit and kind != "lora":
        # DoRA reads the base weight's values (its magnitude, its row norms each step), LoHa and LoKr its .weight
        # shape at every forward: a low-bit Linear has neither (engine/train/allowed.py refuses this first).
        raise ValueError(f"lora.kind = {kind!r} cannot wrap the low-bit base Linears (e.g. {low_bit[0]}): set "
                         "memory.base_weights = \"bf16\" or lora.kind = \"lora\"")
    model.requires_grad_(False)
    try:
        cfg = kinds.peft_config(kind, rank, alpha, dropout, targets_regex(targets), _INITS[init], lokr_decompose_both)
    except kinds.KindError as exc:
        raise ValueError(str(exc)) from None
    # The init draws from the global torch RNG; a fork keeps it a function of the seed alone.
    with torch.random.fork_rng(devices=[]), _low_bit_stand_ins(model, matched):
        torch.manual_seed(seed)
        model.add_adapter(cfg, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if kinds.is_adapter_param(name):
            p.data = p.data.float()
            p.requires_grad_(True)
    log.info("%s rank %d alpha %g on %d modules, %s trainable parameters", kind, rank, alpha, len(matched),
             f"{sum(p.numel() for p in lora_parameters(model)):,}")
    return matched


@contextlib.contextmanager
def _low_bit_stand_ins(model: nn.Module, names: list[str]):
    """While peft adds the LoRA, each low-bit Linear among `names` (a model loaded in low bit) is an nn.Linear
    stand-in whose weight has the shape, device and dtype of the bf16 weight it came from and no storage (one
    element, zero strides): peft wraps only nn.Linear, and sizes, places and casts a LoRA by its base weight's
    shape, device and dtype alone (the default and gaussian inits do not read the values). Afterwards the
    low-bit module becomes the LoRA layer's base_layer, as when the base is quantised after the LoRA is added
    (low_bit_linear.quantize_base_linears): the same LoRA weights bit for bit, the same module tree."""
    originals = {n: m for n in names if isinstance(m := model.get_submodule(n), LowBitLinear)}
    stand_ins = {}
    for name, low_bit in originals.items():
        with torch.device("meta"):
            stand_in = nn.Linear(low_bit.in_features, low_bit.out_features, bias=low_bit.bias is not None)
        empty = torch.empty((), dtype=low_bit.source_dtype, device=low_bit.weight_q.device)
        stand_in.weight = nn.Parameter(empty.expand(low_bit.out_features, low_bit.in_features), requires_grad=False)
        stand_in.bias = None if low_bit.bias is None else nn.Parameter(
            empty.expand(low_bit.out_features), requires_grad=False)
        model.set_submodule(name, stand_in)
        stand_ins[name] = stand_in
    try:
        yield
    finally:
        for name, low_bit in originals.items():
            wrapped = model.get_submodule(name)
            if getattr(wrapped, "base_layer", None) is stand_ins[name]:
                wrapped.base_layer = low_bit
            else:  # peft failed before wrapping this one: put the low-bit module back where it was
                model.set_submodule(name, low_bit)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if kinds.is_adapter_param(n)]


def is_lora_parameter(name: str) -> bool:
    """Whether a model parameter name is one of the adapter's (any kind)."""
    return kinds.is_adapter_param(name)


_canonical = kinds.canonical  # "m.lora_A.default.weight" -> "m.lora_A.weight"; "m.hada_w1_a.default" -> "m.hada_w1_a"


def lora_parameter_names(model: nn.Module) -> list[str]:
    """The canonical names of the LoRA parameters, in the order of lora_parameters(model)."""
    return [_canonical(n) for n, _ in model.named_parameters() if kinds.is_adapter_param(n)]


def get_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical LoRA state: detached CPU fp32 copies."""
    return {_canonical(n): p.detach().to("cpu", torch.float32, copy=True)
            for n, p in model.named_parameters() if kinds.is_adapter_param(n)}


def base_weight_reader(model: nn.Module):
    """module name -> the base weight under the adapter of that module (DoRA's native layout needs it)."""
    return lambda module: model.get_submodule(module).get_base_layer().weight


def _adapter_scaling(model: nn.Module):
    return lambda module: float(model.get_submodule(module).scaling[ADAPTER])


def set_lora_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state>") -> None:
    """Copy a canonical LoRA state into the model; every key must match a LoRA parameter, shape for shape. A
    state read from a native DoRA file gets its magnitudes from its dora_scale and this model's base weights."""
    params = {_canonical(n): p for n, p in model.named_parameters() if kinds.is_adapter_param(n)}
    try:
        state = kinds.resolve_dora(state, _adapter_scaling(model), base_weight_reader(model), source)
    except kinds.KindError as exc:
        raise LoraFileError(str(exc)) from None
    except (KeyError, AttributeError) as exc:  # a module the adapter does not have: reported by name below
        log.debug("dora_scale not resolved: %s", exc)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise LoraFileError(
            f"{source}: LoRA keys do not match the model's adapter (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); was it trained with other "
            "lora.targets, another lora.kind or another model?"
        )
    with torch.no_grad():
        for key, p in params.items():
            value = state[key]
            if tuple(value.shape) != tuple(p.shape):
                raise LoraFileError(f"{source}: {key} has shape {tuple(value.shape)}, the model's adapter "
                                    f"{tuple(p.shape)}; was it trained with another lora.rank?")
            p.copy_(value.to(p.device, p.dtype))


def lora_module_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({kinds.split_key(k)[0] for k in state})


# ---- layouts ------------------------------------------------------------------------------------------------
def to_peft_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PEFT_PREFIX + k: v for k, v in state.items()}


def _native_module(module: str) -> str:
    try:
        return NATIVE_PREFIX + diffusers_to_native(module)
    except KeyError:
        raise LoraFileError(f"LoRA module {module!r} has no native name: it is not a module of the S2V "
                            "transformer; check lora.targets") from None


def native_key_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys the native file of `state` has (names only: nothing is computed)."""
    kind = _kind_of(state, "LoRA state")
    return [f"{_native_module(m)}.{suffix}" for m, params in kinds.by_module(state).items()
            for suffix in kinds.native_suffixes(kind, params)]


def to_native_layout(state: Mapping[str, torch.Tensor], alpha: float, rank: int | None = None,
                     base_weight=None) -> dict[str, torch.Tensor]:
    """The native (ComfyUI) tensors of `state`. `rank`: the adapter's (needed for a LoKr module with no factor,
    whose tensors do not show it; otherwise read from them); `base_weight`: module -> base weight (DoRA)."""
    kind = _kind_of(state, "LoRA state")
    out: dict[str, torch.Tensor] = {}
    for module, params in kinds.by_module(state).items():
        r = kinds.rank_of(kind, params) or rank
        if r is None:
            raise LoraFileError(f"the LoKr of {module} has no factorised side, so its rank is not in its tensors; "
                                "give the adapter's rank")
        try:
            tensors = kinds.native_module_tensors(kind, params, r, alpha,
                                                  base_weight(module) if base_weight and kind == "dora" else None,
                                                  module)
        except kinds.KindError as exc:
            raise LoraFileError(str(exc)) from None
        native = _native_module(module)
        out.update({f"{native}.{suffix}": v for suffix, v in tensors.items()})
    return out


def is_14b_architecture(model: nn.Module) -> bool:
    from engine.models.s2v_transformer import AUDIO_INJECT_LAYERS_14B

    cfg = model.config
    return (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, tuple(cfg.audio_inject_layers)) == (
        40, 40, 128, AUDIO_INJECT_LAYERS_14B)


def native_reference_modules(model: nn.Module) -> frozenset[str]:
    """The native module names a native LoRA of `model` may name: the 14B manifest, or the model's own."""
    if is_14b_architecture(model):
        return native_modules_14b()
    names = set()
    for name, _ in model.named_modules():
        if any(mark in name for mark in (".lora_", ".hada_", ".lokr_")) or name.endswith(".base_layer"):
            continue  # the adapter's own containers (peft keeps each kind's parameters in named submodules)
        try:
            names.add(diffusers_to_native(name))
        except KeyError:
            continue
    return frozenset(names)


def check_native_keys(keys: Iterable[str], modules: frozenset[str]) -> None:
    """Every native LoRA key must name a real module; raise naming the first ones that do not."""
    bad = []
    for key in keys:
        if not key.startswith(NATIVE_PREFIX):
            bad.append(key)
            continue
        parts = kinds.split_native_key(key[len(NATIVE_PREFIX):])
        if parts is None or parts[0] not in modules:
            bad.append(key)
    if bad:
        raise LoraFileError(
            f"{len(bad)} native LoRA keys name no module of the checkpoint (e.g. {bad[:3]}); ComfyUI would "
            "ignore them silently. This is a key-mapping bug in engine/models/keymap.py: please report it"
        )


def lora_metadata(base_model: str, rank: int, alpha: float, steps: int, config_hash: str, layout: str,
                  targets: list[str], extra: Mapping[str, str] | None = None, kind: str = "lora") -> dict[str, str]:
    meta = {
        "format": "pt",
        "base_model": base_model,
        "lora_kind": kind,
        "rank": str(rank),
        "alpha": repr(float(alpha)),
        "steps": str(steps),
        "config_hash": config_hash,
        "layout": layout,
        "lora_targets": json.dumps(list(targets)),
        "software": "s2v-tui",
    }
    if layout == "peft" and kind in ("lora", "dora"):
        # diffusers reads the adapter config (a peft LoraConfig) from this key, prefixed per component, when
        # loading the file; its LoRA loader has no LoHa or LoKr, so those files do not claim one.
        adapter = {"transformer.r": rank, "transformer.lora_alpha": float(alpha),
                   "transformer.target_modules": targets_regex(targets)}
        if kind == "dora":
            adapter["transformer.use_dora"] = True
        meta["lora_adapter_metadata"] = json.dumps(adapter, sort_keys=True)
    meta.update(extra or {})
    return meta


def save_lora(path: str | Path, state: Mapping[str, torch.Tensor], layout: str, metadata: Mapping[str, str],
              alpha: float, native_modules: frozenset[str] | None = None, base_weight=None) -> Path:
    """Write `state` in `layout` atomically (see lora_bytes)."""
    return atomic_write_bytes(path, lora_bytes(state, layout, metadata, alpha, native_modules, base_weight))


def lora_bytes(state: Mapping[str, torch.Tensor], layout: str, metadata: Mapping[str, str], alpha: float,
               native_modules: frozenset[str] | None = None, base_weight=None) -> bytes:
    """The safetensors file of `state` in `layout`. A native file needs `native_modules` to check its keys
    against (a peft file is checked against them too when they are given), and for DoRA `base_weight` (module
    -> base weight, see lora_kinds); the rank of a LoKr without a factor comes from `metadata`."""
    if layout == "peft":
        tensors = to_peft_layout(state)
        if native_modules is not None:  # the same manifest check: a key ComfyUI would map must hit a module
            check_native_keys(native_key_names(state), native_modules)
    elif layout == "native":
        rank = int(metadata["rank"]) if "rank" in metadata else None
        tensors = to_native_layout(state, alpha, rank, base_weight)
        if native_modules is None:
            raise ValueError("saving a native LoRA needs the module names to check the keys against")
        check_native_keys(tensors, native_modules)
    else:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**metadata, "layout": layout}
    return safetensors_bytes(tensors, metadata=meta)


def _detect(keys: list[str], path: str) -> str:
    if keys and all(k.startswith(NATIVE_PREFIX) for k in keys):
        return "native"
    if keys and all(kinds.is_adapter_param(k) for k in keys):
        return "peft"
    raise LoraFileError(
        f"{path}: not a LoRA in a layout this tool reads (e.g. key {keys[:1]}); expected "
        "'transformer.<module>.lora_A.weight' (peft; hada_w1_a, lokr_w1 for LoHa, LoKr) or "
        "'diffusion_model.<module>.lora_down.weight' (native; hada_*, lokr_*)"
    )


def lora_file_layout(path: str | Path) -> str:
    """"peft" or "native" from the file's header alone (no tensor is read); LoraFileError (or CorruptWeightsError
    for a damaged file) says why it is not a LoRA this tool reads."""
    check_weights_file(Path(path), fix="copy it again, or point at another LoRA file")
    with safe_open(str(path), framework="pt") as f:
        return _detect(list(f.keys()), str(path))


def load_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file of any kind in either layout; returns (canonical state, header metadata with `layout`
    and `lora_kind`, the kind the keys show; a header that says another kind is refused).

    A native file's per-module alpha is kept in the metadata as `alpha` when all modules agree; differing
    alphas are refused (our adapter has one scale). A native DoRA file keeps its dora_scale keys until
    set_lora_state has the model's base weights."""
    check_weights_file(Path(path), fix="export it again from its run's checkpoint, or copy it again")
    path = str(path)
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        raw = {k: f.get_tensor(k) for k in f.keys()}
    layout = _detect(list(raw), path)
    state: dict[str, torch.Tensor] = {}
    if layout == "peft":
        for key, value in raw.items():
            state[key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key] = value
    else:
        alphas, modules = set(), {}
        for key, value in raw.items():
            parts = kinds.split_native_key(key[len(NATIVE_PREFIX):])
            if parts is None:
                raise LoraFileError(f"{path}: unexpected key {key!r} in a native LoRA")
            if parts[1] == "alpha":
                alphas.add(float(value))
            else:
                modules.setdefault(parts[0], {})[parts[1]] = value
        if len(alphas) > 1:
            raise LoraFileError(f"{path}: modules have different alphas {sorted(alphas)}; one alpha is supported")
        if alphas:
            meta["alpha"] = repr(alphas.pop())
        for native, tensors in modules.items():
            module = native_to_diffusers(native)
            state.update({f"{module}.{p}": v for p, v in kinds.canonical_from_native(tensors).items()})
    kind = _kind_of(state, path)
    if meta.get("lora_kind", kind) != kind:
        raise LoraFileError(f"{path}: the header says lora kind {meta['lora_kind']!r}, its keys are {kind!r}'s; "
                            "the file was altered: export it again from its run's checkpoint")
    meta["layout"], meta["lora_kind"] = layout, kind
    if layout == "native" and kind == "lokr":
        rank, alpha = lora_rank_alpha(state, meta, path)
        per_module = kinds.by_module(state)
        for params in per_module.values():
            kinds.finish_native_lokr(params, alpha, rank)
        state = {f"{m}.{p}": v for m, params in per_module.items() for p, v in params.items()}
    return state, meta


def lora_rank_alpha(state: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str) -> tuple[int, float]:
    """(rank, alpha) of a loaded LoRA: the rank from the tensors, alpha from the header (default: the rank,
    the scale-1 convention of files written without one). A LoKr whose modules show no rank (no factorised
    side) takes the header's, else the smallest rank with which peft keeps every w2 whole (scale 1 then, as in
    ComfyUI)."""
    kind = _kind_of(state, source)
    per_module = kinds.by_module(state)
    ranks = {r for params in per_module.values() if (r := kinds.rank_of(kind, params)) is not None}
    if not ranks:  # a LoKr without factors
        if "rank" in meta:
            ranks = {int(meta["rank"])}
        else:
            ranks = {max((max(p["lokr_w2"].shape) + 1) // 2 for p in per_module.values())}
    if len(ranks) != 1:
        raise LoraFileError(f"{source}: modules have ranks {sorted(ranks)}; one rank per file is supported")
    rank = ranks.pop()
    alpha = meta.get("alpha")
    if alpha is None and "lora_adapter_metadata" in meta:  # a diffusers-written file
        alpha = json.loads(meta["lora_adapter_metadata"]).get("transformer.lora_alpha")
    return rank, float(alpha) if alpha is not None else float(rank)


def apply_lora_file(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Add the LoRA of a file (any kind, either layout) to a base model as its adapter; returns the header
    metadata.

    The adapter targets exactly the modules the file names, so any targets the file was trained with work."""
    state, meta = load_lora(path)
    rank, alpha = lora_rank_alpha(state, meta, str(path))
    modules = lora_module_names(state)
    known = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LowBitLinear))}
    unknown = [m for m in modules if m not in known]
    if unknown:
        raise LoraFileError(f"{path}: the LoRA names modules this model lacks (e.g. {unknown[:3]}); it was made "
                            "for another model")
    kind = meta["lora_kind"]
    add_lora(model, rank, alpha, 0.0, [re.escape(m) for m in modules], "default", seed=0, kind=kind,
             lokr_decompose_both=kind == "lokr" and kinds.lokr_decomposes_both(state))
    set_lora_state(model, state, source=str(path))
    return meta
