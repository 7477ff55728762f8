"""Exceptions raised by parakeet_client; all derive from ParakeetClientError."""

from __future__ import annotations


class ParakeetClientError(Exception):
    """Base class of every error this package raises."""


class AudioDecodeError(ParakeetClientError):
    """The audio could not be read (unknown format, corrupt file, or no decoder available)."""


class AudioTooLongError(ParakeetClientError):
    """The clip is longer than the server accepts in one request."""

    def __init__(self, audio_seconds: float, max_audio_seconds: float, name: str = "audio"):
        self.audio_seconds = audio_seconds
        self.max_audio_seconds = max_audio_seconds
        super().__init__(
            f"{name} is {audio_seconds:.1f} s long; the server accepts at most {max_audio_seconds:g} s per clip "
            "(its --max-audio-seconds): split the file, or raise the server's limit"
        )


class ServerRejectedError(ParakeetClientError):
    """The server answered the request with an error; sending it again would not help."""

    def __init__(self, message: str, status: str | None = None, name: str = "audio"):
        self.status = status
        self.reason = message
        detail = f" ({status})" if status else ""
        super().__init__(f"{name}: server rejected the request{detail}: {message}")


class ServerUnavailableError(ParakeetClientError):
    """The server could not be reached, or did not answer in time, after every retry."""

    def __init__(self, message: str, attempts: int):
        self.attempts = attempts
        super().__init__(f"{message} (after {attempts} attempt{'s' if attempts != 1 else ''})")
