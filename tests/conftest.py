"""Shared fixtures: a real tritonserver (via `parakeet-serve`) serving the v3_small fixture checkpoint on CPU.

`triton_server` (session scope) renders the model repository for the fixture checkpoint, starts
`python -m parakeet_triton.serve` (the `parakeet-serve` launcher, which runs the real tritonserver) on free
loopback ports, waits until it is ready, and stops it by PID (SIGTERM, then SIGKILL) at the end of the
session, also when tests fail. It yields a :class:`ServerHandle`:

    .grpc_url, .http_url      "127.0.0.1:PORT", as tritonclient.grpc / tritonclient.http take them
    .metrics_url              "http://127.0.0.1:PORT/metrics"
    .checkpoint               the served checkpoint (str path)
    .max_audio_seconds, .max_batch_size, .log_path, .pid

Tests that need a server skip when no tritonserver is available (neither on PATH nor from nvidia-pytriton).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parakeet_triton.server import LaunchedServer, free_loopback_ports

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SERVED_CHECKPOINT = FIXTURES / "v3_small" / "v3_small.nemo"
SERVER_MAX_AUDIO_SECONDS = 60.0  # the longest fixture clip is 44 s; the too-long test sends more than this
SERVER_MAX_BATCH_SIZE = 16
# Long enough that concurrent requests reliably meet in the encoder's queue on a busy 2-core CPU.
SERVER_QUEUE_DELAY_US = 50_000
READY_TIMEOUT_S = 300


free_ports = free_loopback_ports  # the tests' name for it


def tritonserver_available() -> bool:
    return bool(shutil.which("tritonserver")) or importlib.util.find_spec("pytriton") is not None


@dataclasses.dataclass
class ServerHandle:
    grpc_url: str
    http_url: str
    metrics_url: str
    checkpoint: str
    max_audio_seconds: float
    max_batch_size: int
    log_path: Path
    process: subprocess.Popen
    launched: LaunchedServer

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_server(log_path: Path, *extra_args: str, checkpoint: Path | str = SERVED_CHECKPOINT,
                 wait: bool = True, env: dict[str, str] | None = None) -> ServerHandle:
    """Start `parakeet-serve` (as `python -m parakeet_triton.serve`) on free loopback ports, CPU."""
    launched = LaunchedServer.start(
        checkpoint,
        ["--device", "cpu",
         "--max-batch-size", str(SERVER_MAX_BATCH_SIZE),
         "--max-queue-delay-us", str(SERVER_QUEUE_DELAY_US),
         "--max-audio-seconds", str(SERVER_MAX_AUDIO_SECONDS),
         "--ready-timeout", str(READY_TIMEOUT_S),
         *extra_args],
        log_path=log_path, env=env, cwd=ROOT)
    handle = ServerHandle(
        grpc_url=launched.grpc_url,
        http_url=launched.http_url,
        metrics_url=launched.endpoints.metrics_url,
        checkpoint=str(checkpoint),
        max_audio_seconds=SERVER_MAX_AUDIO_SECONDS,
        max_batch_size=SERVER_MAX_BATCH_SIZE,
        log_path=log_path,
        process=launched.process,
        launched=launched,
    )
    if wait:
        launched.wait_ready(READY_TIMEOUT_S)
    return handle


def stop_server(handle: ServerHandle, timeout: float = 30.0) -> int:
    """SIGTERM the launcher by PID (it stops tritonserver); SIGKILL if it does not exit in `timeout`."""
    return handle.launched.stop(timeout)


def _check_installed_from_this_checkout() -> None:
    # The Python backend stub ignores PYTHONPATH: it imports parakeet_triton from the interpreter's environment.
    probe = subprocess.run(
        [sys.executable, "-c", "import parakeet_triton, parakeet_core; print(parakeet_triton.__file__)"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd="/",
    )
    if probe.returncode != 0 or not Path(probe.stdout.strip()).resolve().is_relative_to(ROOT):
        pytest.fail(
            f"{sys.executable} does not import parakeet_triton from {ROOT} without PYTHONPATH "
            f"(got {probe.stdout.strip() or probe.stderr.strip()[-300:]}); run `pip install -e {ROOT}` first"
        )


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> ServerHandle:
    """A running tritonserver with the `parakeet` ensemble for the v3_small fixture checkpoint (CPU)."""
    if not tritonserver_available():
        pytest.skip("no tritonserver: install nvidia-pytriton (the `serve` extra) or run in a Triton container")
    if not SERVED_CHECKPOINT.is_file():
        pytest.fail(f"fixture checkpoint missing: {SERVED_CHECKPOINT}")
    _check_installed_from_this_checkout()
    log_path = tmp_path_factory.mktemp("triton") / "parakeet-serve.log"
    try:
        handle = start_server(log_path)
    except RuntimeError as error:
        pytest.fail(str(error))
    try:
        yield handle
    finally:
        stop_server(handle)
