"""The asyncio client, for services that embed transcription: `await AsyncParakeetClient(url).transcribe(...)`."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterable, Sequence

from parakeet_triton.protocol import ENSEMBLE_MODEL

from . import _wire
from .audio import AudioClip, AudioInput, load_clip
from .client import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S, Outcome, is_single_item, item_name
from .retry import RetryPolicy
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
        pending_items = iter(enumerate(items))
        running: dict[asyncio.Task, tuple[int, str]] = {}

        def start_next() -> bool:
            try:
                index, item = next(pending_items)
            except StopIteration:
                return False
            name = item_name(item, index)
            running[asyncio.create_task(self._transcribe_item(item, name, timestamps))] = (index, name)
            return True

        try:
            while len(running) < concurrency and start_next():
                pass
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index, name = running.pop(task)
                    error = task.exception()
                    yield (Outcome(index, name, error=error) if error is not None
                           else Outcome(index, name, transcript=task.result()))
                    start_next()
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

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
        configs = []
        for model in _wire.MODELS_STATING_THE_LIMIT:
            try:
                configs.append(await self._client().get_model_config(model, **_wire.json_kwargs(self.protocol, self.timeout)))
            except Exception as error:
                if _wire.limit_unknown_for_now(error):
                    return None, False  # ask again with the next request
        return _wire.max_audio_seconds_from_configs(configs), True


    def _client(self) -> Any:
        if self._connection is None:
            if self.protocol == "grpc":
                self._connection = self._module.InferenceServerClient(self.url)
            else:
                self._connection = self._module.InferenceServerClient(self.url, conn_timeout=self.timeout)
        return self._connection
