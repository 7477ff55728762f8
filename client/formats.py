"""Writing transcripts out: plain text, JSON, SubRip (`srt`) and WebVTT (`webvtt-py`)."""

from __future__ import annotations

import datetime
import json

import srt
import webvtt

from .transcript import TimedText, Transcript

FORMATS = ("text", "json", "srt", "vtt")
FILE_SUFFIXES = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}
FORMATS_NEEDING_TIMESTAMPS = frozenset({"json", "srt", "vtt"})

MAX_CUE_CHARACTERS = 42
"""Longest subtitle line built from words when the server sent no segments (a common broadcast guideline)."""
MAX_CUE_SECONDS = 6.0
MIN_CUE_SECONDS = 0.001


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
    return json.dumps(transcript.to_dict(), ensure_ascii=False, indent=2) + "\n"


def to_srt(transcript: Transcript) -> str:
    subtitles = [
        srt.Subtitle(index=number, start=datetime.timedelta(seconds=cue.start),
                     end=datetime.timedelta(seconds=cue.end), content=cue.text)
        for number, cue in enumerate(subtitle_cues(transcript), start=1)
    ]
    return srt.compose(subtitles)


def to_vtt(transcript: Transcript) -> str:
    document = webvtt.WebVTT()
    for cue in subtitle_cues(transcript):
        document.captions.append(webvtt.Caption(start=_vtt_time(cue.start), end=_vtt_time(cue.end),
                                                text=_vtt_escape(cue.text)))
    return document.content


def subtitle_cues(transcript: Transcript) -> list[TimedText]:
    """Cues for subtitles: the server's segments; else words grouped into short lines; else the whole text."""
    if transcript.segments:
        cues = list(transcript.segments)
    elif transcript.words:
        cues = group_words(transcript.words)
    elif transcript.text.strip() and transcript.audio_seconds:
        cues = [TimedText(transcript.text, 0.0, transcript.audio_seconds)]
    else:
        cues = []
    return [TimedText(" ".join(cue.text.split()), cue.start, max(cue.end, cue.start + MIN_CUE_SECONDS))
            for cue in cues if cue.text.strip()]


def group_words(words: tuple[TimedText, ...] | list[TimedText]) -> list[TimedText]:
    """Join words into cues of at most MAX_CUE_CHARACTERS and MAX_CUE_SECONDS, breaking after sentence ends."""
    cues: list[TimedText] = []
    current: list[TimedText] = []
    for word in words:
        if current:
            text = " ".join(w.text for w in current + [word])
            if len(text) > MAX_CUE_CHARACTERS or word.end - current[0].start > MAX_CUE_SECONDS:
                cues.append(_join(current))
                current = []
        current.append(word)
        if word.text.endswith((".", "?", "!")):
            cues.append(_join(current))
            current = []
    if current:
        cues.append(_join(current))
    return cues


def _join(words: list[TimedText]) -> TimedText:
    return TimedText(" ".join(word.text for word in words), words[0].start, max(w.end for w in words))


def _vtt_time(seconds: float) -> str:
    milliseconds = int(round(seconds * 1000))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    seconds_part, milliseconds = divmod(milliseconds, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds_part:02d}.{milliseconds:03d}"


def _vtt_escape(text: str) -> str:
    """WebVTT cue text treats `&`, `<` and `>` as markup; webvtt-py writes text as given."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
