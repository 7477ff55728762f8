"""Which attention the encoder uses for a clip, and local (banded) relative-position attention.

Full attention costs memory and time in the square of a clip's length. Local attention lets every frame attend to
the `context` frames on each side of it, as NeMo's `rel_pos_local_attn` does (its
`RelPositionMultiHeadAttentionLongformer` with a `LocalAttRelPositionalEncoding` table of offsets +w .. -w), with
the same weights, in memory and time linear in the length. `AttentionPolicy` decides per clip: `auto` keeps full
attention up to `full_attention_max_seconds` and switches to local attention past it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
from torch.nn import functional as F

FULL = "full"
LOCAL = "local"
AUTO = "auto"
DEFAULT_LOCAL_CONTEXT = 256
DEFAULT_FULL_ATTENTION_MAX_SECONDS = 600.0
MASKED_SCORE = -10000.0

AttentionSpec = Union[str, int, tuple, list, "AttentionPolicy"]


@dataclass(frozen=True)
class AttentionPolicy:
    """`full`, `local` (symmetric context of `context` encoder frames) or `auto` (full up to a clip length, then local)."""

    mode: str = AUTO
    context: int = DEFAULT_LOCAL_CONTEXT
    full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS

    def __post_init__(self):
        if self.mode not in (FULL, LOCAL, AUTO):
            raise ValueError(f"attention mode {self.mode!r} is not one of 'full', 'auto' or a local context")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"local attention context must be a positive number of encoder frames, got {self.context!r}")
        seconds = self.full_attention_max_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"full_attention_max_seconds must be a finite number >= 0, got {seconds!r}")

    @classmethod
    def parse(cls, attention: AttentionSpec = AUTO, *,
              full_attention_max_seconds: float = DEFAULT_FULL_ATTENTION_MAX_SECONDS) -> "AttentionPolicy":
        """From `"full"`, `"auto"`, a context `N` (or `"N"`), or `(left, right)` with left == right.

        NeMo's banded implementation misaligns its position term when left != right, so only equal contexts are
        accepted; `auto` uses local attention with the default context of 256 frames past the limit.
        """
        if isinstance(attention, AttentionPolicy):
            return attention
        if isinstance(attention, str):
            text = attention.strip().lower()
            if text in (FULL, AUTO):
                return cls(text, full_attention_max_seconds=float(full_attention_max_seconds))
            parts = [p.strip() for p in text.strip("[]()").split(",")]
            if not all(p.isdigit() for p in parts) or len(parts) not in (1, 2):
                raise ValueError(f"attention must be 'auto', 'full', a context N or (N, N); got {attention!r}")
            attention = tuple(int(p) for p in parts)
        if isinstance(attention, (tuple, list)):
            if len(attention) == 1:
                attention = (attention[0], attention[0])
            if len(attention) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in attention):
                raise ValueError(f"local attention context must be (left, right) integers; got {attention!r}")
            left, right = attention
            if left != right:
                raise ValueError(
                    f"local attention context ({left}, {right}) is asymmetric: only left == right is supported, "
                    "because NeMo's banded attention misaligns its position term when left != right"
                )
            attention = left
        if isinstance(attention, bool) or not isinstance(attention, int):
            raise ValueError(f"attention must be 'auto', 'full', a context N or (N, N); got {attention!r}")
        return cls(LOCAL, attention, float(full_attention_max_seconds))

    def context_for(self, seconds: float) -> int | None:
        """The local context for a clip of this many seconds, or None for full attention."""
        if self.mode == FULL or (self.mode == AUTO and seconds <= self.full_attention_max_seconds):
            return None
        return self.context

    def __str__(self) -> str:
        if self.mode == LOCAL:
            return f"local({self.context}, {self.context})"
        if self.mode == FULL:
            return FULL
        return f"auto(full up to {self.full_attention_max_seconds:g} s, then local({self.context}, {self.context}))"


def _skew(position_scores: torch.Tensor, width: int) -> torch.Tensor:
    """[..., w, 2w+1] scores by offset (column r = key at query + r - w) to [..., w, width] by key slot (row a, slot a + r)."""
    *lead, rows, offsets = position_scores.shape
    padded = F.pad(position_scores, (0, width + 1 - offsets))
    return padded.reshape(*lead, rows * (width + 1))[..., : rows * width].view(*lead, rows, width)


def banded_attention(q_content: torch.Tensor, q_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: torch.Tensor, valid: torch.Tensor, context: int,
                     max_scores: int = 1 << 24) -> torch.Tensor:
    """Relative-position attention over keys within `context` frames of each query, never building a T x T tensor.

    q_content = q + pos_bias_u, q_position = q + pos_bias_v, k, v: [B, H, T, d]; positions: the projected table
    [H, d, 2w+1] of offsets +w .. -w; valid: [B, T]. Queries go in blocks of w, each scoring the 3w keys around it;
    keys out of the band, before the start or past a clip's end get NeMo's -10000 (a zero weight); padded queries
    give zeros. Blocks are processed in groups of at most `max_scores` scores. Returns [B, H, T, d].
    """
    batch, heads, steps, head_dim = k.shape
    w = context
    blocks = -(-steps // w)
    extra = blocks * w - steps
    qc = F.pad(q_content, (0, 0, 0, extra)).view(batch, heads, blocks, w, head_dim)
    qp = F.pad(q_position, (0, 0, 0, extra)).view(batch, heads, blocks, w, head_dim)
    keys = F.pad(k, (0, 0, w, extra + w))
    values = F.pad(v, (0, 0, w, extra + w))
    key_valid = F.pad(valid, (w, extra + w), value=False)
    slot = torch.arange(3 * w, device=k.device)
    row = torch.arange(w, device=k.device)
    band = ((slot[None, :] - row[:, None]) >= 0) & ((slot[None, :] - row[:, None]) <= 2 * w)
    scale = math.sqrt(head_dim)
    out = qc.new_empty(batch, heads, blocks, w, head_dim)
    group = max(1, max_scores // (batch * heads * w * 3 * w))
    for first in range(0, blocks, group):
        last = min(blocks, first + group)
        span = slice(first * w, last * w + 2 * w)
        block_keys = keys[:, :, span].unfold(2, 3 * w, w)  # [B, H, n, d, 3w]
        block_values = values[:, :, span].unfold(2, 3 * w, w).transpose(-1, -2)  # [B, H, n, 3w, d]
        allowed = band & key_valid[:, span].unfold(1, 3 * w, w)[:, None, :, None, :]  # [B, 1, n, w, 3w]
        content = torch.matmul(qc[:, :, first:last], block_keys)
        position = _skew(torch.matmul(qp[:, :, first:last], positions[:, None]), 3 * w)
        scores = ((content + position) / scale).masked_fill_(~allowed, MASKED_SCORE)
        out[:, :, first:last] = torch.matmul(torch.softmax(scores, dim=-1), block_values)
    out = out.view(batch, heads, blocks * w, head_dim)[:, :, :steps]
    return out.masked_fill(~valid[:, None, :, None], 0.0)
