"""The Wan 2.2 S2V transformer, our own implementation (diffusers ModelMixin + ConfigMixin, PEFT-ready).

`S2VTransformer3DModel()` with no arguments is the 14B architecture (1,260 tensors, 16,295,755,609 parameters).
`S2VTransformer3DModel.from_pretrained(path_or_id)` loads the diffusers-checkpoint layout and the native
layout of the official `Wan-AI/Wan2.2-S2V-14B` shards (see `engine/models/loading.py`).

Mapping from the official `WanModel_S2V.forward` (batch of B same-shaped samples; the official code takes
lists of per-sample tensors and stacks them):

    official argument          this forward
    x[i]        [16, T, h, w]   hidden_states[i]        [B, 16, T, h, w]
    t           [B]             timestep                [B]  (sigma * 1000)
    context[i]  [L_i, 4096]     encoder_hidden_states   [B, L, 4096], L <= 512 (zero-padded here to 512)
    ref_latents[i] [16,1,h,w]   ref_latents             [B, 16, 1, h_r, w_r]
    motion_latents[i] [16,Tm,h,w]  motion_latents       [B, 16, Tm, h, w]
    cond_states[i] [16,T,h,w]   pose_latents            [B, 16, T, h, w] or None (None == zeros, as official)
    audio_input [B,25,1024,N]   audio_features          [B, 25, 1024, N_px]
    motion_frames [73, 19]      motion_frames           (73, 19)
    add_last_motion 2           add_last_motion         2 (multiplied by config.add_last_motion)
    drop_motion_frames          drop_motion_frames      bool
    seq_len                     (unused by the official S2V model too)

The output is the velocity prediction [B, 16, T, h, w] (fp32), equal to the official list stacked.

Native -> module names: `keymap.native_to_diffusers` (e.g. `blocks.3.self_attn.q` <-> `blocks.3.attn1.to_q`).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from engine.models import loading, tread
from engine.models.attention import is_self_attention_kernel
from engine.models.offload_checkpoint import HostActivationStore, host_checkpoint

from engine.models.rope import rope_cos_sin, sequence_positions
from engine.models.s2v_layers import (
    AudioInjector,
    CausalAudioEncoder,
    FramePackMotion,
    S2VTransformerBlock,
    linear_fp32,
    timestep_sinusoid,
)

AUDIO_INJECT_LAYERS_14B = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)

def _save_self_attention(ctx, op, *args, **kwargs):
    """Selective checkpointing: keep the self-attention kernel's outputs (output + softmax statistics), which
    are the costliest part of a block to recompute (S^2) and cost one [S, D] tensor to store; recompute the rest.
    Cross-attention (512 text keys, 5 audio keys) is cheap to recompute and is not kept."""
    if is_self_attention_kernel(op, args):  # SDPA's kernels and FA4's forward op
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_self_attention)


class TimeEmbedder(nn.Module):
    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        # fp32 throughout, as the official model computes the time embedding under an fp32 autocast.
        return linear_fp32(self.linear_2, F.silu(linear_fp32(self.linear_1, sinusoid)))


class TextEmbedder(nn.Module):
    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.linear_1.weight.dtype)
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.time_embedder = TimeEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextEmbedder(cfg.text_dim, dim)
        self.pose_embedder = nn.Conv3d(cfg.pose_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.causal_audio_encoder = CausalAudioEncoder(
            cfg.audio_dim, dim, cfg.num_weighted_avg_layers, cfg.num_audio_tokens, need_global=cfg.enable_adain
        )


class S2VTransformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    _supports_gradient_checkpointing = True
    _no_split_modules = ["S2VTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        text_len: int = 512,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str = "rms_norm_across_heads",
        eps: float = 1e-6,
        audio_dim: int = 1024,
        num_weighted_avg_layers: int = 25,
        num_audio_tokens: int = 4,
        audio_inject_layers: tuple = AUDIO_INJECT_LAYERS_14B,
        enable_adain: bool = True,
        adain_mode: str = "attn_norm",
        pose_dim: int = 16,
        enable_framepack: bool = True,
        framepack_drop_mode: str = "padd",
        zip_frame_buckets: tuple = (1, 2, 16),
        add_last_motion: bool = True,
        zero_timestep: bool = True,
        rope_max_seq_len: int = 1024,
        ref_rope_time: int = 30,
    ):
        super().__init__()
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={qk_norm!r}: only 'rms_norm_across_heads' (the S2V checkpoint) is built")
        if adain_mode != "attn_norm":
            raise ValueError(f"adain_mode={adain_mode!r}: only 'attn_norm' (the S2V checkpoint) is built")
        if not enable_framepack:
            raise ValueError("enable_framepack=False (the transformer motioner) is not part of the S2V checkpoint")
        if tuple(zip_frame_buckets) != (1, 2, 16):
            raise ValueError(f"zip_frame_buckets={zip_frame_buckets}: the framepack kernels need (1, 2, 16)")
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim

        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = ConditionEmbedder(self.config)
        self.blocks = nn.ModuleList(
            [S2VTransformerBlock(dim, ffn_dim, num_attention_heads, eps, cross_attn_norm) for _ in range(num_layers)]
        )
        self.audio_injector = AudioInjector(dim, num_attention_heads, len(audio_inject_layers), eps, enable_adain)
        self.trainable_condition_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotion(in_channels, dim, zip_frame_buckets, framepack_drop_mode)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, out_channels * patch_size[0] * patch_size[1] * patch_size[2])

        self.injector_of_block = {block: i for i, block in enumerate(audio_inject_layers)}
        self.gradient_checkpointing = False
        self.checkpoint_interval = 1
        self.checkpoint_policy = "full"
        # Keep the residual stream in fp32 between blocks, as the official model does. Off = cast back to the
        # compute dtype after each block (the diffusers port's behaviour, half the activation memory).
        self.residual_fp32 = True
        self._host_store: HostActivationStore | None = None
        self._streamer = None
        self._rope_cache: dict = {}
        # CREPA (engine.train.crepa): the output of block `capture_block` is kept, as the video tokens per latent
        # frame [B, T, h, w, D], in `captured` after each forward with grad enabled; -1 = nothing kept.
        self.capture_block = -1
        self.captured: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = "transformer",
                        torch_dtype: torch.dtype | None = None, device="cpu", low_bit=None, **kwargs):
        """Load a diffusers-layout or native-layout transformer folder (or hub id) strictly; see loading.py.
        `low_bit` (engine.models.low_bit_linear.LowBitSpec): those Linears are quantised as they are loaded."""
        if kwargs:
            raise TypeError(f"unsupported from_pretrained arguments: {sorted(kwargs)}")
        return loading.load_transformer(cls, pretrained_model_name_or_path, subfolder, torch_dtype, device, low_bit)

    # ---- switches -------------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, interval: int = 1, offload_inputs: bool = False,
                                      policy: str = "full", gpu_saved_inputs: int = 0) -> None:
        """Recompute every `interval`-th block (with its audio injector) in the backward pass.

        offload_inputs: keep the saved block inputs in pinned host memory (see offload_checkpoint.py).
        gpu_saved_inputs: with offload_inputs, the inputs of the last N checkpointed blocks stay on the GPU (the
        backward needs them first, so it starts without waiting for a host copy); the earlier ones are offloaded.
        policy: "full" recomputes the whole block; "save_attention" keeps the self-attention outputs and
        recomputes the rest (selective checkpointing; one more [S, D] tensor per block, no S^2 recompute).
        """
        if interval < 1:
            raise ValueError("checkpoint interval must be >= 1")
        if gpu_saved_inputs < 0:
            raise ValueError(f"gpu_saved_inputs={gpu_saved_inputs}: a number of saved block inputs, >= 0")
        if policy not in ("full", "save_attention"):
            raise ValueError(f"checkpoint policy {policy!r}: choose 'full' or 'save_attention'")
        if policy != "full" and offload_inputs:
            # A run never gets here: engine.train.allowed.setting_problems refuses the same combination by its
            # config keys (SAVE_ATTENTION_CONFLICT) in the check phase. This guards direct callers.
            raise ValueError("selective checkpointing keeps tensors on the GPU; it does not combine with "
                             "offloaded block inputs (choose one)")
        self.checkpoint_policy = policy
        self.gradient_checkpointing = True
        self.checkpoint_interval = interval
        self._host_store = HostActivationStore(keep_last=gpu_saved_inputs) if offload_inputs else None

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def enable_block_streaming(self, resident: int = 0, device=None) -> int:
        """Keep the frozen weights of blocks (and their audio injectors) in pinned host memory, streamed to the
        GPU ahead of use; the first `resident` blocks stay on the GPU, and so does everything else (embeddings,
        head, LoRA weights). Call after adding the LoRA adapters and after any low-bit quantisation (the low-bit
        storage is what streams); the model may be on the CPU (so a 24 GB card never holds the whole model) or
        already on `device`. Returns the bytes now held in host memory."""
        from engine.models.block_stream import BlockStreamer

        device = torch.device(device) if device is not None else self.patch_embedding.weight.device
        block_of_injector = {inj: blk for blk, inj in self.injector_of_block.items()}
        units = [[b] for b in self.blocks]
        for inj, blk in block_of_injector.items():
            units[blk].append(self.audio_injector.injector[inj])
            if self.audio_injector.injector_adain_layers is not None:
                units[blk].append(self.audio_injector.injector_adain_layers[inj])
        self._streamer = BlockStreamer(units, device, resident)
        # Everything the streamer does not hold goes to the device; the streamed tensors (low-bit Linears' buffers
        # among them) stay where it put them.
        streamed = {id(t) for unit in self._streamer.units for t, _ in unit.tensors}
        for p in self.parameters():
            if id(p) not in streamed:
                p.data = p.data.to(device)
        for module in self.modules():
            for name, buf in module._buffers.items():
                if buf is not None and id(buf) not in streamed:
                    module._buffers[name] = buf.to(device)
        return self._streamer.host_bytes()

    def compile_blocks(self, routed: bool = False, **compile_kwargs) -> None:
        """Regional torch.compile: each block and each audio-injector module, sharing one graph per kind.

        Fuses the fp32 norm / modulation / RoPE element-wise work that otherwise dominates the step's memory
        traffic; compile time stays in seconds because only one block-sized graph is traced.

        Graph count: dynamo compiles a module's first input shape statically and, at its second shape, one graph
        with the changed sizes dynamic (automatic dynamic shapes), which serves every later shape. So each kind
        (block, injector attention, AdaLN; the no-grad forward and the recompute apart) compiles at most twice,
        whatever the buckets.

        `routed` (TREAD): the routed blocks see a shorter sequence and routed injectors fewer tokens per frame, so
        one step runs a kind at two lengths. Such modules are compiled dynamic from their first call, so both
        lengths run the same graphs (one per kind and grad mode): with a static graph for the first length and a dynamic one made later in the same step, a block
        checkpointed under the static graph would be recomputed by the dynamic one, whose saved tensors have other
        strides (inductor pads a static graph's buffers, never a dynamic one's), and the static backward fails on
        them. A later subset, ratio or bucket compiles nothing (tests/test_tread.py).
        """
        if routed:
            compile_kwargs.setdefault("dynamic", True)
        for block in self.blocks:
            block.compile(**compile_kwargs)
        for attn in self.audio_injector.injector:
            attn.compile(**compile_kwargs)
        if self.audio_injector.injector_adain_layers is not None:
            for ada in self.audio_injector.injector_adain_layers:
                ada.compile(**compile_kwargs)

    def set_ffn_chunk_size(self, tokens: int | None) -> None:
        """Run each FFN over the sequence in chunks of `tokens` (None: whole sequence)."""
        for block in self.blocks:
            block.ffn.chunk_size = tokens

    # ---- pieces of the forward ------------------------------------------------------------------------
    def _rope(self, key, device):
        cached = self._rope_cache.get((key, device))
        if cached is None:
            positions = sequence_positions(*key[:3], ref_time=self.config.ref_rope_time,
                                           include_newest=key[3], include_2x=key[4])
            cached = rope_cos_sin(positions, self.config.attention_head_dim, device)
            self._rope_cache = {(key, device): cached}  # one live shape at a time (buckets change rarely)
        return cached

    def _time_modulation(self, timestep: torch.Tensor):
        """e [B, D] for the head and e0 [B, 6, 2, D] per segment (video: t, reference/motion: 0 if zero_timestep)."""
        ce = self.condition_embedder
        b = timestep.shape[0]
        t = timestep.float()
        if self.config.zero_timestep:
            t = torch.cat([t, t.new_zeros(1)])
        e = ce.time_embedder(timestep_sinusoid(t, self.config.freq_dim))
        e0 = linear_fp32(ce.time_proj, F.silu(e)).unflatten(1, (6, self.inner_dim))
        if self.config.zero_timestep:
            e0 = torch.stack([e0[:b], e0[b:].expand(b, -1, -1)], dim=2)
            e = e[:b]
        else:
            e0 = torch.stack([e0, e0], dim=2)
        return e, e0

    def _audio_tokens(self, audio_features: torch.Tensor, motion_frames):
        """Prepend motion_frames[0] copies of the first frame, encode, drop the first motion_frames[1] steps."""
        lead = audio_features[..., :1].expand(*audio_features.shape[:-1], motion_frames[0])
        feats = torch.cat([lead, audio_features], dim=-1)
        glob, local = self.condition_embedder.causal_audio_encoder(feats)
        drop = motion_frames[1]
        return local[:, drop:], (glob[:, drop:] if glob is not None else None)

    def _patchify(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        return conv(x.to(conv.weight.dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        ref_latents: torch.Tensor,
        audio_features: torch.Tensor,
        motion_latents: torch.Tensor | None = None,
        pose_latents: torch.Tensor | None = None,
        motion_frames=(73, 19),
        add_last_motion: int = 2,
        drop_motion_frames: bool = False,
        route: tread.TokenRoute | None = None,
    ) -> torch.Tensor:
        """`route`: TREAD token routing of this training forward (engine/models/tread.py); None runs every token
        through every block, as sampling always does."""
        cfg = self.config
        b, _, t, h, w = hidden_states.shape
        pt, ph, pw = cfg.patch_size
        compute_dtype = self.patch_embedding.weight.dtype
        residual_dtype = torch.float32 if self.residual_fp32 else compute_dtype
        add_last_motion = int(cfg.add_last_motion) * add_last_motion

        audio_local, audio_global = self._audio_tokens(audio_features, motion_frames)
        n_audio = audio_local.shape[1]
        if n_audio != t // pt:
            raise ValueError(
                f"audio gives {n_audio} latent steps but the video has {t // pt} latent frames: pass one wav2vec2 "
                f"vector per pixel frame ({4 * (t // pt)} columns for {t // pt} latents)"
            )

        # Video tokens (+ pose), then reference tokens, then motion tokens: one sequence.
        x = self._patchify(self.patch_embedding, hidden_states)
        pose_conv = self.condition_embedder.pose_embedder
        if pose_latents is None:
            x = x + pose_conv.bias.to(x.dtype).view(1, -1, 1, 1, 1)  # conv of zeros == its bias
        else:
            x = x + self._patchify(pose_conv, pose_latents)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        n_video = x.shape[1]
        ref = self._patchify(self.patch_embedding, ref_latents)
        ref_grid = tuple(ref.shape[3:])
        parts = [x, ref.flatten(2).transpose(1, 2)]

        use_motion = not drop_motion_frames and motion_latents is not None
        drop_mode = cfg.framepack_drop_mode == "drop"
        if use_motion:
            parts.append(self.frame_packer(motion_latents, add_last_motion))
        x = torch.cat(parts, dim=1)
        segment = torch.ones(x.shape[1], dtype=torch.long, device=x.device)
        segment[:n_video] = 0
        segment[n_video + parts[1].shape[1]:] = 2
        x = x + self.trainable_condition_mask(segment).to(x.dtype)[None]

        rope_key = (
            grid,
            ref_grid,
            tuple(motion_latents.shape[3:]) if use_motion else None,
            not (drop_mode and add_last_motion < 2),
            not (drop_mode and add_last_motion < 1),
        )
        rope = self._rope(rope_key, x.device)

        e, e0 = self._time_modulation(timestep)
        context = encoder_hidden_states
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.condition_embedder.text_embedder(context)

        routing = self._routing(route, grid, x.device)
        self.captured = None
        x = self._run_blocks(x, (e0, n_video, rope, context, residual_dtype, audio_local, audio_global), routing)
        if self.captured is not None:  # the video tokens come first in the sequence, in (t, h, w) order
            self.captured = self.captured[:, :n_video].unflatten(1, grid)

        x = x[:, :n_video]
        shift, scale = (self.scale_shift_table.float() + e[:, None]).chunk(2, dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the official head runs in fp32
            x = F.layer_norm(x.float(), (x.shape[-1],), eps=cfg.eps) * (1 + scale) + shift
        out = linear_fp32(self.proj_out, x)
        gt, gh, gw = grid
        out = out.view(b, gt, gh, gw, pt, ph, pw, cfg.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_channels, gt * pt, gh * ph, gw * pw)

    def _routing(self, route: tread.TokenRoute | None, grid, device):
        """(first routed block, last routed block, kept video token indices) for `route`, or None."""
        if route is None:
            return None
        if not self.training:
            raise RuntimeError("a TREAD route was passed to a model in eval mode: token routing is for training "
                               "only (sampling and the eval loss run every token through every block)")
        first, last = tread.resolve_span(route.start, route.end, len(self.blocks))
        frames, gh, gw = grid
        kept = tread.draw_kept(frames, gh * gw, route.selection_ratio, route.generator)
        return first, last, kept.to(device)

    def _run_blocks(self, x, rest, routing=None):
        streamer = self._streamer
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        if streamer is not None and torch.is_grad_enabled() and not (recompute and self.checkpoint_interval == 1):
            raise RuntimeError("block streaming trains only with gradient checkpointing of every block "
                               "(enable_gradient_checkpointing(interval=1)): a streamed block's weights leave the "
                               "GPU after its forward, so its backward must recompute it")
        store = self._host_store
        if recompute and streamer is not None and store is None:
            store = self._inplace_store = getattr(self, "_inplace_store", None) or HostActivationStore(offload=False)
        if recompute and store is not None:
            # TREAD: slot n holds the n-th saved input of every step, so a routed block's slot is sized by its own
            # shorter input (slots go by bytes; one grows once if a later input outgrows it, as at a bucket change).
            store.begin_step(saves=-(-len(self.blocks) // self.checkpoint_interval))
        first, last, kept = routing if routing is not None else (-1, -1, None)
        full_rest, saved_video = rest, None
        for i in range(len(self.blocks)):
            if i == first:
                # Outside any checkpointed function: the gather and the scatter below are cheap, and the recompute
                # of a routed block then sees only its own (shorter) input. The pre-route hidden states stay on the
                # GPU through the span's forward (one [B, S, D] tensor, what the skipped tokens come back as);
                # autograd keeps nothing of them (the gather and the scatter save only the indices).
                x, saved_video = tread.route_in(x, kept, rest[1])
                e0, n_video, rope, *others = rest
                rest = (e0, kept.shape[0], tread.routed_rope(rope, kept, n_video), *others)
            if streamer is not None:
                streamer.ensure(i)
                streamer.fetch(i + 1)
            if recompute and i % self.checkpoint_interval == 0:
                if store is not None:
                    hooks = {}
                    if streamer is not None:
                        hooks = dict(before_backward=functools.partial(self._stream_in_for_backward, i),
                                     after_backward=functools.partial(streamer.release, i))
                    x = host_checkpoint(functools.partial(self._block_and_injector, i), x, store, *rest, **hooks)
                elif self.checkpoint_policy == "save_attention":
                    x = checkpoint(self._block_and_injector, i, x, *rest, use_reentrant=False,
                                   context_fn=_selective_context)
                else:
                    x = checkpoint(self._block_and_injector, i, x, *rest, use_reentrant=False)
            else:
                x = self._block_and_injector(i, x, *rest)
            if streamer is not None:
                streamer.release(i)
            if i == last:
                x, rest, saved_video = tread.route_out(x, saved_video, kept), full_rest, None
            if i == self.capture_block and torch.is_grad_enabled():
                tread.check_capture_outside(first, last, i)  # the trainer checked it; a caller may not have
                # The block's output as the next block receives it (the checkpointed blocks save it as their
                # input anyway), so keeping it adds no memory unless those inputs are offloaded to the host.
                # Training forwards only: validation, the eval loss and rollout forwards run without grad.
                self.captured = x
        return x

    def _stream_in_for_backward(self, i: int) -> None:
        self._streamer.ensure(i)
        self._streamer.fetch(i - 1)

    def _block_and_injector(self, i, x, e0, n_video, rope, context, residual_dtype, audio_local, audio_global):
        x = self.blocks[i](x, e0, n_video, rope, context, residual_dtype)
        inj = self.injector_of_block.get(i)
        if inj is not None:
            x = self.audio_injector(inj, x, audio_local, audio_global, n_video)
        return x


def block_count(folder) -> int:
    """How many blocks the transformer in the local `folder` has: its config.json's num_layers (both config layouts
    name it so), or the class default (the 14B's 40) when the file leaves it out, as the model is then built."""
    import inspect
    import json

    raw = json.loads((Path(folder) / loading.CONFIG_NAME).read_text(encoding="utf-8"))
    default = inspect.signature(S2VTransformer3DModel.__init__).parameters["num_layers"].default
    return int(raw.get("num_layers", default))
