"""Client library and CLI for the Parakeet Triton server (imports neither torch nor parakeet_core).

    from parakeet_client import ParakeetClient
    with ParakeetClient("localhost:8001") as client:
        print(client.transcribe("talk.mp3").text)
        transcripts = client.transcribe(["a.wav", "b.m4a"], timestamps=True, concurrency=4)

The names below are imported on first use, so `import parakeet_client.audio` or `parakeet_client.protocol` (which
parakeet_core and the server use) does not import tritonclient.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncParakeetClient
    from .audio import AudioClip, AudioInput, load_clip
    from .client import Outcome, ParakeetClient
    from .errors import (AudioDecodeError, AudioTooLongError, ModelNotReadyError, NoAudioStreamError,
                         ParakeetClientError, ServerRejectedError, ServerUnavailableError, ServerUnreachableError)
    from .retry import RetryPolicy
    from .streaming import StreamUpdate
    from .transcript import TimedText, Transcript

_MODULE_OF = {
    "AsyncParakeetClient": "aio",
    "AudioClip": "audio", "AudioInput": "audio", "load_clip": "audio",
    "Outcome": "client", "ParakeetClient": "client",
    "AudioDecodeError": "errors", "AudioTooLongError": "errors", "ModelNotReadyError": "errors",
    "NoAudioStreamError": "errors", "ParakeetClientError": "errors", "ServerRejectedError": "errors",
    "ServerUnavailableError": "errors", "ServerUnreachableError": "errors",
    "RetryPolicy": "retry",
    "StreamUpdate": "streaming",
    "TimedText": "transcript", "Transcript": "transcript",
}

__all__ = [
    "AsyncParakeetClient", "AudioClip", "AudioDecodeError", "AudioInput", "AudioTooLongError", "ModelNotReadyError",
    "NoAudioStreamError", "Outcome", "ParakeetClient", "ParakeetClientError", "RetryPolicy", "ServerRejectedError",
    "ServerUnavailableError", "ServerUnreachableError", "StreamUpdate", "TimedText", "Transcript", "load_clip",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
