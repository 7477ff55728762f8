"""What goes over the wire, shared by the blocking and the asyncio clients: tensors in, transcript out."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import numpy as np
from tritonclient.utils import InferenceServerException

from .audio import AudioClip
from .errors import (AudioTooLongError, ModelNotReadyError, ServerRejectedError, ServerUnavailableError,
                     ServerUnreachableError, not_ready_message, unreachable_message)
from .protocol import MAX_AUDIO_SECONDS_PARAMETER, TIMESTAMPS, TRANSCRIPTS, WAV, WAV_LENS
from .retry import RetryPolicy, retry_reason
from .transcript import Transcript

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
MAX_AUDIO_PARAMETER = MAX_AUDIO_SECONDS_PARAMETER
"""Model-config parameter in which the server states the longest clip it accepts, in seconds."""


def triton_module(protocol: str, asynchronous: bool = False) -> Any:
    """`tritonclient.grpc`, `tritonclient.http` or their `.aio` variants."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}" + (".aio" if asynchronous else ""))


def normalise_url(url: str) -> str:
    """tritonclient wants `host:port`; accept and strip `http://`, `https://` and `grpc://` too."""
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.rstrip("/")
    if not url:
        raise ValueError("url must be host:port")
    return url


def build_request(module: Any, clip: AudioClip, timestamps: bool) -> tuple[list[Any], list[Any]]:
    """The inputs (WAV [1, T] FP32, WAV_LENS [1, 1] INT32) and requested outputs for one clip."""
    wav = clip.samples.reshape(1, -1)
    wav_lens = np.array([[clip.samples.size]], dtype=np.int32)
    inputs = [module.InferInput(WAV, list(wav.shape), "FP32"), module.InferInput(WAV_LENS, [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(wav)
    inputs[1].set_data_from_numpy(wav_lens)
    names = [TRANSCRIPTS, TIMESTAMPS] if timestamps else [TRANSCRIPTS]
    outputs = [module.InferRequestedOutput(name) for name in names]
    return inputs, outputs


def build_piece_request(module: Any, samples: np.ndarray) -> tuple[list[Any], list[Any]]:
    """The inputs (WAV [1, n] FP32, WAV_LENS [1, 1] INT32; n may be 0) and outputs of one piece of a stream."""
    wav = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
    inputs = [module.InferInput(WAV, list(wav.shape), "FP32"), module.InferInput(WAV_LENS, [1, 1], "INT32")]
    inputs[0].set_data_from_numpy(wav)
    inputs[1].set_data_from_numpy(np.array([[wav.shape[1]]], dtype=np.int32))
    return inputs, [module.InferRequestedOutput(TRANSCRIPTS), module.InferRequestedOutput(TIMESTAMPS)]


def parse_piece_response(result: Any) -> tuple[str, str]:
    """(text so far, TIMESTAMPS JSON or "") of a streaming model's answer."""
    text = _first_element(result.as_numpy(TRANSCRIPTS), TRANSCRIPTS)
    timing = _first_element(result.as_numpy(TIMESTAMPS), TIMESTAMPS)
    return (text.decode("utf-8") if isinstance(text, bytes) else str(text),
            timing.decode("utf-8") if isinstance(timing, bytes) else str(timing))


def stream_error(error: Exception, name: str) -> Exception:
    """What a failed piece of a stream raises (never retried: the server's state has moved on)."""
    if isinstance(error, InferenceServerException):
        status = error.status()
        return ServerRejectedError(error_message(error), str(status) if status else None, name)
    return error


def parse_response(result: Any, clip: AudioClip, timestamps: bool) -> Transcript:
    """The transcript of a one-clip response."""
    text = _first_element(result.as_numpy(TRANSCRIPTS), TRANSCRIPTS)
    timing = _first_element(result.as_numpy(TIMESTAMPS), TIMESTAMPS) if timestamps else None
    return Transcript.from_server(text, timing, audio_seconds=clip.seconds)


def _first_element(array: np.ndarray | None, name: str) -> Any:
    if array is None or array.size < 1:
        raise ValueError(f"the response has no {name}")
    return array.reshape(-1)[0]


def max_audio_seconds_from_config(config: Mapping[str, Any]) -> float | None:
    """The `max_audio_seconds` parameter of a model config (JSON form), or None when it states none."""
    config = config.get("config", config)  # gRPC's JSON wraps the config, HTTP's does not
    parameter = (config.get("parameters") or {}).get(MAX_AUDIO_PARAMETER)
    value = parameter.get("string_value", parameter) if isinstance(parameter, Mapping) else parameter
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def check_length(clip: AudioClip, max_audio_seconds: float | None) -> None:
    """Refuse, before sending, a clip longer than the server accepts."""
    if max_audio_seconds is not None and clip.seconds > max_audio_seconds:
        raise AudioTooLongError(clip.seconds, max_audio_seconds, clip.name)


def backoff_or_raise(error: Exception, attempt: int, policy: RetryPolicy, name: str, url: str) -> float:
    """After failed try number `attempt` (from 0): the seconds to wait before trying again, or raise.

    A rejection by the server becomes ServerRejectedError, an exhausted retry budget ServerUnavailableError;
    anything else (a bug, a malformed response) is raised as it is.
    """
    reason = retry_reason(error)
    if reason is None:
        if isinstance(error, InferenceServerException):
            status = error.status()
            raise ServerRejectedError(error_message(error), str(status) if status else None, name) from error
        raise error
    if attempt + 1 >= policy.attempts:
        raise ServerUnavailableError(f"{name}: {reason} at {url}: {error_message(error)}", policy.attempts) \
            from error
    return policy.backoff(attempt)


def error_message(error: BaseException) -> str:
    if isinstance(error, InferenceServerException):
        return str(error.message())
    return str(error) or type(error).__name__


def timeout_kwargs(protocol: str, timeout: float) -> dict[str, float]:
    """tritonclient call arguments for a per-call timeout (gRPC takes one per call; HTTP's is set on the client)."""
    return {"client_timeout": timeout} if protocol == "grpc" else {}


def json_kwargs(protocol: str, timeout: float) -> dict[str, Any]:
    """gRPC answers protobuf unless asked for JSON; HTTP always answers JSON."""
    return {"as_json": True, **timeout_kwargs(protocol, timeout)} if protocol == "grpc" else {}


def limit_unknown_for_now(error: Exception) -> bool:
    """While fetching the model configs: True if the server could not be asked (ask again later), False if it
    answered with an error (that model states no limit); anything else is a bug and is re-raised."""
    if retry_reason(error) is not None:
        return True
    if not isinstance(error, InferenceServerException):
        raise error
    return False


def require_live(live: bool | Exception, url: str, protocol: str) -> None:
    """After asking the server whether it is live (`live`: its answer, or the error the call raised): return, or raise
    ServerUnreachableError describing what answered at `url` (e.g. `connection refused at 127.0.0.1:8001 (grpc)`)."""
    if isinstance(live, Exception):
        raise ServerUnreachableError(unreachable_message(live, url, protocol)) from live
    if not live:
        raise ServerUnreachableError(f"the server at {url} ({protocol}) answers but is not live: is it a Triton server?")


def require_ready(ready: bool | Exception, model: str, url: str, protocol: str) -> None:
    """After asking whether `model` is ready (`ready`: the answer, or the call's error): return, or raise
    ModelNotReadyError (the server is up, the model is not)."""
    if isinstance(ready, Exception):
        raise ModelNotReadyError(f"{not_ready_message(model, url, protocol)}: {ready}") from ready
    if not ready:
        raise ModelNotReadyError(not_ready_message(model, url, protocol))
