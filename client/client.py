"""The blocking client: `ParakeetClient(url).transcribe(item_or_list)`."""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import _wire
from .audio import AudioClip, AudioInput, load_clip
from .protocol import ENSEMBLE_MODEL
from .retry import RetryPolicy
from .transcript import Transcript

DEFAULT_TIMEOUT_S = 120.0
DEFAULT_CONCURRENCY = 4


@dataclass(frozen=True)
class Outcome:
    """What happened to one item of a batch: its transcript, or the error that stopped it."""

    index: int
    name: str
    transcript: Transcript | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        if (self.transcript is None) == (self.error is None):
            raise ValueError("an Outcome holds exactly one of transcript and error")

    @classmethod
    def of(cls, index: int, name: str, finished: Any) -> "Outcome":
        """The outcome of a finished future or asyncio task."""
        error = finished.exception()
        return cls(index, name, error=error) if error is not None else cls(index, name, transcript=finished.result())

    @property
    def ok(self) -> bool:
        return self.error is None


class ParakeetClient:
    """Send audio to the `parakeet` ensemble over gRPC (default) or HTTP and read back transcripts.

    `timeout` bounds each request in seconds. Requests that fail because the server is unavailable or too slow
    are retried according to `retry`; requests the server rejects are not. Clips longer than the server's
    configured maximum (`max_audio_seconds` in its model config) are refused before sending. Safe to share
    between threads.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = DEFAULT_TIMEOUT_S, *,
                 retry: RetryPolicy = RetryPolicy(), model: str = ENSEMBLE_MODEL):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.protocol = protocol
        self._module = _wire.triton_module(protocol)
        self.url = _wire.normalise_url(url or _wire.DEFAULT_URLS[protocol])
        self.timeout = float(timeout)
        self.retry = retry
        self.model = model
        self._lock = threading.Lock()
        self._limit_lock = threading.Lock()
        self._shared: Any = None
        self._per_thread = threading.local()
        self._thread_connections: list[tuple[threading.Thread, Any]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._max_audio_seconds: float | None = None
        self._limit_known = False

    # -- public API ---------------------------------------------------------------------------------------------

    def transcribe(self, audio: AudioInput | Sequence[AudioInput], *, timestamps: bool = False,
                   concurrency: int = DEFAULT_CONCURRENCY) -> Transcript | list[Transcript]:
        """Transcribe one item, or a list of items with up to `concurrency` requests in flight.

        An item is a path, a float array at 16 kHz, or `(array, sample_rate)`. For a list the result keeps its
        order; the first failure is raised (use `transcribe_many` to get every item's outcome).
        """
        if is_single_item(audio):
            return self._transcribe_item(audio, item_name(audio), timestamps)
        items = list(audio)
        transcripts: list[Transcript | None] = [None] * len(items)
        outcomes = self.transcribe_many(items, timestamps=timestamps, concurrency=concurrency)
        try:
            for outcome in outcomes:
                if outcome.error is not None:
                    raise outcome.error
                transcripts[outcome.index] = outcome.transcript
        finally:
            outcomes.close()
        return transcripts  # type: ignore[return-value]

    def transcribe_many(self, items: Iterable[AudioInput], *, timestamps: bool = False,
                        concurrency: int = DEFAULT_CONCURRENCY,
                        on_sent: Callable[[int, float], None] | None = None) -> Iterator[Outcome]:
        """Yield one Outcome per item, in completion order, never raising for a single item's failure.

        At most `concurrency` items are decoded or in flight at a time. Closing the iterator early cancels the
        items not started yet. `on_sent(index, audio_seconds)` is called (from a worker thread) when an item's
        audio is decoded and its request is about to go out, e.g. for a progress display.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")

        def submit(index: int, name: str, item: AudioInput) -> Future:
            return self._submit(concurrency, self._transcribe_item, item, name, timestamps,
                                None if on_sent is None else functools.partial(on_sent, index))

        window = InFlight(items, concurrency, submit)
        try:
            while window.running:
                done, _ = wait(window.running, return_when=FIRST_COMPLETED)
                yield from window.finished(done)
        finally:
            for future in window.running:
                future.cancel()

    @property
    def max_audio_seconds(self) -> float | None:
        """The longest clip the server accepts (from its model config), or None when it states no limit."""
        if not self._limit_known:
            with self._limit_lock:
                if not self._limit_known:
                    self._max_audio_seconds, self._limit_known = self._fetch_limit()
        return self._max_audio_seconds

    def is_ready(self) -> bool:
        """Whether the server answers and the ensemble is loaded (no retries)."""
        try:
            with self._connection() as connection:
                return bool(connection.is_model_ready(self.model, **_wire.timeout_kwargs(self.protocol, self.timeout)))
        except Exception:  # any transport failure means "not ready"
            return False

    def check_ready(self) -> None:
        """Return when the model is ready; else raise ServerUnreachableError (nothing usable answers at `url`, e.g.
        `connection refused at 127.0.0.1:8001 (grpc)`) or ModelNotReadyError (the server is up, the model is not).
        No retries."""
        kwargs = _wire.timeout_kwargs(self.protocol, self.timeout)
        _wire.require_live(self._answer(lambda connection: connection.is_server_live(**kwargs)), self.url,
                           self.protocol)
        _wire.require_ready(self._answer(lambda connection: connection.is_model_ready(self.model, **kwargs)),
                            self.model, self.url, self.protocol)

    def _answer(self, call: Callable[[Any], Any]) -> Any:
        """`call(connection)`'s result, or the exception it raised (returned, not raised)."""
        try:
            with self._connection() as connection:
                return call(connection)
        except Exception as error:  # the caller turns every failure into a description
            return error

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._pool_size = self._pool, None, 0
            connections = [connection for _, connection in self._thread_connections]
            connections += [self._shared] if self._shared is not None else []
            self._shared, self._thread_connections, self._per_thread = None, [], threading.local()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for connection in connections:
            _close_quietly(connection)

    def __enter__(self) -> "ParakeetClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _transcribe_item(self, item: AudioInput, name: str, timestamps: bool,
                         on_sent: Callable[[float], None] | None = None) -> Transcript:
        clip = load_clip(item, name=name)
        _wire.check_length(clip, self.max_audio_seconds)
        if on_sent is not None:
            on_sent(clip.seconds)
        return self._infer(clip, timestamps)

    def _infer(self, clip: AudioClip, timestamps: bool) -> Transcript:
        inputs, outputs = _wire.build_request(self._module, clip, timestamps)
        for attempt in range(self.retry.attempts):
            try:
                with self._connection() as connection:
                    result = connection.infer(self.model, inputs, outputs=outputs, **_wire.timeout_kwargs(self.protocol, self.timeout))
                return _wire.parse_response(result, clip, timestamps)
            except Exception as error:
                time.sleep(_wire.backoff_or_raise(error, attempt, self.retry, clip.name, self.url))
        raise AssertionError("unreachable")

    def _fetch_limit(self) -> tuple[float | None, bool]:
        """(limit, known): known is False when the server could not be asked, so that we ask again later."""
        try:
            with self._connection() as connection:
                config = connection.get_model_config(self.model, **_wire.json_kwargs(self.protocol, self.timeout))
        except Exception as error:
            if _wire.limit_unknown_for_now(error):
                return None, False  # ask again with the next request
            return None, True
        return _wire.max_audio_seconds_from_config(config), True


    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """The tritonclient to use from this thread: one gRPC client shared by all threads, or this thread's own
        HTTP client (tritonclient's HTTP clients are bound to the thread that made them)."""
        connection = self._shared if self.protocol == "grpc" else getattr(self._per_thread, "connection", None)
        if connection is None:
            with self._lock:
                if self.protocol == "grpc":
                    if self._shared is None:
                        self._shared = self._module.InferenceServerClient(self.url)
                    connection = self._shared
                else:
                    connection = self._module.InferenceServerClient(
                        self.url, connection_timeout=self.timeout, network_timeout=self.timeout)
                    self._per_thread.connection = connection
                    self._close_connections_of_finished_threads()
                    self._thread_connections.append((threading.current_thread(), connection))
        yield connection

    def _close_connections_of_finished_threads(self) -> None:
        finished = [entry for entry in self._thread_connections if not entry[0].is_alive()]
        for entry in finished:
            self._thread_connections.remove(entry)
            _close_quietly(entry[1])

    def _submit(self, concurrency: int, function: Any, *args: Any) -> Future:
        """Run on the client's worker pool, kept for the client's life so that per-thread HTTP clients are reused;
        the pool is replaced by a larger one when a call asks for more concurrency than it has."""
        with self._lock:
            if self._pool is None or self._pool_size < concurrency:
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="parakeet-client")
                self._pool_size = concurrency
            return self._pool.submit(function, *args)


def is_single_item(audio: Any) -> bool:
    """A path, an array or an `(array, rate)` tuple is one item; lists and other iterables are many."""
    return isinstance(audio, (str, os.PathLike, np.ndarray, tuple))


class InFlight:
    """At most `concurrency` items of a batch in flight: `start(index, name, item)` starts one and returns its future
    (or asyncio task); `running` maps what is in flight to (index, name); `finished(done)` turns finished ones into
    Outcomes and starts the next items. Shared by the blocking and the asyncio clients."""

    def __init__(self, items: Iterable[Any], concurrency: int, start: Callable[[int, str, Any], Any]):
        self._pending = enumerate(items)
        self._start = start
        self.running: dict[Any, tuple[int, str]] = {}
        while len(self.running) < concurrency and self._start_next():
            pass

    def _start_next(self) -> bool:
        following = next(self._pending, None)
        if following is None:
            return False
        index, item = following
        name = item_name(item, index)
        self.running[self._start(index, name, item)] = (index, name)
        return True

    def finished(self, done: Iterable[Any]) -> Iterator[Outcome]:
        for future in done:
            yield Outcome.of(*self.running.pop(future), future)
            self._start_next()


def item_name(item: Any, index: int | None = None) -> str:
    """How messages name an item: its path, else `item <index>` in a list, else `audio`."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return "audio" if index is None else f"item {index}"



def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:  # closing is best effort: the connection may already be broken
        pass
