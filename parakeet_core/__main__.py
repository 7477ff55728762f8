"""`python -m parakeet_core FILE|DIR...`: transcribe local files in-process.

Directories are searched recursively for media files (the extensions `parakeet-client` uses). A file that cannot be
read (missing, corrupt, no audio stream) is reported on stderr and the others are still transcribed; the exit code
is 1 when any input failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from parakeet_client.audio import MEDIA_SUFFIXES

from . import DEFAULT_CHECKPOINT, ParakeetError, from_pretrained
from .audio import check_waveform, load_audio

TIME_DECIMALS = 3
"""Times in JSON are rounded to milliseconds, as `parakeet-client` writes them."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parakeet_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE|DIR",
                        help="audio or video files (anything soundfile reads, else ffmpeg), or directories searched "
                             "recursively for media files")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="local .nemo file or Hugging Face repo id (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per forward pass (default: %(default)s)")
    parser.add_argument("--timestamps", action="store_true", help="add word and segment timestamps (default: off)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file (default: off)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    suffixes = MEDIA_SUFFIXES if any(Path(name).is_dir() for name in args.files) else frozenset()
    try:
        model = from_pretrained(args.checkpoint, device=args.device)
    except ParakeetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failures = FailureReport()
    for paths in _chunks(expand_inputs(args.files, suffixes, failures), args.batch_size):
        clips: dict[str, np.ndarray] = {}
        for path in paths:
            try:
                clips[path] = read_clip(path, model.sample_rate, model.min_samples)
            except (ParakeetError, OSError, RuntimeError, ValueError) as exc:
                failures(_naming(path, exc))
        if not clips:
            continue
        try:
            transcripts = model.transcribe(list(clips.values()), batch_size=args.batch_size,
                                           timestamps=args.timestamps)
        except ParakeetError as exc:
            for path in clips:
                failures(f"{path}: {exc}")
            continue
        for path, transcript in zip(clips, transcripts):
            print(_render(path, transcript, as_json=args.json, timestamps=args.timestamps), flush=True)
    return 1 if failures.count else 0


class FailureReport:
    """Print each failure to stderr as `error: <message naming the file>` and count them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: str) -> None:
        self.count += 1
        print(f"error: {message}", file=sys.stderr, flush=True)


def expand_inputs(inputs: Sequence[str], suffixes: frozenset[str],
                  report: Callable[[str], None]) -> Iterator[str]:
    """Each input as given, and the files with a media extension (`suffixes`) inside each directory, recursively
    and sorted; a directory without any is reported through `report(message)`."""
    for name in inputs:
        path = Path(name)
        if not path.is_dir():
            yield name
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        if not found:
            report(f"{name}: no media files in this directory")
        yield from (str(p) for p in found)


def read_clip(path: str, sample_rate: int, min_samples: int) -> np.ndarray:
    """Decode one file to mono float32 at `sample_rate`; InvalidAudioError naming the file when it is unusable."""
    samples = load_audio(path, sample_rate)
    check_waveform(samples, min_samples=min_samples, name=path)
    return samples


def rounded(items: list[dict]) -> list[dict]:
    """Word or segment dicts with `start` and `end` rounded to milliseconds."""
    return [{**item, "start": round(item["start"], TIME_DECIMALS), "end": round(item["end"], TIME_DECIMALS)}
            for item in items]


def _render(path: str, transcript, *, as_json: bool, timestamps: bool) -> str:
    if as_json:
        record = {"file": path, "text": transcript.text}
        if timestamps:
            record.update({key: rounded(items) for key, items in transcript.timestamps_dict().items()})
        return json.dumps(record, ensure_ascii=False)
    lines = [f"{path}\t{transcript.text}"]
    lines += [f"  {word.start:8.2f} {word.end:8.2f}  {word.text}" for word in transcript.words or []]
    return "\n".join(lines)


def _naming(path: str, exc: BaseException) -> str:
    message = str(exc) or type(exc).__name__
    return message if path in message else f"{path}: {message}"


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


if __name__ == "__main__":
    sys.exit(main())
