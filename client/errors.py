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


class NoAudioStreamError(AudioDecodeError):
    """The file holds no audio stream (a video-only file, or a file that is not audio or video at all)."""


class ServerUnreachableError(ServerUnavailableError):
    """Nothing usable answers at the server's address: nothing listens, no answer in time, or another protocol."""

    def __init__(self, message: str):
        self.attempts = 1
        ParakeetClientError.__init__(self, message)


class ModelNotReadyError(ParakeetClientError):
    """The server answers, but the model is not ready (still loading, or it failed to load)."""


DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
_OTHER_PROTOCOL = {"grpc": "http", "http": "grpc"}
_PROTOCOL_NAMES = {"grpc": "gRPC", "http": "HTTP"}


def unreachable_message(error: BaseException, url: str, protocol: str) -> str:
    """Why the server at `url` could not be asked, e.g. `connection refused at 127.0.0.1:8001 (grpc)`, with a hint
    when the answer or the port number suggests the other protocol."""
    text = _error_text(error)
    what, spoke_other_protocol = _classify_connection_failure(error, text, protocol)
    hint = protocol_hint(url, protocol, spoke_other_protocol)
    return f"{what} at {url} ({protocol})" + (f"; {hint}" if hint else "")


def not_ready_message(model: str, url: str, protocol: str) -> str:
    """The server is up but the model is not: say so, and where to look."""
    return (f"the server at {url} ({protocol}) is up, but model '{model}' is not ready (still loading, or it failed "
            "to load: see the server's log)")


def protocol_hint(url: str, protocol: str, spoke_other_protocol: bool = False) -> str | None:
    """`is this the HTTP port? use --protocol http` (or the gRPC twin) when the server answered in the other
    protocol or `url`'s port is the other protocol's default; None otherwise."""
    other = _OTHER_PROTOCOL[protocol]
    if spoke_other_protocol or _port(url) == DEFAULT_PORTS[other]:
        return f"is this the {_PROTOCOL_NAMES[other]} port? use --protocol {other}"
    return None


def _classify_connection_failure(error: BaseException, text: str, protocol: str) -> tuple[str, bool]:
    """(what failed, whether the server seems to speak the other protocol)."""
    lowered = text.lower()
    if isinstance(error, ConnectionRefusedError) or "connection refused" in lowered or "connect call failed" in lowered:
        return "connection refused", False
    if "failed parsing http/2" in lowered or "http1.x server" in lowered:
        return "no gRPC answer (the port speaks HTTP/1.x)", True
    if "expected http/" in lowered or type(error).__name__ in ("HTTPParseError", "BadStatusLine"):
        return "no HTTP answer (the port does not speak HTTP/1.1)", True
    if isinstance(error, TimeoutError) or "deadline" in lowered or "timed out" in lowered or "timeout" in lowered:
        return "no answer in time", False
    if type(error).__name__ == "gaierror" or "dns resolution failed" in lowered or "not known" in lowered:
        return "cannot resolve the host name", False
    if "unimplemented" in lowered:
        return f"not a Triton server ({_PROTOCOL_NAMES[protocol]} call not implemented)", False
    return f"cannot connect ({text.splitlines()[0] if text else type(error).__name__})", False


def _error_text(error: BaseException) -> str:
    return str(error).strip()


def _port(url: str) -> int | None:
    _, _, port = url.rpartition(":")
    return int(port) if port.isdigit() else None
