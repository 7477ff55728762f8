"""Client library and CLI for the Parakeet Triton server (imports neither torch nor parakeet_core).

    from parakeet_client import ParakeetClient
    with ParakeetClient("localhost:8001") as client:
        print(client.transcribe("talk.mp3").text)
        transcripts = client.transcribe(["a.wav", "b.m4a"], timestamps=True, concurrency=4)
"""

from .aio import AsyncParakeetClient
from .audio import AudioClip, AudioInput, load_clip
from .client import Outcome, ParakeetClient
from .errors import (AudioDecodeError, AudioTooLongError, ParakeetClientError, ServerRejectedError,
                     ServerUnavailableError)
from .retry import RetryPolicy
from .transcript import TimedText, Transcript

__all__ = [
    "AsyncParakeetClient", "AudioClip", "AudioDecodeError", "AudioInput", "AudioTooLongError", "Outcome",
    "ParakeetClient", "ParakeetClientError", "RetryPolicy", "ServerRejectedError", "ServerUnavailableError",
    "TimedText", "Transcript", "load_clip",
]
