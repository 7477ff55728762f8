"""Build perf_analyzer `--input-data` JSON for the `parakeet` ensemble from real audio or generated speech.

    python -m benchmarks.loadtest.inputs --durations 2,5,12,30 --out-dir benchmarks/results/inputs
    python -m benchmarks.loadtest.inputs --audio talk.wav other.m4a --out-dir benchmarks/results/inputs

Generated speech comes from espeak-ng (deterministic), resampled to 16 kHz with soxr and cut to exactly the
requested duration. Each JSON file holds one or more clips as batch-1 requests: `WAV` (FP32, shape [T]) and
`WAV_LENS` (INT32, shape [1]); perf_analyzer cycles through them.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile

from parakeet_client.audio import load_clip, to_mono_16k
from parakeet_triton.protocol import SAMPLE_RATE, WAV, WAV_LENS

SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Speech recognition turns spoken words into written text for everyone.",
    "A large language model is not required to transcribe this sentence.",
    "Please send the quarterly report to the finance team before Friday.",
    "The weather today is cloudy with a chance of light rain in the evening.",
    "Triton Inference Server batches requests from many clients together.",
    "She sells sea shells by the sea shore while the sun is setting.",
    "Numbers like twelve, thirty four and one hundred are spoken clearly.",
)
ESPEAK_VOICE = "en-us"
ESPEAK_WORDS_PER_MINUTE = 160
FADE_SECONDS = 0.02


@dataclass(frozen=True)
class Clip:
    """One benchmark clip: 16 kHz mono float32 samples and a label."""

    label: str
    samples: np.ndarray

    def __post_init__(self) -> None:
        if self.samples.ndim != 1 or self.samples.dtype != np.float32 or self.samples.size == 0:
            raise ValueError(f"{self.label}: samples must be non-empty 1-D float32")

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


def generate_speech(seconds: float, espeak: str | None = None) -> Clip:
    """Speech from espeak-ng, exactly `seconds` long (text repeated as needed, the end faded out)."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    espeak = espeak or shutil.which("espeak-ng")
    if espeak is None:
        raise FileNotFoundError("espeak-ng is not on PATH (apt-get install espeak-ng), or use --audio FILE...")
    needed = int(round(seconds * SAMPLE_RATE))
    sentences = max(1, math.ceil(seconds / 3.5))
    while True:
        text = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(sentences))
        samples = _speak(espeak, text)
        if samples.size >= needed:
            break
        sentences *= 2
    samples = samples[:needed].copy()
    fade = min(needed, int(FADE_SECONDS * SAMPLE_RATE))
    samples[needed - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return Clip(f"speech_{seconds:g}s", samples)


def _speak(espeak: str, text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="loadtest-espeak-") as work:
        wav_path = Path(work) / "speech.wav"
        subprocess.run([espeak, "-v", ESPEAK_VOICE, "-s", str(ESPEAK_WORDS_PER_MINUTE), "-w", str(wav_path), text],
                       check=True, capture_output=True, timeout=120)
        samples, rate = soundfile.read(str(wav_path), dtype="float32")
    return to_mono_16k(samples, int(rate))


def load_audio_clips(paths: Sequence[str | Path]) -> list[Clip]:
    """Real recordings in any format the client reads, converted to 16 kHz mono."""
    return [Clip(Path(path).stem, load_clip(path).samples) for path in paths]


def input_data(clips: Sequence[Clip]) -> dict:
    """perf_analyzer's JSON input format: one batch-1 request per clip (binary data base64-encoded)."""
    if not clips:
        raise ValueError("need at least one clip")
    return {"data": [
        {
            WAV: {"b64": base64.b64encode(clip.samples.astype("<f4").tobytes()).decode("ascii"),
                  "shape": [int(clip.samples.size)]},
            WAV_LENS: {"content": [int(clip.samples.size)], "shape": [1]},
        }
        for clip in clips
    ]}


def write_input_data(clips: Sequence[Clip], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(clips)))
    return path


def read_clip_seconds(path: str | Path) -> list[float]:
    """Durations of the clips in an input-data JSON file (from WAV_LENS, else the WAV shape)."""
    document = json.loads(Path(path).read_text())
    seconds = []
    for entry in document["data"]:
        lens = entry.get(WAV_LENS, {}).get("content")
        samples = int(lens[0]) if lens else int(entry[WAV]["shape"][-1])
        seconds.append(samples / SAMPLE_RATE)
    return seconds


def parse_durations(text: str) -> list[float]:
    durations = [float(part) for part in text.split(",") if part.strip()]
    if not durations or any(not d > 0 for d in durations):
        raise argparse.ArgumentTypeError(f"durations must be positive seconds separated by commas, got {text!r}")
    return durations


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--durations", type=parse_durations, help="generate speech of these lengths, e.g. 2,5,12,30")
    source.add_argument("--audio", nargs="+", help="real recordings (one JSON per file, plus all.json)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--keep-wav", action="store_true", help="also write the 16 kHz clips as WAV files")
    args = parser.parse_args(argv)
    clips = [generate_speech(d) for d in args.durations] if args.durations else load_audio_clips(args.audio)
    for clip in clips:
        path = write_input_data([clip], args.out_dir / f"{clip.label}.json")
        if args.keep_wav:
            soundfile.write(str(path.with_suffix(".wav")), clip.samples, SAMPLE_RATE, subtype="FLOAT")
        print(f"{path}  ({clip.seconds:.2f} s)")
    if args.audio and len(clips) > 1:
        print(write_input_data(clips, args.out_dir / "all.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
