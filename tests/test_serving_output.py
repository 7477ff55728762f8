"""What `parakeet-serve` prints: `--log-file` (tritonserver's log to a file, only real errors on the terminal), the
filter of known-harmless CPU error lines, and the offline checkpoint message."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parakeet_triton.server import Endpoints, TritonServerProcess, is_real_error

from conftest import ROOT, free_ports, start_server, stop_server, tritonserver_available

# Lines of a real tritonserver 2.51 start on a machine without a GPU (timestamps and pids as printed).
HARMLESS_ON_CPU = [
    'E1207 16:40:36.025673 4759 server.cc:241] "CudaDriverHelper has not been initialized."',
    'E1207 16:40:44.430851 4759 ensemble_scheduler.cc:1468] "unable to create stream for parakeet: CUDA driver '
    'version is insufficient for CUDA runtime version"',
    "Error: Failed to initialize NVML",
    'W1207 16:40:44.435106 4759 metrics.cc:798] "DCGM unable to start: DCGM initialization error"',
    'W1207 16:40:36.024607 4759 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory, pinned '
    'memory pool will not be available: CUDA driver version is insufficient for CUDA runtime version"',
    'I1207 16:40:44.163150 4759 model_lifecycle.cc:839] "successfully loaded \'encoder\'"',
]
REAL_ERRORS = [
    'E1207 16:40:44.430851 4759 model_lifecycle.cc:641] "failed to load \'encoder\' version 1: Internal: '
    'CheckpointError: /models/v3.nemo: truncated .nemo file"',
    'E1207 16:40:44.430851 4759 model_lifecycle.cc:641] "failed to load \'encoder\' version 1: Internal: unable to '
    'create stream for encoder: CUDA driver version is insufficient for CUDA runtime version"',
    'E1207 16:40:44.431000 4759 model_repository_manager.cc:1325] "Invalid argument: ensemble parakeet: unknown '
    'model decoder"',
    "error: creating server: Internal - failed to stat file /models",
    'I1207 16:40:44.431000 4759 server.cc:674] "encoder | 1 | UNAVAILABLE: Internal: CheckpointError: bad file"',
]


@pytest.mark.parametrize("line", HARMLESS_ON_CPU)
def test_harmless_cpu_lines_are_not_real_errors(line):
    assert not is_real_error(line)


@pytest.mark.parametrize("line", REAL_ERRORS)
def test_real_errors_are_recognised_even_when_they_mention_cuda(line):
    assert is_real_error(line)


def _fake_tritonserver(lines: list[str], sink: io.StringIO, log_path: Path | None) -> TritonServerProcess:
    """A TritonServerProcess whose 'server' prints `lines` and exits 1."""
    script = "import sys\nfor line in sys.argv[1:]:\n    print(line, flush=True)\nsys.exit(1)\n"
    process = TritonServerProcess([sys.executable, "-c", script, *lines], dict(os.environ), Endpoints(),
                                  shm_prefix="parakeet_test_output_", sink=sink, log_path=log_path)
    process.start()
    assert process.wait(30) == 1
    return process


def test_log_file_gets_everything_and_the_terminal_only_real_errors(tmp_path):
    lines = [*HARMLESS_ON_CPU, REAL_ERRORS[0], "+----+", "| Model | Version |"]
    terminal = io.StringIO()
    process = _fake_tritonserver(lines, terminal, tmp_path / "triton.log")
    assert (tmp_path / "triton.log").read_text().splitlines() == lines
    assert terminal.getvalue().splitlines() == [REAL_ERRORS[0]]
    assert process.failure_reason() == REAL_ERRORS[0]


def test_without_log_file_the_terminal_gets_everything_and_the_failure_reason_skips_harmless_lines():
    terminal = io.StringIO()
    process = _fake_tritonserver([*HARMLESS_ON_CPU, "Signal (15) received."], terminal, None)
    assert terminal.getvalue().splitlines() == [*HARMLESS_ON_CPU, "Signal (15) received."]
    assert process.failure_reason().splitlines()[-1] == "Signal (15) received."  # the log's tail, no false error


def test_log_file_keeps_the_terminal_to_parakeet_serve_lines(tmp_path):
    if not tritonserver_available():
        pytest.skip("no tritonserver: install nvidia-pytriton (the `serve` extra)")
    log_file = tmp_path / "logs" / "tritonserver.log"
    handle = start_server(tmp_path / "terminal.txt", "--log-file", str(log_file))
    try:
        deadline = time.monotonic() + 30  # Triton answers ready a moment before the launcher says so
        while "parakeet-serve: ready:" not in handle.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        ready_terminal = handle.log()
    finally:
        code = stop_server(handle)
    terminal = handle.log()
    assert code == 0, terminal[-3000:]
    assert "parakeet-serve: ready:" in ready_terminal, ready_terminal
    assert terminal.count(str(log_file)) == 1
    for line in terminal.splitlines():
        assert line.startswith("parakeet-serve: ") or is_real_error(line), line
    assert len(terminal.splitlines()) <= 10, terminal
    log = log_file.read_text()
    assert "successfully loaded 'parakeet'" in log
    assert "Started GRPCInferenceService" in log
    assert "| Model" in log  # Triton's start-up tables went to the file


def test_offline_default_checkpoint_names_the_quick_start_variable_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PARAKEET_", "HF_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    http, grpc, metrics = free_ports(3)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "parakeet_triton.serve", "--host", "127.0.0.1", "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert output.count("PARAKEET_CHECKPOINT=/path/to/model.nemo") == 1, output
    assert output.count("--checkpoint /path/to/model.nemo") == 1, output
    assert output.count("nvidia/parakeet-tdt-0.6b-v3") == 1, output
    assert "HF_HUB_OFFLINE is set" in output
    assert "starting tritonserver" not in output
    assert time.monotonic() - started < 60
