"""Validation during training: samples rendered with the official recipe, and the evaluation loss.

Each configured case (a reference image + speech + prompt, or a dataset clip given as reference = audio = the
video file, whose first frame and audio track are used) is encoded once, before the transformer is loaded, so
UMT5 and wav2vec2 never share the GPU with it; only the VAE is kept (in host memory between validations). Then,
every `validation.every_steps` steps and at the end:

    run_dir/samples/base/case-NN.mp4         the base model (LoRA disabled), once per run
    run_dir/samples/step-XXXXX/case-NN.mp4   the LoRA being trained
    run_dir/samples/step-XXXXX/case-NN-ema.mp4   its EMA weights, when optim.ema is on
    run_dir/samples/step-XXXXX/case-NN-scale-S.mp4   the LoRA at strength S, for each S of validation.lora_scales

with validation.steps / cfg_scale / solver / negative_prompt / attention_backend / sigma_schedule / flow_shift, the
case's seed (so samples of different steps differ only by the weights), at the area of data.resolution, the LoRA at
validation.lora_scale. A validation sample is the first validation.chunks 80-frame chunks of its audio (1 by
default: 77 frames, 4.8 s), with that much audio muxed in: each chunk costs the whole sampling time again at every
validation, and `s2v-tui sample` renders the whole audio with the exported LoRA.
Validation draws no number from the training generators (it forks the global RNG), so a run with validation
trains exactly as one without.

Several processes (engine.train.distributed): with "ddp" every rank holds the whole model, so the cases are
shared out (case i renders on rank i mod N, which writes its file: N times fewer samples per GPU) and the eval
loss's triples too (each rank's losses are summed into every rank in triple order, so the number is the one of a
single process, bit for bit on the CPU). With "fsdp" every forward gathers the others' shards, so all ranks render
every sample together, in lockstep, and rank 0 alone writes it; the stop request is agreed between them at every
sampling step, and the triples are shared out with as many forwards on every rank. A validation ends for all ranks
together: each waits for the others before training goes on, and a stop on one stops the validation on all.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import Config
from engine.events import ValidationDone
from engine.infer.audio import SAMPLE_RATE
from engine.infer.pipeline import FrozenParts, S2VPipeline
from engine.infer.sampler import Conditioning, SampleOptions, SamplingStopped
from engine.infer.video_io import write_sample_mp4
from engine.models.attention import resolve_attention_backend, sampling_attention
from engine.train.distributed import SINGLE, Distributed
from engine.train.eval_loss import evaluation_losses, make_triples

log = logging.getLogger(__name__)
metrics_log = logging.getLogger("engine.train.metrics")

SAMPLES_DIR = "samples"


def samples_dir(run_dir: Path, step: int | None) -> Path:
    return Path(run_dir) / SAMPLES_DIR / ("base" if step is None else f"step-{step:05d}")


@dataclass
class ValidationSet:
    """The encoded cases (CPU tensors) and the VAE that decodes their samples."""

    cases: list[Conditioning]
    seeds: list[int]
    parts: FrozenParts | None


def prepare_validation(config: Config, device: torch.device) -> ValidationSet:
    """Encode every case with the model's own encoders on `device`, then free the encoders."""
    v = config.validation
    if not v.cases:
        return ValidationSet([], [], None)
    # UMT5-XXL in bf16 on a GPU, as the cache encodes the training captions (CacheSettings.text_dtype): in fp32
    # it alone is 22.7 GB and would not fit the 24 GB preset's card; fp32 on the CPU (no fast bf16 there).
    text_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = FrozenParts.load(config.model.source, device, text_dtype)
    pipe = S2VPipeline(None, parts, device)
    width, height = config.data.resolution
    cases = []
    for i, case in enumerate(v.cases):
        try:
            cases.append(pipe.prepare(case.reference, case.audio, case.prompt, max_area=width * height,
                                      max_chunks=v.chunks, negative_prompt=v.negative_prompt))
        except (OSError, ValueError) as exc:
            raise ValueError(f"validation.cases[{i}]: {exc}") from exc
        log.info("validation case %d: %dx%d, %s, seed %d", i, cases[-1].width, cases[-1].height,
                 Path(case.reference).name, case.seed)
    parts.drop_encoders()
    parts.vae.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ValidationSet(cases, [c.seed for c in v.cases], parts)


@dataclass(frozen=True)
class _Job:
    """One sample of a validation: a case, the weights it is rendered with, where it goes."""

    case: int
    weights: str  # "base" (LoRA off), "trained" or "ema"
    path: Path
    lora_scale: float | None = None  # None: validation.lora_scale


class _AgreedStop:
    """A stop event that all ranks read alike: true on every rank as soon as it is set on any. Under FSDP the
    ranks sample in lockstep, so one that stopped alone would leave the others waiting in a collective."""

    def __init__(self, event: threading.Event | None, dist: Distributed) -> None:
        self.event, self.dist = event, dist

    def is_set(self) -> bool:
        return self.dist.any(self.event is not None and self.event.is_set())


class Validator:
    def __init__(self, config: Config, model, dataset, vset: ValidationSet, run_dir: Path, device: torch.device,
                 autocast_dtype: torch.dtype | None, stop_event: threading.Event | None = None,
                 dist: Distributed = SINGLE) -> None:
        self.dist = dist
        v = config.validation
        self.every = v.every_steps
        self.options = [SampleOptions(steps=v.steps, cfg_scale=v.cfg_scale, solver=v.solver,
                                      shift=v.flow_shift, sigma_schedule=v.sigma_schedule, seed=seed,
                                      lora_scale=v.lora_scale)
                        for seed in vset.seeds]
        self.sweep = list(v.lora_scales)
        # "fastest" is chosen here once, as training's is in the switches (same model dtype, same GPU)
        self.attention = resolve_attention_backend(v.attention_backend, device, config.model.dtype)[0]
        self.vset = vset
        self.model = model
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.stop_event = stop_event
        t = config.train
        # With the auto shift each window's sigma is shifted by its own size when it is measured.
        self.auto_shift = t.flow_schedule_auto_shift
        shift = 1.0 if self.auto_shift else t.flow_shift
        self.triples = (make_triples(len(dataset), v.eval_loss.num_triples, t.seed, t.sigma_sampling, shift,
                                     t.logit_mean, t.logit_std) if v.eval_loss.enabled else [])
        self.last_step = -1

    def due(self, step: int, final: bool = False) -> bool:
        if self.every <= 0 or step == self.last_step:
            return False
        return final or step % self.every == 0

    def eval_loss(self) -> float | None:
        if not self.triples:
            return None
        d, n = self.dist, len(self.triples)
        mine = list(range(d.rank, n, d.world_size))
        # FSDP: each forward is collective, so a rank short of triples repeats one (its loss is not counted).
        padding = -(-n // d.world_size) - len(mine) if d.sharded else 0
        losses = evaluation_losses(self.model, self.dataset, [self.triples[i] for i in mine] + self.triples[:1] * padding,
                                   self.device, self.autocast_dtype, self.auto_shift)
        every = [0.0] * n
        for i, loss in zip(mine, losses, strict=False):
            every[i] = loss
        every = d.sum_floats(every)  # one rank's loss per entry, zeros from the rest: exact
        return sum(every) / n

    def run(self, step: int, ema=None) -> ValidationDone | None:
        """Validate at `step`; None when the stop event interrupted the samples (the eval loss is still logged)."""
        self.last_step = step
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss = self.eval_loss()
            if loss is not None:
                metrics_log.info("step %d eval loss %.6f over %d fixed triples", step, loss, len(self.triples))
            try:
                paths = self._samples(step, ema)
            except SamplingStopped:
                log.info("validation of step %d stopped before its samples were done", step)
                return None
        return ValidationDone(step=step, sample_paths=tuple(str(p) for p in paths), eval_loss=loss)

    # ---- samples -------------------------------------------------------------------------------------------------
    def _jobs(self, step: int, with_ema: bool) -> list[_Job]:
        """Every sample of this validation, in render order. The base model's samples are made once per run (also
        across a resume): those whose file is missing on any rank."""
        base, here = samples_dir(self.run_dir, None), samples_dir(self.run_dir, step)
        cases = range(len(self.vset.cases))
        jobs = [job for job in (_Job(i, "base", base / f"case-{i:02d}.mp4") for i in cases)
                if self.dist.any(not job.path.exists())]
        jobs += [_Job(i, "trained", here / f"case-{i:02d}.mp4") for i in cases]
        for scale in self.sweep:
            jobs += [_Job(i, "trained", here / f"case-{i:02d}-scale-{scale:g}.mp4", scale) for i in cases]
        if with_ema:
            jobs += [_Job(i, "ema", here / f"case-{i:02d}-ema.mp4") for i in cases]
        return jobs

    def _renders(self, job: _Job) -> bool:
        """FSDP: every rank renders every sample (together); otherwise case i renders on rank i mod N."""
        return self.dist.sharded or job.case % self.dist.world_size == self.dist.rank

    def _samples(self, step: int, ema) -> list[Path]:
        if not self.vset.cases:
            return []
        jobs = self._jobs(step, ema is not None)
        stopped = False
        vae = self.vset.parts.vae.to(self.device)
        try:
            with sampling_attention(self.attention):  # validation.attention_backend; training's comes back after
                for weights in ("base", "trained", "ema"):
                    mine = [j for j in jobs if j.weights == weights and self._renders(j)]
                    if mine:
                        with self._weights(weights, ema):
                            self._render(mine)
        except SamplingStopped:
            stopped = True
        finally:
            vae.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        # Every rank waits here for the others' samples: a stop on any stops the validation on all.
        if self.dist.any(stopped):
            raise SamplingStopped("stopped during the validation samples")
        return [j.path for j in jobs]

    @contextmanager
    def _weights(self, weights: str, ema):
        if weights == "base":
            self.model.disable_adapters()
            try:
                yield
            finally:
                self.model.enable_adapters()
        elif weights == "ema":
            ema.swap()
            try:
                yield
            finally:
                ema.swap()
        else:
            yield

    def _render(self, jobs: list[_Job]) -> None:
        pipe = S2VPipeline(self.model, self.vset.parts, self.device, self.autocast_dtype)
        stop = _AgreedStop(self.stop_event, self.dist) if self.dist.sharded else self.stop_event
        for job in jobs:
            cond, options = self.vset.cases[job.case], self.options[job.case]
            if job.lora_scale is not None:
                options = dataclasses.replace(options, lora_scale=job.lora_scale)
            frames = pipe.render(cond, options, stop=stop)
            if self.dist.sharded and not self.dist.is_main:
                continue  # rank 0 writes the sample all ranks rendered
            seconds = frames.shape[0] / 16
            audio = cond.audio.waveform[: round(seconds * SAMPLE_RATE)]
            write_sample_mp4(job.path, frames.numpy(), audio)
