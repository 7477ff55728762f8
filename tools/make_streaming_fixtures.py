#!/usr/bin/env python
"""Streaming reference fixtures made by NeMo's own buffered streaming script.

Runs ONLY in the optional NeMo environment (see docs/fixtures.md); the project never imports NeMo:

    /work/nemo-env/bin/python tools/make_streaming_fixtures.py                 # v3_small and v2_small
    /work/nemo-env/bin/python tools/make_streaming_fixtures.py --only v2_small
    /work/nemo-env/bin/python tools/make_streaming_fixtures.py --nemo-repo /path/to/NeMo/git --commit <sha>

The script is NeMo's `examples/asr/asr_chunked_inference/rnnt/speech_to_text_streaming_infer_rnnt.py`, read from a
git checkout (or mirror) of NVIDIA/NeMo at `--commit`, or from `--script FILE`. It is copied to a temporary directory,
patched at run time for pip NeMo 3.0.0's label-looping API (`PATCHES` below, the only changes), and run in a
subprocess per (checkpoint, setting, batch size) with its own Hydra arguments on a manifest of the fixture clips.
A small runner runs the patched copy as `__main__` (runpy) after wrapping, without changing their behaviour, two names
the script imports from NeMo:

- `write_transcription`, to record the hypotheses the script writes (token ids, frames, durations, text);
- `StreamingBatchedAudioBuffer`, to record the buffer's context sizes (samples) after every added chunk.

Output: tests/fixtures/<ckpt>/streaming_reference.json (see docs/fixtures.md, "Streaming references").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
AUDIO_DIR = FIXTURES / "audio"

SCRIPT_PATH = "examples/asr/asr_chunked_inference/rnnt/speech_to_text_streaming_infer_rnnt.py"
DEFAULT_NEMO_REPO = "/work/.mirror/NVIDIA+NeMo/repo"
# Newest commit of NVIDIA/NeMo available here (2025-09-20); the script last changed in 37b7c62 (2025-06-12).
DEFAULT_COMMIT = "8cfedd7203462cb251a914e700e5605444277561"

# The script at DEFAULT_COMMIT targets the label-looping API of its time; pip NeMo 3.0.0 changed two calls.
PATCHES = [
    # 3.0.0's decoding computer returns (BatchedHyps, BatchedLabelLoopingState), no alignments in between.
    ("chunk_batched_hyps, _, state = decoding_computer(", "chunk_batched_hyps, state = decoding_computer("),
    # 3.0.0's batched_hyps_to_hypotheses(batched_hyps, batch_size=None) has no alignments argument.
    ("batched_hyps_to_hypotheses(current_batched_hyps, None, batch_size=batch_size)",
     "batched_hyps_to_hypotheses(current_batched_hyps, batch_size=batch_size)"),
]

# name -> (left_context_secs, chunk_secs, right_context_secs), as given to the script.
SETTINGS = {
    "10-2-2": (10.0, 2.0, 2.0),
    "10-10-5": (10.0, 10.0, 5.0),
    "2-0.5-0.5": (2.0, 0.5, 0.5),
}
CLIPS = ["speech_en", "speech_de", "long", "short", "noise", "silence"]
# Batched runs: the script's dataloader batches the manifest in order. One batch of all clips (the long one forces
# every other clip to end while the batch goes on), and batches of two that group clips of similar length.
BATCHES = {"all": (CLIPS, 6), "pairs": (CLIPS, 2)}

RUNNER = r'''
import json, os, runpy, sys

from nemo.collections.asr.parts.utils import streaming_utils, transcribe_utils

out_path = os.environ["STREAMING_FIXTURE_OUT"]
trace = []
original_write = transcribe_utils.write_transcription
original_buffer = streaming_utils.StreamingBatchedAudioBuffer


def capture(all_hyps, cfg, model_name, *args, **kwargs):
    hyps = []
    for h in all_hyps:
        durations = h.token_duration.tolist() if h.token_duration is not None and len(h.token_duration) else None
        hyps.append({"tokens": h.y_sequence.tolist(), "frames": h.timestamp.tolist(), "durations": durations,
                     "text": h.text})
    result = original_write(all_hyps, cfg, model_name, *args, **kwargs)
    with open(out_path, "w") as f:
        json.dump({"hyps": hyps, "buffer_trace": trace}, f)
    return result


class TracingBuffer(original_buffer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trace.append({"expected_context_samples": [self.expected_context.left, self.expected_context.chunk,
                                                   self.expected_context.right], "steps": []})

    def add_audio_batch_(self, audio_batch, audio_lengths, is_last_chunk, is_last_chunk_batch):
        super().add_audio_batch_(audio_batch, audio_lengths, is_last_chunk=is_last_chunk,
                                 is_last_chunk_batch=is_last_chunk_batch)
        c, cb = self.context_size, self.context_size_batch
        trace[-1]["steps"].append({
            "added": int(audio_batch.shape[1]), "is_last_chunk": bool(is_last_chunk),
            "buffer_samples": int(self.samples.shape[1]),
            "context": [c.left, c.chunk, c.right],
            "context_batch": [cb.left.tolist(), cb.chunk.tolist(), cb.right.tolist()],
        })


# The script binds these names with `from ... import ...` when it runs, so it picks up the wrappers.
transcribe_utils.write_transcription = capture
streaming_utils.StreamingBatchedAudioBuffer = TracingBuffer
script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "streaming_script.py")
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def script_source(args) -> tuple[str, dict]:
    if args.script:
        text = Path(args.script).read_text()
        origin = {"file": str(args.script)}
    else:
        text = subprocess.run(["git", "-C", args.nemo_repo, "show", f"{args.commit}:{SCRIPT_PATH}"], check=True,
                              capture_output=True, text=True).stdout
        last = subprocess.run(["git", "-C", args.nemo_repo, "log", "-1", "--format=%H %cs", args.commit, "--",
                               SCRIPT_PATH], check=True, capture_output=True, text=True).stdout.split()
        origin = {"repository": "NVIDIA/NeMo", "commit": args.commit, "path": SCRIPT_PATH,
                  "script_last_changed_in": {"commit": last[0], "date": last[1]}}
    origin["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return text, origin


def patch(text: str) -> str:
    for old, new in PATCHES:
        if text.count(old) != 1:
            raise RuntimeError(f"patch target not found exactly once in the script: {old!r}")
        text = text.replace(old, new)
    return text


def run_script(work: Path, nemo_path: Path, manifest: Path, setting: tuple[float, float, float], batch_size: int,
               tag: str) -> dict:
    out = work / f"{tag}.capture.json"
    left, chunk, right = setting
    overrides = [
        f"model_path={nemo_path}", f"dataset_manifest={manifest}", f"output_filename={work / (tag + '.manifest.json')}",
        f"batch_size={batch_size}", f"left_context_secs={left}", f"chunk_secs={chunk}", f"right_context_secs={right}",
        "cuda=-1", "compute_dtype=float32", "calculate_wer=false", "decoding.greedy.max_symbols_per_step=10",
    ]
    env = dict(os.environ, STREAMING_FIXTURE_OUT=str(out), PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, str(work / "runner.py"), *overrides], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-20000:])
        raise RuntimeError(f"NeMo's streaming script failed ({tag})")
    written = [json.loads(line) for line in (work / (tag + ".manifest.json")).read_text().splitlines() if line.strip()]
    captured = json.loads(out.read_text())
    for record, hyp in zip(written, captured["hyps"], strict=True):
        assert record["pred_text"] == hyp["text"], (record, hyp)
    return captured


def check_audio(clips: list[str]) -> dict:
    """The script reads audio with librosa; make sure it gets the very samples the project's tests read."""
    import librosa
    import numpy as np
    import soundfile as sf

    info = {}
    for clip in clips:
        path = AUDIO_DIR / f"{clip}.wav"
        a, _ = librosa.load(str(path), sr=16000)
        b, _ = sf.read(str(path), dtype="float32")
        if not np.array_equal(a, b):
            raise RuntimeError(f"librosa and soundfile read {clip} differently")
        info[clip] = {"audio": f"audio/{clip}.wav", "samples": int(len(b)),
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return info


def build(name: str, work: Path, origin: dict) -> None:
    import nemo
    import torch

    t0 = time.time()
    nemo_path = FIXTURES / name / f"{name}.nemo"
    clips = check_audio(CLIPS)
    manifest = work / "clips.json"
    manifest.write_text("".join(json.dumps({"audio_filepath": str(AUDIO_DIR / f"{c}.wav"), "duration":
                                            clips[c]["samples"] / 16000}) + "\n" for c in CLIPS))
    settings = {}
    for setting_name, setting in SETTINGS.items():
        tag = f"{name}.{setting_name}"
        alone = run_script(work, nemo_path, manifest, setting, 1, tag + ".alone")
        record = {"seconds": list(setting),
                  "context_samples": alone["buffer_trace"][0]["expected_context_samples"],
                  "clips": {}, "batched": {}}
        for clip, hyp, trace in zip(CLIPS, alone["hyps"], alone["buffer_trace"], strict=True):
            record["clips"][clip] = {**hyp, "buffer_steps": [
                {"context": s["context"], "buffer_samples": s["buffer_samples"]} for s in trace["steps"]]}
        for batch_name, (order, batch_size) in BATCHES.items():
            batched = run_script(work, nemo_path, manifest, setting, batch_size, f"{tag}.{batch_name}")
            clips_out = {}
            for clip, hyp in zip(order, batched["hyps"], strict=True):
                single = record["clips"][clip]
                clips_out[clip] = {**hyp, "same_tokens_as_alone": hyp["tokens"] == single["tokens"],
                                   "same_frames_as_alone": hyp["frames"] == single["frames"]}
            record["batched"][batch_name] = {"order": order, "batch_size": batch_size, "clips": clips_out}
            differ = [c for c, v in clips_out.items() if not v["same_tokens_as_alone"]]
            print(f"  {name} {setting_name} batch '{batch_name}': tokens differ from alone for {differ or 'none'}",
                  flush=True)
        settings[setting_name] = record
        print(f"  {name} {setting_name}: {time.time() - t0:.0f} s", flush=True)
    reference = {
        "format": 1,
        "checkpoint": nemo_path.name,
        "versions": {"nemo": nemo.__version__, "torch": torch.__version__},
        "script": {**origin, "patches": [{"old": o, "new": n} for o, n in PATCHES],
                   "arguments": "model_path dataset_manifest output_filename batch_size left_context_secs chunk_secs "
                                "right_context_secs cuda=-1 compute_dtype=float32 calculate_wer=false "
                                "decoding.greedy.max_symbols_per_step=10"},
        "audio": clips,
        "settings": settings,
    }
    out = FIXTURES / name / "streaming_reference.json"
    out.write_text(json.dumps(reference, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{name}: {out} ({out.stat().st_size} bytes), {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="checkpoints (default: v3_small v2_small)")
    ap.add_argument("--nemo-repo", default=DEFAULT_NEMO_REPO, help="git directory of NVIDIA/NeMo")
    ap.add_argument("--commit", default=DEFAULT_COMMIT, help="NeMo commit to take the script from")
    ap.add_argument("--script", default=None, help="use this copy of the script instead of --nemo-repo/--commit")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    text, origin = script_source(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="parakeet-streaming-fixtures-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "streaming_script.py").write_text(patch(text))
    (work / "runner.py").write_text(RUNNER)
    for name in args.only or ["v3_small", "v2_small"]:
        build(name, work, origin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
