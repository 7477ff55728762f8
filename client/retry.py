"""When to try a request again, and how long to wait first.

Only failures that say nothing about the request itself are retried: the server could not be reached
(gRPC UNAVAILABLE, HTTP 503, connection refused or reset) or did not answer in time (DEADLINE_EXCEEDED,
timeouts). A request the server answered with an error (bad input, too long, model failure) is never sent again.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass

from tritonclient.utils import InferenceServerException

UNAVAILABLE = "server unavailable"
DEADLINE = "deadline exceeded"

_RETRYABLE_STATUSES = {
    "StatusCode.UNAVAILABLE": UNAVAILABLE,
    "StatusCode.DEADLINE_EXCEEDED": DEADLINE,
    "503": UNAVAILABLE,
    "504": DEADLINE,
}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: wait `initial_backoff * multiplier**k` (capped), `attempts` tries in all."""

    attempts: int = 4
    initial_backoff: float = 0.25
    max_backoff: float = 4.0
    multiplier: float = 2.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], got {self.jitter}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** retry)
        return base * (1 - self.jitter * random.random())


def retry_reason(error: BaseException) -> str | None:
    """`UNAVAILABLE` or `DEADLINE` when `error` is worth retrying, None when the request must not be resent."""
    if isinstance(error, InferenceServerException):
        return _RETRYABLE_STATUSES.get(str(error.status()))
    if isinstance(error, (TimeoutError, socket.timeout, asyncio.TimeoutError)):
        return DEADLINE
    if isinstance(error, ConnectionError):
        return UNAVAILABLE
    # aiohttp's connection errors (http.aio) are OSErrors that are not ConnectionError; name-matched so that
    # aiohttp stays an optional import.
    if type(error).__module__.startswith("aiohttp") and type(error).__name__.startswith(("ClientConnect",
                                                                                      "ServerDisconnected")):
        return UNAVAILABLE
    return None
