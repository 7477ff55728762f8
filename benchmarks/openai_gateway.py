"""What the OpenAI-compatible gateway costs: the same clip through `parakeet-openai` and straight to Triton over gRPC.

One `parakeet-serve --openai-port` serves both paths. For each concurrency level the two paths alternate in
rounds (gateway, direct, gateway, ...) so that a change in machine load falls on both. A request on either path
starts from the same audio file: the gateway path uploads it with the official `openai` SDK
(`audio.transcriptions.create`, response_format json), the direct path decodes it and sends it with
`ParakeetClient.transcribe` (gRPC). Per request: latency from call to transcript; per round: requests per second.

    python benchmarks/openai_gateway.py --checkpoint /work/cache/full-v3-rate04/parakeet-tdt-0.6b-v3.nemo \\
        [--clip-seconds 12] [--concurrency 1,4] [--requests 12] [--rounds 3] [--out FILE]

Prints a table: median and p95 latency of each path, the gateway's added median latency, and throughput with
the gateway / direct ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from parakeet_client import ParakeetClient  # noqa: E402
from parakeet_triton.server import LaunchedServer, free_loopback_ports  # noqa: E402

from synthetic import speech  # noqa: E402

PATHS = ("gateway", "direct")


def round_of_requests(call, clip: Path, requests: int, concurrency: int) -> tuple[list[float], float, set[str]]:
    """(latency of each request, requests per second, the distinct transcripts) for `requests` calls."""
    def timed(_: int) -> tuple[float, str]:
        start = time.perf_counter()
        text = call(clip)
        return time.perf_counter() - start, text

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(timed, range(requests)))
    elapsed = time.perf_counter() - started
    return [latency for latency, _ in results], requests / elapsed, {text for _, text in results}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(args: argparse.Namespace) -> list[dict]:
    from openai import OpenAI

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    clip = work / f"speech_{args.clip_seconds:g}s.wav"
    soundfile.write(clip, speech(args.clip_seconds), 16000, subtype="PCM_16")
    (openai_port,) = free_loopback_ports(1)
    log_path = work / "server.log"
    server = LaunchedServer.start(args.checkpoint, ["--device", "cpu", "--openai-port", str(openai_port),
                                                    *args.serve_args], log_path=log_path, cwd=REPO)
    rows = []
    try:
        server.wait_ready(args.ready_timeout)
        with ParakeetClient(server.grpc_url, timeout=600) as direct:
            gateway = OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused", timeout=600,
                             max_retries=0)
            wait_for_gateway(gateway)

            def through_gateway(path: Path) -> str:
                with open(path, "rb") as upload:
                    return gateway.audio.transcriptions.create(model="parakeet-tdt-0.6b-v3", file=upload).text

            calls = {"gateway": through_gateway, "direct": lambda path: direct.transcribe(str(path)).text}
            for path in PATHS:  # warm both paths (first requests pay allocation and connection set-up)
                round_of_requests(calls[path], clip, max(args.concurrency), max(args.concurrency))
            for concurrency in args.concurrency:
                latencies = {path: [] for path in PATHS}
                rates = {path: [] for path in PATHS}
                texts: set[str] = set()
                for round_index in range(args.rounds):
                    order = PATHS if round_index % 2 == 0 else PATHS[::-1]
                    for path in order:
                        times, rate, seen = round_of_requests(calls[path], clip, args.requests, concurrency)
                        latencies[path] += times
                        rates[path].append(rate)
                        texts |= seen
                        print(f"[gateway-bench] c{concurrency} round {round_index + 1} {path}: "
                              f"median {statistics.median(times):.3f} s, {rate:.2f} req/s", file=sys.stderr, flush=True)
                if len(texts) != 1:
                    raise SystemExit(f"the two paths gave {len(texts)} different transcripts: {sorted(texts)[:2]}")
                rows.append({"concurrency": concurrency, "requests": args.requests * args.rounds,
                             **{f"{path}_p50_s": statistics.median(latencies[path]) for path in PATHS},
                             **{f"{path}_p95_s": percentile(latencies[path], 0.95) for path in PATHS},
                             **{f"{path}_rps": statistics.median(rates[path]) for path in PATHS}})
    finally:
        server.stop(60)
    return rows


def wait_for_gateway(gateway, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            gateway.models.list()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Gateway vs direct gRPC, {args.clip_seconds:g} s clip, {args.rounds} alternating rounds of "
             f"{args.requests} requests per path and level; checkpoint {args.checkpoint.name}",
             "",
             "| concurrency | direct p50 / p95 s | gateway p50 / p95 s | added p50 ms | direct req/s | gateway req/s "
             "| gateway / direct |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        added_ms = (row["gateway_p50_s"] - row["direct_p50_s"]) * 1000
        lines.append(
            f"| {row['concurrency']} | {row['direct_p50_s']:.3f} / {row['direct_p95_s']:.3f} "
            f"| {row['gateway_p50_s']:.3f} / {row['gateway_p95_s']:.3f} | {added_ms:+.0f} "
            f"({added_ms / 10 / row['direct_p50_s']:+.1f} %) | {row['direct_rps']:.2f} | {row['gateway_rps']:.2f} "
            f"| {row['gateway_rps'] / row['direct_rps']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--clip-seconds", type=float, default=12.0)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4])
    parser.add_argument("--requests", type=int, default=12, help="requests per path per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per concurrency level")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--serve-arg", dest="serve_args", action="append", default=[],
                        help="extra parakeet-serve argument (repeatable), e.g. --serve-arg=--cpu-threads=1")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = measure(args)
    text = table(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
