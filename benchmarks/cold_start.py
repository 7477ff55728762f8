"""Cold start and memory: parakeet_core beside nano-parakeet and NeMo, and `parakeet-serve`'s time to ready.

In-process: each implementation runs in fresh processes (rounds alternate between implementations, so a slow
spell of a shared machine does not fall on one), each timing its import, its checkpoint load and its first
transcript of a 12 s clip; cold start is process launch to first transcript; peak RSS is the process's high-water
mark. Served: `parakeet-serve` on the same checkpoint, start to ready, then the resident memory of the launcher,
tritonserver and each stage process, and the bytes each read from disk (/proc/PID/io; with --drop-caches the page
cache is emptied first, as root, so that these are real reads of a cold file).

    python benchmarks/cold_start.py --checkpoint /work/cache/full-v3-rate04/parakeet-tdt-0.6b-v3.nemo \\
        [--nemo-python /work/nemo-env/bin/python] [--rounds 3] [--serve-rounds 3] [--drop-caches]
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
sys.path[:0] = [str(REPO)]

from benchmarks.processes import descendants, proc_field  # noqa: E402

SPEECH = REPO / "tests" / "fixtures" / "audio" / "long.wav"
HF_REPO_ID = "nvidia/parakeet-tdt-0.6b-v3"
KINDS = ("parakeet_core", "nano_parakeet", "nemo")


def worker(kind: str, checkpoint: str, clip: str, launched: float) -> dict:
    """Runs in the measured process: import, load, first transcript, each timed; peak RSS at the end."""
    started = time.time()
    import resource

    import soundfile
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    samples, _ = soundfile.read(clip, dtype="float32")
    if kind == "parakeet_core":
        import parakeet_core

        imported = time.time()
        model = parakeet_core.from_pretrained(checkpoint, device="cpu")
        loaded = time.time()
        model.transcribe(samples)
    elif kind == "nano_parakeet":
        import nano_parakeet

        imported = time.time()
        model = nano_parakeet.from_pretrained(HF_REPO_ID, device="cpu")
        loaded = time.time()
        model.transcribe_audio(torch.from_numpy(samples))
    elif kind == "nemo":
        import logging

        logging.disable(logging.WARNING)
        from nemo.collections.asr.models import ASRModel

        imported = time.time()
        model = ASRModel.restore_from(checkpoint, map_location="cpu").eval()
        loaded = time.time()
        model.transcribe([samples], batch_size=1, verbose=False)
    else:
        raise ValueError(kind)
    first = time.time()
    return {"kind": kind, "startup_s": started - launched, "import_s": imported - started, "load_s": loaded - imported,
            "first_s": first - loaded, "cold_start_s": first - launched,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_worker(python: str, kind: str, checkpoint: Path, clip: Path, env: dict) -> dict | None:
    launched = time.time()
    command = [python, __file__, "--worker", kind, "--checkpoint", str(checkpoint), "--clip", str(clip),
               "--launched", repr(launched)]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        print(f"[{kind}] failed:\n{process.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(process.stdout.strip().splitlines()[-1])


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _process_label(pid: int) -> str:
    command = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    text = " ".join(part.decode(errors="replace") for part in command)
    for stage in ("preprocessor", "encoder", "decoder"):
        if f"/{stage}/1/model.py" in text:
            return stage
    if "tritonserver" in text.split(" ")[0]:
        return "tritonserver"
    return "launcher" if "parakeet_triton.serve" in text else Path(command[0].decode()).name


def _process_figures(pid: int) -> tuple[float, float, float]:
    """(resident MiB, proportional MiB (shared pages divided among their processes), MiB read from disk)."""
    return (proc_field(pid, "status", "VmRSS") / 1024, proc_field(pid, "smaps_rollup", "Pss") / 1024,
            proc_field(pid, "io", "read_bytes") / 2**20)


def serve_once(checkpoint: Path, work: Path, drop_caches: bool) -> dict:
    from parakeet_triton.server import LaunchedServer

    if drop_caches:
        drop_page_cache()
    started = time.perf_counter()
    server = LaunchedServer.start(checkpoint, ["--device", "cpu"], log_path=work / "serve.log", cwd=REPO)
    try:
        server.wait_ready(1800)
        ready = time.perf_counter() - started
        per_process = {}
        for pid in [server.pid, *descendants(server.pid)]:
            try:
                per_process[_process_label(pid)] = _process_figures(pid)
            except OSError:
                continue
    finally:
        server.stop(60)
    return {"ready_s": ready, "processes": per_process}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--hf-cache", type=Path, default=None,
                        help="HF hub cache holding the same checkpoint for nano-parakeet (default: hf-cache/ beside it)")
    parser.add_argument("--nemo-python", default=None, help="interpreter of an environment with nemo-toolkit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clip-seconds", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation, alternating")
    parser.add_argument("--serve-rounds", type=int, default=3, help="parakeet-serve starts (0: skip)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache before each server start (root): a cold file")
    parser.add_argument("--skip", default="", help="comma-separated implementations to skip: nano_parakeet,nemo")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--clip", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, str(args.checkpoint), args.clip, args.launched)))
        return 0

    import soundfile

    hf_cache = args.hf_cache or args.checkpoint.parent / "hf-cache"
    env = dict(os.environ, BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(hf_cache), PYTHONPATH=str(REPO))
    skip = set(filter(None, args.skip.split(",")))
    pythons = {"parakeet_core": sys.executable, "nano_parakeet": sys.executable, "nemo": args.nemo_python}
    kinds = [kind for kind in KINDS if kind not in skip and pythons[kind]]
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    served: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        clip = Path(scratch) / "clip.wav"
        samples, rate = soundfile.read(SPEECH, dtype="float32")
        soundfile.write(clip, samples[: int(args.clip_seconds * rate)], rate, subtype="FLOAT")
        for _ in range(args.rounds):
            for kind in kinds:
                result = run_worker(pythons[kind], kind, args.checkpoint, clip, env)
                if result is not None:
                    runs[kind].append(result)
                    print(f"[cold-start] {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()
                                                             if isinstance(v, float)), file=sys.stderr, flush=True)
        for _ in range(args.serve_rounds):
            served.append(serve_once(args.checkpoint, Path(scratch), args.drop_caches))
            print(f"[cold-start] served: ready {served[-1]['ready_s']:.1f} s", file=sys.stderr, flush=True)

    weights_gib = args.checkpoint.stat().st_size / 2**30
    print(f"\n## Cold start, CPU fp32, {args.threads} threads, {args.clip_seconds:g} s clip, {args.checkpoint.name} "
          f"({weights_gib:.2f} GiB); medians of {args.rounds} fresh processes per implementation\n")
    if args.rounds:
        print("| implementation | cold start s | of which start / import / load / first s | peak RSS GiB |")
        print("|---|---|---|---|")
    for kind, results in runs.items() if args.rounds else ():
        if not results:
            print(f"| {kind} | failed | | |")
            continue

        def median(key: str) -> float:
            return statistics.median(r[key] for r in results)

        print(f"| {kind} | {median('cold_start_s'):.1f} | {median('startup_s'):.1f} / {median('import_s'):.1f} / "
              f"{median('load_s'):.2f} / {median('first_s'):.1f} | {median('peak_rss_gib'):.2f} |")
    if served:
        labels = sorted({label for run in served for label in run["processes"]})
        cache = "page cache emptied before each start" if args.drop_caches else "checkpoint in the page cache"
        print(f"\n`parakeet-serve` ({cache}): ready in "
              + ", ".join(f"{run['ready_s']:.1f}" for run in served)
              + f" s (median {statistics.median(run['ready_s'] for run in served):.1f} s)\n")
        print("| process | RSS MiB | PSS MiB | read from disk MiB |")
        print("|---|---|---|---|")
        for label in labels:
            values = [run["processes"][label] for run in served if label in run["processes"]]
            print(f"| {label} | " + " | ".join(f"{statistics.median(v[i] for v in values):.0f}" for i in range(3)) + " |")
        totals = [[sum(v[i] for v in run["processes"].values()) for i in range(3)] for run in served]
        print("| all | " + " | ".join(f"{statistics.median(t[i] for t in totals):.0f}" for i in range(3)) + " |")
        print(f"\n(medians over the starts) Sum of the server's RSS minus the checkpoint's size: "
              f"{statistics.median(t[0] for t in totals) / 1024 - weights_gib:.2f} GiB; sum of PSS minus it: "
              f"{statistics.median(t[1] for t in totals) / 1024 - weights_gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
