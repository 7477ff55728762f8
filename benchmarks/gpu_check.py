"""GPU checks and timings for parakeet_core, run as one script on a lent GPU machine.

1. Fixture parity on CUDA: fp32 (TF32 off) and the default bf16, each through the CUDA-graph decoder, against
   NeMo's reference tokens; the eager CUDA decoder against the graphed one; a mixed-length batch against single.
2. Timings on a synthetic full-size v3 model (random weights, tuned to ~0.4 tokens per frame): a 12 s clip
   single-stream per stage, batched throughput for B = 1, 4, 16, 64, and the decoder with and without CUDA graphs.

    python benchmarks/gpu_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

import parakeet_core  # noqa: E402
import synthetic  # noqa: E402
from core_fixtures import fixture_names, load_fixture  # noqa: E402


def edit_distance(a: list[int], b: list[int]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def single(model, samples, loop="auto"):
    waveform = torch.from_numpy(samples)[None]
    encoded, lengths = model.encode(*model.featurize(waveform, torch.tensor([len(samples)])))
    return model.decode(encoded, lengths, loop=loop)[0]


def parity(dtypes=(("fp32", torch.float32), ("bf16", torch.bfloat16))) -> dict:
    report = {}
    for name in fixture_names():
        fixture = load_fixture(name)
        for label, dtype in dtypes:
            torch.backends.cudnn.allow_tf32 = dtype != torch.float32
            torch.backends.cuda.matmul.allow_tf32 = False
            model = parakeet_core.from_pretrained(fixture.checkpoint, device=DEVICE, dtype=dtype)
            rows = {}
            for clip, expected in fixture.reference["clips"].items():
                samples = fixture.clip_samples(clip)
                graphed = single(model, samples)
                eager = single(model, samples, loop="fixed_shape")
                rows[clip] = {
                    "tokens_equal_nemo": graphed.token_ids == expected["tokens"],
                    "frames_equal_nemo": graphed.token_frames == expected["frames"],
                    "durations_equal_nemo": graphed.token_durations == expected["durations"],
                    "edit_distance_to_nemo": edit_distance(graphed.token_ids, expected["tokens"]),
                    "reference_tokens": len(expected["tokens"]),
                    "graph_equals_eager": graphed == eager,
                }
            order = list(fixture.reference["clips"])
            waveforms = [torch.from_numpy(fixture.clip_samples(c)) for c in order]
            padded = torch.nn.utils.rnn.pad_sequence(waveforms, batch_first=True)
            encoded, lengths = model.encode(*model.featurize(padded, torch.tensor([len(w) for w in waveforms])))
            batched = model.decode(encoded, lengths)
            for clip, hypothesis in zip(order, batched):
                rows[clip]["batch_equals_single"] = hypothesis == single(model, fixture.clip_samples(clip))
            report[f"{name}/{label}"] = rows
    torch.backends.cudnn.allow_tf32 = True
    return report


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        times.append(time.perf_counter() - start)
    return times


def timings(seconds: float = 12.0, repeats: int = 20, batches=(1, 4, 16, 64)) -> dict:
    model, info = synthetic.build(DEVICE)
    samples = synthetic.speech(seconds)
    waveform = torch.from_numpy(samples)[None]
    lengths = torch.tensor([len(samples)])
    for _ in range(3):
        model.transcribe_waveforms([samples])
    features, feature_lengths = model.featurize(waveform, lengths)
    encoded, encoded_lengths = model.encode(features, feature_lengths)
    stage = {
        "featurize": timed(lambda: model.featurize(waveform, lengths), repeats),
        "encode": timed(lambda: model.encode(features, feature_lengths), repeats),
        "decode (CUDA graph)": timed(lambda: model.decode(encoded, encoded_lengths), repeats),
        "end to end": timed(lambda: model.transcribe_waveforms([samples]), repeats),
    }
    stage["decode (eager)"] = timed(lambda: model.decode(encoded, encoded_lengths, loop="fixed_shape"), repeats)
    full = synthetic.speech(44.0)
    batched = {}
    for batch in batches:
        clips = [full[(i * 4000) % (len(full) - len(samples)):][: len(samples)] for i in range(batch)]
        model.transcribe_waveforms(clips)
        median = statistics.median(timed(lambda: model.transcribe_waveforms(clips), max(3, repeats // 4)))
        batched[batch] = {"seconds": median, "rtfx": batch * seconds / median}
    encoded64, lengths64 = model.encode(*model.featurize(
        torch.from_numpy(samples)[None].repeat(batches[-1], 1), torch.full((batches[-1],), len(samples))))
    graph64 = statistics.median(timed(lambda: model.decode(encoded64, lengths64), 5))
    eager64 = statistics.median(timed(lambda: model.decode(encoded64, lengths64, loop="fixed_shape"), 3))
    return {
        "model": {k: v for k, v in info.items() if k in ("blank_bias", "tokens_per_frame", "parameters")},
        "clip_seconds": seconds,
        "single_stream_median_seconds": {k: statistics.median(v) for k, v in stage.items()},
        "batched": batched,
        "decode_largest_batch": {"batch": batches[-1], "graph": graph64, "eager": eager64},
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-dry-run", action="store_true", help="exercise the script on the CPU, tiny and untimed")
    args = parser.parse_args()
    global DEVICE
    if args.cpu_dry_run:
        DEVICE = "cpu"
        environment = {"torch": torch.__version__, "device": "cpu (dry run)", "capability": None}
        parity_report = parity(dtypes=(("fp32", torch.float32),))
        timing_report = timings(seconds=2.0, repeats=1, batches=(1, 2))
    else:
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 2
        environment = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                       "capability": torch.cuda.get_device_capability()}
        print(json.dumps(environment), flush=True)
        parity_report = parity()
        timing_report = timings()
    result = {"environment": environment, "parity": parity_report, "timings": timing_report}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    print("\n## Parity on CUDA (CUDA-graph decoder) against NeMo's CPU fp32 references")
    print("| fixture/dtype | clip | tokens = NeMo | frames = NeMo | durations = NeMo | edit distance | graph = eager | batch = single |")
    print("|---|---|---|---|---|---|---|---|")
    for key, rows in parity_report.items():
        for clip, r in rows.items():
            print(f"| {key} | {clip} | {r['tokens_equal_nemo']} | {r['frames_equal_nemo']} | {r['durations_equal_nemo']} | "
                  f"{r['edit_distance_to_nemo']}/{r['reference_tokens']} | {r['graph_equals_eager']} | {r['batch_equals_single']} |")
    t = timing_report
    print(f"\n## Synthetic full-size v3, {environment['device']}, bf16, {t['clip_seconds']:.0f} s clip "
          f"({t['model']['parameters']:,} parameters, {t['model']['tokens_per_frame']:.2f} tokens/frame)")
    print("| stage (single stream) | median ms |")
    print("|---|---|")
    for name, value in t["single_stream_median_seconds"].items():
        print(f"| {name} | {value * 1000:.1f} |")
    print("\n| batch | seconds per batch | RTFx (audio s / wall s) |")
    print("|---|---|---|")
    for batch, row in t["batched"].items():
        print(f"| {batch} | {row['seconds']:.3f} | {row['rtfx']:.0f} |")
    largest = t["decode_largest_batch"]
    print(f"\ndecode of {largest['batch']} x {t['clip_seconds']:.0f} s: CUDA graph {largest['graph'] * 1000:.1f} ms, "
          f"eager {largest['eager'] * 1000:.1f} ms; peak memory {t['peak_memory_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
