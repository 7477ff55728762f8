"""fp32 matrix products on the CPU through oneDNN, where this PyTorch build has it; `F.linear` everywhere else.

PyTorch sends a CPU fp32 `F.linear` to MKL; oneDNN (the `mkldnn` operators PyTorch's own compiler uses) is faster on
the encoder's products and on the decoder's one-row products (figures in docs/core.md), and computes each output row
independently of the other rows of the product, so a clip's result does not depend on its batch-mates. Set
`PARAKEET_ONEDNN=0` to use `F.linear` throughout.

oneDNN builds (and keeps) kernels for every input shape it sees, and a server sees a new row count with almost every
request, which grows its memory without bound (docs/core.md). Every oneDNN product here is therefore run on a bounded
set of row counts (`padded_rows`): the input is cut into blocks of at most `MAX_BLOCK_ROWS` rows and each block padded
with zero rows up to its bucket. Rows being independent, the padding changes no result (tested bit for bit).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

# The packed layout depends on the expected row count only as a hint; packed for 16 rows, one to sixteen rows
# all run at full speed.
_PACKING_ROWS_HINT = 16
_SMALL_ROWS = 64
MAX_BLOCK_ROWS = 2048


def padded_rows(rows: int) -> int:
    """The row count a oneDNN product of `rows` rows (at most `MAX_BLOCK_ROWS`) runs at: the next power of two up to
    64, then the next multiple of 64."""
    if rows <= _SMALL_ROWS:
        return 1 << max(rows - 1, 0).bit_length()
    return -(-rows // _SMALL_ROWS) * _SMALL_ROWS


def _in_row_buckets(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_features: int) -> torch.Tensor:
    """`product(x)` over x [..., in] computed in blocks of bucketed row counts (see the module's docstring)."""
    leading = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    total = rows.shape[0]
    blocks = []
    for start in range(0, total, MAX_BLOCK_ROWS):
        block = rows[start:start + MAX_BLOCK_ROWS]
        count = block.shape[0]
        padding = padded_rows(count) - count
        if padding:
            block = F.pad(block, (0, 0, 0, padding))
        blocks.append(product(block)[:count])
    if not blocks:
        return x.new_empty(*leading, out_features)
    result = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return result.reshape(*leading, out_features)


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether oneDNN's linear operators exist in this build, give `F.linear`'s result, and are not switched off."""
    if os.environ.get("PARAKEET_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((3, 8), (5, 8), (5,)))
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACKING_ROWS_HINT)
        with torch.no_grad():
            plain = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
            prepacked = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        expected = F.linear(x, weight, bias)
        return bool(torch.allclose(plain, expected, atol=1e-5) and torch.allclose(prepacked, expected, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not x.is_mkldnn
        and not torch.is_grad_enabled()
        and onednn_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed by oneDNN for CPU fp32 inference."""
    if _onednn_applies(x, weight):
        return _in_row_buckets(lambda rows: torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], ""),
                               x, weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and checkpoint names) whose forward uses `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def fixed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A product with frozen weights for inference; on the CPU in fp32 the weight is packed once into oneDNN's
    layout, which a product of a few rows (the decoder's step) needs for full speed."""
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACKING_ROWS_HINT)

        def packed_product(rows: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")

        def product(x: torch.Tensor) -> torch.Tensor:
            return _in_row_buckets(packed_product, x, weight.shape[0])

        return product
    return functools.partial(F.linear, weight=weight, bias=bias)
