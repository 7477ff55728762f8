"""Soak: many mixed-length requests through `parakeet-serve`, watching for errors and memory growth.

Starts `parakeet-serve` (CPU, the v3_small fixture by default) on loopback ports and sends `--requests` requests
from `--concurrency` threads over gRPC, each a slice of `tools/long_audio.speech_like` audio with a length drawn
uniformly from `--min-seconds`..`--max-seconds` (seeded). Every `--sample-every` completed requests it records the
resident memory (VmRSS) of tritonserver and of each stage's backend process. Prints the memory table, the errors,
and the growth after the first `--baseline` requests (the target: <= 10 % after 1,000 of 5,000).

    python benchmarks/soak.py [--requests 5000] [--concurrency 8] [--malloc system|jemalloc|tcmalloc] [--out DIR]

`--malloc` is passed to `parakeet-serve`, which preloads that allocator into tritonserver and the stage processes
(`LD_PRELOAD`; Debian's libgoogle-perftools4 / libjemalloc2). Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from parakeet_client import ParakeetClient, RetryPolicy  # noqa: E402
from parakeet_triton.server import ALLOCATORS, DEFAULT_ALLOCATOR, LaunchedServer  # noqa: E402
from parakeet_triton.watchdog import backend_stubs  # noqa: E402

from benchmarks.processes import proc_field  # noqa: E402

DEFAULT_CHECKPOINT = REPO / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"
def _speech_like(seconds: float):
    spec = importlib.util.spec_from_file_location("tools_long_audio", REPO / "tools" / "long_audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.speech_like(seconds)


def _tritonserver_pid(launcher_pid: int) -> int | None:
    try:
        children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def memory_sample(launcher_pid: int, done: int) -> dict:
    server = _tritonserver_pid(launcher_pid)
    sample = {"requests": done, "tritonserver_mib": proc_field(server, "status", "VmRSS") / 1024 if server else 0.0}
    for pid, model in backend_stubs(launcher_pid).items():
        sample[f"{model}_mib"] = sample.get(f"{model}_mib", 0.0) + proc_field(pid, "status", "VmRSS") / 1024
    sample["total_mib"] = sum(v for k, v in sample.items() if k.endswith("_mib"))
    return sample


def start_serve(checkpoint: Path, serve_args: list[str], log_path: Path,
                env: dict[str, str] | None = None) -> LaunchedServer:
    """`parakeet-serve` on free loopback ports, CPU (the server picks its own threads unless `env` says)."""
    return LaunchedServer.start(checkpoint, ["--device", "cpu", *serve_args], log_path=log_path, env=env, cwd=REPO)


def run(args: argparse.Namespace) -> dict:
    log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    server = start_serve(args.checkpoint, ["--max-audio-seconds", str(max(60.0, args.max_seconds + 1)),
                                           "--malloc", args.malloc, *args.serve_args], log_path)
    audio = _speech_like(args.max_seconds * 4)
    rng = random.Random(args.seed)
    plans = []
    for _ in range(args.requests):
        seconds = rng.uniform(args.min_seconds, args.max_seconds)
        count = int(seconds * 16000)
        start = rng.randrange(0, len(audio) - count)
        plans.append((start, count))
    samples, errors = [], []
    lock = threading.Lock()
    done = 0
    try:
        server.wait_ready(600)
        with ParakeetClient(server.grpc_url, timeout=120, retry=RetryPolicy(attempts=1)) as client:
            samples.append(memory_sample(server.pid, 0))
            started = time.monotonic()

            def one(plan: tuple[int, int]) -> None:
                nonlocal done
                start, count = plan
                try:
                    client.transcribe(audio[start : start + count])
                except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}"[:300])
                with lock:
                    done += 1
                    if done % args.sample_every == 0:
                        samples.append(memory_sample(server.pid, done))

            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, plans))
            elapsed = time.monotonic() - started
            if samples[-1]["requests"] != done:
                samples.append(memory_sample(server.pid, done))
    finally:
        server.stop(120)
    baseline = next((s for s in samples if s["requests"] >= args.baseline), samples[0])
    final = samples[-1]
    growth = (final["total_mib"] - baseline["total_mib"]) / baseline["total_mib"] if baseline["total_mib"] else 0.0
    audio_seconds = sum(count for _, count in plans) / 16000
    return {"malloc": args.malloc, "requests": args.requests, "concurrency": args.concurrency, "errors": errors,
            "elapsed_s": elapsed, "requests_per_s": args.requests / elapsed, "rtfx": audio_seconds / elapsed,
            "samples": samples, "baseline_requests": baseline["requests"], "growth_after_baseline": growth,
            "checkpoint": str(args.checkpoint)}


def table(result: dict) -> str:
    stages = sorted({k for s in result["samples"] for k in s if k.endswith("_mib") and k != "total_mib"})
    lines = [f"## Soak: {result['requests']} requests, concurrency {result['concurrency']}, malloc {result['malloc']}, "
             f"{Path(result['checkpoint']).name}",
             "",
             f"{len(result['errors'])} errors; {result['requests_per_s']:.1f} requests/s, RTFx {result['rtfx']:.0f}; "
             f"server RSS growth after {result['baseline_requests']} requests: {100 * result['growth_after_baseline']:+.1f} %",
             "",
             "| requests | " + " | ".join(s.removesuffix("_mib") + " MiB" for s in stages) + " | total MiB |",
             "|---" * (len(stages) + 2) + "|"]
    for sample in result["samples"]:
        lines.append(f"| {sample['requests']} | " + " | ".join(f"{sample.get(s, 0):.0f}" for s in stages)
                     + f" | {sample['total_mib']:.0f} |")
    if result["errors"]:
        lines += ["", "First errors:", *[f"- {e}" for e in result["errors"][:5]]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--baseline", type=int, default=1000, help="growth is measured from this many requests on")
    parser.add_argument("--sample-every", type=int, default=250)
    parser.add_argument("--malloc", choices=sorted(ALLOCATORS), default=DEFAULT_ALLOCATOR,
                        help="parakeet-serve --malloc (default: %(default)s, the server's own default)")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write soak.json and soak.md here")
    parser.add_argument("serve_args", nargs="*", help="extra parakeet-serve flags (after --)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    text = table(result)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"soak-{args.malloc}.json").write_text(json.dumps(result, indent=2))
        (args.out / f"soak-{args.malloc}.md").write_text(text + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
