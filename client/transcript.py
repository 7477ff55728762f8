"""The result type: a transcript with optional word and segment timings."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


@dataclass(frozen=True)
class TimedText:
    """A word or a segment and where it lies in the audio, in seconds."""

    text: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) is before start ({self.start})")

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> "TimedText":
        """Build from a `{"text", "start", "end"}` mapping as the server sends it."""
        try:
            return cls(text=item["text"], start=item["start"], end=item["end"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"expected {{text, start, end}}, got {item!r}") from error

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Transcript:
    """What the server recognised in one clip.

    `words` and `segments` are empty unless timestamps were requested. `audio_seconds` is the length of the
    audio that was sent (after decoding and resampling), useful for throughput figures.
    """

    text: str
    words: tuple[TimedText, ...] = field(default_factory=tuple)
    segments: tuple[TimedText, ...] = field(default_factory=tuple)
    audio_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a str, got {type(self.text).__name__}")
        object.__setattr__(self, "words", _timed_tuple(self.words, "words"))
        object.__setattr__(self, "segments", _timed_tuple(self.segments, "segments"))
        if self.audio_seconds is not None and not (self.audio_seconds >= 0 and math.isfinite(self.audio_seconds)):
            raise ValueError(f"audio_seconds must be a finite number >= 0, got {self.audio_seconds!r}")

    @classmethod
    def from_server(cls, text: bytes | str, timestamps: bytes | str | None = None,
                    audio_seconds: float | None = None) -> "Transcript":
        """Build from the ensemble's TRANSCRIPTS element and, when requested, its TIMESTAMPS JSON element."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        words: list[TimedText] = []
        segments: list[TimedText] = []
        if timestamps:
            if isinstance(timestamps, bytes):
                timestamps = timestamps.decode("utf-8")
            try:
                parsed = json.loads(timestamps)
            except json.JSONDecodeError as error:
                raise ValueError(f"TIMESTAMPS is not JSON: {timestamps[:80]!r}") from error
            if not isinstance(parsed, dict):
                raise ValueError(f"TIMESTAMPS must be a JSON object with words and segments, got {timestamps[:80]!r}")
            words = [TimedText.from_dict(item) for item in parsed.get("words", [])]
            segments = [TimedText.from_dict(item) for item in parsed.get("segments", [])]
        return cls(text=text, words=tuple(words), segments=tuple(segments), audio_seconds=audio_seconds)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written by the CLI: text, words and segments."""
        return {
            "text": self.text,
            "words": [word.to_dict() for word in self.words],
            "segments": [segment.to_dict() for segment in self.segments],
        }


def _timed_tuple(items: Iterable[Any], name: str) -> tuple[TimedText, ...]:
    result = []
    for item in items:
        if isinstance(item, TimedText):
            result.append(item)
        elif isinstance(item, Mapping):
            result.append(TimedText.from_dict(item))
        else:
            raise TypeError(f"{name} must hold TimedText or {{text, start, end}} mappings, got {item!r}")
    return tuple(result)
