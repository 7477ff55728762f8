"""`parakeet-client FILE|DIR...`: transcribe many files against a running server.
`parakeet-client --stream FILE|-`: stream one file or stdin live to the server's streaming model.

Results go to stdout or to one file per input as OUTPUT_RULES says (`results_to_stdout`, `plan_jobs`). Failures
are reported per file on stderr; the exit code is 1 when any file failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence, TextIO

from tqdm import tqdm

from .audio import MEDIA_SUFFIXES
from .aio import AsyncParakeetClient
from .client import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, Outcome, ParakeetClient
from .errors import ParakeetClientError
from .formats import FILE_SUFFIXES, FORMATS, FORMATS_NEEDING_TIMESTAMPS, json_document, render
from .protocol import STREAMING_MODEL
from .retry import RetryPolicy
from .streaming import STDIN_FORMATS, read_pieces
from .transcript import Transcript

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
STDOUT = Path("-")
"""`--output-dir -`: every result to stdout."""

OUTPUT_RULES = """\
where results go:
  stdout  without --output-dir: text, and json when the only input is one FILE;
          with --output-dir -: every format. For several inputs each result is headed
          by its path ("path: text"), and json results are JSON Lines: one
          {"file": path, "text", "words", "segments"} object per line.
  files   otherwise one file per input, named after the input's full file name plus
          the format's suffix, whatever else is in the folder or the run:
          talk.mp4 -> talk.mp4.srt, talk.wav -> talk.wav.json (.txt for text).
          It goes next to the input, or under --output-dir keeping the layout of a
          DIR input (each DIR under its own name when several are given). When the
          input's folder is not writable it goes to the current directory instead,
          and stderr says so. An input whose file an earlier input of the run
          already writes (same name in two folders) is skipped and counts as failed.
  times   in seconds; JSON rounds them to milliseconds.

streaming (--stream FILE|-, needs a server started with --streaming):
  the audio goes to the streaming model in pieces of --piece-seconds, at the
  speed of a live talk (--as-fast-as-possible: as fast as the server answers).
  stdout shows the text so far after each piece: on a terminal one line is
  rewritten, otherwise a line is printed each time the text changes; then the
  final transcript in --format (json, srt and vtt: the partial lines go to
  stderr, stdout holds the document alone). '-' reads stdin as it arrives:
  --stdin-format wav (a WAV stream, any rate and channels; 16/32-bit PCM or
  32-bit float), s16le or f32le (raw 16 kHz mono), e.g.
    arecord -q -f S16_LE -r 16000 -c 1 -t raw | parakeet-client --stream - --stdin-format s16le
    ffmpeg -loglevel error -i talk.mp3 -f wav - | parakeet-client --stream -

exit status: 0 every file transcribed, 1 some file failed or the server is not
ready, 2 usage error
"""


@dataclass(frozen=True)
class Job:
    """One input file and where its result goes (None: stdout).

    `moved_from` is the input's folder when it was not writable and the result goes elsewhere; `clashes_with` is an
    earlier input of the run that writes the same file (this one is then not transcribed)."""

    source: Path
    destination: Path | None
    moved_from: Path | None = None
    clashes_with: Path | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parakeet-client", description="Transcribe audio and video files with a Parakeet Triton server.",
        epilog=OUTPUT_RULES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="FILE|DIR",
                        help="media files (any format soundfile or ffmpeg reads), or directories searched "
                             "recursively for files with a media extension")
    parser.add_argument("--url", metavar="HOST:PORT",
                        help="server address (default: localhost:8001 for grpc, localhost:8000 for http)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="how to talk to the server (default: %(default)s)")
    parser.add_argument("--concurrency", type=_positive_int, default=DEFAULT_CONCURRENCY, metavar="N",
                        help="files decoded and in flight at once (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text; json (text, words, segments); srt or vtt subtitles (at most 2 lines of 42 "
                             "characters and 7 s per cue) (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, metavar="DIR",
                        help="write one file per input under DIR; '-' writes every format to stdout (default: "
                             "none: text, and json for a single FILE, to stdout, other results next to each input; "
                             "see below)")
    parser.add_argument("--timestamps", action="store_true",
                        help="ask for word and segment times (implied by json, srt and vtt); text then lists "
                             "segments with their times (default: off)")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="time allowed for each request (default: %(default)s)")
    parser.add_argument("--retries", type=_non_negative_int, default=RetryPolicy().attempts - 1, metavar="N",
                        help="retries when the server is unavailable or too slow; requests it rejects are never "
                             "retried (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bar (default: shown on stderr when it is a terminal)")
    live = parser.add_argument_group("streaming")
    live.add_argument("--stream", metavar="FILE|-",
                      help="stream one media file, or stdin ('-'), to the streaming model and show the text as it "
                           "grows, instead of FILE|DIR inputs; see below (default: off)")
    live.add_argument("--as-fast-as-possible", action="store_true",
                      help="with --stream FILE: send pieces as fast as the server answers (default: at the speed "
                           "of the audio)")
    live.add_argument("--piece-seconds", type=_positive_float, default=0.5, metavar="S",
                      help="audio per request of a stream (default: %(default)s)")
    live.add_argument("--stdin-format", choices=STDIN_FORMATS, default="wav",
                      help="what --stream - reads: wav, or raw 16 kHz mono s16le / f32le (default: %(default)s)")
    live.add_argument("--streaming-model", default=STREAMING_MODEL, metavar="NAME",
                      help="the server's streaming model (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stream is not None:
        if args.inputs:
            parser.error("give either FILE|DIR inputs or --stream, not both")
        return run_stream(args)
    if not args.inputs:
        parser.error("the following arguments are required: FILE|DIR (or --stream FILE|-)")
    try:
        sources = find_media(args.inputs)
    except FileNotFoundError as error:
        print(f"parakeet-client: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not sources:
        print("parakeet-client: error: no media files found in the given directories", file=sys.stderr)
        return EXIT_USAGE
    single_file = len(args.inputs) == 1 and not Path(args.inputs[0]).is_dir()
    to_stdout = results_to_stdout(args.format, args.output_dir, single_file)
    output_dir = None if to_stdout else args.output_dir
    roots = [Path(name) for name in args.inputs if Path(name).is_dir()]
    jobs = plan_jobs(sources, roots, args.format, output_dir, to_stdout=to_stdout)
    timestamps = args.timestamps or args.format in FORMATS_NEEDING_TIMESTAMPS
    with ParakeetClient(args.url, protocol=args.protocol, timeout=args.timeout,
                        retry=RetryPolicy(attempts=args.retries + 1)) as client:
        try:
            client.check_ready()
        except ParakeetClientError as error:
            print(f"parakeet-client: error: {error}", file=sys.stderr)
            return EXIT_SOME_FAILED
        for message in moved_results_notices(jobs):
            print(f"parakeet-client: warning: {message}", file=sys.stderr)
        runnable = [job for job in jobs if job.clashes_with is None]
        for job in jobs:
            if job.clashes_with is not None:
                print(f"parakeet-client: error: {job.source}: skipped: its result {job.destination} would overwrite "
                      f"that of {job.clashes_with}; transcribe it in another run or with another --output-dir",
                      file=sys.stderr)
        failures = run_jobs(client, runnable, timestamps=timestamps, format=args.format,
                            concurrency=args.concurrency, show_progress=not args.no_progress) if runnable else 0
    written = len(runnable) - failures if not to_stdout else 0
    if written:
        print(f"parakeet-client: wrote {written} {args.format} file{'s' if written != 1 else ''} "
              f"{_where(jobs, output_dir)}", file=sys.stderr)
    failures += len(jobs) - len(runnable)
    if failures:
        print(f"parakeet-client: {failures} of {len(jobs)} file{'s' if len(jobs) != 1 else ''} failed",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def run_stream(args: argparse.Namespace, stdin: BinaryIO | None = None, stdout: TextIO | None = None) -> int:
    """`--stream`: the partial lines and the final transcript (see OUTPUT_RULES); the exit status."""
    stdout = stdout or sys.stdout
    if args.stream == "-":
        source: Any = read_pieces(stdin or sys.stdin.buffer, args.stdin_format, args.piece_seconds)
    elif Path(args.stream).is_file():
        source = args.stream
    else:
        print(f"parakeet-client: error: {args.stream}: no such file", file=sys.stderr)
        return EXIT_USAGE
    partial = PartialLine(stdout if args.format == "text" else sys.stderr)

    async def stream() -> Transcript:
        async with AsyncParakeetClient(args.url, protocol=args.protocol, timeout=args.timeout,
                                       model=args.streaming_model) as client:
            await client.check_ready()
            async for update in client.stream(source, piece_seconds=args.piece_seconds,
                                              realtime=not args.as_fast_as_possible, model=args.streaming_model):
                if update.final:
                    return update.transcript
                partial.show(update.text)
        raise AssertionError("the stream ended without a final update")

    try:
        transcript = asyncio.run(stream())
    except ParakeetClientError as error:
        partial.end()
        print(f"parakeet-client: error: {error}", file=sys.stderr)
        return EXIT_SOME_FAILED
    except ValueError as error:  # stdin is not what --stdin-format says
        partial.end()
        print(f"parakeet-client: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    partial.end()
    timestamps = args.timestamps or args.format in FORMATS_NEEDING_TIMESTAMPS
    stdout.write(render(transcript, args.format, timestamps=timestamps))
    stdout.flush()
    return EXIT_OK


class PartialLine:
    """The text so far: one line rewritten in place on a terminal (its end, as much as fits), else one line per
    change."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._tty = stream.isatty()
        self._last: str | None = None

    def show(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        if self._tty:
            width = shutil.get_terminal_size().columns - 1
            self._stream.write("\r\033[K" + text[-width:] if width > 0 else text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def end(self) -> None:
        """Clear the rewritten line (a terminal), so that what follows starts on a clean line."""
        if self._tty and self._last is not None:
            self._stream.write("\r\033[K")
            self._stream.flush()


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


def results_to_stdout(format: str, output_dir: Path | None, single_file: bool) -> bool:
    """Whether results go to stdout: always with `--output-dir -`, never with another --output-dir; without one,
    for text, and for json when the only input is one file (`single_file`)."""
    if output_dir is not None:
        return output_dir == STDOUT
    return format == "text" or (format == "json" and single_file)


def output_name(source: Path, format: str) -> str:
    """The result file's name, a function of the input's path alone: its full file name plus the format's suffix
    (talk.mp4 -> talk.mp4.srt), so that talk.wav and talk.mp3 never share one."""
    return source.name + FILE_SUFFIXES[format]


def is_writable_dir(folder: Path) -> bool:
    """Whether this process may create files in `folder` (False for read-only mounts, also for root)."""
    return os.access(folder, os.W_OK | os.X_OK)


def plan_jobs(sources: list[Path], roots: Sequence[Path], format: str, output_dir: Path | None, *,
              to_stdout: bool = False, writable: Callable[[Path], bool] = is_writable_dir,
              fallback_dir: Path | None = None) -> list[Job]:
    """Where each result goes: stdout when `to_stdout`; else `output_name` under `output_dir` (mirroring the layout
    of the directory inputs `roots`) or next to the input, or in `fallback_dir` (default: the current directory)
    when the input's folder is not `writable` and the fallback is. A later input whose file an earlier one already
    writes is marked `clashes_with` that input."""
    if to_stdout:
        return [Job(source, None) for source in sources]
    fallback_dir = Path.cwd() if fallback_dir is None else fallback_dir
    writers: dict[Path, Path] = {}
    jobs = []
    for source in sources:
        name = output_name(source, format)
        moved_from = None
        if output_dir is not None:
            destination = output_dir / _mirrored_folder(source, roots) / name
        elif writable(source.parent) or not writable(fallback_dir):
            destination = source.with_name(name)
        else:
            destination, moved_from = fallback_dir / name, source.parent
        first_writer = writers.setdefault(destination.resolve(), source)
        jobs.append(Job(source, destination, moved_from, None if first_writer is source else first_writer))
    return jobs


def moved_results_notices(jobs: Sequence[Job]) -> list[str]:
    """One notice per input folder whose results go elsewhere because it is not writable."""
    moved: dict[Path, Path] = {}
    for job in jobs:
        if job.moved_from is not None and job.destination is not None:
            moved.setdefault(job.moved_from, job.destination.parent)
    return [f"cannot write in {folder} (not writable): its results go to {target} instead"
            for folder, target in moved.items()]


def stdout_entry(transcript: Transcript, name: str, format: str, *, timestamps: bool, several: bool) -> str:
    """What stdout shows for one result: the result alone for a single input; for several, `name: text` (or `name:`
    above a multi-line result), and json as one JSON Lines object with its "file"."""
    if format == "json" and several:
        return json.dumps({"file": name, **json_document(transcript)}, ensure_ascii=False) + "\n"
    content = render(transcript, format, timestamps=timestamps)
    if not several:
        return content
    return f"{name}: {content}" if content.count("\n") <= 1 else f"{name}:\n{content}"


def _mirrored_folder(source: Path, roots: Sequence[Path]) -> Path:
    """The folder of `source` inside the directory input it was found in (prefixed by that directory's name when
    there are several); nothing for a file given by itself."""
    for root in roots:
        if source.is_relative_to(root):
            relative = source.parent.relative_to(root)
            return Path(root.resolve().name) / relative if len(roots) > 1 else relative
    return Path()


def _where(jobs: Sequence[Job], output_dir: Path | None) -> str:
    if output_dir is not None:
        return f"under {output_dir}"
    beside = "next to the input" + ("s" if len(jobs) > 1 else "")
    return beside + (" or in the current directory" if any(job.moved_from for job in jobs) else "")


def run_jobs(client: ParakeetClient, jobs: list[Job], *, timestamps: bool, format: str, concurrency: int,
             show_progress: bool = True, stdout: TextIO | None = None) -> int:
    """Transcribe every job, write or print each result, report failures; returns the number that failed."""
    stdout = stdout or sys.stdout
    failures = 0
    printer = _OrderedPrinter(stdout)
    several = len(jobs) > 1
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
                    _deliver(outcome, job, format, timestamps, printer, several)
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


def _deliver(outcome: Outcome, job: Job, format: str, timestamps: bool, printer: "_OrderedPrinter",
             several: bool) -> None:
    if outcome.error is not None:
        raise outcome.error
    assert outcome.transcript is not None
    if job.destination is None:
        printer.emit(outcome.index, stdout_entry(outcome.transcript, str(job.source), format, timestamps=timestamps,
                                                 several=several))
        return
    job.destination.parent.mkdir(parents=True, exist_ok=True)
    job.destination.write_text(render(outcome.transcript, format, timestamps=timestamps), encoding="utf-8")
    printer.skip(outcome.index)


class _OrderedPrinter:
    """Print results to stdout in input order although they finish in any order."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._next = 0
        self._waiting: dict[int, str | None] = {}

    def emit(self, index: int, content: str) -> None:
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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
