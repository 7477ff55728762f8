"""Transcript records and the text/JSON/SRT/VTT writers; subtitles must parse back with their libraries."""

from __future__ import annotations

import json

import pytest
import srt
import webvtt

from parakeet_client import TimedText, Transcript
from parakeet_client.formats import MAX_CUE_CHARACTERS, group_words, render, subtitle_cues, to_srt, to_vtt

TIMESTAMPS_JSON = json.dumps({
    "words": [{"text": "Hello", "start": 0.0, "end": 0.4}, {"text": "world.", "start": 0.5, "end": 0.9},
              {"text": "Again", "start": 1.5, "end": 1.9}],
    "segments": [{"text": "Hello world.", "start": 0.0, "end": 0.9}, {"text": "Again", "start": 1.5, "end": 1.9}],
})


@pytest.fixture
def transcript() -> Transcript:
    return Transcript.from_server(b"Hello world. Again", TIMESTAMPS_JSON.encode(), audio_seconds=2.0)


def test_from_server(transcript: Transcript) -> None:
    assert transcript.text == "Hello world. Again"
    assert [w.text for w in transcript.words] == ["Hello", "world.", "Again"]
    assert transcript.segments[1] == TimedText("Again", 1.5, 1.9)
    assert transcript.audio_seconds == 2.0


def test_from_server_without_timestamps() -> None:
    transcript = Transcript.from_server("plain")
    assert transcript.words == () and transcript.segments == ()


@pytest.mark.parametrize("payload, match", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"words": [{"text": "a", "start": 1.0}]}', "text, start, end"),
    (b'{"words": [{"text": "a", "start": 1.0, "end": 0.5}]}', "before start"),
])
def test_bad_timestamps_are_refused(payload: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Transcript.from_server(b"x", payload)


@pytest.mark.parametrize("start, end", [(-0.1, 1.0), (float("nan"), 1.0), (0.0, float("inf")), (True, 1.0)])
def test_timed_text_validates(start: float, end: float) -> None:
    with pytest.raises(ValueError):
        TimedText("a", start, end)


def test_transcript_validates() -> None:
    with pytest.raises(TypeError):
        Transcript(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Transcript("a", audio_seconds=-1.0)
    assert Transcript("a", words=[{"text": "a", "start": 0, "end": 1}]).words == (TimedText("a", 0.0, 1.0),)


def test_json_holds_text_words_segments(transcript: Transcript) -> None:
    document = json.loads(render(transcript, "json"))
    assert set(document) == {"text", "words", "segments"}
    assert document["segments"][0] == {"text": "Hello world.", "start": 0.0, "end": 0.9}


def test_text_with_and_without_timestamps(transcript: Transcript) -> None:
    assert render(transcript, "text") == "Hello world. Again\n"
    lines = render(transcript, "text", timestamps=True).splitlines()
    assert lines == ["[    0.00 -     0.90] Hello world.", "[    1.50 -     1.90] Again"]


def test_srt_parses_back(transcript: Transcript) -> None:
    subtitles = list(srt.parse(to_srt(transcript)))
    assert [s.content for s in subtitles] == ["Hello world.", "Again"]
    assert subtitles[1].start.total_seconds() == pytest.approx(1.5)
    assert subtitles[1].end.total_seconds() == pytest.approx(1.9)


def test_vtt_parses_back(transcript: Transcript) -> None:
    captions = webvtt.from_string(to_vtt(transcript)).captions
    assert [c.text for c in captions] == ["Hello world.", "Again"]
    assert captions[0].start_in_seconds == 0 and captions[1].end == "00:00:01.900"


def test_vtt_escapes_markup() -> None:
    content = to_vtt(Transcript("a < b & c --> d", segments=[TimedText("a < b & c --> d", 0, 1)]))
    assert "a &lt; b &amp; c --&gt; d" in content
    assert len(webvtt.from_string(content).captions) == 1


def test_words_become_cues_without_segments() -> None:
    words = [TimedText(f"word{i}", i * 0.5, i * 0.5 + 0.4) for i in range(30)]
    cues = subtitle_cues(Transcript(" ".join(w.text for w in words), words=words))
    assert " ".join(c.text for c in cues) == " ".join(w.text for w in words)
    assert all(len(c.text) <= MAX_CUE_CHARACTERS for c in cues)
    assert all(a.end <= b.start for a, b in zip(cues, cues[1:]))


def test_sentence_end_closes_a_cue() -> None:
    cues = group_words([TimedText("Hi.", 0, 0.3), TimedText("Bye", 0.5, 0.8)])
    assert [c.text for c in cues] == ["Hi.", "Bye"]


def test_whole_text_is_one_cue_without_timings() -> None:
    cues = subtitle_cues(Transcript("just text", audio_seconds=3.0))
    assert cues == [TimedText("just text", 0.0, 3.0)]
    assert subtitle_cues(Transcript("", audio_seconds=3.0)) == []


def test_zero_length_cue_gets_a_millisecond() -> None:
    subtitles = list(srt.parse(to_srt(Transcript("a", segments=[TimedText("a", 1.0, 1.0)]))))
    assert subtitles[0].end > subtitles[0].start


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="format"):
        render(Transcript("a"), "docx")
