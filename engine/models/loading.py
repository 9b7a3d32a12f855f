"""Strict, shard-by-shard loading of the S2V transformer from either published layout.

A transformer folder holds `config.json` and safetensors shards (with or without an index). The config is the
diffusers one (`_class_name` WanS2VTransformer3DModel / S2VTransformer3DModel) or the official one
(`dim`, `num_heads`, `cond_dim`, ...); the tensors are in the diffusers-checkpoint layout or the native layout.
The model is built on the meta device and each tensor is read, converted to the target dtype and placed on
the target device one at a time, so host RAM peaks near one model copy in the target dtype (less when the
target is a GPU), never two. With low-bit base weights (`low_bit`) each chosen Linear is quantised as soon as
its tensors are in, so the peak is the low-bit model plus one bf16 Linear. Every missing, unexpected or
mis-shaped tensor is reported by name, and loading fails: nothing is dropped with a warning.
"""
from __future__ import annotations

import ctypes
import inspect
import json
import logging
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from engine.model_source import fetch_from_hub, require_source
from engine.models.keymap import detect_layout, native_to_diffusers, normalise_diffusers_name

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class CheckpointError(RuntimeError):
    """The checkpoint does not match the architecture; the message names every offending tensor."""


class CorruptWeightsError(CheckpointError):
    """A safetensors file cut short or damaged (an interrupted download or copy); the message names it."""

    def __init__(self, path: Path | str, detail: str, fix: str = "") -> None:
        self.path = Path(path)
        super().__init__(f"{path}: the weights file is truncated or corrupt ({detail}); "
                         f"{fix or 'download it again (or copy it again from a good source)'}")


def check_weights_file(path: Path, fix: str = "") -> None:
    """Raise CorruptWeightsError unless the safetensors header parses and its tensors end where the file does.

    safetensors itself reports a short file as "incomplete metadata, file not fully covered" without the file
    name, and a 14B model has dozens of shards; reading the header (a few kB) here names the one to fetch.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptWeightsError(path, f"{size} bytes, shorter than a safetensors header", fix)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CorruptWeightsError(path, f"the header alone needs {n + 8} bytes, the file has {size}", fix)
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptWeightsError(path, f"the header is not valid JSON: {exc}", fix) from None
    except CorruptWeightsError:
        raise
    except OSError as exc:
        raise CorruptWeightsError(path, f"cannot be read: {exc.strerror or exc}", fix) from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CorruptWeightsError(path, "the header does not describe tensors", fix) from None
    if 8 + n + end != size:
        raise CorruptWeightsError(path, f"{size} bytes, but its tensors need {8 + n + end}", fix)


def check_weights_folder(folder: Path) -> None:
    """check_weights_file on every .safetensors file of a component folder (vae/, text_encoder/, ...)."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        check_weights_file(f)


# Official config field -> ours (the rest of the official fields must hold the values of the S2V checkpoint).
_NATIVE_FIELDS = {
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "text_dim": "text_dim",
    "text_len": "text_len",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "eps": "eps",
    "cond_dim": "pose_dim",
    "audio_dim": "audio_dim",
    "num_audio_token": "num_audio_tokens",
    "audio_inject_layers": "audio_inject_layers",
    "enable_adain": "enable_adain",
    "adain_mode": "adain_mode",
    "zero_timestep": "zero_timestep",
    "add_last_motion": "add_last_motion",
    "enable_framepack": "enable_framepack",
    "framepack_drop_mode": "framepack_drop_mode",
    "patch_size": "patch_size",
}
# Official fields whose only supported value is the released one (anything else is another architecture).
_NATIVE_FIXED = {
    "model_type": "s2v",
    "enable_motioner": False,
    "enable_tsm": False,
    "trainable_token_pos_emb": False,
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
}
_NATIVE_IGNORED = {"zero_init", "motion_token_num", "_class_name", "_diffusers_version", "__name__"}


def is_native_config(raw: dict) -> bool:
    return "dim" in raw and "num_heads" in raw


def config_from_json(raw: dict, source: str, cls: type) -> dict:
    """The constructor kwargs of `cls` (the S2V transformer class) from a diffusers or an official config.json.
    The class is passed in rather than imported: the transformer's from_pretrained calls this module, which
    therefore sits below it."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if not is_native_config(raw):
        out, unknown = {}, []
        for key, value in raw.items():
            if key.startswith("_"):
                continue
            if key == "added_kv_proj_dim":
                if value is not None:
                    raise CheckpointError(f"{source}: added_kv_proj_dim={value} is not an S2V transformer")
                continue
            (out.__setitem__(key, value) if key in known else unknown.append(key))
        if unknown:
            raise CheckpointError(f"{source}: unknown config fields {sorted(unknown)} for the S2V transformer")
        return out
    out = {}
    for key, value in raw.items():
        if key in _NATIVE_FIELDS:
            out[_NATIVE_FIELDS[key]] = value
        elif key in _NATIVE_FIXED:
            if value != _NATIVE_FIXED[key]:
                raise CheckpointError(
                    f"{source}: {key}={value!r} is not supported (the S2V checkpoint has {_NATIVE_FIXED[key]!r})"
                )
        elif key not in _NATIVE_IGNORED and key not in ("dim", "num_heads"):
            raise CheckpointError(f"{source}: unknown official config field {key!r}")
    dim, heads = raw["dim"], raw["num_heads"]
    if dim % heads:
        raise CheckpointError(f"{source}: dim {dim} is not a multiple of num_heads {heads}")
    out["num_attention_heads"] = heads
    out["attention_head_dim"] = dim // heads
    return out


def resolve_transformer_dir(source: str | os.PathLike, subfolder: str | None = "transformer") -> Path:
    """A local folder (model root or the transformer folder itself) or a hub id, resolved to a folder."""
    require_source(source)
    path = Path(source).expanduser()
    if path.exists():
        if subfolder and (path / subfolder / CONFIG_NAME).is_file():
            return path / subfolder
        if (path / CONFIG_NAME).is_file():
            return path
        raise FileNotFoundError(
            f"{path}: no {CONFIG_NAME} here{f' or in {subfolder}/' if subfolder else ''}; point the model "
            "source at a diffusers model folder, its transformer/ folder, or an official Wan2.2-S2V-14B folder"
        )
    return _download(str(source), subfolder)


def _download(repo_id: str, subfolder: str | None) -> Path:
    patterns = [CONFIG_NAME, "diffusion_pytorch_model*.safetensors*"]
    if subfolder:
        patterns += [f"{subfolder}/{CONFIG_NAME}", f"{subfolder}/*.safetensors*"]
    return resolve_transformer_dir(fetch_from_hub(repo_id, patterns), subfolder)


def shard_files(folder: Path) -> list[Path]:
    """The transformer's shards, each checked whole (check_weights_file) before any is read."""
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shards listed in the index are missing: {missing}")
            break
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no .safetensors files")
    for f in files:
        check_weights_file(f)
    return files


def _place(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters.get(leaf)
    if old is not None:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor


def _summary(kind: str, names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {kind}: {shown}{more}"


ModuleHook = Callable[[nn.Module, str], None]

# safetensors maps a whole shard per handle, and its CPU tensors are views of that mapping; every page read stays
# in the process's RSS (as a file page: reclaimable, but counted) until the mapping goes, which is when the handle
# is dropped and no tensor read through it is alive. A shard is therefore mapped afresh after this many bytes:
# when what was read has been copied elsewhere (a GPU, or `copy`) or dropped (a Linear made low-bit), the mapped
# pages in RSS stay under about one block of the 14B model (0.7 GB) plus one tensor.
REMAP_BYTES = 1 << 30


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's malloc_trim; elsewhere nothing). A load into host
    memory keeps small copies (norms, biases, row scales) that land between the freed temporaries of the
    quantisation, and glibc returns only the free memory at the top of its heap: the holes stayed resident, 0.36
    GiB at 6 blocks of the 14B's width and growing with depth (bench/load_host.py), none after this."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None  # glibc's malloc_trim, looked up on first use (False: not this libc)


class _Shard:
    """Reads the tensors of one shard, mapping it afresh after every REMAP_BYTES read (and then returning the
    heap's free pages, see _return_free_heap)."""

    def __init__(self, path: Path) -> None:
        self.path, self._handle, self._read = path, None, 0

    def handle(self):
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle

    def tensor(self, key: str) -> torch.Tensor:
        tensor = self.handle().get_tensor(key)
        self._read += tensor.nbytes
        if self._read >= REMAP_BYTES:
            self._handle, self._read = None, 0
            _return_free_heap()
        return tensor


def _hook_waits(model: nn.Module, expected: dict, hooks: Mapping[str, ModuleHook]) -> tuple[dict, dict]:
    """(module -> names of its tensors not placed yet, tensor name -> its hooked module) for `hooks`."""
    waiting, owner = {}, {}
    for module in hooks:
        names = {f"{module}.{leaf}" for leaf, _ in model.get_submodule(module).state_dict().items()}
        if not names or not names <= expected.keys():
            raise ValueError(f"load hook on {module!r}: not a module with tensors of this model")
        for name in names:
            if name in owner:
                raise ValueError(f"load hooks on {owner[name]!r} and {module!r} share the tensor {name}")
            owner[name] = module
        waiting[module] = names
    return waiting, owner


def load_state_into(model: nn.Module, folder: Path, dtype: torch.dtype | None, device,
                    hooks: Mapping[str, ModuleHook] | None = None, copy: bool = False) -> str:
    """Fill a meta-initialised model from the shards in `folder`. Returns the detected layout.

    `hooks`: module name -> hook(model, name), called once every tensor of that module has been placed, wherever
    the shards hold them (keys sort as strings, blocks.1 before blocks.10, and a block may span two shards); the
    hook may replace the module (engine.models.low_bit_linear.low_bit_load_hooks makes its low-bit copy, so
    its bf16 weight is dropped as soon as it is complete). A module with a missing or mis-shaped tensor is never
    hooked and the load fails naming the tensor, as without hooks.

    `copy`: every tensor kept on the CPU is copied out of the mapped shard (a hooked module's tensors are not:
    the hook drops them), so the pages of dropped tensors leave RSS (REMAP_BYTES). Without it a CPU load keeps
    views of the mapped files: nothing is read before it is used, and the pages stay reclaimable."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    waiting, owner = _hook_waits(model, expected, hooks or {})
    files = shard_files(folder)
    keys_per_file = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys_per_file[f] = list(handle.keys())
    layout = detect_layout(k for keys in keys_per_file.values() for k in keys)

    def ours(key: str) -> str | None:
        try:
            return native_to_diffusers(key) if layout == "native" else normalise_diffusers_name(key)
        except KeyError:
            return None

    unexpected, mismatched, seen = [], [], set()
    shard = None
    for f, keys in keys_per_file.items():
        shard = _Shard(f)
        for key in keys:
            name = ours(key)
            if name is None or name not in expected:
                unexpected.append(f"{key} ({f.name})")
                continue
            shape = tuple(shard.handle().get_slice(key).get_shape())
            if shape != expected[name]:
                mismatched.append(f"{key} has shape {list(shape)}, the model needs {list(expected[name])}")
                seen.add(name)  # present, so not also "missing"
                continue
            if name in seen:
                unexpected.append(f"{key} (duplicate in {f.name})")
                continue
            raw = shard.tensor(key)
            tensor = raw.to(dtype) if dtype is not None and raw.is_floating_point() else raw
            tensor = tensor.to(device)
            module = owner.get(name)
            if copy and module is None and tensor.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
                tensor = tensor.clone()
            _place(model, name, tensor)
            del raw, tensor  # a hook may drop the placed tensor: no reference is left here to keep it alive
            seen.add(name)
            if module is not None:
                waiting[module].discard(name)
                if not waiting[module]:
                    hooks[module](model, module)
    shard = None  # the last mapping goes too
    _return_free_heap()
    missing = sorted(set(expected) - seen)
    problems = []
    if missing:
        problems.append(_summary("missing tensors", missing))
    if unexpected:
        problems.append(_summary("unexpected tensors", unexpected))
    if mismatched:
        problems.append(_summary("mis-shaped tensors", mismatched))
    if problems:
        raise CheckpointError(f"{folder} ({layout} layout) does not match the S2V transformer: " + "; ".join(problems))
    return layout


_MIX_KEYS = ("casual_audio_encoder.weights", "condition_embedder.causal_audio_encoder.weights",
             "condition_embedder.causal_audio_encoder.weighted_avg.weights")


def _mixed_layer_count(folder: Path) -> int:
    for f in shard_files(folder):
        with safe_open(str(f), framework="pt") as handle:
            for key in _MIX_KEYS:
                if key in handle.keys():
                    return int(handle.get_slice(key).get_shape()[1])
    raise CheckpointError(f"{folder}: no audio layer-mixing weights ({_MIX_KEYS[0]}) in any shard")


def meta_transformer(cls, source, subfolder="transformer") -> tuple[nn.Module, Path]:
    """The model of `source` built on the meta device (no weight is read), and its transformer folder."""
    folder = resolve_transformer_dir(source, subfolder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    kwargs = config_from_json(raw, str(folder / CONFIG_NAME), cls)
    if "num_weighted_avg_layers" not in kwargs:
        # Neither the official config nor the first diffusers config records how many wav2vec2 layers are
        # mixed; the checkpoint's mixing weights [1, L, 1, 1] do.
        kwargs["num_weighted_avg_layers"] = _mixed_layer_count(folder)
    with torch.device("meta"):
        return cls(**kwargs), folder


def load_transformer(cls, source, subfolder="transformer", torch_dtype=None, device="cpu", low_bit=None):
    """The transformer of `source`, loaded strictly onto `device`. `low_bit` (a low_bit_linear.LowBitSpec): the
    Linears of its families are made low-bit on `device` as each is loaded, so neither the host nor `device`
    ever holds the bf16 model, only the low-bit one and one bf16 Linear beyond it."""
    model, folder = meta_transformer(cls, source, subfolder)
    device = torch.device(device)
    hooks = None
    if low_bit is not None:
        from engine.models.low_bit_linear import low_bit_load_hooks

        hooks = low_bit_load_hooks(model, low_bit, device)
    # A low-bit model is loaded to be small: its bf16 remainder is copied out of the mapped shards, so that the
    # pages of the Linears made low-bit leave the process (see REMAP_BYTES).
    layout = load_state_into(model, folder, torch_dtype, device, hooks, copy=low_bit is not None)
    held = f", {len(hooks)} Linears in {low_bit.kind} ({', '.join(low_bit.families)})" if hooks else ""
    log.info("loaded S2V transformer from %s (%s layout%s)", folder, layout, held)
    model.eval()
    return model
