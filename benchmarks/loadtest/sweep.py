"""Sweep concurrency with perf_analyzer against the `parakeet` ensemble (gRPC), beside parakeet_core in-process.

    # start a server on free loopback ports, sweep, stop it, then time the same clips in-process
    python -m benchmarks.loadtest.sweep --serve tests/fixtures/v3_small/v3_small.nemo \
        --durations 2,5,12 --concurrency 1,2,4 --out-dir benchmarks/results/loadtest-v3-small

    # against a running server (loopback only unless --allow-remote)
    python -m benchmarks.loadtest.sweep --url 127.0.0.1:8001 --in-process CHECKPOINT --durations 12

Per clip set and concurrency it reports requests/s, RTFx (audio seconds per wall second), p50/p95/p99 latency
and the mean batch the encoder ran (from Triton's statistics, before and after each level), then the same clips
through `parakeet_core` single-stream and batched. Writes results.json, table.md and a PNG of throughput
against p95 latency into --out-dir. Every perf_analyzer run is bounded (fixed request count, or time windows
with a trial limit, plus a kill timeout), and so is the whole sweep (--time-budget).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import math
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from parakeet_client import ParakeetClient
from parakeet_triton.protocol import ENCODER_MODEL, ENSEMBLE_MODEL, WAV, WAV_LENS
from parakeet_triton.server import LaunchedServer

from . import in_process, perf_analyzer, report
from .inputs import Clip, generate_speech, load_audio_clips, parse_durations, write_input_data


@dataclass(frozen=True)
class ClipSet:
    """Requests perf_analyzer cycles through (its input-data file) and the same audio for in-process runs."""

    label: str
    input_data: Path
    clips: tuple[Clip, ...]

    @property
    def mean_seconds(self) -> float:
        return float(np.mean([clip.seconds for clip in self.clips]))


def env_assignment(text: str) -> str:
    try:
        parse_env([text])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_concurrency(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, e.g. 1,2,4; got {text!r}")
    return sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadtest.sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default="localhost:8001", help="gRPC address of a running server")
    target.add_argument("--serve", metavar="CHECKPOINT",
                        help="start `python -m parakeet_triton.serve --checkpoint CHECKPOINT` on free loopback ports")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra parakeet-serve argument (repeatable), e.g. --serve-arg=--max-batch-size=8")
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE", type=env_assignment,
                        help="environment variable for the server only (repeatable), e.g. OMP_NUM_THREADS=1")
    parser.add_argument("--serve-timeout", type=float, default=900.0, help="seconds to wait for readiness")
    clips = parser.add_mutually_exclusive_group()
    clips.add_argument("--durations", type=parse_durations, default=[2.0, 5.0, 12.0],
                       help="generated speech (espeak-ng) of these lengths in seconds (default 2,5,12)")
    clips.add_argument("--audio", nargs="+", help="real recordings, one clip set each")
    clips.add_argument("--input-data", nargs="+", type=Path, help="ready perf_analyzer input-data JSON files")
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1, 2, 4], help="levels (default 1,2,4)")
    parser.add_argument("--window-ms", type=int, default=5000,
                        help="perf_analyzer measurement window, at least 3 x (warm latency) x concurrency; each level "
                             "reports its last three windows (default 5000)")
    parser.add_argument("--requests-per-level", type=int, default=None,
                        help="instead of time windows, send this many requests per level (coarse throughput)")
    parser.add_argument("--level-timeout", type=float, default=None,
                        help="kill a perf_analyzer run after this many seconds (default: from the window length)")
    parser.add_argument("--time-budget", type=float, default=1800.0,
                        help="skip the remaining levels once the sweep has run this many seconds")
    parser.add_argument("--in-process", metavar="CHECKPOINT",
                        help="checkpoint for the in-process baseline (default: the --serve checkpoint)")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="in-process batched run size (default: the highest concurrency level, at most 8)")
    parser.add_argument("--in-process-budget", type=float, default=30.0, help="seconds per in-process mode")
    parser.add_argument("--device", default="cpu", help="in-process device (default cpu)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="results folder (default benchmarks/results/loadtest-<time>)")
    parser.add_argument("--perf-analyzer", help="perf_analyzer binary (default: PATH, else the tritonclient wheel)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --url that is not a loopback address")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    out_dir = args.out_dir or Path("benchmarks/results") / f"loadtest-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.serve is None and not args.allow_remote and not is_loopback(args.url):
        print(f"error: {args.url} is not a loopback address; pass --allow-remote to load-test it", file=sys.stderr)
        return 2
    analyzer = perf_analyzer.locate(out_dir, args.perf_analyzer)
    clip_sets = prepare_clip_sets(args, out_dir / "inputs")
    checkpoint = args.in_process or args.serve
    served: list[report.ServedResult] = []
    local: list[report.InProcessResult] = []
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "benchmarks.loadtest.sweep",
                                                        *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "perf_analyzer": analyzer.version(),
        "checkpoint": checkpoint,
        "server_env": parse_env(args.serve_env),
        "concurrency": args.concurrency,
    }
    _say(f"{meta['perf_analyzer']} at {analyzer.executable}; results in {out_dir}")
    _say("by hand: python -m benchmarks.loadtest.perf_analyzer --input-data FILE.json prints the command line")
    model = None
    if checkpoint and not args.no_in_process:
        model = load_in_process(checkpoint, args.device)
        meta["torch_threads"] = _torch_threads()
    batch_size = args.batch_size or min(8, max(args.concurrency))
    server = None
    exit_code = 0
    try:
        if args.serve:
            server = start_server(args.serve, args.serve_arg, out_dir / "server.log",
                                  max_seconds=max(c.seconds for s in clip_sets for c in s.clips),
                                  env=parse_env(args.serve_env))
            server.wait_ready(args.serve_timeout)
            _say(f"server ready at {server.grpc_url}")
            url = server.grpc_url
        else:
            url = args.url
        meta["url"] = url
        latencies = warm_up(url, clip_sets, args.level_timeout or 600.0)
        meta["warm_latency_s"] = latencies
        deadline = started + args.time_budget
        for clip_set in clip_sets:  # served then in-process per clip set, so that both see the same conditions
            levels, failure = sweep(analyzer, url, clip_set, args, out_dir, deadline, latencies[clip_set.label])
            served += levels
            if failure:
                print(f"error: {failure}", file=sys.stderr)
                exit_code = 1
            if model is not None and time.monotonic() < deadline:
                local += measure_in_process(model, clip_set, batch_size, args.in_process_budget)
    except (perf_analyzer.PerfAnalyzerError, RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        exit_code = 1
    finally:
        if server is not None:
            server.stop(60)
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.write_results(out_dir / "results.json", served, local, meta)
    table = report.markdown_tables(served, local)
    (out_dir / "table.md").write_text(
        f"Command: `{meta['command']}`\n\n{meta['date']}, {meta['cpus']} CPUs, load average (1/5/15 min) "
        f"{meta['load_average_at_start']} at start, {meta['load_average_at_end']} at end; {meta['perf_analyzer']}"
        f"\n\n{table}")
    written = [out_dir / "results.json", out_dir / "table.md"]
    if served or local:
        try:
            written.append(report.plot(out_dir / "throughput_vs_p95.png", served, local,
                                       title=report.plot_title(meta)))
        except ImportError:
            _say("matplotlib is not installed (pip install matplotlib): no plot")
    print(table)
    _say(f"wrote {', '.join(map(str, written))} in {time.monotonic() - started:.0f} s")
    return exit_code


def prepare_clip_sets(args: argparse.Namespace, inputs_dir: Path) -> list[ClipSet]:
    if args.input_data:
        return [ClipSet(path.stem, path, tuple(read_input_clips(path))) for path in args.input_data]
    clips = load_audio_clips(args.audio) if args.audio else [generate_speech(d) for d in args.durations]
    return [ClipSet(clip.label, write_input_data([clip], inputs_dir / f"{clip.label}.json"), (clip,))
            for clip in clips]


def read_input_clips(path: Path) -> list[Clip]:
    """The clips of an input-data JSON file (`b64` or `content` WAV data, cut to WAV_LENS)."""
    document = json.loads(path.read_text())
    clips = []
    for number, entry in enumerate(document["data"]):
        wav = entry[WAV]
        if "b64" in wav:
            samples = np.frombuffer(base64.b64decode(wav["b64"]), dtype="<f4").astype(np.float32)
        else:
            samples = np.asarray(wav["content"], dtype=np.float32).reshape(-1)
        lens = entry.get(WAV_LENS, {}).get("content")
        clips.append(Clip(f"{path.stem}[{number}]", samples[: int(lens[0])] if lens else samples))
    return clips


def warm_up(url: str, clip_sets: Sequence[ClipSet], timeout_s: float) -> dict[str, float]:
    """Two requests per clip set; first-call costs stay out of the figures. Returns the second's seconds."""
    latencies = {}
    with ParakeetClient(url, timeout=timeout_s) as client:
        for clip_set in clip_sets:
            client.transcribe(clip_set.clips[0].samples)
            started = time.perf_counter()
            client.transcribe(clip_set.clips[0].samples)
            latencies[clip_set.label] = time.perf_counter() - started
    return latencies


def window_ms_for(requested_ms: int, latency_s: float, concurrency: int) -> int:
    """A window long enough for several requests to start and finish in it: at least 3 x latency x concurrency
    (perf_analyzer fails a window in which no request completed)."""
    return max(requested_ms, int(math.ceil(3000 * latency_s * concurrency / 1000.0)) * 1000)


def sweep(analyzer: perf_analyzer.PerfAnalyzer, url: str, clip_set: ClipSet, args: argparse.Namespace,
          out_dir: Path, deadline: float, latency_s: float) -> tuple[list[report.ServedResult], str | None]:
    """perf_analyzer at each concurrency level for one clip set; the encoder's mean batch from statistics.

    Returns the levels measured and, when a perf_analyzer run failed (the higher levels are then skipped), why.
    """
    import tritonclient.grpc as grpcclient

    results = []
    statistics_client = grpcclient.InferenceServerClient(url)
    try:
        for concurrency in args.concurrency:
            if time.monotonic() > deadline:
                _say(f"time budget spent: skipping {clip_set.label} at concurrency {concurrency} and above")
                break
            window_ms = window_ms_for(args.window_ms, latency_s, concurrency)
            try:
                results.append(run_level(analyzer, url, clip_set, concurrency, window_ms, args, out_dir,
                                         statistics_client))
            except perf_analyzer.PerfAnalyzerError as error:
                return results, str(error)
    finally:
        statistics_client.close()
    return results, None


def run_level(analyzer: perf_analyzer.PerfAnalyzer, url: str, clip_set: ClipSet, concurrency: int, window_ms: int,
              args: argparse.Namespace, out_dir: Path, statistics_client: object) -> report.ServedResult:
    settings = perf_analyzer.LoadSettings(
        concurrency=concurrency, window_ms=window_ms,
        request_count=max(args.requests_per_level, concurrency) if args.requests_per_level else None)
    stem = out_dir / f"perf_{clip_set.label}_c{concurrency}"
    arguments = perf_analyzer.command_arguments(ENSEMBLE_MODEL, url, "grpc", clip_set.input_data,
                                                stem.with_suffix(".csv"), settings)
    before = encoder_counts(statistics_client)
    completed = analyzer.run(arguments, timeout_s=args.level_timeout or settings.time_limit_s())
    after = encoder_counts(statistics_client)
    stem.with_suffix(".log").write_text(f"$ {analyzer.command_line(arguments)}\n"
                                        f"{completed.stdout}\n{completed.stderr}")
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr).strip()[-1500:]
        raise perf_analyzer.PerfAnalyzerError(f"perf_analyzer exited {completed.returncode} for "
                                              f"{clip_set.label} at concurrency {concurrency}:\n{tail}")
    row = perf_analyzer.parse_csv_report(stem.with_suffix(".csv").read_text())[0]
    result = report.ServedResult(
        clips=clip_set.label, clip_seconds=clip_set.mean_seconds, concurrency=concurrency,
        requests_per_second=row.requests_per_second, p50_ms=row.p50_ms, p95_ms=row.p95_ms,
        p99_ms=row.p99_ms, mean_encoder_batch=mean_batch(before, after))
    _say(f"{clip_set.label} c{concurrency}: {result.requests_per_second:.2f} req/s, RTFx {result.rtfx:.1f}, "
         f"p95 {result.p95_ms:.0f} ms, encoder batch {result.mean_encoder_batch}")
    return result


def encoder_counts(statistics_client: object) -> tuple[int, int] | None:
    """(inferences, executions) of the encoder so far, or None when statistics are unavailable."""
    try:
        stats = statistics_client.get_inference_statistics(ENCODER_MODEL, as_json=True)
        model = stats["model_stats"][0]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))
    except Exception as error:  # statistics are a nice-to-have: report n/a rather than fail the sweep
        _say(f"warning: no statistics for {ENCODER_MODEL}: {error}")
        return None


def mean_batch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Clips per encoder execution between two statistics snapshots."""
    if before is None or after is None:
        return None
    executions = after[1] - before[1]
    return None if executions <= 0 else (after[0] - before[0]) / executions


def load_in_process(checkpoint: str, device: str) -> object:
    import parakeet_core

    _say(f"in-process: loading {checkpoint} on {device}")
    return parakeet_core.from_pretrained(checkpoint, device=device)


def measure_in_process(model: object, clip_set: ClipSet, batch_size: int,
                       budget_s: float) -> list[report.InProcessResult]:
    """Single stream (batch 1), then batches of `batch_size`, through parakeet_core in this process."""
    results = []
    for size in sorted({1, batch_size}):
        result = in_process.measure(model, clip_set.label, clip_set.clips, size, budget_s=budget_s)
        results.append(result)
        _say(f"{clip_set.label} {result.label}: RTFx {result.rtfx:.1f}, p50 {result.p50_ms:.0f} ms "
             f"({result.calls} calls)")
    return results


def parse_env(assignments: Sequence[str]) -> dict[str, str]:
    """`["NAME=VALUE", ...]` as a dict; a malformed entry is an error."""
    env = {}
    for assignment in assignments:
        name, separator, value = assignment.partition("=")
        if not separator or not name:
            raise ValueError(f"expected NAME=VALUE, got {assignment!r}")
        env[name] = value
    return env


def is_loopback(url: str) -> bool:
    """Whether host:port names this machine (127.0.0.0/8, ::1, or a name resolving only to those)."""
    host = url.split("://")[-1].rsplit(":", 1)[0].strip("[]") if ":" in url else url
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def start_server(checkpoint: str, extra_args: Sequence[str], log_path: Path, max_seconds: float,
                 env: dict[str, str] | None = None) -> LaunchedServer:
    """`parakeet-serve` for the sweep on free loopback ports, accepting clips up to `max_seconds`; the server's
    environment is ours less PARAKEET_* and OMP_* variables, plus `env` (--serve-env)."""
    args = ["--max-audio-seconds", f"{max(60.0, max_seconds + 1):g}", *extra_args]
    settings = "".join(f"{name}={shlex.quote(value)} " for name, value in (env or {}).items())
    _say(f"starting server: {settings}parakeet-serve --checkpoint {shlex.quote(checkpoint)} {shlex.join(args)} "
         f"(log {log_path})")
    return LaunchedServer.start(checkpoint, args, log_path=log_path, env=env)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _say(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
