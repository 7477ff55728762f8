"""Finding and running Triton's perf_analyzer, and reading its CSV report.

perf_analyzer 2.51.0 ships inside the `tritonclient==2.51.0` wheel (installed as `<venv>/bin/perf_analyzer`) but
links against `libb64.so.0d` and `libcudart.so.12`, which the wheel does not bring. `locate()` finds the binary
(explicit path, PATH, or the tritonclient wheel) and, for each library the dynamic loader cannot resolve, puts a
symlink to a bundled copy (nvidia-pytriton's `nvidia_pytriton.libs`, or the nvidia-cuda-runtime wheel) in a
private directory that goes on LD_LIBRARY_PATH for perf_analyzer alone.

To run it by hand, `python -m benchmarks.loadtest.perf_analyzer --input-data FILE` makes those links (under
`--lib-dir`, default ~/.cache/parakeet-triton) and prints the one-line command, ready to paste.
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.metadata
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

BINARY_NAME = "perf_analyzer"
NEEDED_LIBRARIES = {
    # soname: glob patterns (relative to candidate directories) of files that provide it
    "libb64.so.0d": ("libb64.so.0d", "libb64-*.so.0d*", "libb64.so.0d.*"),
    "libcudart.so.12": ("libcudart.so.12", "libcudart-*.so.12*", "libcudart.so.12.*"),
}
_NOT_FOUND = re.compile(r"^\s*(\S+)\s*=>\s*not found", re.MULTILINE)


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer is missing, cannot be made to start, or failed."""


@dataclass(frozen=True)
class PerfAnalyzer:
    """A runnable perf_analyzer: the binary and the directory of library links it needs (if any)."""

    executable: Path
    library_dir: Path | None = None
    linked: dict[str, Path] = field(default_factory=dict)

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        if self.library_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                part for part in (str(self.library_dir), env.get("LD_LIBRARY_PATH", "")) if part)
        return env

    def command_line(self, arguments: Sequence[str]) -> str:
        """The shell command that runs this perf_analyzer with `arguments` by hand, library path included."""
        command = shlex.join([str(self.executable), *arguments])
        return f"LD_LIBRARY_PATH={shlex.quote(str(self.library_dir))} {command}" if self.library_dir else command

    def version(self) -> str:
        """`Perf Analyzer Version 2.51.0 ...`; raises PerfAnalyzerError when the binary does not start."""
        completed = subprocess.run([str(self.executable), "--version"], capture_output=True, text=True,
                                   env=self.environment(), timeout=60, check=False)
        output = (completed.stdout + completed.stderr).strip()
        if completed.returncode != 0:
            raise PerfAnalyzerError(f"{self.executable} --version failed (exit {completed.returncode}): {output}")
        return output

    def run(self, arguments: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
        """Run with `arguments`; a run past `timeout_s` is killed and raises PerfAnalyzerError."""
        command = [str(self.executable), *arguments]
        try:
            return subprocess.run(command, capture_output=True, text=True, env=self.environment(),
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as error:
            raise PerfAnalyzerError(f"perf_analyzer ran past its {timeout_s:.0f} s limit: {' '.join(command)}") \
                from error


def locate(work_dir: str | os.PathLike, explicit: str | os.PathLike | None = None) -> PerfAnalyzer:
    """A ready-to-run perf_analyzer, its missing libraries linked under `work_dir/perf_analyzer-libs`."""
    executable = find_binary(explicit)
    missing = missing_libraries(executable)
    if not missing:
        return PerfAnalyzer(executable)
    library_dir = Path(work_dir) / "perf_analyzer-libs"
    library_dir.mkdir(parents=True, exist_ok=True)
    linked: dict[str, Path] = {}
    unresolved = []
    for soname in missing:
        provider = find_library(soname)
        if provider is None:
            unresolved.append(soname)
            continue
        link = library_dir / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(provider)
        linked[soname] = provider
    if unresolved:
        raise PerfAnalyzerError(
            f"{executable} needs {', '.join(unresolved)}, found neither on the system nor in a bundled wheel; "
            "install nvidia-pytriton (bundles libb64 and libcudart) or nvidia-cuda-runtime-cu12")
    analyzer = PerfAnalyzer(executable, library_dir, linked)
    still_missing = missing_libraries(executable, analyzer.environment())
    if still_missing:
        raise PerfAnalyzerError(f"{executable} still lacks {', '.join(still_missing)} after linking {linked}")
    return analyzer


def find_binary(explicit: str | os.PathLike | None = None) -> Path:
    """`explicit`, else $PERF_ANALYZER, else perf_analyzer on PATH, else the tritonclient wheel's copy."""
    for candidate in (explicit, os.environ.get("PERF_ANALYZER"), shutil.which(BINARY_NAME)):
        if candidate:
            path = Path(shutil.which(str(candidate)) or candidate)
            if path.is_file() and os.access(path, os.X_OK):
                return path.resolve()
            if candidate in (explicit, os.environ.get("PERF_ANALYZER")):
                raise PerfAnalyzerError(f"perf_analyzer not found or not executable at {candidate}")
    wheel_copy = binary_in_tritonclient_wheel()
    if wheel_copy is not None:
        return wheel_copy
    raise PerfAnalyzerError("perf_analyzer not found: put it on PATH, pass its path, or "
                            "pip install 'tritonclient==2.51.0' (its wheel ships bin/perf_analyzer)")


def binary_in_tritonclient_wheel() -> Path | None:
    """The `bin/perf_analyzer` listed in the installed tritonclient distribution's RECORD, if any."""
    try:
        distribution = importlib.metadata.distribution("tritonclient")
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in distribution.files or ():
        if entry.name == BINARY_NAME and entry.parent.name == "bin":
            path = Path(distribution.locate_file(entry)).resolve()
            if path.is_file():
                return path
    return None


def missing_libraries(executable: Path, env: dict[str, str] | None = None) -> list[str]:
    """Shared libraries the dynamic loader cannot resolve for `executable` (per `ldd`).

    Without `ldd`, the libraries perf_analyzer 2.51 is known to need are reported missing unless the system
    loader cache has them, so that bundled copies are linked anyway.
    """
    ldd = shutil.which("ldd")
    if ldd is None:
        return [soname for soname in NEEDED_LIBRARIES if not _in_loader_cache(soname)]
    completed = subprocess.run([ldd, str(executable)], capture_output=True, text=True, env=env, timeout=60,
                               check=False)
    return sorted(set(_NOT_FOUND.findall(completed.stdout + completed.stderr)))


def find_library(soname: str) -> Path | None:
    """A file providing `soname`, from the wheels that bundle it."""
    patterns = NEEDED_LIBRARIES.get(soname, (soname, f"{soname}.*"))
    for directory in library_search_dirs():
        for pattern in patterns:
            matches = sorted(glob.glob(str(directory / pattern)))
            if matches:
                return Path(matches[0]).resolve()
    return None


def library_search_dirs() -> list[Path]:
    """Where bundled copies live: nvidia-pytriton's `nvidia_pytriton.libs`, CUDA runtime wheels."""
    directories: list[Path] = []
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
        directories.append(package.parent / "nvidia_pytriton.libs")
    for package_name in ("nvidia.cuda_runtime",):
        try:
            spec = importlib.util.find_spec(package_name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.submodule_search_locations:
            directories.append(Path(list(spec.submodule_search_locations)[0]) / "lib")
    return [directory for directory in directories if directory.is_dir()]


def _in_loader_cache(soname: str) -> bool:
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None:
        return False
    completed = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, check=False)
    return soname in completed.stdout


# -- command line and report -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadSettings:
    """How one perf_analyzer run measures: `windows` time windows of `window_ms` (default), or a request count.

    In time-window mode the report covers the last three windows. perf_analyzer normally keeps measuring until
    three windows agree within `stability_percentage` and fails after `windows` tries; the default of 1000 %
    accepts any spread, so that a run on a busy machine ends after exactly three windows instead of failing.
    Request-count mode reports a throughput rounded by perf_analyzer's one-second polling (coarse for short runs).
    """

    concurrency: int
    window_ms: int = 5000
    windows: int = 3
    stability_percentage: float = 1000.0
    request_count: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.request_count is not None and self.request_count < self.concurrency:
            raise ValueError(f"request_count ({self.request_count}) must be >= concurrency ({self.concurrency})")
        if self.window_ms < 100 or self.windows < 3 or self.stability_percentage <= 0:
            raise ValueError("need window_ms >= 100, windows >= 3 (perf_analyzer compares three), "
                             "stability_percentage > 0")

    def time_limit_s(self) -> float:
        """A generous bound on the run in time-window mode (startup, windows, draining the last requests)."""
        return 60.0 + 2.5 * self.windows * self.window_ms / 1000


def command_arguments(model: str, url: str, protocol: str, input_data: str | os.PathLike, csv_path: str | os.PathLike,
                      settings: LoadSettings) -> list[str]:
    """perf_analyzer arguments for one concurrency level, batch 1 per request, with a CSV report."""
    arguments = [
        "-m", model, "-u", url, "-i", protocol, "-b", "1",
        "--input-data", str(input_data),
        "--concurrency-range", f"{settings.concurrency}:{settings.concurrency}",
        "--percentile", "95",
        "-f", str(csv_path),
    ]
    if settings.request_count is not None:
        arguments += ["--request-count", str(settings.request_count)]
    else:
        arguments += ["--measurement-mode", "time_windows",
                      "--measurement-interval", str(settings.window_ms),
                      "--stability-percentage", f"{settings.stability_percentage:g}",
                      "--max-trials", str(settings.windows)]
    return arguments


@dataclass(frozen=True)
class PerfRow:
    """One concurrency level of perf_analyzer's CSV report (latencies converted to milliseconds)."""

    concurrency: int
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float


def parse_csv_report(text: str) -> list[PerfRow]:
    """Rows of perf_analyzer's `-f` CSV (latency columns are in microseconds)."""
    reader = csv.DictReader(io.StringIO(text.strip()))
    rows = []
    for record in reader:
        if not record.get("Concurrency"):
            continue
        try:
            rows.append(PerfRow(
                concurrency=int(float(record["Concurrency"])),
                requests_per_second=float(record["Inferences/Second"]),
                p50_ms=float(record["p50 latency"]) / 1000,
                p90_ms=float(record["p90 latency"]) / 1000,
                p95_ms=float(record["p95 latency"]) / 1000,
                p99_ms=float(record["p99 latency"]) / 1000,
            ))
        except KeyError as error:
            raise PerfAnalyzerError(f"perf_analyzer CSV lacks column {error}; header: {reader.fieldnames}") \
                from None
    if not rows:
        raise PerfAnalyzerError(f"perf_analyzer CSV has no rows: {text[:200]!r}")
    return rows


def manual_arguments(model: str, url: str, protocol: str, input_data: str | os.PathLike, concurrency: int,
                     window_ms: int) -> list[str]:
    """Arguments for a run by hand: like `command_arguments`, with the summary printed instead of a CSV file."""
    arguments = command_arguments(model, url, protocol, input_data, "-", LoadSettings(concurrency, window_ms=window_ms))
    at = arguments.index("-f")
    return arguments[:at] + arguments[at + 2:]


DEFAULT_LIB_DIR = Path.home() / ".cache" / "parakeet-triton"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loadtest.perf_analyzer",
        description="Make perf_analyzer runnable (link the libraries it lacks) and print the one-line command that "
                    "load-tests the server with it.")
    parser.add_argument("--input-data", required=True,
                        help="perf_analyzer --input-data JSON (python -m benchmarks.loadtest.inputs writes one)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="server address (default: %(default)s)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="(default: %(default)s)")
    parser.add_argument("--model", default="parakeet", help="model to load (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (default: %(default)s)")
    parser.add_argument("--window-ms", type=int, default=5000,
                        help="length of each of the three measurement windows (default: %(default)s)")
    parser.add_argument("--lib-dir", type=Path, default=DEFAULT_LIB_DIR,
                        help="where the library links are kept (default: %(default)s)")
    parser.add_argument("--perf-analyzer", default=None, help="the binary (default: PATH, else the tritonclient wheel's)")
    args = parser.parse_args(argv)
    try:
        analyzer = locate(args.lib_dir, args.perf_analyzer)
        version = analyzer.version().splitlines()[0]
    except PerfAnalyzerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"# {version}; libraries linked: {', '.join(analyzer.linked) or 'none needed'}", file=sys.stderr)
    input_data = Path(args.input_data).resolve()
    print(analyzer.command_line(manual_arguments(args.model, args.url, args.protocol, input_data, args.concurrency,
                                                 args.window_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
