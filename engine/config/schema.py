"""The run config as typed dataclasses: every section, key, default and one line of help.

The help text lives in each field's metadata so the commented `presets/base.toml`, the TUI's config form and
the error messages all read the same words. No `None` defaults: TOML has no null, so "off" or "automatic" is
spelled with an empty string or 0 and the help says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ModelDtype = Literal["bf16", "fp16", "fp32"]
BucketMode = Literal["fixed", "aspect"]
CropMode = Literal["center", "random"]
ReferenceChoice = Literal["first", "random", "outside"]
LoraInit = Literal["default", "gaussian", "pissa", "olora"]
LoraKind = Literal["lora", "dora", "loha", "lokr"]
OptimizerName = Literal["adamw", "adamw8bit", "lion8bit", "paged_adamw8bit", "paged_lion8bit", "lion", "prodigy",
                        "schedulefree"]
GradClip = Literal["norm", "value"]
ScheduleName = Literal["constant", "cosine", "linear"]
MixedPrecision = Literal["bf16", "fp16", "no"]
SigmaSampling = Literal["logit_normal", "uniform"]
Solver = Literal["unipc", "euler"]
SigmaSchedule = Literal["shifted", "beta"]
BaseWeights = Literal["bf16", "int8", "fp8"]
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math", "fa4", "cudnn_fp8", "fastest", "sage"]
SamplingAttention = Literal["same", "auto", "cudnn", "flash", "efficient", "math", "fa4", "cudnn_fp8", "fastest",
                            "sage"]
ResidualDtype = Literal["fp32", "bf16"]
CheckpointPolicy = Literal["full", "save_attention"]
ExportFormat = Literal["peft", "native"]
DistributedStrategy = Literal["ddp", "fsdp"]
WebhookFormat = Literal["auto", "json", "discord", "slack"]

# The official S2V negative prompt (wan/configs/wan_s2v_14B.py, sample_neg_prompt): blurry picture, worst
# quality, blurred details, violent emotions, fast shaking hands, subtitles, ugly, mutilated, extra fingers,
# badly drawn hands and face, deformed, disfigured limbs, fused fingers, a still picture, cluttered background,
# three legs, many people in the background, walking backwards. It lives here, not in engine.infer, so the
# config (which loads without torch) can offer it as a default.
OFFICIAL_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，"
    "背景人很多，倒着走"
)

# Full-match regexes over the transformer's module names (diffusers layout, see spec/S2V_MODEL.md §2.3):
# q, k, v, o of self-attention (attn1), text cross-attention (attn2) and the 12 audio injectors.
# Module families that base_weights = "fp8" or "int8" can quantise (engine.models.low_bit_linear.FAMILIES names
# them the same).
LOW_BIT_FAMILIES = ("self_attn", "cross_attn", "ffn", "audio_attn")
LOW_BIT_DEFAULT_FAMILIES = ("self_attn", "cross_attn", "ffn")
DEFAULT_LORA_TARGETS = (
    r"blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)",
    r"blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    r"audio_injector\.injector\.\d+\.(to_q|to_k|to_v|to_out\.0)",
)


def opt(default: Any, help: str, *, finite: bool = True) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """A field with a default and its help line. Lists get a fresh copy per instance. Number fields refuse nan
    and inf unless `finite=False` says the key gives them a meaning."""
    metadata = {"help": help} if finite else {"help": help, "finite": False}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    if dataclasses.is_dataclass(default):
        # A fresh default instance each time, so no two configs share a nested list.
        return field(default_factory=type(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    source: str = opt("Wan-AI/Wan2.2-S2V-14B", "Hugging Face hub id or local folder of the S2V checkpoint")
    transformer_subfolder: str = opt("", "subfolder holding the transformer weights; '' = find it")
    dtype: ModelDtype = opt("bf16", "dtype of the frozen base weights once loaded: bf16, fp16 or fp32")


@dataclass
class DatasetEntry:
    path: str = opt("", "folder of video clips (each with a caption .txt of the same name)")
    audio_dir: str = opt("", "folder of separate audio files of the same names; '' = audio track of the clip")
    repeats: int = opt(1, "how many times each clip counts per epoch")
    weight: float = opt(1.0, "relative sampling weight against the other datasets")
    caption_prefix: str = opt("", "trigger word put before every caption of this dataset; '' = none")
    caption_separator: str = opt(", ", "text between caption_prefix and the caption")
    default_caption: str = opt("", "caption of the clips that have no caption file (a warning, not a block); "
                               "'' = such clips are refused")


@dataclass
class DataConfig:
    datasets: list[DatasetEntry] = opt([], "the training folders, one [[data.datasets]] table each")
    resolution: tuple[int, int] = opt((832, 480), "[width, height] in pixels, multiples of 16")
    bucket: BucketMode = opt("aspect", "fixed = every clip to `resolution`; aspect = buckets of similar area")
    crop: CropMode = opt("center", "where to crop a clip that does not fit its bucket: center or random")
    frames: int = opt(80, "new pixel frames per training window at 16 fps (80 = 20 latents, as inference)")
    motion_frames: int = opt(73, "frames before the window given as motion context (73 = 19 latents; 0 = none)")
    motion_drop_prob: float = opt(0.25, "probability of dropping the motion frames so first-clip mode is learnt")
    reference: ReferenceChoice = opt("first", "reference image: first frame, a random frame, or one outside the window")
    windows_per_clip: int = opt(0, "training windows taken from each clip, spread over it; 0 = every window that fits")
    allow_silent_audio: bool = opt(False, "accept clips whose audio is silent (otherwise the check flags them)")
    cache_dir: str = opt("", "cache of latents, text and audio features; '' = <output.run_dir>/cache")
    caption_dropout: float = opt(0.1, "probability of training a step with an empty caption")


@dataclass
class LoraConfig:
    kind: LoraKind = opt("lora", "adapter kind (peft): lora; dora = lora + a trained magnitude per output row; "
                         "loha = Hadamard product of two rank-r products; lokr = Kronecker product")
    rank: int = opt(16, "rank r: of B @ A (lora, dora), of each factor (loha: the update has rank up to r^2), of "
                    "the factorised Kronecker side (lokr: a side of at most 2r stays whole)")
    alpha: float = opt(16.0, "alpha; every kind scales its update by alpha / rank (lokr: 1 when no side is "
                       "factorised, as ComfyUI reads it)")
    dropout: float = opt(0.0, "dropout on the LoRA input, 0 <= dropout < 1 (lora, dora only)")
    targets: list[str] = opt(list(DEFAULT_LORA_TARGETS), "full-match regexes of the Linear modules to adapt")
    init: LoraInit = opt("default", "initialisation of the LoRA weights: default, gaussian (lora, dora), pissa "
                         "or olora")
    init_from: str = opt("", "LoRA file (peft or native) a new run starts from, of this rank, alpha and targets; "
                         "'' = none")


@dataclass
class EmaConfig:
    enabled: bool = opt(False, "keep an exponential moving average of the LoRA weights and export it")
    decay: float = opt(0.999, "EMA decay per EMA update, 0 < decay < 1")
    update_every: int = opt(1, "update the EMA every N optimizer steps (1 = every step)")


@dataclass
class OptimConfig:
    optimizer: OptimizerName = opt(
        "adamw", "adamw; adamw8bit, lion8bit, paged_adamw8bit, paged_lion8bit (bitsandbytes; paged = on a GPU "
        "the state moves to host RAM when the GPU runs short); lion, prodigy, schedulefree (the optimizers extra)")
    lr: float = opt(1e-4, "peak learning rate (prodigy: a multiplier, usually 1.0)")
    betas: tuple[float, float] = opt((0.9, 0.999), "[beta1, beta2] of the optimizer")
    weight_decay: float = opt(0.01, "decoupled weight decay")
    eps: float = opt(1e-8, "optimizer epsilon")
    schedule: ScheduleName = opt("constant", "learning-rate schedule after warmup: constant, cosine or linear")
    warmup_steps: int = opt(0, "linear warmup steps from 0 to lr")
    max_steps: int = opt(2000, "optimizer steps of the whole run")
    batch_size: int = opt(1, "windows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    grad_clip: GradClip = opt("norm", "gradient clipping: norm (scale the whole gradient to max_grad_norm) or "
                              "value (clamp each element to +-max_grad_value)")
    max_grad_norm: float = opt(1.0, "with grad_clip = norm: clip the gradient norm to this; 0 = no clipping")
    max_grad_value: float = opt(1.0, "with grad_clip = value: clamp each gradient element to +-this; 0 = no clipping")
    ema: EmaConfig = opt(EmaConfig(), "EMA of the LoRA weights")


@dataclass
class TrainConfig:
    seed: int = opt(42, "seed of every random choice (data order, noise, sigmas, LoRA init)")
    mixed_precision: MixedPrecision = opt("bf16", "autocast dtype of the forward pass: bf16, fp16 or no")
    flow_shift: float = opt(3.0, "shift of the flow-matching sigmas (the official inference uses 3)")
    flow_schedule_auto_shift: bool = opt(
        False, "shift the training sigmas by the window's size instead of flow_shift: k = exp(0.5 + 0.65 (n - 256) "
        "/ 3840), n = (h/8) (w/8) / 4 tokens per frame (SimpleTuner's, from Flux; 832x480: k = 2.06)")
    sigma_sampling: SigmaSampling = opt("logit_normal", "how training sigmas are drawn: logit_normal or uniform")
    logit_mean: float = opt(0.0, "mean of the logit-normal sigma distribution")
    logit_std: float = opt(1.0, "standard deviation of the logit-normal sigma distribution")
    nonfinite_max_in_a_row: int = opt(20, "stop the run after this many NaN/inf steps in a row")


@dataclass
class RolloutConfig:
    enabled: bool = opt(False, "scheduled sampling: some windows are trained on the model's own denoising from a "
                        "higher noise level instead of the exact noising (one no-grad forward per rollout step)")
    probability: float = opt(1.0, "with enabled: the chance that a window is rolled out, drawn per window")
    max_step_offset: int = opt(
        10, "with enabled: a rollout starts 0..this many timesteps (of 1000) above the trained one, one Euler step "
        "per timestep")


@dataclass
class CrepaConfig:
    enabled: bool = opt(False, "CREPA: align one block's video hidden states to DINOv2 features of the clip's frames "
                        "and their neighbours (an extra loss term; the features are cached)")
    block_index: int = opt(8, "the transformer block (0-based) whose output hidden states are aligned")
    weight: float = opt(0.5, "weight of the alignment term: loss = flow loss + weight * (1 - mean similarity)")
    adjacent_distance: int = opt(1, "neighbouring latent frames within this distance are aligned too; 0 = only "
                                 "the same frame")
    temporal_decay: float = opt(1.0, "a neighbour at distance d counts exp(-d / temporal_decay) against 1 for "
                                "the same frame")
    encoder: str = opt("facebook/dinov2-giant", "hub id or local folder of the DINOv2 model (transformers layout) "
                       "that makes the features")


@dataclass
class CheckpointConfig:
    every_steps: int = opt(250, "write a checkpoint every N steps; 0 = only on stop, signal and end")
    keep_last: int = opt(3, "checkpoints kept; older ones are deleted")


@dataclass
class ValidationCase:
    reference: str = opt("", "reference image (or video whose first frame is used)")
    audio: str = opt("", "speech audio file")
    prompt: str = opt("", "text prompt")
    seed: int = opt(0, "noise seed of this sample")


@dataclass
class EvalLossConfig:
    enabled: bool = opt(False, "measure a fixed-noise loss at each validation: on the held-out clips (holdout, "
                        "datasets) when there are any, else on training windows")
    num_triples: int = opt(8, "(window, sigma, noise) triples in the eval loss")
    holdout: float = opt(0.0, "fraction of the clips (0 <= f < 1) never trained on, that the eval loss measures; "
                         "chosen from train.seed and the clip ids, listed by `s2v-tui check`; 0 = none")
    datasets: list[DatasetEntry] = opt([], "folders of clips that only the eval loss measures, one "
                                       "[[validation.eval_loss.datasets]] table each (the keys of [[data.datasets]] "
                                       "but repeats and weight); cached, never trained")


@dataclass
class ValidationConfig:
    every_steps: int = opt(0, "validate every N steps; 0 = never")
    cases: list[ValidationCase] = opt([], "samples to render, one [[validation.cases]] table each")
    steps: int = opt(40, "sampling steps per validation sample")
    cfg_scale: float = opt(4.5, "classifier-free guidance scale")
    solver: Solver = opt("unipc", "sampler: unipc (as the official inference) or euler")
    sigma_schedule: SigmaSchedule = opt(
        "shifted", "sampling sigmas: shifted (the official flow shift) or beta (the same end points, the steps between "
        "at Beta(0.6, 0.6) quantiles, crowded at both ends)")
    flow_shift: float = opt(3.0, "shift of the sampling sigmas (3 as the official inference; train.flow_shift is "
                            "the training one)")
    negative_prompt: str = opt(OFFICIAL_NEGATIVE_PROMPT, "negative prompt of the unconditional pass (default: the "
                               "official one, in Chinese); '' = an empty prompt")
    chunks: int = opt(1, "length of each sample in 80-frame chunks (1 = 77 frames, 4.8 s; n = 80 n - 3 frames), "
                      "capped by the case's audio")
    lora_scale: float = opt(1.0, "strength of the LoRA in the samples (0 = the base model, 1 = as trained)")
    lora_scales: list[float] = opt([], "a strength sweep: each case also rendered at each of these scales, as "
                                   "case-NN-scale-S.mp4; [] = none")
    attention_backend: SamplingAttention = opt(
        "same", "attention kernel of the samples: same = memory.attention_backend's; or one of its values, or sage "
        "(SageAttention 1, int8 Q.K, samples only; slower than cudnn and fa4 on an H200 at the 14B's shape)")
    eval_loss: EvalLossConfig = opt(EvalLossConfig(), "fixed-noise evaluation loss")


@dataclass
class MemoryConfig:
    gradient_checkpointing: bool = opt(True, "recompute block activations in the backward pass")
    checkpoint_interval: int = opt(1, "checkpoint every Nth block (1 = every block)")
    checkpoint_policy: CheckpointPolicy = opt(
        "full", "full = recompute whole blocks; save_attention = keep self-attention outputs (faster, more memory)")
    offload_checkpoint_inputs: bool = opt(False, "keep the saved block inputs in host memory")
    gpu_saved_inputs: int = opt(
        0, "with offload_checkpoint_inputs: the last N blocks' saved inputs stay on the GPU (needed first); 0 = none")
    block_offload: bool = opt(False, "stream transformer blocks from pinned host memory to the GPU")
    blocks_resident: int = opt(0, "with block_offload: blocks that stay on the GPU")
    base_weights: BaseWeights = opt(
        "bf16", "frozen base weights: bf16; fp8 (e4m3, fp8 forward matmuls: fastest); int8 (weight-only: closest to bf16)")
    low_bit_families: list[str] = opt(
        list(LOW_BIT_DEFAULT_FAMILIES), f"with base_weights = fp8 or int8, the module families held in low bit: {', '.join(LOW_BIT_FAMILIES)}")
    fp8_input_grad: bool = opt(
        False, "with base_weights = fp8: the input-gradient matmuls in fp8 too (faster; rounds the gradients)")
    chunked_ffn: int = opt(0, "split the feed-forward over this many sequence chunks; 0 = off")
    attention_backend: AttentionBackend = opt(
        "auto", "auto, cudnn, flash, efficient, math, fa4 (FlashAttention 4, Hopper/Blackwell), cudnn_fp8 (cuDNN's "
        "fp8 self-attention, Hopper/Blackwell; inexact) or fastest (fa4 where it runs, else cudnn; the run says "
        "which); sage: samples only")
    compile_blocks: bool = opt(False, "torch.compile each block (CUDA): fuses the fp32 norm/modulation work")
    residual_dtype: ResidualDtype = opt(
        "fp32", "residual stream between blocks: fp32 (the official model) or bf16 (half the saved activations)")
    vram_budget_gb: float = opt(0.0, "GPU memory the run may use, in GB; 0 = what the card has free")
    host_ram_margin_gb: float = opt(
        2.0, "checkpoint and stop when available host RAM falls below this, in GB (before the OOM killer acts); 0 = off")


@dataclass
class TreadConfig:
    enabled: bool = opt(False, "TREAD token routing in training: a random part of the video tokens skips a span of "
                        "blocks and rejoins after it (sampling never routes)")
    selection_ratio: float = opt(0.5, "fraction of each latent frame's video tokens that skip the routed blocks, "
                                 "0 <= ratio < 1")
    start_layer_idx: int = opt(2, "first routed block (negative: counted from the end, -1 = the last)")
    end_layer_idx: int = opt(-2, "last routed block, inclusive (negative: counted from the end)")


@dataclass
class DistributedConfig:
    strategy: DistributedStrategy = opt(
        "ddp", "several GPUs: ddp = each holds the whole model, LoRA gradients averaged; fsdp = base sharded per block")


@dataclass
class OutputConfig:
    run_dir: str = opt("runs", "folder that holds the run folders")
    name: str = opt("s2v-lora", "this run's folder name under run_dir, also the LoRA file name")
    formats: list[ExportFormat] = opt(["peft", "native"], "LoRA layouts to export: peft (diffusers), native (ComfyUI)")
    push_to_hub: str = opt(
        "", "Hugging Face repo (owner/name) that gets the final LoRA files and a model card at the end; '' = off")
    push_checkpoints: bool = opt(False, "with push_to_hub: upload each checkpoint's LoRA files too, as they are written")
    hub_private: bool = opt(True, "with push_to_hub: create the repo private (an existing repo keeps its visibility)")


@dataclass
class LoggingConfig:
    every_steps: int = opt(10, "log a metrics line every N steps")
    tensorboard: bool = opt(True, "write TensorBoard scalars under the run folder")
    wandb_project: str = opt("", "Weights & Biases project (needs the wandb extra); '' = off")
    webhooks: list[str] = opt([], "URLs sent a message at run start, each checkpoint and validation, and the end")
    webhook_format: WebhookFormat = opt(
        "auto", "auto (Discord and Slack webhook URLs get their text form, others JSON), json, discord or slack")
    webhook_timeout_s: float = opt(10.0, "seconds one webhook request may take before it counts as failed")


@dataclass
class Config:
    model: ModelConfig = opt(ModelConfig(), "the base model")
    data: DataConfig = opt(DataConfig(), "training data and windowing")
    lora: LoraConfig = opt(LoraConfig(), "the adapter")
    optim: OptimConfig = opt(OptimConfig(), "optimizer, schedule and batch")
    train: TrainConfig = opt(TrainConfig(), "objective and numerics")
    rollout: RolloutConfig = opt(RolloutConfig(), "scheduled sampling (rollout) against exposure bias")
    crepa: CrepaConfig = opt(CrepaConfig(), "CREPA temporal regularisation (off by default)")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpoints")
    validation: ValidationConfig = opt(ValidationConfig(), "validation samples and loss")
    memory: MemoryConfig = opt(MemoryConfig(), "memory switches (set by the VRAM presets)")
    tread: TreadConfig = opt(TreadConfig(), "TREAD token routing (training speed-up, off by default)")
    distributed: DistributedConfig = opt(DistributedConfig(), "several GPUs under accelerate launch; one process ignores it")
    output: OutputConfig = opt(OutputConfig(), "where results go")
    logging: LoggingConfig = opt(LoggingConfig(), "metrics")

    def resolved_dict(self) -> dict[str, Any]:
        return resolved_dict(self)

    def run_path(self) -> Path:
        """This run's folder: <output.run_dir>/<output.name>."""
        return Path(self.output.run_dir) / self.output.name

    def cache_path(self) -> Path:
        """The feature cache: data.cache_dir, or <output.run_dir>/cache shared by the runs there."""
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.output.run_dir) / "cache"

    def config_hash(self) -> str:
        return config_hash(self)

    def identity_hash(self) -> str:
        return identity_hash(self)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolved_dict(config: Any) -> dict[str, Any]:
    """Every key with its value, as plain dicts, lists and scalars (tuples become lists), in schema order."""
    return _plain(config)


def config_hash(config: Config) -> str:
    """Stable 16-hex-digit hash of the resolved values: same config, same hash, in any process."""
    text = json.dumps(resolved_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# Keys that say where a run lives, not what it trains: a run folder copied elsewhere (or a cache moved) is the
# same run, so these never count as a change of a run's configuration.
LOCATION_KEYS = ("output.run_dir", "output.name", "data.cache_dir")
# Keys a finished or stopped run may change and still continue from its checkpoints (engine.run_folder).
CONTINUE_KEYS = ("optim.max_steps",)
# Keys about what a run reports and keeps, not what it trains (no random draw and no tensor depends on them): a
# resumed run may change them too (log less often, keep more checkpoints, export another layout). The validation
# keys here only shape the samples: validation forks the RNG and puts the LoRA strength back exactly
# (tests/test_infer_validation.py trains the same losses with and without it).
REPORTING_KEYS = ("logging.every_steps", "logging.tensorboard", "logging.wandb_project", "logging.webhooks",
                  "logging.webhook_format", "logging.webhook_timeout_s", "checkpoint.every_steps",
                  "checkpoint.keep_last", "output.formats", "output.push_to_hub", "output.push_checkpoints",
                  "output.hub_private", "validation.negative_prompt", "validation.chunks", "validation.lora_scale",
                  "validation.lora_scales", "validation.attention_backend", "validation.sigma_schedule",
                  "validation.flow_shift")
# Keys that say where tensors live and how the step is scheduled, not what is computed: a run stopped by host or
# GPU memory resumes on another card or preset with them changed. (Their numerics differ at most by rounding
# order; the keys that change the base's numerics, base_weights, fp8_input_grad and residual_dtype, are not here.)
PLACEMENT_KEYS = ("memory.gradient_checkpointing", "memory.checkpoint_interval", "memory.checkpoint_policy",
                  "memory.offload_checkpoint_inputs", "memory.gpu_saved_inputs", "memory.block_offload",
                  "memory.blocks_resident",
                  "memory.chunked_ffn", "memory.attention_backend", "memory.compile_blocks", "memory.vram_budget_gb",
                  "memory.host_ram_margin_gb", "distributed.strategy")


def identity_hash(config: Config) -> str:
    """Hash of what a run trains: the values that differ from the defaults, less the keys a resume may change.
    Checkpoints carry it, so a run extended to more steps, moved to another folder or resumed with other
    PLACEMENT_KEYS still resumes from them; and a key added to the schema later (its default keeping the old
    behaviour) leaves it unchanged."""
    defaults = flatten(resolved_dict(Config()))
    flat = {k: v for k, v in flatten(resolved_dict(config)).items() if k not in defaults or v != defaults[k]}
    for key in (*LOCATION_KEYS, *CONTINUE_KEYS, *PLACEMENT_KEYS, *REPORTING_KEYS):
        flat.pop(key, None)
    text = json.dumps(flat, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"ema": {"decay": x}}} -> {"optim.ema.decay": x}. Lists (also of tables) stay leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any


def diff(a: Config, b: Config) -> list[ConfigChange]:
    """Keys whose values differ from `a` to `b`, in schema order (lists compare whole)."""
    flat_a, flat_b = flatten(resolved_dict(a)), flatten(resolved_dict(b))
    return [ConfigChange(k, flat_a[k], flat_b[k]) for k in flat_a if flat_a[k] != flat_b[k]]


@dataclass(frozen=True)
class FieldInfo:
    """One leaf key of the schema, for forms and generated docs."""

    key: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] = ()


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def schema_key(key: str) -> str:
    """'data.datasets[0].weight' -> 'data.datasets.weight': the schema's name of a key, without item numbers."""
    return re.sub(r"\[\d+\]", "", key)


def _nonfinite_keys(cls: type, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        tp = type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            tp = typing.get_args(tp)[0]  # the items of an array of tables share one schema name
        if dataclasses.is_dataclass(tp):
            keys |= _nonfinite_keys(tp, key + ".")
        elif f.metadata.get("finite", True) is False:
            keys.add(key)
    return keys


_NONFINITE: set[str] | None = None


def nonfinite_allowed(key: str) -> bool:
    """Whether the number key (any form, e.g. 'optim.betas[1]') may be nan or inf: only when its field says so."""
    global _NONFINITE
    if _NONFINITE is None:
        _NONFINITE = _nonfinite_keys(Config)
    return schema_key(key) in _NONFINITE


def choices_of(tp: Any) -> tuple[str, ...]:
    """The allowed strings of a Literal (or of a list of a Literal); () otherwise."""
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return tuple(typing.get_args(tp))
    return ()


def schema_fields(cls: type = Config, prefix: str = "") -> list[FieldInfo]:
    """Every leaf key below `cls` with its type, default and help. Lists of tables are one leaf each."""
    hints = type_hints(cls)
    default = cls()
    out: list[FieldInfo] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(schema_fields(tp, key + "."))
        else:
            value = _plain(getattr(default, f.name))
            out.append(FieldInfo(key, tp, value, f.metadata.get("help", ""), choices_of(tp)))
    return out
