"""Production hardening against the real server: admin APIs closed without the operator key, queue limits that
refuse fast, a dead backend process that stops the server, and the launcher's checks before Triton starts."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from parakeet_triton import protocol
from parakeet_triton.watchdog import backend_stubs

from conftest import FIXTURES, free_ports, start_server, stop_server, tritonserver_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from long_audio import speech_like  # noqa: E402

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

ADMIN_KEY = "test-operator-key"
LONG_SECONDS = 960.0

pytestmark = pytest.mark.skipif(not tritonserver_available(), reason="no tritonserver")


def _http(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[protocol.ADMIN_KEY_HEADER] = key
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _wav_inputs(samples: np.ndarray) -> list:
    wav = grpcclient.InferInput(protocol.WAV, [1, len(samples)], "FP32")
    wav.set_data_from_numpy(samples[None].astype(np.float32))
    lens = grpcclient.InferInput(protocol.WAV_LENS, [1, 1], "INT32")
    lens.set_data_from_numpy(np.array([[len(samples)]], dtype=np.int32))
    return [wav, lens]


def _infer(url: str, samples: np.ndarray, headers: dict | None = None):
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(protocol.ENSEMBLE_MODEL, _wav_inputs(samples), headers=headers,
                              outputs=[grpcclient.InferRequestedOutput(protocol.TRANSCRIPTS)], client_timeout=600)
        return result.as_numpy(protocol.TRANSCRIPTS).reshape(-1)[0].decode("utf-8")
    finally:
        client.close()


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    """A server with a known admin key and a queue of one request per stage."""
    handle = start_server(tmp_path_factory.mktemp("guarded") / "serve.log", "--admin-key", ADMIN_KEY,
                          "--max-queue-size", "1", "--max-audio-seconds", str(LONG_SECONDS + 60))
    yield handle
    stop_server(handle)


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/v2/systemsharedmemory/region/triton_python_backend_shm/register",
     {"key": "/triton_python_backend_shm", "offset": 0, "byte_size": 1 << 20}),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/trace/setting", None),
])
def test_admin_http_apis_refused_without_the_key(guarded_server, method, path, body):
    url = f"http://{guarded_server.http_url}{path}"
    status, text = _http(method, url, body)
    assert status == 403, (status, text)
    assert protocol.ADMIN_KEY_HEADER in text
    status, text = _http(method, url, body, key="wrong")
    assert status == 403, (status, text)
    if method == "GET":
        status, text = _http(method, url, body, key=ADMIN_KEY)
        assert status == 200, (status, text)


def test_admin_grpc_apis_refused_without_the_key(guarded_server):
    client = grpcclient.InferenceServerClient(guarded_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match=protocol.ADMIN_KEY_HEADER):
            client.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException, match=protocol.ADMIN_KEY_HEADER):
            client.update_log_settings({"log_verbose_level": 1})
        with pytest.raises(InferenceServerException, match=protocol.ADMIN_KEY_HEADER):
            client.get_model_repository_index()
        admin = {protocol.GRPC_ADMIN_KEY_HEADER: ADMIN_KEY}
        with pytest.raises(InferenceServerException, match=protocol.ADMIN_KEY_HEADER):
            client.get_log_settings(headers={protocol.GRPC_ADMIN_KEY_HEADER: "wrong"})
        assert client.get_system_shared_memory_status(headers=admin) is not None
        assert client.get_log_settings(headers=admin) is not None
        # What clients and perf_analyzer need stays open.
        assert client.is_server_ready() and client.get_model_config(protocol.ENSEMBLE_MODEL)
        assert client.get_inference_statistics(protocol.ENSEMBLE_MODEL) is not None
    finally:
        client.close()


def test_full_queue_refuses_fast_with_unavailable_and_keeps_serving(guarded_server):
    """A 16-minute request occupies the encoder; short requests arriving meanwhile find its queue (size 1) full
    and are refused at once with UNAVAILABLE, which clients retry; the long request and later ones succeed."""
    long_clip = speech_like(LONG_SECONDS)
    short = speech_like(3.0)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        long_future = pool.submit(_infer, guarded_server.grpc_url, long_clip)
        time.sleep(2.0)  # the long clip is past the preprocessor and in the encoder
        started = time.monotonic()
        futures = [pool.submit(_infer, guarded_server.grpc_url, short) for _ in range(12)]
        errors = []
        for future in futures:
            try:
                future.result()
            except InferenceServerException as error:
                errors.append((error.status(), str(error), time.monotonic() - started))
        assert long_future.result()
    assert errors, "no request was refused although the encoder's queue holds one"
    for status, message, _ in errors:
        assert status == "StatusCode.UNAVAILABLE" and "queue size" in message, (status, message)
    assert min(elapsed for *_, elapsed in errors) < 1.0
    assert _infer(guarded_server.grpc_url, short) is not None


def test_killed_stage_process_stops_the_server_within_10s(tmp_path):
    """kill -9 of the encoder's stub under load: the launcher names the stage, stops tritonserver and exits 3."""
    handle = start_server(tmp_path / "serve.log")
    stop = threading.Event()

    def load() -> None:
        clip = speech_like(4.0)
        while not stop.is_set():
            try:
                _infer(handle.grpc_url, clip)
            except Exception:  # noqa: BLE001 - requests fail once the stage is gone
                time.sleep(0.05)

    workers = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    try:
        for worker in workers:
            worker.start()
        time.sleep(1.0)
        stubs = backend_stubs(handle.pid)
        assert sorted(stubs.values()) == ["decoder", "encoder", "preprocessor"], stubs
        encoder_pid = next(pid for pid, model in stubs.items() if model == "encoder")
        killed = time.monotonic()
        os.kill(encoder_pid, signal.SIGKILL)
        code = handle.process.wait(timeout=30)
        elapsed = time.monotonic() - killed
    finally:
        stop.set()
        stop_server(handle)
    log = handle.log()
    assert code == 3, log[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert f"the 'encoder' stage's backend process (pid {encoder_pid}) died" in log


def test_busy_port_refused_before_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port, metrics_port = free_ports(2)
        handle = start_server(tmp_path / "serve.log", "--http-port", str(port), "--grpc-port", str(grpc_port),
                              "--metrics-port", str(metrics_port), wait=False)
        try:
            code = handle.process.wait(timeout=60)
        finally:
            stop_server(handle)
    log = handle.log()
    assert code == 2, log[-3000:]
    assert f"HTTP port {port} on 127.0.0.1 is not available" in log and "parakeet-serve: ready" not in log


@pytest.mark.parametrize("damage", ["truncated", "not a tar"])
def test_damaged_checkpoint_refused_before_start(tmp_path, damage):
    data = (FIXTURES / "v3_small" / "v3_small.nemo").read_bytes()
    checkpoint = tmp_path / "model.nemo"
    checkpoint.write_bytes(data[: len(data) - 100_000] if damage == "truncated" else b"garbage" * 100)
    handle = start_server(tmp_path / "serve.log", checkpoint=checkpoint, wait=False)
    try:
        code = handle.process.wait(timeout=60)
    finally:
        stop_server(handle)
    log = handle.log()
    assert code == 2, log[-3000:]
    assert str(checkpoint) in log and ("truncated" in log if damage == "truncated" else "not a readable" in log)
    assert "starting tritonserver" not in log
