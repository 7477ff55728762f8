"""The asyncio client, for services that embed transcription: `await AsyncParakeetClient(url).transcribe(...)`."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Awaitable, Iterable, Sequence

import numpy as np

from . import _wire
from .audio import AudioClip, AudioInput, load_clip
from .client import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, InFlight, Outcome, is_single_item, item_name
from .protocol import ENSEMBLE_MODEL, SAMPLE_RATE, STREAMING_MODEL
from .retry import RetryPolicy
from .streaming import StreamUpdate, audio_pieces, new_sequence_id
from .transcript import Transcript


class AsyncParakeetClient:
    """The asyncio twin of ParakeetClient (same arguments, same retry and length rules).

    Files are decoded in worker threads so that the event loop is never blocked. Use `async with`, or call
    `await close()`, from the loop that made the requests.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout: float = DEFAULT_TIMEOUT_S, *,
                 retry: RetryPolicy = RetryPolicy(), model: str = ENSEMBLE_MODEL):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.protocol = protocol
        self._module = _wire.triton_module(protocol, asynchronous=True)
        self.url = _wire.normalise_url(url or _wire.DEFAULT_URLS[protocol])
        self.timeout = float(timeout)
        self.retry = retry
        self.model = model
        self._connection: Any = None
        self._max_audio_seconds: float | None = None
        self._limit_known = False
        self._limit_lock: asyncio.Lock | None = None

    async def transcribe(self, audio: AudioInput | Sequence[AudioInput], *, timestamps: bool = False,
                         concurrency: int = DEFAULT_CONCURRENCY) -> Transcript | list[Transcript]:
        """Transcribe one item, or a list with up to `concurrency` requests in flight (order kept)."""
        if is_single_item(audio):
            return await self._transcribe_item(audio, item_name(audio), timestamps)
        items = list(audio)
        transcripts: list[Transcript | None] = [None] * len(items)
        outcomes = self.transcribe_many(items, timestamps=timestamps, concurrency=concurrency)
        try:
            async for outcome in outcomes:
                if outcome.error is not None:
                    raise outcome.error
                transcripts[outcome.index] = outcome.transcript
        finally:
            await outcomes.aclose()
        return transcripts  # type: ignore[return-value]

    async def transcribe_many(self, items: Iterable[AudioInput], *, timestamps: bool = False,
                              concurrency: int = DEFAULT_CONCURRENCY) -> AsyncIterator[Outcome]:
        """Yield one Outcome per item in completion order; at most `concurrency` items at a time."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        window = InFlight(items, concurrency, lambda index, name, item: asyncio.create_task(
            self._transcribe_item(item, name, timestamps)))
        try:
            while window.running:
                done, _ = await asyncio.wait(window.running, return_when=asyncio.FIRST_COMPLETED)
                for outcome in window.finished(done):
                    yield outcome
        finally:
            for task in window.running:
                task.cancel()
            if window.running:
                await asyncio.gather(*window.running, return_exceptions=True)

    async def stream(self, audio: AudioInput | Iterable[np.ndarray], *, piece_seconds: float = 0.5,
                     realtime: bool = True, model: str = STREAMING_MODEL,
                     sequence_id: int | str | None = None) -> AsyncIterator[StreamUpdate]:
        """Send audio to the streaming model piece by piece and yield one StreamUpdate per piece, then the final one.

        `audio`: a file or array (cut into `piece_seconds` pieces), or an iterable of float32 16 kHz pieces (e.g.
        `parakeet_client.streaming.read_pieces(sys.stdin.buffer, ...)`; read in a worker thread, so a live source
        never blocks the loop). `realtime`: never send audio before it would exist in a live stream (a file plays
        at its own speed; a live source is never slowed); False sends as fast as the server answers. The stream
        is one sequence (`sequence_id`, random by default); a piece the server refuses raises ServerRejectedError
        and ends the iteration (no retries: the server's state has moved on)."""
        pieces = audio_pieces(audio, piece_seconds)
        sequence_id = new_sequence_id() if sequence_id is None else sequence_id
        name = item_name(audio)
        started = time.monotonic()
        sent = 0
        first = True
        while True:
            piece = await asyncio.to_thread(next, pieces, None)
            last = piece is None
            piece = np.zeros(0, dtype=np.float32) if last else piece
            sent += len(piece)
            if realtime and not last:
                await asyncio.sleep(max(0.0, started + sent / SAMPLE_RATE - time.monotonic()))
            inputs, outputs = _wire.build_piece_request(self._module, piece)
            sent_at = time.monotonic()
            try:
                result = await self._client().infer(model, inputs, outputs=outputs, sequence_id=sequence_id,
                                                    sequence_start=first, sequence_end=last,
                                                    **_wire.timeout_kwargs(self.protocol, self.timeout))
            except Exception as error:
                raise _wire.stream_error(error, name) from error
            first = False
            text, timing = _wire.parse_piece_response(result)
            latency = time.monotonic() - sent_at
            if last:
                transcript = Transcript.from_server(text, timing or None, audio_seconds=sent / SAMPLE_RATE)
                yield StreamUpdate(text, sent / SAMPLE_RATE, latency, final=True, transcript=transcript)
                return
            yield StreamUpdate(text, sent / SAMPLE_RATE, latency)

    async def max_audio_seconds(self) -> float | None:
        """The longest clip the server accepts (from its model config), or None when it states no limit."""
        if self._limit_lock is None:
            self._limit_lock = asyncio.Lock()
        async with self._limit_lock:
            if not self._limit_known:
                self._max_audio_seconds, self._limit_known = await self._fetch_limit()
        return self._max_audio_seconds

    async def is_ready(self) -> bool:
        """Whether the server answers and the ensemble is loaded (no retries)."""
        try:
            return bool(await self._client().is_model_ready(self.model, **_wire.timeout_kwargs(self.protocol, self.timeout)))
        except Exception:  # any transport failure means "not ready"
            return False

    async def check_ready(self) -> None:
        """Return when the model is ready; else raise ServerUnreachableError or ModelNotReadyError (as
        ParakeetClient.check_ready does). No retries."""
        kwargs = _wire.timeout_kwargs(self.protocol, self.timeout)
        _wire.require_live(await self._answer(self._client().is_server_live(**kwargs)), self.url, self.protocol)
        _wire.require_ready(await self._answer(self._client().is_model_ready(self.model, **kwargs)),
                            self.model, self.url, self.protocol)

    @staticmethod
    async def _answer(call: Awaitable[Any]) -> Any:
        """The awaited result, or the exception it raised (returned, not raised)."""
        try:
            return await call
        except Exception as error:  # the caller turns every failure into a description
            return error

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def __aenter__(self) -> "AsyncParakeetClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def transcribe_clip(self, clip: AudioClip, *, timestamps: bool = False) -> Transcript:
        """Transcribe audio already decoded (AudioTooLongError past the server's limit, checked before sending)."""
        _wire.check_length(clip, await self.max_audio_seconds())
        return await self._infer(clip, timestamps)

    async def _transcribe_item(self, item: AudioInput, name: str, timestamps: bool) -> Transcript:
        return await self.transcribe_clip(await asyncio.to_thread(load_clip, item, name), timestamps=timestamps)

    async def _infer(self, clip: AudioClip, timestamps: bool) -> Transcript:
        inputs, outputs = _wire.build_request(self._module, clip, timestamps)
        for attempt in range(self.retry.attempts):
            try:
                result = await self._client().infer(self.model, inputs, outputs=outputs, **_wire.timeout_kwargs(self.protocol, self.timeout))
                return _wire.parse_response(result, clip, timestamps)
            except Exception as error:
                await asyncio.sleep(_wire.backoff_or_raise(error, attempt, self.retry, clip.name, self.url))
        raise AssertionError("unreachable")

    async def _fetch_limit(self) -> tuple[float | None, bool]:
        try:
            config = await self._client().get_model_config(self.model, **_wire.json_kwargs(self.protocol, self.timeout))
        except Exception as error:
            if _wire.limit_unknown_for_now(error):
                return None, False  # ask again with the next request
            return None, True
        return _wire.max_audio_seconds_from_config(config), True


    def _client(self) -> Any:
        if self._connection is None:
            if self.protocol == "grpc":
                self._connection = self._module.InferenceServerClient(self.url)
            else:
                self._connection = self._module.InferenceServerClient(self.url, conn_timeout=self.timeout)
        return self._connection
