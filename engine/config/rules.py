"""Value rules of the run config: ranges, and combinations the model or the data make impossible.

`check_config` returns every problem (the TUI shows them next to their fields); `validate_config` raises the
first. Frame arithmetic follows spec/S2V_MODEL.md (the rule itself is engine.data.windows.window_frame_problems,
shared with the dataset code): the VAE encodes 4k+1 pixel frames (the first alone, then groups of 4), and the
official continuation mode feeds 73 motion frames (19 latents) before 80 new ones.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.config.errors import BadValueError, ConfigError, ConflictError
from engine.config.schema import LOW_BIT_FAMILIES, Config, nonfinite_allowed, schema_key
from engine.frames import window_frame_problems
from engine.model_source import EXAMPLE_HUB_ID, SOURCE_FIX, is_hub_id, source_problem

# ---- rules on one value alone -----------------------------------------------------------------------------
# strict.py applies these as each value is read (file, form, --set), so a value that is wrong whatever the rest
# says (an output.name that climbs out of output.run_dir) is refused before anything can act on it;
# check_config applies them again to configs built in code.


def _folder_name(name: str) -> tuple[str, str] | None:
    if not name.strip() or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        shown = f"'{name}'" if name.strip() else "empty"
        return (f"{shown} is not one folder name: the run folder would not be a new folder inside "
                "output.run_dir", 'output.name must be one folder name (no /, \\, "." or ".."), '
                'e.g. name = "my-voice-lora"')
    return None


def _model_source(source: str) -> tuple[str, str] | None:
    if not source.strip():
        return "is empty", f'give a hub id (owner/name) or a model folder, e.g. source = "{EXAMPLE_HUB_ID}"'
    return None


def _hub_repo(repo: str) -> tuple[str, str] | None:
    if repo and not is_hub_id(repo):
        return (f"'{repo}' is not a Hugging Face repo id of the form owner/name",
                'e.g. push_to_hub = "your-name/my-voice-lora", or "" for no upload')
    return None


def _webhook_url(url: str) -> tuple[str, str] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ("is not an http:// or https:// URL with a host",
                'e.g. webhooks = ["https://discord.com/api/webhooks/..."]')
    return None


_STRING_RULES: dict[str, Callable[[str], tuple[str, str] | None]] = {
    "model.source": _model_source,
    "output.name": _folder_name,
    "output.push_to_hub": _hub_repo,
    "logging.webhooks": _webhook_url,
}


def leaf_problems(key: str, value: Any) -> Iterator[tuple[str, str, str]]:
    """(key, what is wrong, fix) for one schema value judged alone; arrays item by item. Tables are skipped:
    their own values are judged one by one."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from leaf_problems(f"{key}[{i}]", item)
        return
    if isinstance(value, float) and not math.isfinite(value) and not nonfinite_allowed(key):
        yield key, f"must be a finite number, got {value}", "write a finite number (nan and inf mean nothing here)"
    elif isinstance(value, str):
        rule = _STRING_RULES.get(schema_key(key))
        found = rule(value) if rule else None
        if found:
            yield key, *found


def _tree_problems(node: Any, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _tree_problems(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                yield from _tree_problems(item, f"{key}[{i}].")
        else:
            yield from leaf_problems(key, value)


class _Checker:
    def __init__(self, origin: Callable[[str], str]) -> None:
        self.origin = origin
        self.errors: list[ConfigError] = []
        self.judged: set[str] = set()  # keys refused on their value alone: their range rules would say it again

    def bad(self, key: str, message: str, fix: str) -> None:
        if key not in self.judged:
            self.errors.append(BadValueError(self.origin(key), key, message, fix))

    def conflict(self, key: str, message: str, fix: str) -> None:
        if key not in self.judged:
            self.errors.append(ConflictError(self.origin(key), key, message, fix))

    def leaves(self, cfg: Config) -> None:
        for key, message, fix in _tree_problems(cfg):
            self.bad(key, message, fix)
            self.judged.add(key)

    def at_least(self, key: str, value: float, low: float, fix: str = "") -> None:
        if value < low:
            self.bad(key, f"must be at least {low:g}, got {value:g}", fix or f"set it to {low:g} or more")

    def positive(self, key: str, value: float) -> None:
        if not value > 0:
            self.bad(key, f"must be greater than 0, got {value:g}", "use a positive value")

    def probability(self, key: str, value: float, allow_one: bool = True) -> None:
        ok = 0.0 <= value <= 1.0 if allow_one else 0.0 <= value < 1.0
        if not ok:
            upper = "1" if allow_one else "below 1"
            self.bad(key, f"must be a probability between 0 and {upper}, got {value:g}", "e.g. 0.1")


def _check_dataset_entry(c: _Checker, key: str, ds) -> None:
    if not ds.path:
        c.bad(f"{key}.path", "is empty", "give the folder of the clips")
    if ds.caption_prefix != ds.caption_prefix.strip():
        # Captions are stripped when read; a prefix with edge spaces would silently differ from the
        # trigger word written at sampling time.
        c.bad(f"{key}.caption_prefix", f"{ds.caption_prefix!r} starts or ends with whitespace",
              "put the spacing in caption_separator instead")


def _check_eval_datasets(c: _Checker, cfg: Config) -> None:
    trained = {Path(ds.path).expanduser().resolve() for ds in cfg.data.datasets if ds.path}
    for i, ds in enumerate(cfg.validation.eval_loss.datasets):
        key = f"validation.eval_loss.datasets[{i}]"
        _check_dataset_entry(c, key, ds)
        # The eval loss reads each window once: a sampling share means nothing there.
        if ds.repeats != 1:
            c.bad(f"{key}.repeats", f"is {ds.repeats}, but an eval dataset is measured, not sampled",
                  "remove repeats from this table")
        if ds.weight != 1.0:
            c.bad(f"{key}.weight", f"is {ds.weight:g}, but an eval dataset is measured, not sampled",
                  "remove weight from this table")
        if ds.path and Path(ds.path).expanduser().resolve() in trained:
            c.conflict(f"{key}.path", f"{ds.path} is also a training dataset, so its clips would train and be "
                       "measured", "give a folder of clips that are not in [[data.datasets]], or use "
                       "validation.eval_loss.holdout to hold out part of a training folder")


def _check_data(c: _Checker, cfg: Config) -> None:
    d = cfg.data
    for i, ds in enumerate(d.datasets):
        key = f"data.datasets[{i}]"
        _check_dataset_entry(c, key, ds)
        c.at_least(f"{key}.repeats", ds.repeats, 1)
        c.positive(f"{key}.weight", ds.weight)
    width, height = d.resolution
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        fix = f"use multiples of 16, e.g. [{max(16, round(width / 16) * 16)}, {max(16, round(height / 16) * 16)}]"
        c.bad("data.resolution", f"{width}x{height} is not a multiple of 16 on both sides (VAE 8x, patch 2x)", fix)
    for which, message, fix in window_frame_problems(d.frames, d.motion_frames):
        c.bad(f"data.{which}", message, fix)
    c.probability("data.motion_drop_prob", d.motion_drop_prob)
    c.at_least("data.windows_per_clip", d.windows_per_clip, 0)
    c.probability("data.caption_dropout", d.caption_dropout)


def _check_lora(c: _Checker, cfg: Config) -> None:
    lo = cfg.lora
    c.at_least("lora.rank", lo.rank, 1, "e.g. rank = 16")
    c.positive("lora.alpha", lo.alpha)
    c.probability("lora.dropout", lo.dropout, allow_one=False)
    if not lo.targets:
        c.bad("lora.targets", "is empty: nothing would train", "remove the key to use the default targets")
    for i, pattern in enumerate(lo.targets):
        try:
            re.compile(pattern)
        except re.error as exc:
            c.bad(f"lora.targets[{i}]", f"is not a valid regex: {exc}", "escape dots as \\\\. in TOML strings")
    if lo.kind in ("loha", "lokr"):
        # peft's LoHa and LoKr have no dropout on the input, and their init has no gaussian variant.
        if lo.dropout:
            c.conflict("lora.dropout", f"is {lo.dropout:g}, but lora.kind = {lo.kind!r} has no input dropout",
                       "set dropout = 0.0, or kind = \"lora\" or \"dora\"")
        if lo.init == "gaussian":
            c.conflict("lora.init", f"\"gaussian\" initialises LoRA's A matrix; lora.kind = {lo.kind!r} has its own "
                       "init", "set init = \"default\"")
    v = cfg.validation
    if lo.kind == "dora" and (v.lora_scale != 1.0 or v.lora_scales):
        # Scaling DoRA's update inside its row norm is not a strength: at 0 it is not the base model (the trained
        # magnitudes stay), and ComfyUI's strength blends the weights instead.
        key = "validation.lora_scale" if v.lora_scale != 1.0 else "validation.lora_scales"
        c.conflict(key, "a LoRA strength other than 1 has no peft equivalent for lora.kind = \"dora\"",
                   "set lora_scale = 1.0 and lora_scales = [] (or train kind = \"lora\" to preview strengths)")


def _check_optim(c: _Checker, cfg: Config, dataset_size: int | None) -> None:
    o = cfg.optim
    c.positive("optim.lr", o.lr)
    if o.optimizer == "prodigy" and 0 < o.lr < 0.1:
        c.conflict("optim.lr", f"prodigy finds the step size itself; lr {o.lr:g} is a multiplier", "set lr = 1.0")
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            c.bad(f"optim.betas[{i}]", f"must be in [0, 1), got {beta:g}", "e.g. betas = [0.9, 0.999]")
    c.at_least("optim.weight_decay", o.weight_decay, 0)
    c.positive("optim.eps", o.eps)
    c.at_least("optim.max_steps", o.max_steps, 1)
    c.at_least("optim.warmup_steps", o.warmup_steps, 0)
    if o.max_steps >= 1 and o.warmup_steps >= o.max_steps:
        c.conflict(
            "optim.warmup_steps",
            f"warmup of {o.warmup_steps} steps is not shorter than the run ({o.max_steps} steps)",
            f"lower it below optim.max_steps, e.g. {o.max_steps // 10}",
        )
    if o.optimizer == "schedulefree" and o.schedule != "constant":
        c.conflict("optim.schedule", "schedule-free optimizers replace the lr schedule", 'set schedule = "constant"')
    c.at_least("optim.batch_size", o.batch_size, 1)
    c.at_least("optim.grad_accum", o.grad_accum, 1, "grad_accum = 1 means no accumulation")
    if dataset_size is not None and o.batch_size > dataset_size:
        c.conflict(
            "optim.batch_size",
            f"batch of {o.batch_size} is larger than the dataset ({dataset_size} windows)",
            f"set batch_size to at most {max(1, dataset_size)} and raise optim.grad_accum instead",
        )
    c.at_least("optim.max_grad_norm", o.max_grad_norm, 0, "0 turns clipping off")
    c.at_least("optim.max_grad_value", o.max_grad_value, 0, "0 turns clipping off")
    c.at_least("optim.ema.update_every", o.ema.update_every, 1, "1 = every optimizer step")
    if not 0.0 < o.ema.decay < 1.0:
        c.bad("optim.ema.decay", f"must be between 0 and 1 (exclusive), got {o.ema.decay:g}", "e.g. 0.999")


def _check_train(c: _Checker, cfg: Config) -> None:
    t = cfg.train
    c.positive("train.flow_shift", t.flow_shift)
    if t.flow_schedule_auto_shift and t.flow_shift != 3.0:
        # The auto shift replaces flow_shift; a flow_shift set beside it would silently do nothing.
        c.conflict("train.flow_schedule_auto_shift", f"computes the training shift from the window size, but "
                   f"train.flow_shift = {t.flow_shift:g} is set too", "remove flow_shift (or set it to 3) or set "
                   "flow_schedule_auto_shift = false")
    c.positive("train.logit_std", t.logit_std)
    c.at_least("train.nonfinite_max_in_a_row", t.nonfinite_max_in_a_row, 1)
    c.at_least("checkpoint.every_steps", cfg.checkpoint.every_steps, 0, "0 = only on stop, signal and end")
    c.at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 1, "keep at least 1 to be able to resume")


def _check_rollout(c: _Checker, cfg: Config) -> None:
    r = cfg.rollout
    c.probability("rollout.probability", r.probability)
    # The model's timestep scale is sigma * 1000: an offset past 1000 would start every rollout from pure noise.
    if not 1 <= r.max_step_offset <= 1000:
        c.bad("rollout.max_step_offset", f"must be between 1 and 1000 timesteps, got {r.max_step_offset}",
              "e.g. 10 (the seed recommends 5 to 10; each step is one more forward pass)")


def _check_crepa(c: _Checker, cfg: Config) -> None:
    r = cfg.crepa
    # Checked whether CREPA is on or not: a value set wrong while off would surprise when it is switched on.
    c.at_least("crepa.block_index", r.block_index, 0, "0 = the first block's output")
    c.at_least("crepa.weight", r.weight, 0, "e.g. 0.5 (the seed's default)")
    c.at_least("crepa.adjacent_distance", r.adjacent_distance, 0, "0 = only the same frame, 1 = its neighbours")
    c.positive("crepa.temporal_decay", r.temporal_decay)
    if r.enabled:
        problem = source_problem(r.encoder)
        if problem:
            c.bad("crepa.encoder", problem, 'give a DINOv2 hub id or folder, e.g. encoder = "facebook/dinov2-giant"')


def _check_validation(c: _Checker, cfg: Config) -> None:
    v = cfg.validation
    c.at_least("validation.every_steps", v.every_steps, 0)
    c.at_least("validation.steps", v.steps, 1, "40 as the official inference")
    c.at_least("validation.cfg_scale", v.cfg_scale, 1, "4.5 as the official inference; 1 = no guidance")
    c.positive("validation.flow_shift", v.flow_shift)
    c.at_least("validation.eval_loss.num_triples", v.eval_loss.num_triples, 1)
    c.probability("validation.eval_loss.holdout", v.eval_loss.holdout, allow_one=False)
    measured = v.eval_loss.enabled and v.every_steps > 0
    if v.eval_loss.holdout > 0 and not measured:
        # The clips would be taken out of training and never measured.
        c.conflict("validation.eval_loss.holdout",
                   "holds clips out of training for the eval loss, but the eval loss is never measured "
                   "(it needs validation.eval_loss.enabled = true and validation.every_steps > 0)",
                   "enable the eval loss and set validation.every_steps, or set holdout = 0")
    if v.eval_loss.datasets and not measured:
        c.conflict("validation.eval_loss.datasets",
                   "lists clips for the eval loss (cached at every run), but the eval loss is never measured "
                   "(it needs validation.eval_loss.enabled = true and validation.every_steps > 0)",
                   "enable the eval loss and set validation.every_steps, or remove the eval datasets")
    _check_eval_datasets(c, cfg)
    c.at_least("validation.chunks", v.chunks, 1, "1 = 77 frames (4.8 s), as before")
    names = [f"{s:g}" for s in v.lora_scales]
    for i, name in enumerate(names):
        if name in names[:i]:
            # Two equal scales would render into the same case-NN-scale-S.mp4 file.
            c.bad(f"validation.lora_scales[{i}]", f"{name} is listed twice", "list each strength once")
    for i, case in enumerate(v.cases):
        for name in ("reference", "audio"):
            if not getattr(case, name):
                c.bad(f"validation.cases[{i}].{name}", "is empty", f"give the {name} file of this case")
    if v.every_steps > 0 and not v.cases and not v.eval_loss.enabled:
        c.conflict(
            "validation.every_steps",
            "validation is scheduled but there is nothing to validate",
            "add [[validation.cases]], enable validation.eval_loss, or set every_steps = 0",
        )


def _check_memory(c: _Checker, cfg: Config) -> None:
    m = cfg.memory
    c.at_least("memory.checkpoint_interval", m.checkpoint_interval, 1)
    if m.offload_checkpoint_inputs and not m.gradient_checkpointing:
        c.conflict(
            "memory.offload_checkpoint_inputs",
            "needs memory.gradient_checkpointing (there are no saved block inputs without it)",
            "set gradient_checkpointing = true or offload_checkpoint_inputs = false",
        )
    c.at_least("memory.gpu_saved_inputs", m.gpu_saved_inputs, 0, "0 = every saved input in host memory")
    if m.gpu_saved_inputs > 0 and not m.offload_checkpoint_inputs:
        c.conflict(
            "memory.gpu_saved_inputs",
            "says how many saved block inputs stay on the GPU when the others are offloaded, but "
            "offload_checkpoint_inputs = false keeps all of them there",
            "set offload_checkpoint_inputs = true or gpu_saved_inputs = 0",
        )
    c.at_least("memory.blocks_resident", m.blocks_resident, 0)
    c.at_least("memory.chunked_ffn", m.chunked_ffn, 0, "0 = off")
    c.at_least("memory.vram_budget_gb", m.vram_budget_gb, 0, "0 = what the card has free")
    c.at_least("memory.host_ram_margin_gb", m.host_ram_margin_gb, 0, "0 turns the host-RAM guard off; 2 is the default")
    if m.base_weights != "bf16" and cfg.model.dtype != "bf16":
        c.conflict(
            "memory.base_weights",
            f"{m.base_weights} base weights compute in bf16, but model.dtype is {cfg.model.dtype}",
            'set model.dtype = "bf16" or base_weights = "bf16"',
        )
    if m.attention_backend == "sage":
        c.bad("memory.attention_backend", "sage (SageAttention) has no backward pass, so it cannot train",
              'set attention_backend = "cudnn" or "fa4"; for faster samples set validation.attention_backend = "sage"')
    attention_keys = (("memory.attention_backend", m.attention_backend),
                      ("validation.attention_backend", cfg.validation.attention_backend))
    fa4_keys = [k for k, name in attention_keys if name == "fa4"]
    if fa4_keys and cfg.model.dtype == "fp32":
        c.conflict(fa4_keys[0], "fa4 (FlashAttention 4) takes bf16 or fp16 tensors, but model.dtype is fp32",
                   f'set model.dtype = "bf16" or {fa4_keys[0]} = "cudnn"')
    fp8_keys = [k for k, name in attention_keys if name == "cudnn_fp8"]
    if fp8_keys and cfg.model.dtype != "bf16":
        c.conflict(fp8_keys[0], f"cudnn_fp8 attention takes bf16 tensors, but model.dtype is {cfg.model.dtype}",
                   f'set model.dtype = "bf16" or {fp8_keys[0]} = "cudnn"')
    if m.fp8_input_grad and m.base_weights != "fp8":
        c.conflict("memory.fp8_input_grad", f"needs fp8 base weights, but base_weights = \"{m.base_weights}\"",
                   'set base_weights = "fp8" or fp8_input_grad = false')
    unknown = [f for f in m.low_bit_families if f not in LOW_BIT_FAMILIES]
    if unknown:
        c.bad("memory.low_bit_families", f"unknown families {unknown}", f"choose from {', '.join(LOW_BIT_FAMILIES)}")
    if m.base_weights != "bf16" and not m.low_bit_families:
        c.bad("memory.low_bit_families", f"is empty, so base_weights = \"{m.base_weights}\" would change nothing",
              'list at least one family, e.g. ["self_attn", "cross_attn", "ffn"], or set base_weights = "bf16"')


def _check_tread(c: _Checker, cfg: Config) -> None:
    tr = cfg.tread
    # 1 would route every video token around the span: nothing of the video would pass through it.
    c.probability("tread.selection_ratio", tr.selection_ratio, allow_one=False)
    # Two indices of the same sign can be compared without the model's block count; a span of mixed signs is
    # resolved against it when the trainer starts (engine.models.tread.resolve_span).
    if (tr.start_layer_idx < 0) == (tr.end_layer_idx < 0) and tr.start_layer_idx > tr.end_layer_idx:
        c.conflict("tread.start_layer_idx",
                   f"{tr.start_layer_idx} comes after tread.end_layer_idx = {tr.end_layer_idx}: the span is empty",
                   "choose start_layer_idx <= end_layer_idx (both inclusive), e.g. 2 and -2")


def _check_output(c: _Checker, cfg: Config) -> None:
    out = cfg.output
    if not out.run_dir:
        c.bad("output.run_dir", "is empty", 'e.g. run_dir = "runs"')
    if not out.formats:
        c.bad("output.formats", "is empty: nothing would be exported", 'e.g. formats = ["peft", "native"]')
    elif len(set(out.formats)) != len(out.formats):
        c.bad("output.formats", "lists a format twice", "list each format once")
    c.at_least("logging.every_steps", cfg.logging.every_steps, 1)
    c.positive("logging.webhook_timeout_s", cfg.logging.webhook_timeout_s)
    if out.push_checkpoints and not out.push_to_hub:
        c.conflict("output.push_checkpoints", "asks to upload checkpoints but output.push_to_hub names no repo",
                   'set push_to_hub = "owner/name" or push_checkpoints = false')


def check_config(
    cfg: Config,
    origin: Callable[[str], str] | str = "<config>",
    dataset_size: int | None = None,
    require_data: bool = False,
    require_model: bool | None = None,
) -> list[ConfigError]:
    """Every rule broken by `cfg`, in schema order. `origin` is the file name, or a function from dotted key
    to the file that set it. `dataset_size` (windows) enables the batch-size check; `require_data` the check
    that at least one dataset is given (a preset may leave that to the file that extends it); `require_model`
    the check that model.source is an existing folder or has the form of a hub id. It follows `require_data`
    when not given: a config that must name its data is one about to be cached or trained, which needs the
    model too; `s2v-tui check` reads the data of a preset without the model and passes False.
    Whether lora.init_from names a LoRA file is not asked here: reading its header needs engine.models, above
    config; the run about to start fresh asks it (engine.train.init_lora.check_init_from)."""
    where = origin if callable(origin) else (lambda key, name=origin: name)
    c = _Checker(where)
    c.leaves(cfg)
    if require_data and not cfg.data.datasets:
        c.bad("data.datasets", "no dataset is given", 'add a [[data.datasets]] table with path = "clips/"')
    if require_data if require_model is None else require_model:
        problem = source_problem(cfg.model.source)
        if problem:
            c.bad("model.source", problem, SOURCE_FIX)
    _check_data(c, cfg)
    _check_lora(c, cfg)
    _check_optim(c, cfg, dataset_size)
    _check_train(c, cfg)
    _check_rollout(c, cfg)
    _check_crepa(c, cfg)
    _check_validation(c, cfg)
    _check_memory(c, cfg)
    _check_tread(c, cfg)
    _check_output(c, cfg)
    return c.errors


def validate_config(cfg: Config, origin: Callable[[str], str] | str = "<config>", **kwargs) -> Config:
    """`cfg` unchanged if it breaks no rule; otherwise raises the first ConfigError."""
    errors = check_config(cfg, origin, **kwargs)
    if errors:
        raise errors[0]
    return cfg
