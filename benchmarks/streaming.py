"""Streaming on the CPU: per-chunk compute and real-time factor in-process, and how many live streams the served
streaming model sustains, with first-partial and final latencies.

- in-process: one `model.stream(L, C, R)` session fed `--seconds` of speech-like audio (tools/long_audio.py) in
  `--piece-seconds` pieces; each feed that runs a step is timed (one step = one encoder pass over the buffer of up
  to L + C + R seconds, decoding of the chunk). RTF = compute / audio (below 1: faster than real time).
- served: `parakeet-serve --streaming` on loopback ports with `--cpu-threads --threads`; N streams at once, each fed
  in real time through `AsyncParakeetClient.stream` (N = 1, 2, 4, ... up to `--max-streams`, stopping after the
  first N that falls behind). A stream keeps up when its slowest piece answer (p95) is shorter than the chunk and
  it ends no later than one chunk after its audio. First partial: from the stream's start to its first non-empty
  text (at best chunk + right + one piece: the first step needs one sample past its right context). Final: from
  the end of the audio to the final transcript.

    python benchmarks/streaming.py --checkpoint /path/to/parakeet-tdt-0.6b-v3.nemo [--contexts 10,2,2]
        [--threads 2] [--seconds 60] [--max-streams 8] [--modes in-process,served]
    python benchmarks/streaming.py --dry-run     # the v3_small fixture, short audio, to test the script
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]
SMALL_FIXTURE = REPO / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"
SAMPLE_RATE = 16000


def speech_like(seconds: float) -> np.ndarray:
    """tools/long_audio.speech_like (imported by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_long_audio", REPO / "tools" / "long_audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.speech_like(seconds)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def in_process(checkpoint: str, contexts: tuple[float, float, float], threads: int, audio: np.ndarray,
               piece_seconds: float) -> dict[str, float]:
    import torch

    import parakeet_core

    torch.set_num_threads(threads)
    model = parakeet_core.from_pretrained(checkpoint, device="cpu")
    left, chunk, right = contexts
    warm = model.stream(left_seconds=left, chunk_seconds=chunk, right_seconds=right)
    warm.feed(audio[: int((chunk + right) * SAMPLE_RATE) + 1])
    warm.finish()
    session = model.stream(left_seconds=left, chunk_seconds=chunk, right_seconds=right)
    size = int(piece_seconds * SAMPLE_RATE)
    steps, total = [], 0.0
    for start in range(0, len(audio), size):
        before = session.decoded_frames
        began = time.perf_counter()
        session.feed(audio[start:start + size])
        spent = time.perf_counter() - began
        total += spent
        if session.decoded_frames != before:
            steps.append(spent)
    began = time.perf_counter()
    session.finish()
    last = time.perf_counter() - began
    total += last
    chunk_seconds = session.context.chunk / SAMPLE_RATE
    return {"steps": len(steps), "chunk_s": chunk_seconds, "median_ms": 1000 * statistics.median(steps),
            "p90_ms": 1000 * percentile(steps, 90), "max_ms": 1000 * max(steps), "last_ms": 1000 * last,
            "rtf": total / (len(audio) / SAMPLE_RATE), "chunk_rtf": statistics.median(steps) / chunk_seconds}


async def one_stream(url: str, audio: np.ndarray, piece_seconds: float, delay: float) -> dict[str, float]:
    from parakeet_client import AsyncParakeetClient

    await asyncio.sleep(delay)
    latencies, first_partial = [], None
    async with AsyncParakeetClient(url, timeout=600) as client:
        started = time.monotonic()
        async for update in client.stream(audio, piece_seconds=piece_seconds, realtime=True):
            if update.final:
                final = update.latency_seconds
                lag = time.monotonic() - started - final - len(audio) / SAMPLE_RATE
            else:
                latencies.append(update.latency_seconds)
                if first_partial is None and update.text:
                    first_partial = time.monotonic() - started
    return {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "max": max(latencies),
            "first_partial": float("nan") if first_partial is None else first_partial, "final": final, "lag": lag}


def served(checkpoint: str, contexts: tuple[float, float, float], threads: int, audio: np.ndarray,
           piece_seconds: float, max_streams: int) -> list[dict[str, float]]:
    from parakeet_triton.server import LaunchedServer

    chunk = contexts[1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="parakeet-streaming-bench-") as work:
        server = LaunchedServer.start(
            checkpoint, ["--device", "cpu", "--streaming", "--streaming-contexts", ",".join(map(str, contexts)),
                         "--cpu-threads", str(threads), "--model-aliases", ""],
            log_path=Path(work) / "serve.log", cwd=REPO)
        try:
            server.wait_ready(1800)
            asyncio.run(one_stream(server.grpc_url, audio[: int((contexts[1] + contexts[2] + 1) * SAMPLE_RATE)],
                                   piece_seconds, 0.0))  # warm-up
            streams = 1
            while streams <= max_streams:
                # starts spread over one chunk, as independent talkers would be
                results = asyncio.run(_many(server.grpc_url, audio, piece_seconds, streams, chunk))
                keeps_up = all(r["p95"] < chunk and r["lag"] < chunk for r in results)
                rows.append({"streams": streams, "p50": statistics.median(r["p50"] for r in results),
                             "p95": max(r["p95"] for r in results), "max": max(r["max"] for r in results),
                             "first_partial": statistics.median(r["first_partial"] for r in results),
                             "final": statistics.median(r["final"] for r in results),
                             "lag": max(r["lag"] for r in results), "keeps_up": keeps_up})
                print(_served_line(rows[-1]), flush=True)
                if not keeps_up:
                    break
                streams *= 2
        finally:
            server.stop()
    return rows


async def _many(url: str, audio: np.ndarray, piece_seconds: float, streams: int, spread: float):
    return await asyncio.gather(*(one_stream(url, audio, piece_seconds, spread * index / streams)
                                  for index in range(streams)))


def _served_line(row: dict) -> str:
    return (f"{row['streams']:>7d}  {1000 * row['p50']:>8.0f}  {1000 * row['p95']:>8.0f}  {1000 * row['max']:>8.0f}  "
            f"{row['first_partial']:>13.2f}  {row['final']:>7.2f}  {row['lag']:>6.2f}  "
            f"{'yes' if row['keeps_up'] else 'NO':>8}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="the .nemo to measure (required unless --dry-run)")
    parser.add_argument("--contexts", default="10,2,2", help="left,chunk,right seconds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process and per server model")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per stream (default: %(default)s)")
    parser.add_argument("--piece-seconds", type=float, default=0.5, help="audio per request (default: %(default)s)")
    parser.add_argument("--max-streams", type=int, default=8, help="most concurrent streams tried")
    parser.add_argument("--modes", default="in-process,served", help="in-process, served or both")
    parser.add_argument("--dry-run", action="store_true", help="the v3_small fixture, 12 s of audio, up to 2 streams")
    args = parser.parse_args()
    if args.dry_run:
        args.checkpoint, args.seconds, args.max_streams = args.checkpoint or str(SMALL_FIXTURE), 12.0, 2
    if not args.checkpoint:
        parser.error("--checkpoint is required (or --dry-run)")
    contexts = tuple(float(value) for value in args.contexts.split(","))
    audio = speech_like(args.seconds)
    modes = set(args.modes.split(","))
    print(f"checkpoint {args.checkpoint}; contexts {args.contexts} s; {args.threads} threads; "
          f"{len(audio) / SAMPLE_RATE:.0f} s of audio per stream in {args.piece_seconds} s pieces", flush=True)
    if "in-process" in modes:
        row = in_process(args.checkpoint, contexts, args.threads, audio, args.piece_seconds)
        print("\nin-process, one stream")
        print(" steps  chunk s  median ms  p90 ms  max ms  last ms  chunk RTF  stream RTF")
        print(f"{row['steps']:>6d}  {row['chunk_s']:>7.2f}  {row['median_ms']:>9.0f}  {row['p90_ms']:>6.0f}  "
              f"{row['max_ms']:>6.0f}  {row['last_ms']:>7.0f}  {row['chunk_rtf']:>9.3f}  {row['rtf']:>10.3f}",
              flush=True)
    if "served" in modes:
        print("\nserved, streams fed in real time (latencies of piece answers; first partial and final in s; "
              "lag: how far the slowest stream ended behind its audio, s)")
        print("streams  p50 ms    p95 ms    max ms    first partial  final    lag     keeps up")
        rows = served(args.checkpoint, contexts, args.threads, audio, args.piece_seconds, args.max_streams)
        sustained = max((r["streams"] for r in rows if r["keeps_up"]), default=0)
        print(f"\nsustained: {sustained} real-time stream(s) (of those tried: "
              f"{', '.join(str(r['streams']) for r in rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
