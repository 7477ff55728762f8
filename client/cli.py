"""`parakeet-client FILE|DIR...`: transcribe many files against a running server.

Text goes to stdout unless --output-dir is given; JSON, SRT and VTT files are written next to each input (so that
media players find the subtitles) or under --output-dir, keeping the layout of a directory given as input.
Failures are reported per file on stderr; the exit code is 1 when any file failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

from tqdm import tqdm

from .audio import MEDIA_SUFFIXES
from .client import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, Outcome, ParakeetClient
from .errors import ParakeetClientError
from .formats import FILE_SUFFIXES, FORMATS, FORMATS_NEEDING_TIMESTAMPS, render
from .retry import RetryPolicy

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Job:
    """One input file and where its result goes (None: stdout)."""

    source: Path
    destination: Path | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parakeet-client", description="Transcribe audio and video files with a Parakeet Triton server.")
    parser.add_argument("inputs", nargs="+", metavar="FILE|DIR",
                        help="media files, or directories searched recursively for media files")
    parser.add_argument("--url", help="server address host:port (default: localhost:8001 for gRPC, "
                                      "localhost:8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--concurrency", type=_positive_int, default=DEFAULT_CONCURRENCY,
                        help=f"files in flight at once (default {DEFAULT_CONCURRENCY})")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--output-dir", type=Path,
                        help="write one file per input here (default: text to stdout, other formats next to "
                             "each input)")
    parser.add_argument("--timestamps", action="store_true",
                        help="ask for word and segment times (implied by json, srt and vtt); text then lists "
                             "segments with their times")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per request")
    parser.add_argument("--retries", type=_non_negative_int, default=RetryPolicy().attempts - 1,
                        help="retries when the server is unavailable or too slow (never for rejected requests)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sources = find_media(args.inputs)
    except FileNotFoundError as error:
        print(f"parakeet-client: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not sources:
        print("parakeet-client: error: no media files found in the given directories", file=sys.stderr)
        return EXIT_USAGE
    roots = [Path(name) for name in args.inputs if Path(name).is_dir()]
    jobs = plan_jobs(sources, roots, args.format, args.output_dir)
    timestamps = args.timestamps or args.format in FORMATS_NEEDING_TIMESTAMPS
    with ParakeetClient(args.url, protocol=args.protocol, timeout=args.timeout,
                        retry=RetryPolicy(attempts=args.retries + 1)) as client:
        if not client.is_ready():
            print(f"parakeet-client: error: no ready '{client.model}' model at {client.url} ({args.protocol})",
                  file=sys.stderr)
            return EXIT_SOME_FAILED
        failures = run_jobs(client, jobs, timestamps=timestamps, format=args.format,
                            concurrency=args.concurrency, show_progress=not args.no_progress)
    written = len(jobs) - failures if jobs[0].destination is not None else 0
    if written:
        where = f"under {args.output_dir}" if args.output_dir else "next to the input" + ("s" if written > 1 else "")
        print(f"parakeet-client: wrote {written} {args.format} file{'s' if written != 1 else ''} {where}",
              file=sys.stderr)
    if failures:
        print(f"parakeet-client: {failures} of {len(jobs)} file{'s' if len(jobs) != 1 else ''} failed",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def find_media(inputs: Sequence[str]) -> list[Path]:
    """Files as given, and media files found recursively in directories (sorted); duplicates dropped."""
    found: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"{name}: no such file or directory")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def plan_jobs(sources: list[Path], roots: Sequence[Path], format: str, output_dir: Path | None) -> list[Job]:
    """Where each result goes: stdout for text without --output-dir, else `<name><suffix>` next to the input or
    under `output_dir` (mirroring the layout of the directory inputs `roots`). Inputs that would write the same
    file keep their full file name (`talk.wav.srt`, `talk.mp3.srt`), and a number if that still clashes."""
    if output_dir is None and format == "text":
        return [Job(source, None) for source in sources]
    suffix = FILE_SUFFIXES[format]

    def destination(source: Path, keep_extension: bool) -> Path:
        name = source.name + suffix if keep_extension else source.stem + suffix
        if output_dir is None:
            return source.with_name(name)
        for root in roots:
            if source.is_relative_to(root):
                relative = source.relative_to(root).with_name(name)
                return output_dir / (root.resolve().name / relative if len(roots) > 1 else relative)
        return output_dir / name

    planned = [destination(source, False) for source in sources]
    planned = [destination(source, True) if planned.count(path) > 1 else path
               for source, path in zip(sources, planned)]
    taken: set[Path] = set()
    jobs = []
    for source, path in zip(sources, planned):
        unique, number = path, 1
        while unique in taken:
            unique, number = path.with_name(f"{path.stem}.{number}{path.suffix}"), number + 1
        taken.add(unique)
        jobs.append(Job(source, unique))
    return jobs


def run_jobs(client: ParakeetClient, jobs: list[Job], *, timestamps: bool, format: str, concurrency: int,
             show_progress: bool = True, stdout: TextIO | None = None) -> int:
    """Transcribe every job, write or print each result, report failures; returns the number that failed."""
    stdout = stdout or sys.stdout
    failures = 0
    printer = _OrderedPrinter(stdout, several=len(jobs) > 1)
    with tqdm(total=len(jobs), unit="file", file=sys.stderr, disable=True if not show_progress else None,
              dynamic_ncols=True) as progress:
        status = _LiveStatus(progress)
        outcomes = client.transcribe_many([job.source for job in jobs], timestamps=timestamps,
                                          concurrency=concurrency, on_sent=status.sent)
        try:
            for outcome in outcomes:
                job = jobs[outcome.index]
                audio_seconds = 0.0
                try:
                    _deliver(outcome, job, format, timestamps, printer)
                    audio_seconds = outcome.transcript.audio_seconds or 0.0
                except ParakeetClientError as error:  # its message names the file
                    failures += 1
                    printer.skip(outcome.index)
                    progress.write(f"parakeet-client: error: {error}", file=sys.stderr)
                except (OSError, ValueError) as error:
                    failures += 1
                    printer.skip(outcome.index)
                    progress.write(f"parakeet-client: error: {job.source}: {_describe(error)}", file=sys.stderr)
                except Exception as error:  # an unexpected failure of one file must not stop the others
                    failures += 1
                    printer.skip(outcome.index)
                    progress.write(f"parakeet-client: error: {job.source}: unexpected {type(error).__name__}: {error}",
                                   file=sys.stderr)
                status.done(outcome.index, audio_seconds)
                progress.update(1)
        finally:
            status.close()
    return failures


class _LiveStatus:
    """The progress bar's live postfix: audio done, throughput, and the audio in flight with its elapsed time,
    refreshed every second so that a long request shows it is still running."""

    def __init__(self, progress: tqdm, interval: float = 1.0):
        self._progress = progress
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._in_flight: dict[int, tuple[float, float]] = {}  # index -> (audio seconds, sent at)
        self._audio_done = 0.0
        self._stop = threading.Event()
        self._ticker = None
        if not progress.disable:
            self._ticker = threading.Thread(target=self._tick, args=(interval,), name="parakeet-progress", daemon=True)
            self._ticker.start()

    def sent(self, index: int, audio_seconds: float) -> None:
        with self._lock:
            self._in_flight[index] = (audio_seconds, time.monotonic())

    def done(self, index: int, audio_seconds: float) -> None:
        with self._lock:
            self._in_flight.pop(index, None)
            self._audio_done += audio_seconds
        self._show()

    def text(self) -> str:
        now = time.monotonic()
        with self._lock:
            done, flight = self._audio_done, list(self._in_flight.values())
        parts = [f"audio {done:.0f} s, {done / max(now - self._started, 1e-9):.1f} audio s/s"]
        if flight:
            oldest = min(sent for _, sent in flight)
            parts.append(f"in flight {sum(seconds for seconds, _ in flight):.0f} s of audio for {now - oldest:.0f} s")
        return ", ".join(parts)

    def _show(self) -> None:
        self._progress.set_postfix_str(self.text(), refresh=False)

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._show()
            self._progress.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()


def _deliver(outcome: Outcome, job: Job, format: str, timestamps: bool, printer: "_OrderedPrinter") -> None:
    if outcome.error is not None:
        raise outcome.error
    assert outcome.transcript is not None
    content = render(outcome.transcript, format, timestamps=timestamps)
    if job.destination is None:
        printer.emit(outcome.index, str(job.source), content)
        return
    job.destination.parent.mkdir(parents=True, exist_ok=True)
    job.destination.write_text(content, encoding="utf-8")
    printer.skip(outcome.index)


class _OrderedPrinter:
    """Print results to stdout in input order although they finish in any order."""

    def __init__(self, stream: TextIO, several: bool):
        self._stream = stream
        self._several = several
        self._next = 0
        self._waiting: dict[int, str | None] = {}

    def emit(self, index: int, name: str, content: str) -> None:
        if self._several:
            content = f"{name}: {content}" if content.count("\n") <= 1 else f"{name}:\n{content}"
        self._waiting[index] = content
        self._flush()

    def skip(self, index: int) -> None:
        self._waiting.setdefault(index, None)
        self._flush()

    def _flush(self) -> None:
        while self._next in self._waiting:
            content = self._waiting.pop(self._next)
            if content is not None:
                self._stream.write(content)
                self._stream.flush()
            self._next += 1


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
