"""CPU decode stage alone: B clips of ~12 s decoded in one batch against one after another (prints a table).

    python benchmarks/decode_batching.py --checkpoint /work/cache/full-v3-rate04/parakeet-tdt-0.6b-v3.nemo
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import soundfile
import torch

import parakeet_core

SPEECH = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio" / "long.wav"


def median_seconds(function, repeats: int = 3) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_clips(count: int) -> list[torch.Tensor]:
    """`count` clips of about 12 s of the fixture speech, each starting 0.1 s later than the one before (mod 1 s)."""
    samples, _ = soundfile.read(SPEECH, dtype="float32")
    samples = samples[: 12 * 16000]
    return [torch.from_numpy(samples[(i * 1600) % 16000 :]) for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = parakeet_core.from_pretrained(args.checkpoint, device="cpu")
    clips = benchmark_clips(max(args.batches))
    lengths = torch.tensor([len(c) for c in clips])
    encoded, encoded_lengths = model.encode(*model.featurize(torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths))
    alone = [median_seconds(lambda i=i: model.decode(encoded[i : i + 1, : int(encoded_lengths[i])], encoded_lengths[i : i + 1]),
                            args.repeats) for i in range(len(clips))]
    tokens = sum(len(h.token_ids) for h in model.decode(encoded, encoded_lengths))
    print(f"\n## CPU decode stage, fp32, {args.threads} threads, {Path(args.checkpoint).name}: "
          f"{tokens / int(encoded_lengths.sum()):.2f} tokens per encoder frame\n")
    print("| B | one after another, ms | one batch, ms | speed-up |")
    print("|---|---|---|---|")
    for batch in args.batches:
        batched = median_seconds(lambda: model.decode(encoded[:batch], encoded_lengths[:batch]), args.repeats)
        sequential = sum(alone[:batch])
        print(f"| {batch} | {sequential * 1000:.0f} | {batched * 1000:.0f} | {sequential / batched:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
