"""Names of S2V tensors and modules in the two published layouts.

Our modules use the diffusers-checkpoint names. The native names (official code, ComfyUI) differ by a fixed
table of prefixes, applied at dot boundaries; block-level and injector-level entries are matched first. The
manifest `data/s2v14b_checkpoint_keys.tsv` lists all 1,260 tensors of the real checkpoint in both layouts and the
tests check that these rules reproduce it exactly.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

_ATTN = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"), ("norm_k", "norm_k")]

# (diffusers, native) within `blocks.N.`
_BLOCK = (
    [("scale_shift_table", "modulation")]
    + [(f"attn1.{a}", f"self_attn.{b}") for a, b in _ATTN]
    + [(f"attn2.{a}", f"cross_attn.{b}") for a, b in _ATTN]
    + [("norm2", "norm3"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2")]
)
# (diffusers, native) at the top level.
_TOP = [
    ("scale_shift_table", "head.modulation"),
    ("proj_out", "head.head"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.pose_embedder", "cond_encoder"),
    ("condition_embedder.causal_audio_encoder", "casual_audio_encoder"),
    ("trainable_condition_mask", "trainable_cond_mask"),
    ("patch_embedding", "patch_embedding"),
    ("frame_packer", "frame_packer"),
    ("audio_injector.injector_adain_layers", "audio_injector.injector_adain_layers"),
]
# Spellings of later diffusers ports, folded into the checkpoint layout on load.
_DIFFUSERS_ALIASES = [
    (re.compile(r"causal_audio_encoder\.weighted_avg\.weights$"), "causal_audio_encoder.weights"),
    (re.compile(r"\.encoder\.(conv[123])\.conv\.conv\."), r".encoder.\1.conv."),
]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_INJ_RE = re.compile(r"^audio_injector\.injector\.(\d+)\.(.+)$")


def _swap(rest: str, table, src: int) -> str | None:
    dst = 1 - src
    for pair in table:
        prefix = pair[src]
        if rest == prefix or rest.startswith(prefix + "."):
            return pair[dst] + rest[len(prefix):]
    return None


def _convert(name: str, src: int) -> str | None:
    """src 0: diffusers -> native; src 1: native -> diffusers. None when the name is not part of the model."""
    m = _BLOCK_RE.match(name)
    if m:
        rest = _swap(m.group(2), _BLOCK, src)
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    m = _INJ_RE.match(name)
    if m:
        rest = _swap(m.group(2), _ATTN, src)
        return None if rest is None else f"audio_injector.injector.{m.group(1)}.{rest}"
    return _swap(name, _TOP, src)


def diffusers_to_native(name: str) -> str:
    """Tensor or module name, diffusers layout -> native layout. KeyError if it is not an S2V name."""
    out = _convert(name, 0)
    if out is None:
        raise KeyError(f"{name!r} is not a tensor or module of the S2V transformer")
    return out


def native_to_diffusers(name: str) -> str:
    out = _convert(name, 1)
    if out is None:
        raise KeyError(f"{name!r} is not a native tensor or module name of the S2V transformer")
    return out


def normalise_diffusers_name(name: str) -> str:
    for pattern, repl in _DIFFUSERS_ALIASES:
        name = pattern.sub(repl, name)
    return name


_NATIVE_MARKERS = ("head.head.", "casual_audio_encoder.", "time_embedding.", "text_embedding.", "cond_encoder.")


def detect_layout(keys) -> str:
    """'native' or 'diffusers', from the names in a checkpoint."""
    for key in keys:
        if key.startswith(_NATIVE_MARKERS) or ".self_attn." in key or ".cross_attn." in key:
            return "native"
    return "diffusers"


@functools.lru_cache(maxsize=1)
def manifest_14b() -> list[tuple[str, str, tuple[int, ...]]]:
    """(native key, diffusers key, shape) for every tensor of the real 14B checkpoint."""
    text = resources.files("engine.models").joinpath("data/s2v14b_checkpoint_keys.tsv").read_text()
    rows = []
    for line in text.splitlines()[1:]:
        native, diffusers, shape, _numel = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        rows.append((native, diffusers, dims))
    return rows


@functools.lru_cache(maxsize=1)
def native_modules_14b() -> frozenset[str]:
    """Native module names of the 14B checkpoint (tensor keys without their last component)."""
    return frozenset(native.rsplit(".", 1)[0] for native, _, _ in manifest_14b())
