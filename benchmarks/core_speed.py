"""CPU speed of parakeet_core beside nano-parakeet and NeMo, on the same full-size checkpoint and clip.

Each implementation runs in its own fresh process (same thread count), which gives the cold start (process
launch to first transcript) and then warm single-stream timings (median of --repeats). parakeet_core is also
timed batched (B clips in one call) against the same clips transcribed one after another.

    python benchmarks/core_speed.py --checkpoint /work/cache/full-v3/parakeet-tdt-0.6b-v3.nemo \\
        [--nemo-python /work/nemo-env/bin/python] [--threads 2] [--repeats 5] [--rounds 3]

The checkpoint is a full-size random-weight v3 `.nemo` made by `tools/make_reference_fixtures.py --full-size`
and re-tuned by `benchmarks/retune_token_rate.py` to about 0.4 tokens per encoder frame on the benchmark clip
(the rate is printed); nano-parakeet finds it offline through the Hugging Face cache layout written beside it
(`hf-cache/`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "tests" / "fixtures" / "audio" / "long.wav"
HF_REPO_ID = "nvidia/parakeet-tdt-0.6b-v3"


def _clip(seconds: float, path: Path) -> Path:
    import soundfile

    samples, rate = soundfile.read(SPEECH, dtype="float32")
    soundfile.write(path, samples[: int(seconds * rate)], rate, subtype="FLOAT")
    return path


def _load_samples(path: str):
    import soundfile

    samples, _ = soundfile.read(path, dtype="float32")
    return samples


def worker(kind: str, checkpoint: str, clip: str, repeats: int, batches: list[int]) -> dict:
    """Runs inside the measured process; prints FIRST when the first transcript exists, then a JSON result."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    samples = _load_samples(clip)
    result: dict = {"kind": kind}
    if kind == "parakeet_core":
        import parakeet_core

        model = parakeet_core.from_pretrained(checkpoint, device="cpu")

        def transcribe(batch):
            return model.transcribe(batch, batch_size=len(batch))

        def single():
            return transcribe([samples])[0].token_ids
    elif kind == "nano_parakeet":
        import nano_parakeet

        model = nano_parakeet.from_pretrained(HF_REPO_ID, device="cpu")
        tensor = torch.from_numpy(samples)

        def single():
            return model.transcribe_audio(tensor)
    elif kind == "nemo":
        import logging

        logging.disable(logging.WARNING)
        from nemo.collections.asr.models import ASRModel

        model = ASRModel.restore_from(checkpoint, map_location="cpu").eval()

        def single():
            output = model.transcribe([samples], batch_size=1, verbose=False)
            model.eval()
            return output[0].y_sequence.tolist() if hasattr(output[0], "y_sequence") else output[0]
    else:
        raise ValueError(kind)
    first = single()
    print(f"FIRST {time.time()}", flush=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        single()
        times.append(time.perf_counter() - start)
    result["single_seconds"] = statistics.median(times)
    if kind == "parakeet_core":
        result["tokens"] = len(first)
        waveform, lengths = torch.from_numpy(samples)[None], torch.tensor([len(samples)])
        stages = {"featurize": [], "encode": [], "decode": []}
        for _ in range(repeats):
            start = time.perf_counter()
            features = model.featurize(waveform, lengths)
            featurized = time.perf_counter()
            encoded, encoded_lengths = model.encode(*features)
            encoded_at = time.perf_counter()
            model.decode(encoded, encoded_lengths)
            for name, seconds in zip(stages, (featurized - start, encoded_at - featurized, time.perf_counter() - encoded_at)):
                stages[name].append(seconds)
        result["stage_seconds"] = {name: statistics.median(values) for name, values in stages.items()}
        result["encoder_frames"] = int(encoded_lengths[0])
        rows = {}
        for batch in batches:
            clips = [samples[(i * 1600) % 16000 :] for i in range(batch)]
            audio = sum(len(c) for c in clips) / 16000
            start = time.perf_counter()
            for clip_ in clips:
                transcribe([clip_])
            sequential = time.perf_counter() - start
            start = time.perf_counter()
            transcribe(clips)
            batched = time.perf_counter() - start
            rows[batch] = {"audio_seconds": audio, "sequential": sequential, "batched": batched}
        result["batches"] = rows
    import resource

    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def run_worker(python: str, kind: str, args, clip: Path, env: dict) -> dict | None:
    command = [python, __file__, "--worker", kind, "--checkpoint", str(args.checkpoint), "--clip", str(clip),
               "--repeats", str(args.repeats), "--batches", ",".join(map(str, args.batches))]
    launched = time.time()
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        print(f"[{kind}] failed:\n{process.stderr[-2000:]}", file=sys.stderr)
        return None
    lines = process.stdout.strip().splitlines()
    first = next(float(line.split()[1]) for line in lines if line.startswith("FIRST "))
    result = json.loads(lines[-1])
    result["cold_start_seconds"] = first - launched
    return result


def _combine(runs: list[dict]) -> dict | None:
    """Median over rounds of the per-round figures; the first round's extra rows (batches, split) as they are."""
    if not runs:
        return None
    combined = dict(runs[0])
    for key in ("single_seconds", "cold_start_seconds", "peak_rss_gib"):
        combined[key] = statistics.median(r[key] for r in runs)
    return combined


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("/work/cache/full-v3/parakeet-tdt-0.6b-v3.nemo"))
    parser.add_argument("--hf-cache", type=Path, default=None, help="HF hub cache holding the same checkpoint for nano-parakeet")
    parser.add_argument("--nemo-python", default=None, help="interpreter of an environment with nemo-toolkit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clip-seconds", type=float, default=12.0)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per implementation, alternating")
    parser.add_argument("--skip", default="", help="comma-separated peers to skip: nano_parakeet,nemo")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.checkpoint), args.clip, args.repeats, args.batches)))
        return 0

    hf_cache = args.hf_cache or args.checkpoint.parent / "hf-cache"
    env = dict(os.environ, BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hf_cache), PYTHONPATH=str(REPO))
    skip = set(filter(None, args.skip.split(",")))
    workers = {"parakeet_core": sys.executable}
    if "nano_parakeet" not in skip:
        workers["nano_parakeet"] = sys.executable
    if args.nemo_python and "nemo" not in skip:
        workers["nemo"] = args.nemo_python
    rounds: dict[str, list[dict]] = {name: [] for name in workers}
    with tempfile.TemporaryDirectory() as scratch:
        clip = _clip(args.clip_seconds, Path(scratch) / "clip.wav")
        # Implementations alternate round by round, so a slow spell of a shared machine does not land on one.
        for round_index in range(args.rounds):
            for name, python in workers.items():
                round_args = argparse.Namespace(**vars(args))
                if round_index or name != "parakeet_core":
                    round_args.batches = []
                result = run_worker(python, name, round_args, clip, env)
                if result is not None:
                    rounds[name].append(result)
    results = {name: _combine(runs) for name, runs in rounds.items()}
    for name, runs in rounds.items():
        print(f"{name}: warm single-stream s per round " + ", ".join(f"{r['single_seconds']:.2f}" for r in runs)
              + "; cold start s " + ", ".join(f"{r['cold_start_seconds']:.1f}" for r in runs))

    print(f"\n## CPU, fp32, {args.threads} threads, {args.clip_seconds:.0f} s clip, full-size v3 config "
          f"({args.checkpoint.name}), median of {args.repeats} per process, median over {args.rounds} "
          f"round(s) of fresh processes\n")
    if results.get("parakeet_core"):
        ours_ = results["parakeet_core"]
        print(f"Decoded: {ours_['tokens']} tokens in {ours_['encoder_frames']} encoder frames "
              f"({ours_['tokens'] / ours_['encoder_frames']:.2f} tokens per frame; real speech gives about 0.4)\n")
    print("| implementation | warm single-stream s | RTFx | cold start s (new process to first transcript) | peak RSS GiB |")
    print("|---|---|---|---|---|")
    ours = results["parakeet_core"]
    for name, r in results.items():
        if r is None:
            print(f"| {name} | failed | | | |")
            continue
        print(f"| {name} | {r['single_seconds']:.2f} | {args.clip_seconds / r['single_seconds']:.1f} | "
              f"{r['cold_start_seconds']:.1f} | {r['peak_rss_gib']:.1f} |")
    if ours and results.get("nano_parakeet"):
        print(f"\nparakeet_core vs nano-parakeet single-stream: {results['nano_parakeet']['single_seconds'] / ours['single_seconds']:.2f}x")
    if ours and results.get("nemo"):
        print(f"parakeet_core vs NeMo single-stream: {results['nemo']['single_seconds'] / ours['single_seconds']:.2f}x")
    if ours:
        split = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in ours["stage_seconds"].items())
        print(f"\nparakeet_core in-process, single clip (median of {args.repeats}): {split}")
        print("\n| parakeet_core batch | audio s | sequential s | batched s | batched speed-up |")
        print("|---|---|---|---|---|")
        for batch, row in ours["batches"].items():
            print(f"| {batch} | {row['audio_seconds']:.0f} | {row['sequential']:.2f} | {row['batched']:.2f} | "
                  f"{row['sequential'] / row['batched']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
