"""Building blocks of the Wan 2.2 S2V transformer.

Module and parameter names follow the diffusers-checkpoint layout (`attn1.to_q`, `ffn.net.0.proj`, ...), so a
state dict in that layout loads as is and the native layout is a table lookup away (see `keymap.py`).

Numerics follow the official model (spec section 3): layer norms and RMS norms are computed in fp32 and cast
back to the input dtype; every modulation product is fp32; RoPE is applied in fp32 (the official code uses
fp64, which differs from fp32 by far less than the 1e-5 fidelity budget).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.models.attention import attention


def layer_norm_fp32(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in fp32, returned in the input dtype (the official `WanLayerNorm`)."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


class RMSNormAcrossHeads(nn.Module):
    """RMSNorm over the full projection width (all heads at once), learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, S, H, Dh] by angles given as cos/sin [S, Dh/2] (fp32)."""
    b, s, h, d = x.shape
    pairs = x.float().reshape(b, s, h, d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    sn = sin[None, :, None, :]
    out = torch.stack((re * c - im * sn, re * sn + im * c), dim=-1)
    return out.flatten(3).to(x.dtype)


class S2VAttention(nn.Module):
    """q/k/v/o with biases, RMSNorm on q and k over the full width (native: `q, k, v, o, norm_q, norm_k`)."""

    fp8_ratios: torch.Tensor | None = None  # attention backend cudnn_fp8's scaling state (attach_fp8_ratios)

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = RMSNormAcrossHeads(dim, eps)
        self.norm_k = RMSNormAcrossHeads(dim, eps)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        """Self-attention when `context` is None (with RoPE), cross-attention otherwise (no RoPE)."""
        dtype = self.norm_q.weight.dtype  # the model's compute dtype; to_q may be wrapped or quantised
        x = x.to(dtype)
        kv_in = x if context is None else context.to(dtype)
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(kv_in)))
        v = self._heads(self.to_v(kv_in))
        if rope is not None:
            q = apply_rope(q, *rope)
            k = apply_rope(k, *rope)
        out = attention(q, k, v, self_attention=context is None, fp8_ratios=self.fp8_ratios)
        return self.to_out[0](out.flatten(2))


class GELUTanhProj(nn.Module):
    """First FFN layer: Linear then GELU(tanh) (diffusers name `ffn.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """GELU(tanh) MLP; optionally run over the sequence in chunks to bound the wide intermediate."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUTanhProj(dim, ffn_dim), nn.Dropout(0.0), nn.Linear(ffn_dim, dim)])
        self.chunk_size: int | None = None

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dtype)
        if not self.chunk_size or x.shape[1] <= self.chunk_size:
            return self._run(x)
        return torch.cat([self._run(c) for c in x.split(self.chunk_size, dim=1)], dim=1)


def modulate_segments(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, n_video: int) -> torch.Tensor:
    """x*(1+scale)+shift in fp32, with the video segment and the reference/motion segment modulated apart.

    scale/shift: [B, 2, D] (row 0 video, row 1 everything after the first n_video tokens).
    """
    xf = x.float()
    video = xf[:, :n_video] * (1 + scale[:, 0:1]) + shift[:, 0:1]
    cond = xf[:, n_video:] * (1 + scale[:, 1:2]) + shift[:, 1:2]
    return torch.cat([video, cond], dim=1)


def gate_segments(y: torch.Tensor, gate: torch.Tensor, n_video: int) -> torch.Tensor:
    yf = y.float()
    return torch.cat([yf[:, :n_video] * gate[:, 0:1], yf[:, n_video:] * gate[:, 1:2]], dim=1)


class S2VTransformerBlock(nn.Module):
    """Self-attention (modulated, RoPE), text cross-attention (affine LayerNorm), FFN (modulated).

    Diffusers names: norm2 is the affine cross-attention norm (native `norm3`); the FFN pre-norm (native
    `norm2`) and the self-attention pre-norm carry no parameters.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6, cross_attn_norm: bool = True):
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.attn1 = S2VAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.attn2 = S2VAttention(dim, num_heads, eps)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x, e0, n_video: int, rope, context, residual_dtype: torch.dtype) -> torch.Tensor:
        """x [B, S, D]; e0 [B, 6, 2, D] fp32 (per-segment modulation, segment 1 = t=0 for ref/motion)."""
        mod = self.scale_shift_table.float().unsqueeze(2) + e0  # [B, 6, 2, D]
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.unbind(1)

        h = modulate_segments(layer_norm_fp32(x, self.eps), scale_a, shift_a, n_video)
        y = self.attn1(h, rope=rope)
        x = (x.float() + gate_segments(y, gate_a, n_video)).to(residual_dtype)

        if isinstance(self.norm2, nn.LayerNorm):
            normed = layer_norm_fp32(x, self.eps, self.norm2.weight, self.norm2.bias)
        else:
            normed = x
        x = (x.float() + self.attn2(normed, context=context).float()).to(residual_dtype)

        h = modulate_segments(layer_norm_fp32(x, self.eps), scale_f, shift_f, n_video)
        y = self.ffn(h, self.attn1.norm_q.weight.dtype)
        return (x.float() + gate_segments(y, gate_f, n_video)).to(residual_dtype)


class AdaLayerNormFromAudio(nn.Module):
    """AdaLN of the audio injector: LN(x, eps 1e-5) * (1 + scale) + shift, [shift | scale] = Linear(SiLU(g))."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, global_token: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        emb = self.linear(F.silu(global_token.to(w.dtype)))
        shift, scale = emb.float().chunk(2, dim=-1)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
        return normed * (1 + scale[:, None, :]) + shift[:, None, :]


class AudioInjector(nn.Module):
    """Per-frame audio cross-attention added to the video tokens after selected blocks."""

    def __init__(self, dim: int, num_heads: int, num_injectors: int, eps: float = 1e-6, enable_adain: bool = True):
        super().__init__()
        self.injector = nn.ModuleList([S2VAttention(dim, num_heads, eps) for _ in range(num_injectors)])
        self.injector_adain_layers = (
            nn.ModuleList([AdaLayerNormFromAudio(dim) for _ in range(num_injectors)]) if enable_adain else None
        )

    def forward(self, idx: int, x: torch.Tensor, audio_local, audio_global, n_video: int) -> torch.Tensor:
        """x [B, S, D]; audio_local [B, T, 5, D]; audio_global [B, T, 1, D]; acts on the first n_video tokens."""
        b, t = audio_local.shape[:2]
        video = x[:, :n_video]
        if n_video % t:
            raise ValueError(f"{n_video} video tokens cannot be split into {t} audio frames")
        frames = video.reshape(b * t, n_video // t, video.shape[-1])
        if self.injector_adain_layers is not None:
            frames = self.injector_adain_layers[idx](frames, audio_global.reshape(b * t, -1))
        else:
            frames = F.layer_norm(frames.float(), (frames.shape[-1],), eps=1e-6)
        out = self.injector[idx](frames, context=audio_local.reshape(b * t, audio_local.shape[2], -1))
        out = out.reshape(b, n_video, -1)
        return torch.cat([(video.float() + out.float()).to(x.dtype), x[:, n_video:]], dim=1)


class CausalConv1d(nn.Module):
    """Conv1d with replicate left padding of kernel-1 steps (native `convK.conv`)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0), mode="replicate"))


class CausalAudioEncoderCore(nn.Module):
    """Local (num_tokens tokens per step) and global (1 token) branches sharing conv2/conv3, stride 4 in time."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int, need_global: bool = True):
        super().__init__()
        self.num_tokens = num_tokens
        quarter = dim // 4
        self.conv1_local = CausalConv1d(in_dim, quarter * num_tokens)
        self.conv1_global = CausalConv1d(in_dim, quarter) if need_global else None
        self.conv2 = CausalConv1d(quarter, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim) if need_global else None
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    @staticmethod
    def _ln_silu(x_bct: torch.Tensor) -> torch.Tensor:
        """LayerNorm over channels (no affine, eps 1e-6) then SiLU; in [N, C, T], out [N, T, C]."""
        x = x_bct.transpose(1, 2)
        return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))

    def _shared(self, x_bct: torch.Tensor) -> torch.Tensor:
        x = self._ln_silu(x_bct)
        x = self._ln_silu(self.conv2(x.transpose(1, 2)))
        return self._ln_silu(self.conv3(x.transpose(1, 2)))  # [N, T', dim]

    def forward(self, feats: torch.Tensor):
        """feats [B, T, in_dim] -> (global [B, T', 1, dim] or None, local [B, T', num_tokens+1, dim])."""
        b = feats.shape[0]
        x = feats.transpose(1, 2)
        local = self.conv1_local(x)  # [B, n*c, T]; channels grouped token-major
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B*n, c, T]
        local = self._shared(local)
        local = local.unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', n, dim]
        pad = self.padding_tokens.to(local.dtype).expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad], dim=2)
        if self.conv1_global is None:
            return None, local
        glob = self.final_linear(self._shared(self.conv1_global(x)))
        return glob.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """Mix of the wav2vec2 hidden states with SiLU-activated learned weights, then the causal encoder (fp32)."""

    def __init__(self, in_dim: int, dim: int, num_layers: int, num_tokens: int, need_global: bool = True):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = CausalAudioEncoderCore(in_dim, dim, num_tokens, need_global)

    def forward(self, features: torch.Tensor):
        """features [B, num_layers, in_dim, T] -> see CausalAudioEncoderCore.forward."""
        w = F.silu(self.weights.float())
        mixed = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, in_dim, T]
        enc = self.encoder
        with torch.autocast(device_type=features.device.type, enabled=False):
            return _run_fp32(enc, mixed.transpose(1, 2))


def _run_fp32(module: nn.Module, x: torch.Tensor):
    """Run a (possibly bf16) module in fp32 without copying it: functional calls on upcast parameters."""
    params = {n: p.float() for n, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


class FramePackMotion(nn.Module):
    """Motion latents as tokens at three compressions: newest 1 frame (1,2,2), next 2 (2,4,4), oldest 16 (4,8,8)."""

    def __init__(self, in_channels: int, dim: int, buckets=(1, 2, 16), drop_mode: str = "padd"):
        super().__init__()
        self.buckets = tuple(buckets)
        self.drop_mode = drop_mode
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor, add_last_motion: int) -> torch.Tensor:
        """motion [B, C, Tm, h, w] -> tokens [B, N_m, D], ordered newest(1) | 2x | 4x."""
        total = sum(self.buckets)
        b, c, tm, h, w = motion.shape
        padded = motion.new_zeros(b, c, total, h, w)
        keep = min(total, tm)
        if keep:
            padded[:, :, total - keep:] = motion[:, :, tm - keep:]
        drop = self.drop_mode == "drop"
        if add_last_motion < 2 and not drop:
            # "padd": zero the newest frames instead of removing their tokens.
            zero_n = sum(self.buckets[: len(self.buckets) - add_last_motion - 1])
            padded[:, :, total - zero_n:] = 0
        n4, n2, n1 = self.buckets[::-1]
        lat_4x, lat_2x, lat_1 = padded.split([n4, n2, n1], dim=2)
        dtype = self.proj.weight.dtype
        tok_1 = self.proj(lat_1.to(dtype)).flatten(2).transpose(1, 2)
        tok_2 = self.proj_2x(lat_2x.to(dtype)).flatten(2).transpose(1, 2)
        tok_4 = self.proj_4x(lat_4x.to(dtype)).flatten(2).transpose(1, 2)
        if drop and add_last_motion < 2:
            tok_1 = tok_1[:, :0]
            if add_last_motion < 1:
                tok_2 = tok_2[:, :0]
        return torch.cat([tok_1, tok_2, tok_4], dim=1)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos | sin](t * 10000^(-k/half)) computed in fp64, returned fp32 (the official embedding)."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float()


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """An fp32 Linear whatever the weights' dtype, also inside a bf16 autocast region (as the official model)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
