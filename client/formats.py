"""Writing transcripts out: plain text, JSON, SubRip (`srt`) and WebVTT (`webvtt-py`).

JSON times are rounded to milliseconds. SRT and VTT cues follow `subtitles`: at most 2 lines of 42 characters and
7 s per cue, split at word boundaries and timed by the words, never across a segment.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import srt
import webvtt

from .subtitles import (MAX_CUE_CHARACTERS, MAX_CUE_SECONDS, MAX_LINE_CHARACTERS, break_lines, cues_from_segments,
                        group_words)
from .transcript import TimedText, Transcript

__all__ = [
    "FILE_SUFFIXES", "FORMATS", "FORMATS_NEEDING_TIMESTAMPS", "MAX_CUE_CHARACTERS", "MAX_CUE_SECONDS",
    "MAX_LINE_CHARACTERS", "MIN_CUE_SECONDS", "capped_cues", "group_words", "json_document", "render",
    "rounded_times", "subtitle_cues", "to_json", "to_srt", "to_text", "to_vtt",
]

FORMATS = ("text", "json", "srt", "vtt")
FILE_SUFFIXES = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}
FORMATS_NEEDING_TIMESTAMPS = frozenset({"json", "srt", "vtt"})

MIN_CUE_SECONDS = 0.001
TIME_DECIMALS = 3
"""Times in JSON are rounded to milliseconds."""


def render(transcript: Transcript, format: str, *, timestamps: bool = False) -> str:
    """The transcript as the text of a `format` file (`text` lists segments with times when `timestamps`)."""
    if format == "text":
        return to_text(transcript, timestamps=timestamps)
    if format == "json":
        return to_json(transcript)
    if format == "srt":
        return to_srt(transcript)
    if format == "vtt":
        return to_vtt(transcript)
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def to_text(transcript: Transcript, *, timestamps: bool = False) -> str:
    if timestamps and transcript.segments:
        return "".join(f"[{cue.start:8.2f} - {cue.end:8.2f}] {cue.text}\n" for cue in transcript.segments)
    return transcript.text + "\n"


def to_json(transcript: Transcript) -> str:
    return json.dumps(json_document(transcript), ensure_ascii=False, indent=2) + "\n"


def json_document(transcript: Transcript) -> dict[str, Any]:
    """The JSON form of a transcript (text, words, segments) with times rounded to milliseconds."""
    return rounded_times(transcript.to_dict())


def rounded_times(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of a transcript's dict with every word and segment `start`/`end` rounded to milliseconds."""
    rounded = dict(document)
    for key in ("words", "segments"):
        if key in rounded:
            rounded[key] = [{**item, "start": round(item["start"], TIME_DECIMALS),
                             "end": round(item["end"], TIME_DECIMALS)} for item in rounded[key]]
    return rounded


def to_srt(transcript: Transcript) -> str:
    subtitles = [
        srt.Subtitle(index=number, start=datetime.timedelta(seconds=cue.start),
                     end=datetime.timedelta(seconds=cue.end), content="\n".join(break_lines(cue.text)))
        for number, cue in enumerate(capped_cues(transcript), start=1)
    ]
    return srt.compose(subtitles)


def to_vtt(transcript: Transcript) -> str:
    document = webvtt.WebVTT()
    for cue in capped_cues(transcript):
        document.captions.append(webvtt.Caption(start=_vtt_time(cue.start), end=_vtt_time(cue.end),
                                                text="\n".join(_vtt_escape(line) for line in break_lines(cue.text))))
    return document.content


def subtitle_cues(transcript: Transcript) -> list[TimedText]:
    """The transcript's timed spans: the server's segments as they are; else words grouped into cues; else the
    whole text over the audio."""
    if transcript.segments:
        cues = list(transcript.segments)
    elif transcript.words:
        cues = group_words(transcript.words)
    elif transcript.text.strip() and transcript.audio_seconds:
        cues = [TimedText(transcript.text, 0.0, transcript.audio_seconds)]
    else:
        cues = []
    return _tidy(cues)


def capped_cues(transcript: Transcript) -> list[TimedText]:
    """The cues srt and vtt files hold: each segment (or the words, or the whole text) split at word boundaries into
    cues of at most 2 lines of 42 characters and 7 s, timed by their words (times estimated where words are
    missing). The cue text is one line; `subtitles.break_lines` makes the display lines."""
    if transcript.segments:
        cues = cues_from_segments(transcript.segments, transcript.words)
    elif transcript.words:
        cues = group_words(transcript.words)
    elif transcript.text.strip() and transcript.audio_seconds:
        cues = cues_from_segments([TimedText(transcript.text, 0.0, transcript.audio_seconds)], [])
    else:
        cues = []
    return _tidy(cues)


def _tidy(cues: list[TimedText]) -> list[TimedText]:
    """Whitespace collapsed, empty cues dropped, and at least MIN_CUE_SECONDS each (players skip empty spans)."""
    return [TimedText(" ".join(cue.text.split()), cue.start, max(cue.end, cue.start + MIN_CUE_SECONDS))
            for cue in cues if cue.text.strip()]


def _vtt_time(seconds: float) -> str:
    milliseconds = int(round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds_part, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds_part:02d}.{milliseconds:03d}"


def _vtt_escape(text: str) -> str:
    """WebVTT cue text treats `&`, `<` and `>` as markup; webvtt-py writes text as given."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
