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


def _raw_http(http_url: str, method: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    import http.client

    host, port = http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _assert_serving(handle) -> None:
    status, _ = _raw_http(handle.http_url, "GET", "/v2/health/ready", b"")
    assert status == 200 and handle.process.poll() is None, handle.log()[-3000:]
    assert _infer(handle.grpc_url, speech_like(2.0)) is not None


INFER = f"/v2/models/{protocol.ENSEMBLE_MODEL}/infer"
CRASH_PAYLOADS = {
    # Triton 2.51's HTTP front end: std::bad_alloc (buffer sized from the shape alone) ...
    "huge shape, no data": (json.dumps({"inputs": [{"name": protocol.WAV, "shape": [1, 1 << 40], "datatype": "FP32",
                                                    "data": []}]}).encode(), {}, 400, "holds"),
    "huge binary shape": (json.dumps({"inputs": [{"name": protocol.WAV, "shape": [1, 1 << 40], "datatype": "FP32",
                                                  "parameters": {"binary_data_size": 0}}]}).encode(),
                          {"Inference-Header-Content-Length": None}, 400, "needs"),
    # ... and a stack overflow on deep nesting, of the whole document or inside "data".
    "deep document": (b"[" * 1_000_000, {}, 400, "nested"),
    "deep data": (b'{"inputs":[{"name":"WAV","shape":[1,1],"datatype":"FP32","data":' + b"[" * 100_000 + b"1"
                  + b"]" * 100_000 + b"}]}", {}, 400, "nested"),
    "negative shape": (json.dumps({"inputs": [{"name": protocol.WAV, "shape": [1, -5], "datatype": "FP32",
                                               "data": [1.0]}]}).encode(), {}, 400, "shape"),
    "declared body beyond the limit": (b"{}", {"Content-Length": str(1 << 40)}, 413, "over the limit"),
    "compressed body": (b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
}


@pytest.mark.parametrize("case", sorted(CRASH_PAYLOADS))
def test_http_crash_payloads_are_refused_and_the_server_keeps_serving(guarded_server, case):
    """Payloads that abort or segfault Triton 2.51's own HTTP server get a 4xx naming the problem from the
    front (parakeet_triton.front), and the server keeps serving."""
    body, extra, status, words = CRASH_PAYLOADS[case]
    headers = {"Content-Type": "application/json"}
    for key, value in extra.items():
        headers[key] = str(len(body)) if value is None else value
    if "Content-Length" in extra:  # a lie about the length: send the header only
        import socket

        host, port = guarded_server.http_url.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {extra['Content-Length']}\r\n\r\n".encode())
            chunks = []
            while chunk := sock.recv(4096):  # the front answers and closes the connection
                chunks.append(chunk)
            reply = b"".join(chunks).decode(errors="replace")
        assert reply.startswith(f"HTTP/1.1 {status}") and words in reply, reply
    else:
        got, reply = _raw_http(guarded_server.http_url, "POST", INFER, body, headers)
        assert got == status and words in reply.decode(errors="replace"), (got, reply[:300])
    _assert_serving(guarded_server)


def test_bounded_fuzz_of_http_and_grpc_bodies_never_takes_the_server_down(guarded_server):
    """Seeded mutations of a valid request (shapes, datatypes, sizes, truncations, random bytes) sent to the
    HTTP port (through the front) and the gRPC port (raw ModelInferRequest messages, past tritonclient's own
    checks): every one is answered, and the server still transcribes afterwards."""
    import random

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    rng = random.Random(1234)
    clip = speech_like(1.0)
    valid = {"inputs": [{"name": protocol.WAV, "shape": [1, len(clip)], "datatype": "FP32",
                         "data": [round(float(x), 4) for x in clip]}]}
    for _ in range(150):
        document = json.loads(json.dumps(valid))
        entry = document["inputs"][0]
        choice = rng.randrange(8)
        if choice == 0:
            entry["shape"] = [rng.choice([0, 1, 2, 1 << 31, 1 << 40, -1]) for _ in range(rng.randrange(0, 4))]
        elif choice == 1:
            entry["datatype"] = rng.choice(["FP16", "INT64", "BYTES", "BOOL", "XX", 7])
        elif choice == 2:
            entry["data"] = entry["data"][: rng.randrange(len(entry["data"]))]
        elif choice == 3:
            entry["data"] = [[x] for x in entry["data"][:50]]
        elif choice == 4:
            entry["name"] = rng.choice(["", "WAV_LENS", "X" * 1000, None])
        elif choice == 5:
            document["inputs"].append({"name": protocol.WAV_LENS, "shape": [1, 1], "datatype": "INT32",
                                       "data": [rng.choice([0, -1, 1 << 30, len(clip)])]})
        body = json.dumps(document).encode()
        if choice == 6:
            body = body[: rng.randrange(len(body))]
        elif choice == 7:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
        status, reply = _raw_http(guarded_server.http_url, "POST", INFER, body)
        assert status != 502, (status, reply[:300])  # the front found no server behind it

    channel = grpc.insecure_channel(guarded_server.grpc_url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    codes: dict[str, int] = {}
    for _ in range(100):
        request = service_pb2.ModelInferRequest(model_name=protocol.ENSEMBLE_MODEL)
        tensor = request.inputs.add(name=rng.choice([protocol.WAV, protocol.WAV_LENS, "X"]),
                                    datatype=rng.choice(["FP32", "INT32", "BYTES", "FP64"]))
        tensor.shape.extend(rng.choice([1, 2, 1 << 31, 1 << 40, 0, -3]) for _ in range(rng.randrange(0, 4)))
        request.raw_input_contents.append(bytes(rng.randrange(256) for _ in range(rng.choice([0, 3, 4, 64, 4096]))))
        try:
            stub.ModelInfer(request, timeout=30)
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        codes[code] = codes.get(code, 0) + 1
    channel.close()
    # Each message answered by the server (a dead one would give UNAVAILABLE: failed to connect).
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "INTERNAL"}, codes
    _assert_serving(guarded_server)


def test_full_queue_refuses_fast_with_unavailable_and_keeps_serving(guarded_server):
    """A 16-minute request occupies the encoder; short requests arriving meanwhile find its queue (size 1) full
    and are refused at once with UNAVAILABLE, which clients retry; the long request and later ones succeed."""
    long_clip = speech_like(LONG_SECONDS)
    short = speech_like(3.0)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        long_future = pool.submit(_infer, guarded_server.grpc_url, long_clip)
        time.sleep(2.0)  # the long clip is past the preprocessor and in the encoder

        def timed_short_request():
            started = time.monotonic()
            try:
                _infer(guarded_server.grpc_url, short)
                return None
            except InferenceServerException as error:
                return error.status(), str(error), time.monotonic() - started

        futures = [pool.submit(timed_short_request) for _ in range(12)]
        errors = [outcome for outcome in (future.result() for future in futures) if outcome is not None]
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


def _stage_counts(http_url: str) -> dict[str, tuple[int, int]]:
    from parakeet_triton.drain import _counts

    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as response:
        return _counts(json.load(response))


DRAIN_SECONDS = (15.0, 40.0, 80.0, 120.0, 200.0, 300.0)


def check_sigterm_drains_the_ensemble(grpc_url: str, http_url: str, process, log) -> None:
    """Six requests of different lengths admitted by the preprocessor when `process` gets SIGTERM: all six
    complete with their transcripts, a request sent during the drain is refused with UNAVAILABLE, and the process
    exits 0 after saying it drained. (The server must accept clips of DRAIN_SECONDS.)"""
    clips = [speech_like(seconds) for seconds in DRAIN_SECONDS]
    results: dict[int, object] = {}

    def call(index: int) -> None:
        try:
            results[index] = _infer(grpc_url, clips[index])
        except Exception as error:  # noqa: BLE001 - asserted on below
            results[index] = error

    workers = [threading.Thread(target=call, args=(index,)) for index in range(len(clips))]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while True:  # every request admitted by the preprocessor
        counts = _stage_counts(http_url)
        if counts.get(protocol.PREPROCESSOR_MODEL, (0, 0))[0] == len(clips):
            break
        assert time.monotonic() < deadline, counts
        time.sleep(0.02)
    assert counts.get(protocol.DECODER_MODEL, (0, 0))[0] < len(clips), "all finished before the signal"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(InferenceServerException) as refused:
        _infer(grpc_url, speech_like(2.0))
    for worker in workers:
        worker.join(300)
    code = process.wait(timeout=120)
    failed = {index: result for index, result in results.items() if not isinstance(result, str)}
    assert not failed and len(results) == len(clips), (failed, log()[-3000:])
    assert all(text.strip() for text in results.values())
    assert "StatusCode.UNAVAILABLE" in str(refused.value.status()) and "shutting down" in str(refused.value)
    assert code == 0, log()[-3000:]
    assert "drained" in log()


def test_sigterm_drains_requests_in_flight_through_the_ensemble(tmp_path):
    """parakeet-serve's drain (Triton alone refuses the ensemble's internal requests once signalled)."""
    handle = start_server(tmp_path / "serve.log", "--exit-timeout-secs", "120",
                          "--max-audio-seconds", str(max(DRAIN_SECONDS) + 60))
    try:
        check_sigterm_drains_the_ensemble(handle.grpc_url, handle.http_url, handle.process, handle.log)
    finally:
        stop_server(handle)
    assert "parakeet-serve: drained:" in handle.log()


def _refused_before_start(tmp_path, *args: str, **kwargs) -> str:
    """Start parakeet-serve expecting it to refuse (exit 2) before it is ready; its log."""
    handle = start_server(tmp_path / "serve.log", *args, wait=False, **kwargs)
    try:
        code = handle.process.wait(timeout=60)
    finally:
        stop_server(handle)
    log = handle.log()
    assert code == 2, log[-3000:]
    return log


def test_busy_port_refused_before_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        grpc_port, metrics_port = free_ports(2)
        log = _refused_before_start(tmp_path, "--http-port", str(port), "--grpc-port", str(grpc_port),
                                    "--metrics-port", str(metrics_port))
    assert f"HTTP port {port} on 127.0.0.1 is not available" in log and "parakeet-serve: ready" not in log


@pytest.mark.parametrize("damage", ["truncated", "not a tar"])
def test_damaged_checkpoint_refused_before_start(tmp_path, damage):
    data = (FIXTURES / "v3_small" / "v3_small.nemo").read_bytes()
    checkpoint = tmp_path / "model.nemo"
    checkpoint.write_bytes(data[: len(data) - 100_000] if damage == "truncated" else b"garbage" * 100)
    log = _refused_before_start(tmp_path, checkpoint=checkpoint)
    assert str(checkpoint) in log and ("truncated" in log if damage == "truncated" else "not a readable" in log)
    assert "starting tritonserver" not in log


def test_short_soak_keeps_memory_level(tmp_path):
    """A short soak (benchmarks/soak.py, the server's default allocator): no request fails and the server's total
    resident memory after the last request stays within 10 % of what it was halfway (the full run: docs/load-test.md)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import soak

    args = soak.build_parser().parse_args(["--requests", "300", "--concurrency", "4", "--max-seconds", "5",
                                           "--sample-every", "50", "--baseline", "150"])
    result = soak.run(args)
    assert result["errors"] == [], result["errors"][:3]
    assert [s["requests"] for s in result["samples"]][-1] == 300
    assert result["growth_after_baseline"] <= 0.10, soak.table(result)
