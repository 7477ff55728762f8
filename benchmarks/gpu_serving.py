"""Triton end to end on a GPU: the `parakeet` ensemble (KIND_GPU, bf16) against in-process parakeet_core.

Builds the synthetic full-size v3 model (random weights, ~0.4 tokens per frame), writes it as a `.nemo`, serves it
with `parakeet-serve --device cuda` on loopback ports, and drives the ensemble over gRPC (`ParakeetClient`) with N
concurrent clients sending 12 s clips (each client one request at a time, for --seconds per level). Prints requests/s,
RTFx, latency percentiles and the encoder's mean executed batch size per concurrency, beside in-process
single-stream and batched timings of the same model on the same GPU.

    python benchmarks/gpu_serving.py [--concurrency 1,4,16,64] [--seconds 8] [--out DIR]
    python benchmarks/gpu_serving.py --cpu-dry-run      # the v3_small fixture on the CPU, tiny, to test the script
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import parakeet_core  # noqa: E402
import synthetic  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from parakeet_client import ParakeetClient  # noqa: E402
from parakeet_triton import protocol  # noqa: E402
from parakeet_triton.server import LaunchedServer  # noqa: E402


def encoder_batches(statistics_client) -> tuple[int, int]:
    """(executions, inferences) of the encoder so far, from Triton's statistics."""
    stats = statistics_client.get_inference_statistics(protocol.ENCODER_MODEL, as_json=True)["model_stats"][0]
    return int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))


def sweep(client: ParakeetClient, statistics_client, clips: list[np.ndarray], clip_seconds: float,
          concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    before = encoder_batches(statistics_client)

    def one_client(index: int) -> None:
        n = index
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            client.transcribe(clips[n % len(clips)])
            with lock:
                latencies.append(time.perf_counter() - start)
            n += concurrency

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one_client, range(concurrency)))
    elapsed = time.perf_counter() - started
    after = encoder_batches(statistics_client)
    executions, inferences = after[0] - before[0], after[1] - before[1]
    latencies.sort()

    def percentile(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    return {"concurrency": concurrency, "requests": len(latencies), "requests_per_s": len(latencies) / elapsed,
            "rtfx": len(latencies) * clip_seconds / elapsed, "p50_ms": percentile(0.50) * 1000,
            "p95_ms": percentile(0.95) * 1000, "p99_ms": percentile(0.99) * 1000,
            "mean_encoder_batch": inferences / executions if executions else float("nan")}


def in_process(model: parakeet_core.ParakeetTDT, clips: list[np.ndarray], clip_seconds: float, device: str) -> dict:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rows = {}
    for batch in (1, 16, 64):
        chosen = [clips[i % len(clips)] for i in range(batch)]
        model.transcribe_waveforms(chosen)
        times = []
        for _ in range(5):
            sync()
            start = time.perf_counter()
            model.transcribe_waveforms(chosen)
            sync()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows[batch] = {"seconds": median, "rtfx": batch * clip_seconds / median}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clip-seconds", type=float, default=12.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    scratch = Path(tempfile.mkdtemp(prefix="gpu-serving-"))

    started = time.perf_counter()
    if args.cpu_dry_run:
        checkpoint = REPO / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"
        model = parakeet_core.from_pretrained(checkpoint, device="cpu")
        info = {"parameters": sum(p.numel() for p in model.encoder.parameters()), "tokens_per_frame": float("nan")}
    else:
        model, info = synthetic.build(device)
        checkpoint = synthetic.save_nemo(model, scratch / "synthetic-v3-full.nemo", info["raw_config"],
                                         info["tokenizer_model"])
    print(f"model ready in {time.perf_counter() - started:.0f} s: {checkpoint}", flush=True)
    long_speech = synthetic.speech(44.0)
    size = int(args.clip_seconds * 16000)
    clips = [long_speech[offset : offset + size] for offset in range(0, len(long_speech) - size, 16000)]
    local = in_process(model, clips, args.clip_seconds, device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()

    server = LaunchedServer.start(
        checkpoint, ["--device", device, "--max-batch-size", str(args.max_batch_size),
                     "--max-queue-delay-us", str(args.queue_delay_us), "--max-audio-seconds", "60"],
        log_path=scratch / "server.log", cwd=REPO)
    results = []
    try:
        started = time.perf_counter()
        server.wait_ready(1800)
        print(f"server ready in {time.perf_counter() - started:.0f} s", flush=True)
        statistics_client = grpcclient.InferenceServerClient(server.grpc_url)
        with ParakeetClient(server.grpc_url, timeout=300) as client:
            client.transcribe(clips[0])
            for concurrency in args.concurrency:
                results.append(sweep(client, statistics_client, clips, args.clip_seconds, concurrency, args.seconds))
                print(json.dumps(results[-1]), flush=True)
        statistics_client.close()
    finally:
        server.stop(60)
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "model": {k: info[k] for k in ("parameters", "tokens_per_frame")}, "clip_seconds": args.clip_seconds,
              "in_process": local, "served": results}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_serving.json").write_text(json.dumps(report, indent=1))
    print(f"\n## Triton ensemble over gRPC, {report['device']}, bf16 KIND_GPU, {args.clip_seconds:.0f} s clips, "
          f"max batch {args.max_batch_size}, queue delay {args.queue_delay_us} us\n")
    print("| concurrency | requests/s | RTFx | p50 ms | p95 ms | p99 ms | mean encoder batch |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['rtfx']:.0f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_encoder_batch']:.1f} |")
    print("\n| in-process batch | seconds | RTFx |")
    print("|---|---|---|")
    for batch, row in local.items():
        print(f"| {batch} | {row['seconds']:.3f} | {row['rtfx']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
