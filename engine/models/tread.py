"""TREAD token routing (training only): a random part of the noisy-video tokens skips a span of blocks.

At the first routed block the video tokens chosen to skip are taken out of the sequence; the span's blocks (and
the audio injectors that follow them) run on the kept video tokens plus the whole reference and motion streams;
after the last routed block the kept tokens go back to their places and the skipped ones come back as they were
before the span (the pre-route hidden states, saved). The head, and so the loss, sees every token.

What each part of a block needs, and how routing meets it:
- RoPE is per token: the kept tokens take their own rows of the position tables (`routed_rope`), so a kept
  token's attention sees the same relative positions as without routing.
- Modulation is per segment (video, reference/motion: e0 [B, 6, 2, D]), not per token: the block splits the
  segments at the video token count, which inside the span is the kept count.
- Text enters by cross-attention (every query alone): nothing to route.
- The audio injector attends per latent frame: it cuts the video tokens into T equal frames and gives each frame
  its own audio tokens. The selection is therefore stratified: every latent frame keeps the same number of its
  tokens, in their order, so the kept tokens cut into T equal groups are exactly each frame's kept tokens, and
  the injector needs no change (it is called with the kept count). An injector inside the span acts on the kept
  tokens only; the skipped ones skip it like they skip the blocks, which is what TREAD is.
- One subset is drawn per micro-batch and shared by its samples (one RoPE table for the batch). With several
  processes every rank draws the same one from its own copy of the generator, so a global batch has one subset
  whatever the number of processes, as one process of that batch would have.

The subset comes from the trainer's route generator (a CPU torch.Generator saved in every checkpoint, like the
noise generator), so a resumed run draws the same subsets as an uninterrupted one. Ratio 0 keeps every token and
runs the same gather and scatter: the result is bit-identical to no routing (tests/test_tread.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenRoute:
    """What the trainer passes to the model's forward to route one micro-batch (config [tread])."""

    selection_ratio: float  # fraction of each latent frame's video tokens that skip the span
    start: int  # first routed block; negative counts from the end
    end: int  # last routed block, inclusive; negative counts from the end
    generator: torch.Generator  # the trainer's route generator (CPU)


def resolve_span(start: int, end: int, num_layers: int) -> tuple[int, int]:
    """(first, last) routed block as indices into the model's blocks; an empty or out-of-range span is an error."""
    first = start + num_layers if start < 0 else start
    last = end + num_layers if end < 0 else end
    if not 0 <= first <= last < num_layers:
        raise ValueError(
            f"tread.start_layer_idx = {start} and tread.end_layer_idx = {end} name blocks {first}..{last} of a model "
            f"with {num_layers} blocks: choose 0 <= start <= end <= {num_layers - 1} (negative indices count from "
            "the end, -1 = the last block)")
    return first, last


def check_capture_outside(first: int, last: int, block: int) -> None:
    """CREPA reads one block's output per latent frame; inside the routed span [first, last) that output holds only
    the kept tokens (the span's last block already hands back every token), so such a block is refused."""
    if first <= block < last:
        raise ValueError(
            f"crepa.block_index = {block} lies inside the TREAD span (blocks {first}..{last}), where the block's "
            f"output holds only the kept video tokens: set crepa.block_index below {first} or to {last} or later, "
            f"or tread.start_layer_idx past {block}")


def kept_per_frame(per_frame: int, ratio: float) -> int:
    """Tokens of one latent frame that go through the span: the frame's count less ratio of it, rounded."""
    keep = per_frame - int(ratio * per_frame + 0.5)
    if keep < 1:
        raise ValueError(f"tread.selection_ratio = {ratio:g} leaves none of a latent frame's {per_frame} video tokens "
                         "in the routed blocks: lower selection_ratio")
    return keep


def draw_kept(frames: int, per_frame: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Indices [frames * keep] (ascending) into the frame-major video tokens of those that go through the span:
    the same number in every latent frame, chosen at random within it."""
    keep = kept_per_frame(per_frame, ratio)
    scores = torch.rand(frames, per_frame, generator=generator, device=generator.device)
    chosen = scores.argsort(dim=1, stable=True)[:, :keep].sort(dim=1).values
    offsets = torch.arange(frames, device=chosen.device)[:, None] * per_frame
    return (chosen + offsets).flatten()


def routed_rope(rope: tuple[torch.Tensor, torch.Tensor], kept: torch.Tensor, n_video: int):
    """The (cos, sin) rows of the kept video tokens, then those of the reference and motion tokens."""
    cos, sin = rope
    rows = torch.cat([kept, torch.arange(n_video, cos.shape[0], device=kept.device)])
    return cos.index_select(0, rows), sin.index_select(0, rows)


def route_in(x: torch.Tensor, kept: torch.Tensor, n_video: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the routed sequence: kept video tokens then the rest, the video part of x as it is before the span)."""
    video = x[:, :n_video]
    return torch.cat([video.index_select(1, kept), x[:, n_video:]], dim=1), video


def route_out(x: torch.Tensor, saved_video: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The full sequence after the span: the kept tokens' outputs at their places among the saved video tokens,
    then the reference and motion tokens. The saved tokens take the span's output dtype (the residual dtype; the
    cast from the embeddings' dtype is exact)."""
    n_kept = kept.shape[0]
    video = saved_video.to(x.dtype).index_copy(1, kept, x[:, :n_kept])
    return torch.cat([video, x[:, n_kept:]], dim=1)
