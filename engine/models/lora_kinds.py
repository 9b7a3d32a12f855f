"""The four LoRA kinds (`lora.kind`): their peft configs, parameter names and native (ComfyUI) layouts.

Canonical names (the engine's state dicts, checkpoints and the peft layout without its `transformer.` prefix) are
peft's saved names without the adapter name:

    lora   <module>.lora_A.weight [r, in], <module>.lora_B.weight [out, r]
    dora   the two of lora and <module>.lora_magnitude_vector [out]
    loha   <module>.hada_w1_a [out, r], .hada_w1_b [r, in], .hada_w2_a [out, r], .hada_w2_b [r, in]
    lokr   <module>.lokr_w1 [a, c] or .lokr_w1_a/.lokr_w1_b, and .lokr_w2 [b, d] or .lokr_w2_a/.lokr_w2_b
           (out = a*b, in = c*d; peft factorises a side once r < half its larger dimension)

The native files carry, under diffusion_model.<native module>, the keys ComfyUI's weight adapters read
(comfy/weight_adapter/lora.py, loha.py, lokr.py), with the scale they apply:

    lora   lora_down.weight, lora_up.weight, alpha          W + alpha/r * up @ down
    dora   the same and dora_scale [out, 1]                 (W + dW) * dora_scale / (||W|| + eps), rows
    loha   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha W + alpha/r * (w1a @ w1b) * (w2a @ w2b)
    lokr   lokr_w1 or lokr_w1_a/_b, lokr_w2 or _a/_b, alpha W + alpha/r * kron(w1, w2), r from a factor;
                                                             scale 1 when neither side is factorised

Two of these differ from peft and are converted on the way out and back in:
- LoKr without a factorised side: ComfyUI ignores alpha there, so peft's alpha/r is folded into lokr_w1.
- DoRA: peft scales each output row by m / ||W + dW|| (the norm of the adapted row); ComfyUI's output-axis
  decomposition (a dora_scale of shape [out, 1]) divides by the norm of the *base* row, ||W|| + eps. The file's
  dora_scale is therefore m * (||W|| + eps) / ||W + dW||, which needs the base weights to write and to read: a
  native DoRA file belongs to the checkpoint it was trained on, as DoRA's magnitudes do anyway.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

KINDS = ("lora", "dora", "loha", "lokr")
ADAPTER = "default"
# The parameter names of every kind, as the segment after the module name (canonical form).
_PARAMS = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
# A model's adapter parameter (peft names: "<module>.lora_A.default.weight", "<module>.hada_w1_a.default",
# "<module>.lora_magnitude_vector.default.weight") or a canonical key, by the name segment that marks it.
# A native DoRA file read back holds dora_scale until the model's base weights turn it into the magnitude
# (resolve_dora), so it is a parameter name of the kind too.
_MARK = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector|dora_scale|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)(?=\.|$)")
# canonical param -> native key suffix (dora's magnitude is converted, see the module docstring)
_TO_NATIVE = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
              "lora_magnitude_vector": "dora_scale"}
NATIVE_SUFFIXES = ("lora_down.weight", "lora_up.weight", "dora_scale", "alpha", *_PARAMS["loha"], *_PARAMS["lokr"])
_NATIVE_KEY = re.compile(r"^(.*)\.(" + "|".join(re.escape(s) for s in NATIVE_SUFFIXES) + r")$")
EPS32 = torch.finfo(torch.float32).eps  # what ComfyUI adds to the row norm of an fp32 working copy of W


class KindError(ValueError):
    """A LoRA state or file whose kind cannot be told or converted: the message names the key and the fix."""


def is_adapter_param(name: str) -> bool:
    return _MARK.search(name) is not None


def canonical(param_name: str) -> str:
    """"m.lora_A.default.weight" -> "m.lora_A.weight", "m.hada_w1_a.default" -> "m.hada_w1_a",
    "m.lora_magnitude_vector.default.weight" -> "m.lora_magnitude_vector" (peft saves it without .weight)."""
    name = re.sub(rf"\.{ADAPTER}(?=\.|$)", "", param_name)
    return name[: -len(".weight")] if name.endswith(".lora_magnitude_vector.weight") else name


def split_key(key: str) -> tuple[str, str]:
    """(module, param) of a canonical key: "blocks.0.attn1.to_q.lokr_w1" -> ("blocks.0.attn1.to_q", "lokr_w1")."""
    match = _MARK.search(key)
    if match is None:
        raise KindError(f"{key!r} is not a LoRA parameter of any kind ({', '.join(KINDS)})")
    return key[: match.start()], key[match.start() + 1:]


def state_kind(keys, source: str) -> str:
    """The kind of a canonical state from its parameter names; one kind per state."""
    params = {split_key(k)[1] for k in keys}
    found = {kind for kind in ("loha", "lokr") if params & set(_PARAMS[kind])}
    if params & {"lora_magnitude_vector", "dora_scale"}:
        found.add("dora")
    elif params & set(_PARAMS["lora"]):
        found.add("lora")
    if len(found) != 1:
        what = "no LoRA parameters" if not found else "parameters of the kinds " + ", ".join(sorted(found))
        raise KindError(f"{source}: {what} (e.g. {sorted(keys)[:2]}); a file holds one kind of {', '.join(KINDS)}")
    return found.pop()


def peft_config(kind: str, rank: int, alpha: float, dropout: float, target_regex: str, init: bool | str = True,
                lokr_decompose_both: bool = False):
    """The peft config of `kind`. `init`: peft's init_lora_weights (lora/dora) or init_weights (loha/lokr)."""
    if kind in ("lora", "dora"):
        from peft import LoraConfig

        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex,
                          init_lora_weights=init, use_dora=kind == "dora")
    if dropout:  # the LyCORIS kinds have rank and module dropout, not the input dropout lora.dropout means
        raise KindError(f"lora.dropout = {dropout:g} has no meaning for lora.kind = {kind!r}; set dropout = 0.0")
    if kind == "loha":
        from peft import LoHaConfig

        return LoHaConfig(r=rank, alpha=alpha, target_modules=target_regex, init_weights=init)
    if kind == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(r=rank, alpha=alpha, target_modules=target_regex, init_weights=init,
                          decompose_both=lokr_decompose_both)
    raise KindError(f"lora.kind = {kind!r} is not one of {', '.join(KINDS)}")


def rank_of(kind: str, module_state: Mapping[str, torch.Tensor]) -> int | None:
    """The rank a module's tensors show (None: a LoKr with neither side factorised carries no rank)."""
    if kind in ("lora", "dora"):
        return int(module_state["lora_A.weight"].shape[0])
    if kind == "loha":
        return int(module_state["hada_w1_b"].shape[0])
    for name in ("lokr_w2_b", "lokr_w1_b"):  # ComfyUI takes the rank from w2's factor first
        if name in module_state:
            return int(module_state[name].shape[0])
    return None


def lokr_decomposes_both(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a LoKr state factorises w1 too (peft's decompose_both): needed to rebuild its adapter."""
    return any(split_key(k)[1] == "lokr_w1_a" for k in state)


def by_module(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, param = split_key(key)
        out.setdefault(module, {})[param] = value
    return out


# ---- DoRA's magnitude, peft <-> ComfyUI ---------------------------------------------------------------------
def _dora_norms(module_state, base: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(||W + dW||, ||W|| + eps) per output row, in fp32, as [out, 1] on the CPU; dW = scaling * B @ A. Computed
    where the base weight is (the GPU of a training run): the small factors travel, not the weight."""
    w = base.detach().float()
    a, b = (module_state[k].to(w.device, torch.float32) for k in ("lora_A.weight", "lora_B.weight"))
    adapted = w + scaling * (b @ a)
    return adapted.norm(dim=1, keepdim=True).cpu(), (w.norm(dim=1, keepdim=True) + EPS32).cpu()


def dora_scale(module_state, base: torch.Tensor, scaling: float) -> torch.Tensor:
    """ComfyUI's dora_scale [out, 1] that gives peft's DoRA weight m * (W + dW) / ||W + dW||."""
    adapted, original = _dora_norms(module_state, base, scaling)
    return module_state["lora_magnitude_vector"].float().reshape(-1, 1) * original / adapted


def dora_magnitude(module_state, base: torch.Tensor, scaling: float, source: str) -> torch.Tensor:
    """peft's lora_magnitude_vector [out] from a native dora_scale (the inverse of dora_scale)."""
    scale = module_state["dora_scale"].float()
    rows = base.shape[0]
    if tuple(scale.shape) not in ((rows, 1), (rows,)):
        raise KindError(f"{source}: dora_scale has shape {tuple(scale.shape)}; this tool's DoRA (peft's) "
                        f"normalises output rows, which needs [{rows}, 1] (a decomposition on the input axis, "
                        "LyCORIS's wd_on_out = false, has no peft equivalent): train it again with "
                        "lora.kind = \"dora\"")
    adapted, original = _dora_norms(module_state, base, scaling)
    return (scale.reshape(-1, 1) * adapted / original).reshape(-1)


# ---- layouts ------------------------------------------------------------------------------------------------
def native_module_tensors(kind: str, module_state: Mapping[str, torch.Tensor], rank: int, alpha: float,
                          base: torch.Tensor | None, source: str) -> dict[str, torch.Tensor]:
    """param suffix -> tensor of one module in the native layout (see the module docstring); `rank` and
    `alpha` are the adapter's, `base` the module's base weight (DoRA only)."""
    out = {_TO_NATIVE.get(p, p): v for p, v in module_state.items()}
    if kind == "dora":
        if base is None:
            raise KindError(f"{source}: a native DoRA file needs the base weights to write dora_scale")
        out["dora_scale"] = dora_scale(module_state, base, alpha / rank)
    if kind == "lokr" and rank_of(kind, module_state) is None:
        # ComfyUI applies kron(w1, w2) unscaled here, so peft's alpha/r goes into w1.
        out["lokr_w1"] = module_state["lokr_w1"] * (alpha / rank)
    out["alpha"] = torch.tensor(float(alpha))
    return out


def native_suffixes(kind: str, params) -> list[str]:
    """The native key suffixes of one module whose canonical params are `params` (names only, no tensors)."""
    return [_TO_NATIVE.get(p, p) for p in params] + ["alpha"]


def split_native_key(key_body: str) -> tuple[str, str] | None:
    """("<native module>", suffix) of a native key without its prefix, or None for a key no kind has."""
    match = _NATIVE_KEY.match(key_body)
    return (match.group(1), match.group(2)) if match else None


def canonical_from_native(native: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """param -> tensor of one module read from a native file; alpha is dropped (the caller reads it), and a
    DoRA's dora_scale stays until resolve_dora has the base weights."""
    return {("lora_A.weight" if s == "lora_down.weight" else "lora_B.weight" if s == "lora_up.weight" else s): v
            for s, v in native.items() if s != "alpha"}


def finish_native_lokr(module_state: dict[str, torch.Tensor], alpha: float, rank: int) -> None:
    """Undo the fold of alpha/r into lokr_w1 for a LoKr module without a factorised side (in place)."""
    if rank_of("lokr", module_state) is None:
        module_state["lokr_w1"] = module_state["lokr_w1"] / (alpha / rank)


def resolve_dora(state: Mapping[str, torch.Tensor], scaling: Callable[[str], float],
                 base_weight: Callable[[str], torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A state read from a native DoRA file (with <module>.dora_scale keys) in canonical form, its magnitudes
    computed against the model's base weights and the adapter's scaling (alpha / r) of each module; other
    states are returned unchanged."""
    if not any(k.endswith(".dora_scale") for k in state):
        return dict(state)
    out = {}
    for key, value in state.items():
        if not key.endswith(".dora_scale"):
            out[key] = value
            continue
        module = key[: -len(".dora_scale")]
        parts = {"dora_scale": value, "lora_A.weight": state[f"{module}.lora_A.weight"],
                 "lora_B.weight": state[f"{module}.lora_B.weight"]}
        out[f"{module}.lora_magnitude_vector"] = dora_magnitude(parts, base_weight(module), scaling(module),
                                                                f"{source}: {module}")
    return out


def adapter_shapes(kind: str, rank: int, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    """param -> shape of the adapter peft gives a Linear of these sizes (on the meta device: nothing is
    allocated); a native DoRA file's dora_scale is listed as [out, 1]."""
    from peft import inject_adapter_in_model
    from torch import nn

    with torch.device("meta"):
        holder = nn.ModuleDict({"layer": nn.Linear(in_features, out_features)})
        inject_adapter_in_model(peft_config(kind, rank, float(rank), 0.0, "layer"), holder, adapter_name=ADAPTER)
    shapes = {split_key(canonical(n))[1]: tuple(p.shape) for n, p in holder.named_parameters() if is_adapter_param(n)}
    if kind == "dora":
        shapes["dora_scale"] = (out_features, 1)
    return shapes
