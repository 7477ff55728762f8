"""How much batching can gain on this CPU: the time of the encoder's matrix products alone, per clip, at B = 1 and B.

Batching saves per-call overheads and the decoder's weight traffic, not arithmetic. Here the encoder's matrix
products (which batching cannot shrink) are timed with the PyTorch profiler inside a batched run, and the best
possible batched time per clip is taken as those products plus the batched decode, with everything else free.

    python benchmarks/cpu_batching_bound.py --checkpoint /work/cache/full-v3-rate04/parakeet-tdt-0.6b-v3.nemo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import parakeet_core
from decode_batching import benchmark_clips, median_seconds
PRODUCT_OPERATORS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")


def product_seconds(function) -> float:
    """Seconds the matrix products of one profiled call of `function` took."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    return sum(event.self_cpu_time_total for event in profiler.key_averages() if event.key in PRODUCT_OPERATORS) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = parakeet_core.from_pretrained(args.checkpoint, device="cpu")
    clips = benchmark_clips(args.batch)
    lengths = torch.tensor([len(c) for c in clips])
    features, feature_lengths = model.featurize(torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths)
    single, batch = (features[:1], feature_lengths[:1]), (features, feature_lengths)
    product_seconds(lambda: model.encode(*single))  # the profiler's own first-use cost
    single_products = product_seconds(lambda: model.encode(*single))
    batch_products = product_seconds(lambda: model.encode(*batch))
    single_wall = median_seconds(lambda: model.encode(*single))
    batch_wall = median_seconds(lambda: model.encode(*batch), 1)
    single_encoded, batch_encoded = model.encode(*single), model.encode(*batch)
    single_decode = median_seconds(lambda: model.decode(*single_encoded))
    batch_decode = median_seconds(lambda: model.decode(*batch_encoded))

    b = args.batch
    sequential = single_wall + single_decode
    bound = batch_products / b + batch_decode / b
    print(f"\n## Encoder matrix products vs the rest, CPU fp32, {args.threads} threads, 12 s clips "
          f"({Path(args.checkpoint).name})\n")
    print("| per clip, s | encode | its matrix products (profiled) | decode |")
    print("|---|---|---|---|")
    print(f"| B = 1 | {single_wall:.3f} | {single_products:.3f} | {single_decode:.3f} |")
    print(f"| B = {b} | {batch_wall / b:.3f} | {batch_products / b:.3f} | {batch_decode / b:.3f} |")
    print(f"\nsequential per clip {sequential:.3f} s; batched per clip can be no less than matrix products + decode "
          f"= {bound:.3f} s, so batched/sequential <= {sequential / bound:.2f}x on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
