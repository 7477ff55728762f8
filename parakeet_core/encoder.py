"""FastConformer encoder: depthwise-striding subsampling, then Conformer layers with relative positional attention.

Module and parameter names follow NeMo's so a checkpoint's `encoder.*` weights load as they are. Padding never
leaks into valid frames: the subsampling convolutions see zeros past each clip's current length, attention masks
padded keys (and zeroes padded queries), and the convolution module zeroes padded frames before its depthwise
convolution. In fp32 a clip's output in a padded batch therefore equals its output alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import kernels
from .attention import MASKED_SCORE, banded_attention
from .config import EncoderConfig

_MASKED_SCORE = MASKED_SCORE
# Output frames of real input kept on each side of a subsampling time chunk (one is enough; see `_clip`).
_CHUNK_HALO = 2


def _time_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    return torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]


_SUBSAMPLING_KERNEL, _SUBSAMPLING_STRIDE, _SUBSAMPLING_PADDING = 3, 2, 1


def subsampled_length(length, layers: int):
    """The length (int or integer tensor) after `layers` of the subsampling's strided convolutions, each
    `floor((n + 2 * padding - kernel) / stride) + 1`: the encoder's frames for `length` feature frames, the mel bins
    left after them, and the valid lengths between them."""
    for _ in range(layers):
        length = (length + 2 * _SUBSAMPLING_PADDING - _SUBSAMPLING_KERNEL) // _SUBSAMPLING_STRIDE + 1
    return length


class DepthwiseStridingSubsampling(nn.Module):
    """A strided 3x3 convolution then (depthwise strided 3x3 + pointwise 1x1) pairs, each followed by ReLU.

    `conv` keeps NeMo's sequential layout (activations included) so parameter names match.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        channels = config.subsampling_conv_channels
        strided = dict(kernel_size=_SUBSAMPLING_KERNEL, stride=_SUBSAMPLING_STRIDE, padding=_SUBSAMPLING_PADDING)
        layers: list[nn.Module] = [nn.Conv2d(1, channels, **strided), nn.ReLU()]
        for _ in range(config.subsampling_layers - 1):
            layers += [
                nn.Conv2d(channels, channels, groups=channels, **strided),
                nn.Conv2d(channels, channels, kernel_size=1),
                nn.ReLU(),
            ]
        self.conv = nn.Sequential(*layers)
        frequencies = subsampled_length(config.feat_in, config.subsampling_layers)
        self.out = kernels.Linear(channels * frequencies, config.d_model)

    def _convolutions(self, features: torch.Tensor, lengths: torch.Tensor,
                      masked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, T, F] to [B, T', C * F'] and the new lengths; `masked`: zero past each clip's current length
        before every layer, as NeMo's masked convolutions do."""
        x = features.unsqueeze(1)  # [B, 1, T, F]
        mask = _time_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None]
        if masked:
            x = x * mask
        for layer in self.conv:
            x = layer(x)
            if isinstance(layer, nn.Conv2d) and layer.stride != (1, 1):
                lengths = subsampled_length(lengths, 1)
                mask = _time_mask(lengths, x.shape[2]).to(x.dtype)[:, None, :, None]
            if masked:
                x = x * mask
        batch, channels, steps, frequencies = x.shape
        return x.transpose(1, 2).reshape(batch, steps, channels * frequencies), lengths

    def runs_unmasked(self, feature_length: int) -> bool:
        """Whether NeMo, given this clip alone, takes its split-convolution path, which skips the masks.

        With `subsampling_conv_chunking_factor` 1 NeMo splits only inputs of more than 2**31 / channels * 4
        elements (pytorch#80020): about 44 minutes for 256 channels and 128 mel bins. A batch of one cannot be split
        by batch, so it is split by channel and time without masking. With a factor above 1 it always splits.
        """
        frames = (feature_length + 1) * self.config.feat_in  # a clip alone has samples // hop + 1 frames
        if self.config.subsampling_conv_chunking_factor != 1:
            return True
        return frames > 2**31 / self.config.subsampling_conv_channels * 4

    def _output_chunk(self) -> int:
        """Output frames per time chunk, so the first convolution's output stays near 16 M elements."""
        first = self.config.subsampling_conv_channels * (self.config.feat_in // 2 + 1) * (self.factor // 2)
        return max(16, (1 << 24) // first)

    def _clip(self, features: torch.Tensor, length: int, masked: bool) -> torch.Tensor:
        """One clip's features [1, T, F] to projected frames [1, T', d_model], in time chunks on long inputs.

        Each chunk carries `_CHUNK_HALO` output frames of real input on both sides and is cut back to its own
        frames; a chunk starts on a multiple of the subsampling factor, so every layer's frames and masks line up
        with the unchunked computation.
        """
        steps = features.shape[1]
        out_steps = subsampled_length(steps, self.config.subsampling_layers)
        chunk = self._output_chunk()
        if out_steps <= chunk:
            x, _ = self._convolutions(features, features.new_tensor([length], dtype=torch.long), masked)
            return self.out(x)
        pieces = []
        for first in range(0, out_steps, chunk):
            last = min(out_steps, first + chunk)
            start = max(0, (first - _CHUNK_HALO) * self.factor)
            stop = min(steps, (last + _CHUNK_HALO) * self.factor)
            x, _ = self._convolutions(features[:, start:stop],
                                      features.new_tensor([length - start], dtype=torch.long), masked)
            skip = first - start // self.factor
            pieces.append(self.out(x[:, skip : skip + last - first]))
        return torch.cat(pieces, dim=1)

    @property
    def factor(self) -> int:
        return 2 ** self.config.subsampling_layers

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, steps = features.shape[:2]
        unmasked = [self.runs_unmasked(int(n)) for n in lengths]
        out_steps = subsampled_length(steps, self.config.subsampling_layers)
        batched = (not any(unmasked) and out_steps <= self._output_chunk()
                   and (features.device.type != "cpu" or batch == 1))
        if batched:
            x, lengths = self._convolutions(features, lengths)
            return self.out(x), lengths
        # One clip at a time, cropped to its length: on the CPU the first convolutions' outputs (channels x T/2 x
        # F/2 per clip, 40 MB for 12 s) outgrow the caches when batched, and long clips go in time chunks. A clip's
        # frames are the same either way (zero padding past its end, as the batch's masks give).
        out_lengths = subsampled_length(lengths, self.config.subsampling_layers)
        padding_row = self.out(features.new_zeros(1, 1, self.out.in_features))
        x = padding_row.expand(batch, out_steps, -1).clone()
        for row in range(batch):
            length = int(lengths[row])
            # An unmasked clip sees what NeMo's split path sees: its frames plus the one trailing (zero) frame.
            frames = min(steps, length + 1) if unmasked[row] else max(1, length)
            clip = self._clip(features[row : row + 1, :frames], length, masked=not unmasked[row])
            x[row, : clip.shape[1]] = clip[0]
        return x, out_lengths



class RelativePositionalEncoding(nn.Module):
    """Sinusoidal embeddings of relative positions T-1 .. -(T-1), as Transformer-XL uses them."""

    def __init__(self, d_model: int, initial_length: int):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("pe", self._table(initial_length), persistent=False)

    def _table(self, length: int) -> torch.Tensor:
        # Computed on the CPU even when the module is built on the meta device: it is not in the checkpoint.
        positions = torch.arange(length - 1, -length, -1, dtype=torch.float32, device="cpu").unsqueeze(1)
        inverse_frequency = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.float32, device="cpu") * -(math.log(10000.0) / self.d_model)
        )
        table = torch.zeros(positions.shape[0], self.d_model, device="cpu")
        table[:, 0::2] = torch.sin(positions * inverse_frequency)
        table[:, 1::2] = torch.cos(positions * inverse_frequency)
        return table.unsqueeze(0)

    def forward(self, steps: int, dtype: torch.dtype) -> torch.Tensor:
        if self.pe.shape[1] < 2 * steps - 1:
            self.pe = self._table(steps).to(self.pe.device)
        centre = self.pe.shape[1] // 2
        return self.pe[:, centre - steps + 1 : centre + steps].to(dtype)

    def local(self, context: int, dtype: torch.dtype) -> torch.Tensor:
        """The fixed table of offsets +context .. -context that local attention uses (NeMo's LocalAttRelPositionalEncoding)."""
        return self._table(context + 1).to(device=self.pe.device, dtype=dtype)


# Full attention on long clips: position scores (query rows x (2T - 1) positions x heads) held at once, fp32.
_FULL_SCORES_PER_BLOCK = 1 << 25


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.linear1 = kernels.Linear(d_model, d_ff, bias=bias)
        self.linear2 = kernels.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.silu(self.linear1(x)))


class RelPositionSelfAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (content bias u, position bias v)."""

    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.heads = n_heads
        self.head_dim = d_model // n_heads
        self.linear_q = kernels.Linear(d_model, d_model, bias=bias)
        self.linear_k = kernels.Linear(d_model, d_model, bias=bias)
        self.linear_v = kernels.Linear(d_model, d_model, bias=bias)
        self.linear_out = kernels.Linear(d_model, d_model, bias=bias)
        self.linear_pos = kernels.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.head_dim))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.head_dim))

    @staticmethod
    def _relative_shift(scores: torch.Tensor) -> torch.Tensor:
        batch, heads, queries, positions = scores.shape
        shifted = F.pad(scores, (1, 0)).view(batch, heads, positions + 1, queries)
        return shifted[:, :, 1:].reshape(batch, heads, queries, positions)

    def forward_local(self, x: torch.Tensor, pos_emb: torch.Tensor, valid: torch.Tensor, context: int) -> torch.Tensor:
        """Attention within `context` frames on each side; pos_emb is the local table [1, 2 * context + 1, d_model].

        Computed in fp32 whatever the model dtype, as NeMo does under autocast.
        """
        batch, steps, _ = x.shape
        split = (batch, steps, self.heads, self.head_dim)
        q, k, v = (linear(x).view(split).transpose(1, 2).float() for linear in (self.linear_q, self.linear_k, self.linear_v))
        positions = self.linear_pos(pos_emb).float().view(-1, self.heads, self.head_dim).permute(1, 2, 0)
        out = banded_attention(q + self.pos_bias_u.float()[:, None], q + self.pos_bias_v.float()[:, None], k, v,
                               positions, valid, context)
        return self.linear_out(out.to(x.dtype).transpose(1, 2).reshape(batch, steps, -1))

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = x.shape
        split = (batch, steps, self.heads, self.head_dim)
        q = self.linear_q(x).view(split)
        k = self.linear_k(x).view(split).transpose(1, 2)
        v = self.linear_v(x).view(split).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(-1, self.heads, self.head_dim).permute(1, 2, 0)  # [H, d, 2T-1]
        q_content = (q + self.pos_bias_u).transpose(1, 2)
        # The position embeddings are shared by the batch: one product per head over all clips' queries,
        # rather than broadcasting them to every clip.
        q_position = (q + self.pos_bias_v).permute(2, 0, 1, 3)  # [H, B, T, d]
        fully_masked_queries = masked.all(dim=-1)[:, None, :, None]
        rows = max(64, _FULL_SCORES_PER_BLOCK // (self.heads * p.shape[-1]))
        if rows >= steps:
            q_position = q_position.reshape(self.heads, batch * steps, self.head_dim)
            position_scores = torch.matmul(q_position, p).view(self.heads, batch, steps, -1).transpose(0, 1)
            position_scores = self._relative_shift(position_scores)[..., :steps]
            bias = (position_scores / math.sqrt(self.head_dim)).masked_fill(masked[:, None], _MASKED_SCORE)
            out = F.scaled_dot_product_attention(q_content, k, v, attn_mask=bias)
        else:
            # Long clips: a block of queries at a time, so the position scores (T x (2T - 1) per head) and the
            # attention bias are never held for the whole clip; each query row is computed as in one pass.
            out = torch.cat([
                F.scaled_dot_product_attention(
                    q_content[:, :, first : first + rows], k, v,
                    attn_mask=self._shifted_block(q_position, p, first, min(steps, first + rows))
                    .div_(math.sqrt(self.head_dim)).masked_fill_(masked[:, None, first : first + rows], _MASKED_SCORE))
                for first in range(0, steps, rows)
            ], dim=2)
        out = out.masked_fill(fully_masked_queries, 0.0)
        return self.linear_out(out.transpose(1, 2).reshape(batch, steps, -1))

    def _shifted_block(self, q_position: torch.Tensor, p: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Relative-position scores of queries first..last-1 against every key: [B, H, last - first, T].

        Query t takes positions T-1-t .. 2T-2-t of its row of `q_position @ p` (the Transformer-XL shift,
        which `_relative_shift` does for the whole square at once)."""
        heads, batch, steps, dim = q_position.shape
        count, positions = last - first, p.shape[-1]
        raw = torch.matmul(q_position[:, :, first:last].reshape(heads, batch * count, dim), p)
        raw = raw.view(heads, batch, count, positions).transpose(0, 1).contiguous()
        return raw.as_strided((batch, heads, count, steps), (heads * count * positions, count * positions,
                                                             positions - 1, 1), steps - 1 - first)


class ConvolutionModule(nn.Module):
    def __init__(self, d_model: int, kernel_size: int, bias: bool):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d_model, 2 * d_model, kernel_size=1, bias=bias)
        self.depthwise_conv = nn.Conv1d(
            d_model, d_model, kernel_size=kernel_size, padding=(kernel_size - 1) // 2, groups=d_model, bias=bias
        )
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.pointwise_conv2 = nn.Conv1d(d_model, d_model, kernel_size=1, bias=bias)

    @staticmethod
    def _pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        """A kernel-size-1 convolution applied to [B, T, C] as the matrix product it is."""
        return kernels.linear(x, conv.weight[..., 0], conv.bias)

    def forward(self, x: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        x = F.glu(self._pointwise(self.pointwise_conv1, x), dim=-1)
        x = x.masked_fill(padded[:, :, None], 0.0).transpose(1, 2)
        x = F.silu(self.batch_norm(self.depthwise_conv(x))).transpose(1, 2)
        return self._pointwise(self.pointwise_conv2, x)


class ConformerLayer(nn.Module):
    """Macaron feed-forward halves around self-attention and convolution, each pre-normed and residual."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        d_model, bias = config.d_model, config.use_bias
        d_ff = d_model * config.ff_expansion_factor
        self.norm_feed_forward1 = nn.LayerNorm(d_model)
        self.feed_forward1 = FeedForward(d_model, d_ff, bias)
        self.norm_self_att = nn.LayerNorm(d_model)
        self.self_attn = RelPositionSelfAttention(d_model, config.n_heads, bias)
        self.norm_conv = nn.LayerNorm(d_model)
        self.conv = ConvolutionModule(d_model, config.conv_kernel_size, bias)
        self.norm_feed_forward2 = nn.LayerNorm(d_model)
        self.feed_forward2 = FeedForward(d_model, d_ff, bias)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, x, pos_emb, attention_masked, padded, local_context: int | None = None):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        if local_context is None:
            x = x + self.self_attn(self.norm_self_att(x), pos_emb, attention_masked)
        else:
            x = x + self.self_attn.forward_local(self.norm_self_att(x), pos_emb, ~padded, local_context)
        x = x + self.conv(self.norm_conv(x), padded)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """Features [B, F, T] with lengths to encoded frames [B, T / subsampling, d_model] with lengths."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.pre_encode = DepthwiseStridingSubsampling(config)
        self.pos_enc = RelativePositionalEncoding(config.d_model, initial_length=1)
        self.layers = nn.ModuleList(ConformerLayer(config) for _ in range(config.n_layers))
        self.xscale = math.sqrt(config.d_model) if config.xscaling else None

    @staticmethod
    def output_lengths_for(config: EncoderConfig, feature_lengths):
        """Encoded frames for the given feature frames (tensor or int)."""
        return subsampled_length(feature_lengths, config.subsampling_layers)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor,
                local_context: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full attention, or with `local_context` = w attention to the w frames on each side (memory linear in T)."""
        x, lengths = self.pre_encode(features.transpose(1, 2), lengths)
        if self.xscale is not None:
            x = x * self.xscale
        steps = x.shape[1]
        valid = _time_mask(lengths, steps)
        padded = ~valid
        if local_context is None:
            pos_emb = self.pos_enc(steps, x.dtype)
            attention_masked = ~(valid[:, None, :] & valid[:, :, None])
        else:
            pos_emb = self.pos_enc.local(local_context, x.dtype)
            attention_masked = None
        for layer in self.layers:
            x = layer(x, pos_emb, attention_masked, padded, local_context)
        return x, lengths
