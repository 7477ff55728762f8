"""OpenAI's audio-transcription wire format: the request fields, the response bodies and the error shape.

Pure functions and dataclasses, testable without a server; the ASGI app (`parakeet_openai.app`) only moves bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Iterator, Mapping

from parakeet_client import formats
from parakeet_client.transcript import Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
STREAMABLE_FORMATS = ("json", "text")
GRANULARITIES = ("word", "segment")
KNOWN_FIELDS = frozenset({"file", "model", "response_format", "timestamp_granularities[]", "timestamp_granularities",
                          "language", "prompt", "temperature", "stream", "include[]", "chunking_strategy"})
LANGUAGE_CODE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def _bool_field(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", ""):
        return False
    raise ApiError(400, f"'{name}' must be true or false, got {value!r}", param=name, code="invalid_value")


@dataclasses.dataclass(frozen=True)
class TranscriptionRequest:
    """The form fields of `POST /v1/audio/transcriptions`, validated (the file is handled apart)."""

    model: str
    response_format: str = "json"
    timestamp_granularities: tuple[str, ...] = ()
    language: str | None = None
    prompt: str | None = None
    temperature: float = 0.0
    stream: bool = False

    def __post_init__(self) -> None:
        if self.response_format not in RESPONSE_FORMATS:
            raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}; "
                                f"got {self.response_format!r}", param="response_format", code="invalid_value")
        for granularity in self.timestamp_granularities:
            if granularity not in GRANULARITIES:
                raise ApiError(400, f"timestamp_granularities[] values must be 'word' or 'segment'; got {granularity!r}",
                               param="timestamp_granularities[]", code="invalid_value")
        if self.timestamp_granularities and self.response_format != "verbose_json":
            raise ApiError(400, "timestamp_granularities[] needs response_format=verbose_json",
                           param="timestamp_granularities[]", code="invalid_value")
        if self.language is not None and not LANGUAGE_CODE.match(self.language):
            raise ApiError(400, f"language must be an ISO-639-1 code such as 'en'; got {self.language!r}",
                           param="language", code="invalid_value")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 1.0):
            raise ApiError(400, f"temperature must be within 0..1; got {self.temperature!r}", param="temperature",
                           code="invalid_value")
        if self.stream and self.response_format not in STREAMABLE_FORMATS:
            raise ApiError(400, f"stream=true works with response_format json or text; got {self.response_format!r}",
                           param="stream", code="invalid_value")

    @classmethod
    def from_form(cls, fields: Mapping[str, list[str]], served: tuple[str, ...]) -> "TranscriptionRequest":
        """Build from the non-file form fields (name -> values); `served` are the accepted `model` names."""
        unknown = sorted(set(fields) - KNOWN_FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}", param=unknown[0], code="unknown_parameter")

        def single(name: str) -> str | None:
            values = fields.get(name, [])
            if len(values) > 1:
                raise ApiError(400, f"field {name!r} given {len(values)} times", param=name, code="invalid_value")
            return values[0] if values else None

        model = single("model")
        if not model:
            raise ApiError(400, "the 'model' field is required", param="model", code="missing_required_parameter")
        if model not in served:
            raise ApiError(400, f"model {model!r} is not served here; use {served[0]!r}", param="model",
                           code="model_not_found")
        temperature_text = single("temperature")
        try:
            temperature = float(temperature_text) if temperature_text not in (None, "") else 0.0
        except ValueError:
            raise ApiError(400, f"temperature must be a number, got {temperature_text!r}", param="temperature",
                           code="invalid_value") from None
        granularities = [*fields.get("timestamp_granularities[]", []), *fields.get("timestamp_granularities", [])]
        return cls(
            model=model,
            response_format=single("response_format") or "json",
            timestamp_granularities=tuple(dict.fromkeys(g.strip() for g in granularities)),
            language=single("language") or None,
            prompt=single("prompt"),
            temperature=temperature,
            stream=_bool_field(single("stream") or "", "stream"),
        )

    @property
    def needs_timestamps(self) -> bool:
        """Whether the answer needs the ensemble's TIMESTAMPS (word and segment times)."""
        return self.response_format in ("srt", "vtt", "verbose_json")


def segment_dicts(transcript: Transcript) -> list[dict[str, Any]]:
    """`segments` of a verbose_json answer, from the ensemble's segments (or words grouped into cues)."""
    return [{"id": number, "seek": int(round(cue.start * 100)), "start": cue.start, "end": cue.end,
             "text": cue.text, "tokens": [], "temperature": 0.0}
            for number, cue in enumerate(formats.subtitle_cues(transcript))]


def verbose_json(transcript: Transcript, request: TranscriptionRequest, duration: float) -> dict[str, Any]:
    granularities = request.timestamp_granularities or ("segment",)
    body: dict[str, Any] = {"task": "transcribe", "language": request.language or "unknown",
                            "duration": duration, "text": transcript.text}
    if "segment" in granularities:
        body["segments"] = segment_dicts(transcript)
    if "word" in granularities:
        body["words"] = [{"word": word.text, "start": word.start, "end": word.end} for word in transcript.words]
    body["usage"] = {"type": "duration", "seconds": duration}
    return body


def render(transcript: Transcript, request: TranscriptionRequest, duration: float) -> tuple[str, str]:
    """(media type, body) of the non-streamed answer in `request.response_format`."""
    kind = request.response_format
    if kind == "json":
        return "application/json", json.dumps({"text": transcript.text}, ensure_ascii=False)
    if kind == "verbose_json":
        return "application/json", json.dumps(verbose_json(transcript, request, duration), ensure_ascii=False)
    if kind == "text":
        return "text/plain; charset=utf-8", transcript.text + "\n"
    if kind == "srt":
        return "text/plain; charset=utf-8", formats.to_srt(transcript)
    return "text/vtt; charset=utf-8", formats.to_vtt(transcript)


def stream_events(transcript: Transcript) -> Iterator[str]:
    """Server-sent events: one `transcript.text.delta` per word (the deltas add up to the text), then `.done`.

    The events follow the finished transcription (Triton answers a clip at once), so they arrive together.
    """
    text = transcript.text
    pieces = re.findall(r"\s*\S+", text)
    rest = text[len("".join(pieces)):]
    if rest:
        pieces = [*pieces[:-1], pieces[-1] + rest] if pieces else [rest]
    for piece in pieces:
        yield _event({"type": "transcript.text.delta", "delta": piece})
    yield _event({"type": "transcript.text.done", "text": text})


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
