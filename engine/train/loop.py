"""The training loop: flow matching on a LoRA'd S2V transformer, with checkpoints, resume and a stop event.

One optimizer step = `grad_accum` micro-batches. The stop event is checked at every step boundary; stopping
writes a checkpoint and returns. All randomness comes from seeded generators saved in each checkpoint, so a
resumed run replays the same windows, sigmas and noise as an uninterrupted one (bit for bit on CPU).

A step whose loss or gradient is NaN/inf is skipped (no update, counted); `train.nonfinite_max_in_a_row` in a
row stop the run. A CUDA out-of-memory error saves the LoRA as it stands and ends the run with status failed.

With crepa.enabled the loss gains CREPA's alignment term (engine.train.crepa): its projector trains with the LoRA in
the same optimizer and is saved and restored with the checkpoints, never exported.

Every checkpoint carries the LoRA files of its step in each layout of output.formats, with the weights and header
of the final export (engine.train.export): with optim.ema on they hold the EMA average.
"""
from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import Config, resolved_dict
from engine.dtypes import AUTOCAST_DTYPES
from engine.events import CheckpointSaved, Event, PhaseChanged, RunWarning, StepEnd
from engine.fsio import atomic_write_bytes
from engine.models.lora import base_weight_reader, lora_parameter_names, lora_parameters, native_reference_modules
from engine.models.tread import TokenRoute, check_capture_outside, resolve_span
from engine.train import checkpoint as ckpt
from engine.train.batches import Batch, BatchSource
from engine.train.crepa import crepa_term
from engine.train.distributed import SINGLE, Distributed
from engine.train.ema import LoraEma
from engine.train.export import emergency_paths, lora_files
from engine.train.host_guard import HostMemoryGuard
from engine.train.metrics import LossSmoother, StepTimer, memory_stats
from engine.train.objective import flow_loss, sample_sigmas, sigmas_to_timesteps, training_shift, velocity_target
from engine.train.optim import build_optimizer, build_scheduler
from engine.train.rollout import training_input

log = logging.getLogger(__name__)
metrics_log = logging.getLogger("engine.train.metrics")



@dataclass(frozen=True)
class TrainOutcome:
    status: str  # "completed", "stopped" or "failed" (events.RUN_STATUSES)
    step: int
    reason: str = ""
    checkpoint: Path | None = None  # the newest checkpoint written by this run, if any
    oom: bool = False
    emergency_loras: tuple[Path, ...] = ()  # the LoRA files saved after an out-of-memory error


class NonFiniteStop(RuntimeError):
    pass


class CheckpointFailed(RuntimeError):
    """A checkpoint write failed; the message names the cause and the newest good checkpoint."""


class Trainer:
    def __init__(self, config: Config, model: torch.nn.Module, dataset, run_dir: str | Path,
                 emit: Callable[[Event], None], stop_event: threading.Event, device: torch.device,
                 config_hash: str, resume_state: dict | None = None, dist: Distributed = SINGLE,
                 validator=None, host_guard: HostMemoryGuard | None = None) -> None:
        self.cfg = config
        self.dist = dist
        self.model = model
        self.run_dir = Path(run_dir)
        if dist.is_main:  # made here, once: a run folder that vanishes later must not be silently recreated
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.emit = emit
        self.stop_event = stop_event
        self.device = device
        self.config_hash = config_hash
        self.validator = validator  # engine.train.validation.Validator, or None
        self.host_guard = host_guard if host_guard is not None else HostMemoryGuard.from_config(config)
        o, t = config.optim, config.train

        # Fresh-run seeding; a resume overwrites every one of these from the checkpoint below.
        random.seed(t.seed)
        np.random.seed(t.seed % 2**32)
        torch.manual_seed(t.seed)
        self.noise_gen = torch.Generator().manual_seed(t.seed + 1)
        self.data_gen = torch.Generator().manual_seed(t.seed + 2)
        # TREAD's token subsets: a generator of their own, so routing changes no other draw of the run.
        self.route_gen = torch.Generator().manual_seed(t.seed + 3) if config.tread.enabled else None
        if self.route_gen is not None:  # fails before the first step, naming the keys
            first, last = resolve_span(config.tread.start_layer_idx, config.tread.end_layer_idx, len(model.blocks))
            if config.crepa.enabled:
                check_capture_outside(first, last, config.crepa.block_index)

        self.params = lora_parameters(model)
        self.crepa = crepa_term(config, model, device)
        # What the optimizer updates and the clipping sees: the LoRA, and CREPA's projector when it is on (the EMA
        # and the LoRA files stay the LoRA's alone).
        self.trainable = self.params + (self.crepa.parameters() if self.crepa else [])
        self.optimizer = build_optimizer(self.trainable, o.optimizer, o.lr, o.betas, o.weight_decay, o.eps)
        self.scheduler = build_scheduler(self.optimizer, o.schedule, o.warmup_steps, o.max_steps, o.optimizer)
        self.ema = LoraEma(self.params, o.ema.decay, o.ema.update_every) if o.ema.enabled else None
        mp = t.mixed_precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(mp)
        self.scaler = torch.amp.GradScaler("cuda") if mp == "fp16" and device.type == "cuda" else None
        motion_drop = config.data.motion_drop_prob if config.data.motion_frames > 0 else 1.0
        # The order is of global batches (every rank draws the same one and keeps its slice), so the data position
        # is global and a checkpoint resumes on any number of processes.
        self.batches = BatchSource(dataset, o.batch_size * dist.world_size, t.seed, config.data.caption_dropout, motion_drop,
                                   self.data_gen)
        self.smoother = LossSmoother()
        self.timer = StepTimer()
        self.step = 0
        self.skipped = 0
        self.in_a_row = 0
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step = -1
        self.last_step_skipped = False
        self.resumed = resume_state is not None
        self._native_modules: frozenset[str] | None = None
        if resume_state is not None:
            self._restore(resume_state)

    # ---- state -----------------------------------------------------------------------------------------------
    def _generators(self) -> dict[str, torch.Generator]:
        gens = {"noise": self.noise_gen, "data": self.data_gen}
        if self.route_gen is not None:
            gens["route"] = self.route_gen
        return gens

    def state(self) -> dict:
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "step": self.step,
            "epoch": self.batches.epoch,
            "config_hash": self.config_hash,
            "identity": self.cfg.identity_hash(),
            "max_steps": self.cfg.optim.max_steps,
            "lora": self.dist.lora_state(self.model),
            "optimizer": self.dist.full(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.dist.full(self.ema.state_dict()) if self.ema else {},
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": ckpt.capture_rng(self._generators()),
            "data": self.batches.order.state_dict(),
            "counters": {"skipped": self.skipped, "in_a_row": self.in_a_row},
            "metrics": self.smoother.state_dict(),
            "crepa": self.crepa.state_dict() if self.crepa else {},
            "world_size": self.dist.world_size,  # informative: the data position is global whatever it was
        }

    def _restore(self, state: dict) -> None:
        self.dist.set_lora_state(self.model, state["lora"], source=f"checkpoint of step {state['step']}")
        if self.crepa:
            if not state.get("crepa"):
                raise ValueError(f"the checkpoint of step {state['step']} has no CREPA projector although "
                                 "crepa.enabled is on; it belongs to another configuration")
            self.crepa.load_state_dict(state["crepa"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dist.shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        if int(state.get("max_steps", self.cfg.optim.max_steps)) != self.cfg.optim.max_steps:
            self._replan_schedule()
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
            self.ema.shadow = [self.dist.like(s, p) for s, p in zip(self.ema.shadow, self.params, strict=True)]
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            b = self.cfg.optim.batch_size
            self.emit(RunWarning(code="world_size_changed", message=(
                f"the checkpoint of step {state['step']} was written by {saved_world} process(es), this run has "
                f"{self.dist.world_size}: the data continues where it stopped, but the global batch is now "
                f"{b * self.dist.world_size} windows (was {b * saved_world}); launch {saved_world} process(es) "
                "to keep it")))
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.batches.order.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.skipped = int(state["counters"]["skipped"])
        self.in_a_row = int(state["counters"]["in_a_row"])
        self.smoother.load_state_dict(state["metrics"])
        self.last_checkpoint_step = self.step
        self.last_checkpoint = ckpt.checkpoint_path(self.run_dir, self.step)
        ckpt.restore_rng(state["rng"], self._generators())  # last: nothing above may draw after it

    def _replan_schedule(self) -> None:
        """A continued run (optim.max_steps raised): the schedule's factor is a function of (step, max_steps), so
        from the resumed step on the learning rate is what the longer schedule gives at that step. Constant
        schedules are unchanged; cosine and linear rise to the longer curve and decay to its new end; warmup is
        not repeated. The loaded scheduler state still holds the old curve's current value, so set it here."""
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ---- LoRA files ------------------------------------------------------------------------------------------
    @property
    def native_modules(self) -> frozenset[str]:
        """The module names every LoRA file's keys are checked against (see engine.models.lora.save_lora)."""
        if self._native_modules is None:
            self._native_modules = native_reference_modules(self.model)
        return self._native_modules

    def export_weights(self, lora: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], str]:
        """The LoRA that the run's LoRA files hold, and which it is: the EMA average ("ema") when optim.ema is on,
        a schedule-free optimizer's evaluation weights ("schedulefree_eval"), else the trained weights ("trained";
        `lora`, when given, is that state already gathered). The run's own weights are left as they were, bit for
        bit, so that a checkpoint's LoRA never changes the training that follows. Every rank calls it."""
        if self.ema:
            names = lora_parameter_names(self.model)
            shadow = self.dist.full(list(self.ema.shadow))
            return {n: s.detach().to("cpu", torch.float32, copy=True) for n, s in zip(names, shadow, strict=True)}, "ema"
        if hasattr(self.optimizer, "eval"):
            with self.evaluation_weights():
                return self.dist.lora_state(self.model), "schedulefree_eval"
        return (lora if lora is not None else self.dist.lora_state(self.model)), "trained"

    @contextmanager
    def evaluation_weights(self):
        """A schedule-free optimizer's evaluation weights (its averaged point x) in the LoRA for the block, where
        the trained ones (the point y its gradients are taken at) are restored after; any other optimizer leaves
        the weights as they are. eval() moves the weights to x and train() back, but not exactly (floating point),
        so the trained weights are copied back afterwards: validating never changes the training that follows."""
        if not hasattr(self.optimizer, "eval"):
            yield
            return
        live = [p.detach().clone() for p in self.trainable]  # the CREPA projector moves with the LoRA
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()
            with torch.no_grad():
                for p, saved in zip(self.trainable, live, strict=True):
                    p.copy_(saved)

    @property
    def base_weight(self):
        """module -> its base weight, for the native layout of a DoRA (computed against it)."""
        return base_weight_reader(self.model)

    def _lora_files(self, weights: dict[str, torch.Tensor], kind: str) -> dict[str, bytes]:
        return lora_files(self.cfg, weights, kind, self.native_modules, self.step, self.config_hash,
                          self.base_weight)

    def complete_checkpoint_loras(self) -> None:
        """Write the LoRA files that the checkpoint resumed from lacks: one set aside as damaged at the start, a
        layout added to output.formats since it was written, or all of them for a checkpoint of a build before
        checkpoint LoRAs. The trainer now holds exactly that checkpoint's state, so they are the files it would
        have had. A write that fails stops the run like a failed checkpoint."""
        path = self.last_checkpoint if self.resumed else None
        missing: list[str] = []
        record = ckpt.read_digest(path) if path is not None and self.dist.is_main else None
        if record is not None:  # a checkpoint without a record (an early build) has nothing to vouch for them
            recorded = record.get("loras") or {}
            missing = [layout for layout in self.cfg.output.formats
                       if layout not in recorded or not ckpt.lora_path(path, layout).exists()]
        if not self.dist.any(bool(missing)):
            return
        weights, kind = self.export_weights()  # every rank: collective under fsdp
        error = None
        if self.dist.is_main:
            files = {layout: blob for layout, blob in self._lora_files(weights, kind).items() if layout in missing}
            try:
                ckpt.add_loras(path, files)
                log.info("wrote the %s LoRA file(s) of the checkpoint of step %d, which it lacked",
                         ", ".join(files), self.step)
            except ckpt.CheckpointWriteError as exc:
                error = exc
        if self.dist.any(error is not None):
            raise CheckpointFailed(self._write_failure(error))

    def save_checkpoint(self, reason: str) -> Path:
        """Write the full state and its LoRA files; a write that fails raises CheckpointFailed (on every rank): the
        run must stop at once rather than train on with nothing saved."""
        if self.last_checkpoint_step == self.step and self.last_checkpoint is not None:
            return self.last_checkpoint
        state = self.state()  # on every rank: gathering sharded states is collective
        weights, kind = self.export_weights(state["lora"])
        error = None
        if self.dist.is_main:  # rank 0 alone writes; the others only keep its name
            extra = {"config": resolved_dict(self.cfg), "loss_smooth": self.smoother.current(), "reason": reason}
            try:
                ckpt.save_checkpoint(self.run_dir, state, self.cfg.checkpoint.keep_last, extra,
                                     self._lora_files(weights, kind))
            except ckpt.CheckpointWriteError as exc:
                error = exc
        del state, weights
        if self.dist.any(error is not None):
            raise CheckpointFailed(self._write_failure(error))
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        self.last_checkpoint, self.last_checkpoint_step = path, self.step
        if self.dist.is_main:
            self.emit(CheckpointSaved(step=self.step, path=str(path), reason=reason))
            metrics_log.info("checkpoint of step %d written to %s (%s)", self.step, path, reason)  # train.log only
        return path

    def _write_failure(self, error: ckpt.CheckpointWriteError | None) -> str:
        what = str(error) if error is not None else "rank 0 could not write it"
        return (f"stopped at step {self.step}: the checkpoint of this step could not be written: {what}. Training "
                f"stopped at once so that no more work is lost; {self._newest_good()}. Fix that, then run the same "
                "command again to resume from it")

    def _newest_good(self) -> str:
        path = ckpt.newest_healthy(self.run_dir)
        if path is None:
            return "there is no checkpoint yet"
        return f"the newest good checkpoint is step {int(path.stem.split('-')[1])} ({path})"

    # ---- one step ----------------------------------------------------------------------------------------------
    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        t = self.cfg.train
        x0 = batch.latents
        # Sigmas and noise come from the CPU generator whatever the device, so runs replay on any machine. With
        # several processes each draws them for the whole global batch and keeps its slice: N ranks of batch b
        # then train on exactly the noise one process of batch N*b would.
        n, part = batch.global_size or x0.shape[0], slice(batch.offset, batch.offset + x0.shape[0])
        shift = training_shift(t, x0.shape)  # one shape per global batch (batches keep to one bucket)
        sigmas = sample_sigmas(n, self.noise_gen, t.sigma_sampling, shift, t.logit_mean,
                               t.logit_std)[part].to(self.device)
        noise = torch.randn((n, *x0.shape[1:]), generator=self.noise_gen)[part].to(self.device)

        route = None
        if self.route_gen is not None:
            tr = self.cfg.tread
            route = TokenRoute(tr.selection_ratio, tr.start_layer_idx, tr.end_layer_idx, self.route_gen)

        def predict(x: torch.Tensor, s: torch.Tensor, route: TokenRoute | None = None) -> torch.Tensor:
            amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                   else nullcontext())
            extra = {"route": route} if route is not None else {}
            with amp:
                return self.model(x, sigmas_to_timesteps(s), batch.text, batch.ref_latents, batch.audio,
                                  motion_latents=batch.motion_latents, drop_motion_frames=batch.drop_motion, **extra)

        # [rollout] off: the plain noising; on, some windows get the model's own no-grad Euler steps from higher up.
        # Those forwards imitate sampling, so they never route ([tread] routes only the trained forward).
        x_t = training_input(self.cfg.rollout, self.noise_gen, predict, x0, noise, sigmas, n, part)
        prediction = predict(x_t, sigmas, route)
        loss = flow_loss(prediction, velocity_target(x0, noise))
        if self.crepa:  # the one auxiliary term; the model kept the block's hidden states for it
            hidden, self.model.captured = self.model.captured, None
            loss = loss + self.crepa.loss(hidden, batch.crepa_features)
        return loss

    def _grad_norm(self) -> float:
        """Clip the gradients as optim.grad_clip says; returns their norm before clipping (the logged one)."""
        o = self.cfg.optim
        by_norm = o.grad_clip == "norm" and o.max_grad_norm > 0
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, o.max_grad_norm if by_norm else float("inf"))
        norm = float(self.dist.full(norm))  # FSDP: the norm of the sharded gradients is itself a DTensor
        if o.grad_clip == "value" and o.max_grad_value > 0 and math.isfinite(norm):
            # Element-wise, after the gradients are complete (reduced over ranks, unscaled), so every rank clips
            # the same numbers; the norm stays the unclipped one, which is what says a step was unusual.
            torch.nn.utils.clip_grad_value_(self.trainable, o.max_grad_value)
        return norm

    def train_step(self) -> StepEnd:
        o = self.cfg.optim
        started = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        losses, bad = [], False
        dist = self.dist
        for _ in range(o.grad_accum):
            batch = self.batches.next_batch(dist.rank, dist.world_size).to(self.device)
            loss = self._forward_loss(batch)
            value = float(loss.detach())
            losses.append(value * batch.share)  # the global loss is the sum of the ranks' shares
            if not math.isfinite(value):
                bad = True
            # After one non-finite micro-batch the step is lost; the data is still consumed. Several processes
            # still run backward (FSDP's gradient reduction inside it must see every rank); the step is skipped
            # below, by all ranks together.
            if not bad or dist.active:
                weight = batch.share * dist.world_size  # the gradient reduction averages over the ranks
                scaled = (loss * weight if weight != 1.0 else loss) / o.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if dist.active:
            *losses, flag = dist.sum_floats([*losses, float(bad)])
            bad = flag > 0 or not all(math.isfinite(v) for v in losses)
            if not bad:
                dist.reduce_gradients(self.trainable)
        grad_norm = None
        if not bad:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad_norm = self._grad_norm()
            bad = not math.isfinite(grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)  # skips the update itself when the gradient is not finite
                self.scaler.update()
            elif not bad:
                self.optimizer.step()
        self.last_step_skipped = bad
        if bad:
            self.skipped += 1
            self.in_a_row += 1
        else:
            self.in_a_row = 0
            if self.ema:
                self.ema.after_optimizer_step()
        with warnings.catch_warnings():
            # A skipped update still advances the schedule (it is tied to the step count); torch warns about
            # exactly that order, which is intended here.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean_loss = sum(losses) / len(losses)
        elapsed = time.perf_counter() - started
        self.timer.add(elapsed)
        peak_alloc, peak_reserved, rss = memory_stats(self.device)
        ranks = dist.gather_ints([peak_alloc, peak_reserved, rss]) if dist.active else []
        return StepEnd(
            step=self.step, total_steps=o.max_steps, epoch=self.batches.epoch, loss=mean_loss,
            loss_smooth=self.smoother.update(mean_loss), lr=lr, grad_norm=grad_norm,
            samples_per_s=(o.batch_size * o.grad_accum * dist.world_size / self.timer.s_per_step)
            if self.timer.s_per_step else 0.0,
            s_per_step=self.timer.s_per_step, eta_s=self.timer.eta(o.max_steps - self.step), step_s=elapsed,
            peak_alloc_bytes=peak_alloc, peak_reserved_bytes=peak_reserved, host_rss_bytes=rss,
            skipped_nonfinite=self.skipped,
            rank_peak_alloc_bytes=tuple(r[0] for r in ranks), rank_peak_reserved_bytes=tuple(r[1] for r in ranks),
            rank_host_rss_bytes=tuple(r[2] for r in ranks),
        )

    # ---- the run -------------------------------------------------------------------------------------------------
    def run(self) -> TrainOutcome:
        self.model.train()
        if hasattr(self.optimizer, "train"):  # schedule-free optimizers keep separate train/eval weights
            self.optimizer.train()
        try:
            self.complete_checkpoint_loras()
            with self.host_guard:  # polls host RAM from a thread: an allocation spike inside a step is what kills
                return self._train_steps()
        except (NonFiniteStop, CheckpointFailed) as exc:
            return TrainOutcome("failed", self.step, str(exc), self.last_checkpoint)
        except torch.OutOfMemoryError:
            return self._out_of_memory()
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the step in flight, the newest one stands
            return TrainOutcome("stopped", self.step, f"aborted by Ctrl-C during step {self.step + 1}; "
                                f"{self._newest_good()}; run the same command again to resume from it",
                                self.last_checkpoint)

    def _train_steps(self) -> TrainOutcome:
        o, c = self.cfg.optim, self.cfg.checkpoint
        limit = self.cfg.train.nonfinite_max_in_a_row
        while self.step < o.max_steps:
            short = self.host_guard.check()
            if self.dist.any(short is not None):  # every rank writes its part of the checkpoint
                path = self.save_checkpoint("host_memory")
                reason = short or "another process of this run ran short of host RAM (see its output)."
                # "failed", not "stopped": an unchanged retry (exit 75 says retry) meets the same wall.
                return TrainOutcome("failed", self.step, f"{reason} Stopped at step {self.step}; checkpoint "
                                    f"{path}.", path)
            if self.dist.any(self.stop_event.is_set()):  # all ranks stop at the same step
                if self.step == 0:
                    # Stopped while loading: the initial state comes from the seed alone, and a checkpoint of it
                    # would make the folder look trained, so a corrected config would be refused.
                    return TrainOutcome("stopped", 0, "stopped before the first step (step 0): nothing was "
                                        "trained yet; run the same command again to start")
                path = self.save_checkpoint("stop")
                reason = f"stopped at step {self.step}; checkpoint {path}; run again to resume"
                return TrainOutcome("stopped", self.step, reason, path)
            event = self.train_step()
            self.emit(event)
            if self.step % self.cfg.logging.every_steps == 0 or self.step == 1:
                metrics_log.info("step %d/%d loss %.4f (smoothed %.4f) lr %.3g grad norm %s %.2f s/step",
                                 self.step, o.max_steps, event.loss, event.loss_smooth, event.lr,
                                 "-" if event.grad_norm is None else f"{event.grad_norm:.3g}",
                                 event.s_per_step)
                if self.crepa:
                    metrics_log.info("step %d CREPA similarity %.4f (of its last micro-batch; 1 = aligned)", self.step,
                                     self.crepa.last_similarity)
            if self.last_step_skipped:
                log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", self.step,
                            self.in_a_row)
            if self.in_a_row >= limit:
                raise NonFiniteStop(
                    f"{self.in_a_row} steps in a row had a NaN/inf loss or gradient (up to step {self.step}); "
                    f"the LoRA was not updated by them (a checkpoint written during them is marked unhealthy and "
                    f"never prunes the newest healthy one); "
                    f"{self._newest_good()}. Lower optim.lr, use train.mixed_precision = \"bf16\" rather than "
                    "fp16, or check the cache for broken entries (delete it to rebuild); a new setting needs "
                    "another output.name"
                )
            if self.validator is not None and self.validator.due(self.step):
                self.validate()
            if c.every_steps and self.step % c.every_steps == 0 and self.step < o.max_steps:
                self.save_checkpoint("interval")
        if self.validator is not None and self.validator.due(self.step, final=True):
            self.validate()
        path = self.save_checkpoint("final")
        return TrainOutcome("completed", self.step, f"trained {self.step} steps", path)

    def validate(self) -> None:
        self.emit(PhaseChanged(phase="validate", detail=f"step {self.step}"))
        with self.evaluation_weights():  # samples and eval loss of the weights the export would hold
            done = self.validator.run(self.step, self.ema)
        if done is not None:
            self.emit(done)
        self.emit(PhaseChanged(phase="train", detail=f"{self.cfg.optim.max_steps} steps"))

    def _out_of_memory(self) -> TrainOutcome:
        # Free what the failed step held before writing anything; the LoRA is as of the last completed step.
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        saved: list[Path] = []
        if self.dist.sharded:
            # Gathering a sharded LoRA needs every process, and the others may be anywhere in their step.
            log.error("out of memory in a sharded run: no emergency LoRA; %s", self._newest_good())
        elif self.dist.is_main:
            paths = emergency_paths(self.cfg, self.run_dir, self.step)
            try:
                for layout, blob in self._lora_files(*self.export_weights()).items():
                    saved.append(atomic_write_bytes(paths[layout], blob))
                    self.emit(CheckpointSaved(step=self.step, path=str(paths[layout]), reason="oom"))
            except OSError as exc:
                log.error("emergency LoRA save to %s failed: %s", self.run_dir, exc)
        return TrainOutcome("failed", self.step, "CUDA out of memory", self.last_checkpoint, oom=True,
                            emergency_loras=tuple(saved))
