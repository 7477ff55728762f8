"""Served throughput under CPU contention: the default thread settings against hand-picked ones.

Starts `parakeet-serve` (CPU, the v3_small fixture by default) once per thread setting and sends `--requests`
clips of `--clip-seconds` of speech-like audio over gRPC at each `--concurrency`, first with the machine idle,
then with a busy neighbour: a process spinning on one core (pinned to the first usable core), as another pod on
the node would. Prints requests/s per setting and scenario, and for each scenario the best setting's throughput
over the default's (the target: at most 1.5).

    python benchmarks/contention.py [--requests 40] [--concurrency 1,4] [--clip-seconds 4] [--out FILE.md]

Settings: `default` (what `parakeet-serve` chooses: the usable cores divided among the stage processes,
OMP_WAIT_POLICY=PASSIVE), `--cpu-threads 1` .. all cores, and all cores with OMP_WAIT_POLICY=ACTIVE (torch's own
defaults before the launcher chose them; for reference, not a candidate). Exit status 1 if the default is more
than 1.5x slower than the best candidate in some scenario, 2 if a request failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from benchmarks.soak import DEFAULT_CHECKPOINT, _speech_like, start_serve  # noqa: E402
from parakeet_client import ParakeetClient, RetryPolicy  # noqa: E402
from parakeet_triton.render import usable_cpus  # noqa: E402

TARGET_RATIO = 1.5
BUSY_LOOP = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    serve_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    candidate: bool = True


def settings(cores: int) -> list[Setting]:
    rows = [Setting("default")]
    rows += [Setting(f"--cpu-threads {n}", ("--cpu-threads", str(n))) for n in range(1, cores + 1)]
    rows.append(Setting(f"--cpu-threads {cores}, OMP_WAIT_POLICY=ACTIVE", ("--cpu-threads", str(cores)),
                        (("OMP_WAIT_POLICY", "ACTIVE"),), candidate=False))
    return rows


class Neighbour:
    """A process spinning on one core while the block runs."""

    def __init__(self, core: int):
        self.core = core
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Neighbour":
        self.process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(self.core)])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


def throughput(client: ParakeetClient, clip, requests: int, concurrency: int) -> float:
    """Requests per second for `requests` transcriptions of `clip` from `concurrency` threads."""
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: client.transcribe(clip), range(requests)))
    return requests / (time.monotonic() - started)


def measure(setting: Setting, args: argparse.Namespace, clip, core: int) -> dict[str, float]:
    log_dir = Path(tempfile.mkdtemp(prefix="contention-"))
    server = start_serve(args.checkpoint, list(setting.serve_args), log_dir / "server.log", dict(setting.env))
    results = {}
    try:
        server.wait_ready(600)
        with ParakeetClient(server.grpc_url, timeout=300, retry=RetryPolicy(attempts=1)) as client:
            throughput(client, clip, 4, 1)  # warm-up
            for scenario in ("idle", "busy neighbour"):
                for concurrency in args.concurrency:
                    if scenario == "idle":
                        rate = throughput(client, clip, args.requests, concurrency)
                    else:
                        with Neighbour(core):
                            rate = throughput(client, clip, args.requests, concurrency)
                    results[f"{scenario}, c{concurrency}"] = rate
                    print(f"  {setting.name}: {scenario}, c{concurrency}: {rate:.2f} req/s", file=sys.stderr, flush=True)
    finally:
        server.stop(120)
        shutil.rmtree(log_dir, ignore_errors=True)
    return results


def report(rows: list[Setting], measured: dict[str, dict[str, float]], args: argparse.Namespace, cores: int) -> tuple[str, bool]:
    scenarios = list(next(iter(measured.values())))
    lines = [f"## Served throughput under contention: {args.checkpoint.name}, {args.clip_seconds:g} s clips, "
             f"{args.requests} requests per cell, {cores} usable cores",
             "",
             "requests/s over gRPC; busy neighbour = one process spinning on one core.",
             "",
             "| setting | " + " | ".join(scenarios) + " |",
             "|---" * (len(scenarios) + 1) + "|"]
    for setting in rows:
        lines.append(f"| {setting.name} | " + " | ".join(f"{measured[setting.name][s]:.2f}" for s in scenarios) + " |")
    ratios = {s: max(measured[r.name][s] for r in rows if r.candidate) / measured["default"][s] for s in scenarios}
    lines.append("| best candidate / default | " + " | ".join(f"{ratios[s]:.2f}x" for s in scenarios) + " |")
    ok = all(ratio <= TARGET_RATIO for ratio in ratios.values())
    lines += ["", f"Target: the default within {TARGET_RATIO}x of the best candidate in every column: "
              + ("met." if ok else "**missed**.")]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4])
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    cores = usable_cpus()
    core = min(os.sched_getaffinity(0))
    clip = _speech_like(args.clip_seconds)
    rows = settings(cores)
    measured = {}
    try:
        for setting in rows:
            measured[setting.name] = measure(setting, args, clip, core)
    except Exception as error:  # noqa: BLE001 - a failed request ends the run with its reason
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    text, ok = report(rows, measured, args, cores)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
