"""Graceful shutdown through the ensemble: refuse new requests, finish every request in flight, then stop.

Triton 2.51 refuses the ensemble's internal requests once it has received SIGTERM ("Server is stopping"), so a
request that had passed the preprocessor when the signal came fails at the encoder or the decoder, whatever
`--exit-timeout-secs` says. The drain therefore happens before tritonserver is signalled:

1. `drain()` creates a marker file in the rendered model repository. The preprocessor's :class:`AdmissionGate`
   sees it at its next execute and answers every new request with UNAVAILABLE ("server is shutting down"),
   which clients retry (on another replica). The gate and `drain()` share a lock file: a batch the
   preprocessor had admitted before the marker appeared finishes before `drain()` goes on.
2. `drain()` then waits until every request the preprocessor passed on has left the pipeline, for at most
   `timeout` seconds. Each stage instance keeps its own counts of answered and refused requests in a small file
   (:class:`StageCounter`), as Triton 2.51's statistics count a Python model's error responses as successes;
   Triton's failure counts add the requests it refused itself (a full queue, a queue timeout).
3. The caller signals tritonserver, which now has nothing in flight and exits at once.

`parakeet-serve` does this on its first SIGTERM / SIGINT; the container entrypoint runs

    python -m parakeet_triton.drain --repository DIR --http-url http://127.0.0.1:8000 --timeout 60
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator
from contextlib import contextmanager

from . import protocol

MARKER_NAME = ".parakeet-draining"
LOCK_NAME = ".parakeet-admission.lock"
REFUSAL = "server is shutting down and takes no new requests; retry on another replica"


def marker_path(repository: str | os.PathLike) -> Path:
    return Path(repository) / MARKER_NAME


def lock_path(repository: str | os.PathLike) -> Path:
    return Path(repository) / LOCK_NAME


class AdmissionGate:
    """The preprocessor's check, per execute, that the server is not draining (see the module docstring)."""

    def __init__(self, repository: str | os.PathLike):
        self.marker = marker_path(repository)
        self._lock = lock_path(repository)
        self._fd: int | None = None

    @contextmanager
    def admitting(self) -> Iterator[bool]:
        """True: admit this batch (the lock is held, shared, until the block ends); False: refuse it."""
        if self._fd is None:
            try:
                self._fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:  # a read-only repository: no drain support, admit as before
                yield True
                return
        fcntl.flock(self._fd, fcntl.LOCK_SH)
        try:
            yield not self.marker.exists()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


COUNTS_DIR = ".parakeet-pipeline"


def counts_dir(repository: str | os.PathLike) -> Path:
    return Path(repository) / COUNTS_DIR


class StageCounter:
    """Cumulative outcomes (answered, refused with an error) of one stage instance's requests, kept in
    `<repository>/.parakeet-pipeline/<model>.<instance>.<pid>` for :func:`requests_in_pipeline`."""

    def __init__(self, repository: str | os.PathLike, model: str, instance: str):
        self.path: Path | None = counts_dir(repository) / f"{model}.{instance}.{os.getpid()}"
        self.model = model
        self.answered = self.refused = 0
        try:
            self.path.parent.mkdir(exist_ok=True)
            self._write()
        except OSError:  # a read-only repository: no drain support
            self.path = None

    def record(self, answered: int, refused: int) -> None:
        self.answered += answered
        self.refused += refused
        if self.path is not None:
            try:
                self._write()
            except OSError:
                self.path = None

    def _write(self) -> None:
        scratch = self.path.with_name(self.path.name + ".tmp")
        scratch.write_text(f"{self.answered} {self.refused}\n")
        os.replace(scratch, self.path)


def stage_counts(repository: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{model: (answered, refused)} summed over the instances' :class:`StageCounter` files."""
    totals: dict[str, tuple[int, int]] = {}
    for path in counts_dir(repository).glob("*.*.*"):
        if path.name.endswith(".tmp"):
            continue
        try:
            answered, refused = (int(value) for value in path.read_text().split()[:2])
        except (OSError, ValueError):
            continue
        model = path.name.split(".", 1)[0]
        previous = totals.get(model, (0, 0))
        totals[model] = (previous[0] + answered, previous[1] + refused)
    return totals


def _counts(stats: dict) -> dict[str, tuple[int, int]]:
    found = {}
    for entry in stats.get("model_stats", []):
        inference = entry.get("inference_stats", {})
        found[entry.get("name")] = (int(inference.get("success", {}).get("count", 0)),
                                    int(inference.get("fail", {}).get("count", 0)))
    return found


def requests_in_pipeline(repository: str | os.PathLike, http_url: str, timeout: float = 5.0) -> int:
    """Requests the preprocessor passed on that have not yet left the encoder or the decoder: the stages' own
    counts, plus the requests Triton refused in front of the encoder or decoder (its statistics'
    failures, `GET /v2/models/stats`). Requests still waiting in front of the preprocessor are not counted."""
    with urllib.request.urlopen(f"{http_url.rstrip('/')}/v2/models/stats", timeout=timeout) as response:
        refused_by_triton = {model: failed for model, (_, failed) in _counts(json.load(response)).items()}
    stages = stage_counts(repository)
    passed_on, _ = stages.get(protocol.PREPROCESSOR_MODEL, (0, 0))
    _, encoder_refused = stages.get(protocol.ENCODER_MODEL, (0, 0))
    decoded, decoder_refused = stages.get(protocol.DECODER_MODEL, (0, 0))
    left = (encoder_refused + refused_by_triton.get(protocol.ENCODER_MODEL, 0) + decoded + decoder_refused
            + refused_by_triton.get(protocol.DECODER_MODEL, 0))
    return passed_on - left


@dataclasses.dataclass(frozen=True)
class DrainResult:
    drained: bool
    """True: nothing was left in flight; False: `timeout` passed first (or the statistics could not be read)."""
    in_flight_at_start: int
    seconds: float
    detail: str = ""


def drain(repository: str | os.PathLike, http_url: str, timeout: float, *, poll: float = 0.1,
          say: Callable[[str], None] = lambda message: None) -> DrainResult:
    """Close admission and wait (at most `timeout` seconds) until no request is in the pipeline."""
    started = time.monotonic()
    deadline = started + timeout
    marker_path(repository).touch()
    fd = os.open(lock_path(repository), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        while True:  # the batch the preprocessor is computing, if any, finishes first
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return DrainResult(False, -1, time.monotonic() - started, "the preprocessor did not finish its batch")
                time.sleep(poll)
    finally:
        os.close(fd)
    first: int | None = None
    zero_reads = 0
    while True:
        try:
            in_flight = requests_in_pipeline(repository, http_url)
        except (urllib.error.URLError, OSError, ValueError) as error:
            return DrainResult(False, -1 if first is None else first, time.monotonic() - started,
                               f"cannot read the server's statistics: {error}")
        if first is None:
            first = in_flight
            say(f"draining: new requests are refused; {in_flight} request(s) in flight")
        # Statistics are updated as each response is sent: two zero reads in a row, a poll apart.
        zero_reads = zero_reads + 1 if in_flight <= 0 else 0
        if zero_reads >= 2:
            return DrainResult(True, first, time.monotonic() - started)
        if time.monotonic() > deadline:
            return DrainResult(False, first, time.monotonic() - started, f"{in_flight} request(s) still in flight")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parakeet_triton.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="the rendered model repository tritonserver serves")
    parser.add_argument("--http-url", required=True, help="tritonserver's HTTP address, e.g. http://127.0.0.1:8000")
    parser.add_argument("--timeout", type=float, default=60.0, help="longest wait in seconds (default 60)")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"parakeet-drain: {message}", file=sys.stderr, flush=True)

    result = drain(args.repository, args.http_url, args.timeout, say=say)
    if result.drained:
        say(f"drained {result.in_flight_at_start} request(s) in {result.seconds:.1f} s")
        return 0
    say(f"warning: gave up after {result.seconds:.1f} s: {result.detail}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
