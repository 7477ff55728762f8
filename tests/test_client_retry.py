"""Retries only on UNAVAILABLE and deadline errors; rejected requests are sent once; length limit; ordering.

A fake tritonclient connection stands in for the server, so these run without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from parakeet_client import (AsyncParakeetClient, AudioTooLongError, ParakeetClient, RetryPolicy, ServerRejectedError,
                             ServerUnavailableError)
from parakeet_client.retry import DEADLINE, UNAVAILABLE, retry_reason
from parakeet_triton.protocol import TIMESTAMPS, TRANSCRIPTS, WAV, WAV_LENS

FAST = RetryPolicy(attempts=3, initial_backoff=0.001, max_backoff=0.002)
CLIP = np.zeros(1600, dtype=np.float32)


class FakeResult:
    def __init__(self, text: str):
        self.text = text

    def as_numpy(self, name: str) -> np.ndarray:
        value = {TRANSCRIPTS: self.text.encode(), TIMESTAMPS: b'{"words": [], "segments": []}'}[name]
        return np.array([[value]], dtype=object)


class FakeConnection:
    """Fails with the given errors first, then answers with the length of WAV as text."""

    def __init__(self, errors=(), limit: float | None = None, delay: float = 0.0):
        self.errors = list(errors)
        self.limit = limit
        self.delay = delay
        self.calls = 0
        self.lock = threading.Lock()

    def _answer(self, inputs):
        with self.lock:
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
        names = [i.name() for i in inputs]
        assert names == [WAV, WAV_LENS]
        shape = inputs[0].shape()
        return FakeResult(str(shape[1]))

    def infer(self, model, inputs, outputs=None, **kwargs):
        time.sleep(self.delay * np.random.default_rng().random())
        return self._answer(inputs)

    def get_model_config(self, model, **kwargs):
        parameters = {} if self.limit is None else {"max_audio_seconds": {"string_value": str(self.limit)}}
        return {"config": {"name": model, "parameters": parameters}}

    def is_model_ready(self, model, **kwargs):
        return True

    def close(self):
        pass


class FakeAsyncConnection(FakeConnection):
    async def infer(self, model, inputs, outputs=None, **kwargs):
        await asyncio.sleep(self.delay * np.random.default_rng().random())
        return self._answer(inputs)

    async def get_model_config(self, model, **kwargs):
        return FakeConnection.get_model_config(self, model)

    async def close(self):
        pass


def client_with(connection: FakeConnection, protocol: str = "grpc", retry: RetryPolicy = FAST) -> ParakeetClient:
    client = ParakeetClient("127.0.0.1:1", protocol=protocol, retry=retry)
    client._connection = lambda: contextlib.nullcontext(connection)  # type: ignore[method-assign]
    return client


def status_error(status: str) -> InferenceServerException:
    return InferenceServerException(msg=f"fake {status}", status=status)


@pytest.mark.parametrize("error, reason", [
    (status_error("StatusCode.UNAVAILABLE"), UNAVAILABLE),
    (status_error("StatusCode.DEADLINE_EXCEEDED"), DEADLINE),
    (status_error("503"), UNAVAILABLE),
    (ConnectionRefusedError(), UNAVAILABLE),
    (TimeoutError(), DEADLINE),
    (socket.timeout(), DEADLINE),
    (status_error("StatusCode.INVALID_ARGUMENT"), None),
    (status_error("StatusCode.INTERNAL"), None),
    (status_error("400"), None),
    (InferenceServerException(msg="no status"), None),
    (ValueError("bug"), None),
])
def test_retry_reason(error: BaseException, reason: str | None) -> None:
    assert retry_reason(error) == reason


@pytest.mark.parametrize("status", ["StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"])
def test_transient_errors_are_retried(status: str) -> None:
    connection = FakeConnection(errors=[status_error(status), status_error(status)])
    assert client_with(connection).transcribe(CLIP).text == "1600"
    assert connection.calls == 3


def test_retries_run_out() -> None:
    connection = FakeConnection(errors=[status_error("StatusCode.UNAVAILABLE")] * 5)
    with pytest.raises(ServerUnavailableError, match="after 3 attempts") as error:
        client_with(connection).transcribe(CLIP)
    assert connection.calls == 3 and error.value.attempts == 3


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "400"])
def test_rejected_requests_are_sent_once(status: str) -> None:
    connection = FakeConnection(errors=[status_error(status)])
    with pytest.raises(ServerRejectedError, match=f"rejected the request \\({status}\\)") as error:
        client_with(connection).transcribe(CLIP)
    assert connection.calls == 1 and error.value.status == status


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(attempts=6, initial_backoff=0.1, max_backoff=0.5, multiplier=2, jitter=0)
    assert [policy.backoff(k) for k in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    jittery = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.5)
    assert all(0.5 <= jittery.backoff(0) <= 1.0 for _ in range(50))
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_too_long_is_refused_before_sending_with_the_limit() -> None:
    connection = FakeConnection(limit=0.05)
    client = client_with(connection)
    assert client.max_audio_seconds == 0.05
    with pytest.raises(AudioTooLongError, match=r"0.1 s long; the server accepts at most 0.05 s"):
        client.transcribe(CLIP)
    assert connection.calls == 0


def test_too_long_file_is_named(tmp_path) -> None:
    import soundfile

    path = tmp_path / "talk.wav"
    soundfile.write(path, CLIP, 16000)
    with pytest.raises(AudioTooLongError, match=r"talk.wav is 0.1 s long"):
        client_with(FakeConnection(limit=0.05)).transcribe(path)


def test_no_limit_stated() -> None:
    assert client_with(FakeConnection()).max_audio_seconds is None


def test_list_keeps_order_under_concurrency() -> None:
    clips = [np.zeros(n, dtype=np.float32) for n in range(100, 2100, 100)]
    connection = FakeConnection(delay=0.01)
    transcripts = client_with(connection).transcribe(clips, concurrency=5)
    assert [t.text for t in transcripts] == [str(c.size) for c in clips]


def test_concurrency_is_bounded() -> None:
    in_flight, peak = 0, 0
    lock = threading.Lock()

    class Counting(FakeConnection):
        def infer(self, model, inputs, outputs=None, **kwargs):
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
            time.sleep(0.01)
            with lock:
                in_flight -= 1
            return self._answer(inputs)

    client_with(Counting()).transcribe([CLIP] * 12, concurrency=3)
    assert peak <= 3


def test_transcribe_many_reports_each_failure() -> None:
    connection = FakeConnection(errors=[status_error("StatusCode.INVALID_ARGUMENT")])
    outcomes = sorted(client_with(connection, retry=RetryPolicy(attempts=1)).transcribe_many([CLIP, CLIP, "absent.wav"],
                                                                                             concurrency=1),
                      key=lambda o: o.index)
    assert [o.ok for o in outcomes] == [False, True, False]
    assert isinstance(outcomes[0].error, ServerRejectedError)
    assert "absent.wav: no such file" in str(outcomes[2].error)


def test_list_raises_the_first_failure() -> None:
    with pytest.raises(ServerRejectedError):
        client_with(FakeConnection(errors=[status_error("400")])).transcribe([CLIP, CLIP], concurrency=1)


def test_unreachable_server_is_unavailable_after_retries() -> None:
    for protocol in ("grpc", "http"):
        with ParakeetClient("127.0.0.1:1", protocol=protocol, timeout=5, retry=FAST) as client:
            assert not client.is_ready()
            with pytest.raises(ServerUnavailableError, match="server unavailable at 127.0.0.1:1"):
                client.transcribe(CLIP)


def test_client_imports_neither_torch_nor_parakeet_core() -> None:
    import subprocess

    code = ("import sys, parakeet_client, parakeet_client.cli; "
            "bad = [m for m in ('torch', 'parakeet_core') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="protocol"):
        ParakeetClient(protocol="smtp")
    with pytest.raises(ValueError, match="timeout"):
        ParakeetClient(timeout=0)
    assert ParakeetClient(protocol="http").url == "localhost:8000"
    assert ParakeetClient("http://example:9/").url == "example:9"
    with pytest.raises(ValueError, match="concurrency"):
        list(ParakeetClient().transcribe_many([CLIP], concurrency=0))


def async_client_with(connection: FakeAsyncConnection, retry: RetryPolicy = FAST) -> AsyncParakeetClient:
    client = AsyncParakeetClient("127.0.0.1:1", retry=retry)
    client._connection = connection
    return client


def test_async_retries_and_order() -> None:
    async def scenario():
        connection = FakeAsyncConnection(errors=[status_error("StatusCode.UNAVAILABLE")], delay=0.01)
        client = async_client_with(connection)
        clips = [np.zeros(n, dtype=np.float32) for n in range(100, 1100, 100)]
        transcripts = await client.transcribe(clips, concurrency=4)
        assert [t.text for t in transcripts] == [str(c.size) for c in clips]
        assert connection.calls == len(clips) + 1
        await client.close()

    asyncio.run(scenario())


def test_async_rejected_and_too_long() -> None:
    async def scenario():
        client = async_client_with(FakeAsyncConnection(errors=[status_error("StatusCode.INVALID_ARGUMENT")]))
        with pytest.raises(ServerRejectedError):
            await client.transcribe(CLIP)
        limited = async_client_with(FakeAsyncConnection(limit=0.05))
        with pytest.raises(AudioTooLongError, match="at most 0.05 s"):
            await limited.transcribe(CLIP)

    asyncio.run(scenario())
