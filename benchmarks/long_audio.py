"""Long audio on the CPU: wall time, RTFx and peak RSS for 1-60 minutes of speech, in-process and served.

The model is the synthetic full-size v3 (random weights, blank bias tuned to ~0.4 tokens per encoder frame; see
`synthetic.py`), written once as a `.nemo` and loaded through `from_pretrained` like a real checkpoint. The audio
is `tools/long_audio.speech_like(seconds)`: the committed speech clips with pauses and noise, repeated. Attention
is "auto" (full up to 600 s, local (256, 256) beyond), as a user gets by default.

Each length runs in a fresh process, so each peak RSS belongs to that length alone:
- in-process: load, warm up on 5 s, then the clip through `featurize`, `encode`, `decode` and `to_transcript`
  (what `transcribe` does for one clip), each stage timed; peak RSS is the process's VmHWM;
- served: `parakeet-serve` on loopback ports, warm up on 5 s, then one gRPC request through `parakeet-client`'s
  API; peak RSS is the sum of VmHWM over the server and its backend stubs (an upper bound on their joint peak).

    python benchmarks/long_audio.py [--minutes 1,10,30,60] [--threads 2] [--modes in-process,served] [--out DIR]
    python benchmarks/long_audio.py --dry-run     # the v3_small fixture, 0.5 and 1 minute, to test the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from benchmarks.processes import descendants, proc_field  # noqa: E402

WARMUP_SECONDS = 5.0


def speech_like(seconds: float):
    """tools/long_audio.speech_like (imported by path: this file has the same module name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_long_audio", REPO / "tools" / "long_audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.speech_like(seconds)
SMALL_FIXTURE = REPO / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"


def _text_summary(text: str) -> dict:
    import hashlib

    return {"words": len(text.split()), "chars": len(text), "text_sha256": hashlib.sha256(text.encode()).hexdigest()}


def run_in_process(checkpoint: str, seconds: float, threads: int) -> dict:
    import torch

    import parakeet_core
    from parakeet_core.audio import check_waveform

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model = parakeet_core.from_pretrained(checkpoint, device="cpu")
    model.transcribe(speech_like(WARMUP_SECONDS))
    ready = time.perf_counter() - started
    rss_ready = proc_field(os.getpid(), "status", "VmRSS")
    samples = speech_like(seconds)
    started = time.perf_counter()
    check_waveform(samples, min_samples=model.min_samples)
    batch, lengths = torch.from_numpy(samples)[None], torch.tensor([len(samples)])
    features, feature_lengths = model.featurize(batch, lengths)
    featurized = time.perf_counter()
    encoded, encoded_lengths = model.encode(features, feature_lengths)
    encoded_at = time.perf_counter()
    hypothesis = model.decode(encoded, encoded_lengths)[0]
    transcript = model.to_transcript(hypothesis)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "ready_s": ready, **_text_summary(transcript.text),
            "featurize_s": featurized - started, "encode_s": encoded_at - featurized,
            "decode_s": wall - (encoded_at - started), "encoder_frames": int(encoded_lengths[0]),
            "tokens": len(transcript.token_ids), "rss_ready_gib": rss_ready / 2**20,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_served(checkpoint: str, seconds: float, threads: int, scratch: Path) -> dict:
    from parakeet_client import ParakeetClient
    from parakeet_triton.server import LaunchedServer

    server = LaunchedServer.start(checkpoint, ["--device", "cpu", "--cpu-threads", str(threads),
                                               "--max-audio-seconds", str(max(10800.0, seconds))],
                                  log_path=scratch / f"server-{seconds:.0f}s.log", cwd=REPO)
    try:
        started = time.perf_counter()
        server.wait_ready(1800)
        with ParakeetClient(server.grpc_url, timeout=4 * 3600) as client:
            client.transcribe(speech_like(WARMUP_SECONDS))
            ready = time.perf_counter() - started
            processes = [server.pid, *descendants(server.pid)]
            rss_ready = sum(proc_field(pid, "status", "VmRSS") for pid in processes)
            samples = speech_like(seconds)
            started = time.perf_counter()
            transcript = client.transcribe(samples)
            wall = time.perf_counter() - started
            processes = [server.pid, *descendants(server.pid)]
            peak = sum(proc_field(pid, "status", "VmHWM") for pid in processes)
    finally:
        server.stop(120)
    return {"wall_s": wall, "ready_s": ready, **_text_summary(transcript.text), "processes": len(processes),
            "rss_ready_gib": rss_ready / 2**20, "peak_rss_gib": peak / 2**20}


def make_checkpoint(scratch: Path, dry_run: bool) -> tuple[Path, dict]:
    if dry_run:
        return SMALL_FIXTURE, {"model": "v3_small fixture"}
    import synthetic

    model, info = synthetic.build(device="cpu")
    path = synthetic.save_nemo(model, scratch / "synthetic-v3-full.nemo", info["raw_config"],
                               info["tokenizer_model"])
    return path, {"model": "synthetic full-size v3", "parameters": info["parameters"],
                  "tokens_per_frame_12s": round(info["tokens_per_frame"], 3)}


def child(args: argparse.Namespace) -> int:
    if args.child == "in-process":
        result = run_in_process(args.checkpoint, args.seconds, args.threads)
    else:
        result = run_served(args.checkpoint, args.seconds, args.threads, Path(args.scratch))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", default="1,10,30,60", help="clip lengths in minutes (default: %(default)s)")
    parser.add_argument("--modes", default="in-process,served", help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None, help="a .nemo to use instead of building the synthetic one")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and table.md here")
    parser.add_argument("--dry-run", action="store_true", help="the small fixture at 0.5 and 1 minute")
    parser.add_argument("--child", choices=("in-process", "served"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    minutes = [0.5, 1.0] if args.dry_run else [float(m) for m in args.minutes.split(",")]
    modes = args.modes.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="long-audio-bench-"))
    if args.checkpoint:
        checkpoint, model_info = Path(args.checkpoint), {"model": Path(args.checkpoint).name}
    else:
        checkpoint, model_info = make_checkpoint(scratch, args.dry_run)
    print(f"model: {model_info}; scratch {scratch}", flush=True)
    rows = []
    for mode in modes:
        for length in minutes:
            command = [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint),
                       "--seconds", str(length * 60), "--threads", str(args.threads), "--scratch", str(scratch)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=str(REPO))
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{mode} {length} min failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}", flush=True)
                return 1
            result = json.loads(lines[-1][len("RESULT "):])
            result.update(mode=mode, minutes=length, rtfx=length * 60 / result["wall_s"])
            rows.append(result)
            print(json.dumps(result), flush=True)

    local = {r["minutes"]: r["text_sha256"] for r in rows if r["mode"] == "in-process"}
    table = ["| mode | audio min | wall s | RTFx | peak RSS GiB | RSS when ready GiB | text chars | text == in-process |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        same = "-" if row["mode"] == "in-process" or row["minutes"] not in local else (
            "yes" if local[row["minutes"]] == row["text_sha256"] else "NO")
        table.append(f"| {row['mode']} | {row['minutes']:g} | {row['wall_s']:.1f} | {row['rtfx']:.2f} | "
                     f"{row['peak_rss_gib']:.2f} | {row['rss_ready_gib']:.2f} | {row.get('chars', '?')} | {same} |")
    split = [r for r in rows if "encode_s" in r]
    if split:
        table += ["", "| in-process, audio min | encoder frames | featurize s | encode s | encoder frames/s | decode s | "
                  "tokens | tokens/frame | decode ms/frame |", "|---|---|---|---|---|---|---|---|---|"]
        for r in split:
            table.append(f"| {r['minutes']:g} | {r['encoder_frames']} | {r['featurize_s']:.1f} | {r['encode_s']:.1f} | "
                         f"{r['encoder_frames'] / r['encode_s']:.0f} | {r['decode_s']:.1f} | {r['tokens']} | "
                         f"{r['tokens'] / r['encoder_frames']:.2f} | {1000 * r['decode_s'] / r['encoder_frames']:.2f} |")
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) > 1:
            table.append(f"\n{mode}: RTFx at {mine[-1]['minutes']:g} min / at {mine[0]['minutes']:g} min = "
                         f"{mine[-1]['rtfx'] / mine[0]['rtfx']:.2f}")
    header = (f"## Long audio, CPU fp32, {args.threads} threads, attention auto, {model_info['model']}"
              f" ({os.cpu_count()} CPUs)")
    print("\n" + header + "\n\n" + "\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"model": model_info, "threads": args.threads,
                                                           "rows": rows}, indent=2))
        (args.out / "table.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
