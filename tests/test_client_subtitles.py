"""Subtitle cues capped at 2 lines of 42 characters and 7 s, split at word boundaries and timed by the words; JSON
times rounded to milliseconds."""

from __future__ import annotations

import json

import pytest
import srt
import webvtt

from parakeet_client import TimedText, Transcript
from parakeet_client.formats import capped_cues, render, rounded_times, subtitle_cues, to_srt, to_vtt
from parakeet_client.subtitles import (MAX_CUE_SECONDS, MAX_LINE_CHARACTERS, break_lines, count_lines,
                                       cues_from_segments, estimate_word_times, group_words, words_by_segment)

LOREM = ("the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches and "
         "nobody in the crowded hall notices the extraordinarily uncomfortable silence that follows").split()


def timed_words(texts: list[str], step: float = 0.4, length: float = 0.3, start: float = 0.0) -> list[TimedText]:
    return [TimedText(text, start + i * step, start + i * step + length) for i, text in enumerate(texts)]


def test_a_long_segment_is_split_at_word_boundaries_within_the_limits() -> None:
    words = timed_words(LOREM)
    segment = TimedText(" ".join(LOREM), words[0].start, words[-1].end)
    cues = capped_cues(Transcript(segment.text, words=words, segments=[segment]))
    assert len(cues) > 1
    assert " ".join(cue.text for cue in cues) == segment.text
    for cue in cues:
        lines = break_lines(cue.text)
        assert 1 <= len(lines) <= 2 and all(len(line) <= MAX_LINE_CHARACTERS for line in lines), lines
        assert cue.end - cue.start <= MAX_CUE_SECONDS
    assert (cues[0].start, cues[-1].end) == (words[0].start, words[-1].end)


def test_cue_times_are_the_first_start_and_the_last_end_of_its_words() -> None:
    words = timed_words(LOREM)
    cues = group_words(words)
    position = 0
    for cue in cues:
        count = len(cue.text.split())
        assert (cue.start, cue.end) == (words[position].start, words[position + count - 1].end)
        position += count
    assert position == len(words)


def test_seven_seconds_close_a_cue_before_the_characters_do() -> None:
    words = timed_words(["a"] * 30, step=1.0, length=0.5)
    cues = group_words(words)
    assert [len(cue.text.split()) for cue in cues] == [7, 7, 7, 7, 2]
    assert all(cue.end - cue.start <= MAX_CUE_SECONDS for cue in cues)


def test_a_word_longer_than_the_limits_keeps_its_own_cue() -> None:
    giant = "x" * 60
    words = [TimedText("short", 0.0, 0.5), TimedText(giant, 0.6, 9.0), TimedText("after", 9.1, 9.4)]
    cues = group_words(words)
    assert [cue.text for cue in cues] == ["short", giant, "after"]
    assert break_lines(giant) == [giant]


def test_sentence_end_closes_a_cue() -> None:
    cues = group_words(timed_words(["Hello", "there.", "Next", "one?", "Yes"]))
    assert [cue.text for cue in cues] == ["Hello there.", "Next one?", "Yes"]


def test_cues_never_cross_a_segment_boundary() -> None:
    words = timed_words(["one", "two", "three", "four"], step=1.0)
    segments = [TimedText("one two", 0.0, 1.3), TimedText("three four", 2.0, 3.3)]
    assert words_by_segment(segments, words) == [words[:2], words[2:]]
    assert [cue.text for cue in cues_from_segments(segments, words)] == ["one two", "three four"]


def test_segments_without_words_get_estimated_word_times() -> None:
    text = " ".join(LOREM)
    estimated = estimate_word_times(TimedText(text, 10.0, 40.0))
    assert [w.text for w in estimated] == LOREM
    assert estimated[0].start == 10.0 and estimated[-1].end == 40.0
    assert all(a.end == pytest.approx(b.start) for a, b in zip(estimated, estimated[1:]))
    cues = capped_cues(Transcript(text, segments=[TimedText(text, 10.0, 40.0)]))
    assert len(cues) > 2 and all(cue.end - cue.start <= MAX_CUE_SECONDS + 1e-9 for cue in cues)
    assert all(len(line) <= MAX_LINE_CHARACTERS for cue in cues for line in break_lines(cue.text))


def test_break_lines_balances_two_lines() -> None:
    assert break_lines("short line") == ["short line"]
    text = "the quick brown fox jumps over the lazy dog and runs far away"
    lines = break_lines(text)
    assert len(lines) == 2 and " ".join(lines) == text
    assert abs(len(lines[0]) - len(lines[1])) <= 8 and len(lines[0]) <= len(lines[1])
    assert count_lines(text.split()) == 2
    assert count_lines(["x" * 43]) == 1


def test_srt_and_vtt_hold_at_most_two_lines_of_42() -> None:
    words = timed_words(LOREM)
    transcript = Transcript(" ".join(LOREM), words=words,
                            segments=[TimedText(" ".join(LOREM), words[0].start, words[-1].end)])
    subtitles = list(srt.parse(to_srt(transcript)))
    captions = webvtt.from_string(to_vtt(transcript)).captions
    assert len(subtitles) == len(captions) > 1
    for content in [s.content for s in subtitles] + [c.text for c in captions]:
        lines = content.split("\n")
        assert len(lines) <= 2 and all(len(line) <= MAX_LINE_CHARACTERS for line in lines), content
    assert " ".join(s.content.replace("\n", " ") for s in subtitles) == transcript.text
    assert subtitles[0].start.total_seconds() == 0.0
    assert subtitles[-1].end.total_seconds() == pytest.approx(words[-1].end)


def test_subtitle_cues_keep_the_servers_segments_whole() -> None:
    """The OpenAI gateway's verbose_json segments come from subtitle_cues: they stay the server's segments."""
    words = timed_words(LOREM)
    segment = TimedText(" ".join(LOREM), words[0].start, words[-1].end)
    assert subtitle_cues(Transcript(segment.text, words=words, segments=[segment])) == [segment]


def test_json_times_are_rounded_to_milliseconds() -> None:
    transcript = Transcript("a b", words=[TimedText("a", 0.1 + 0.2, 0.30000049), TimedText("b", 1 / 3, 2 / 3)],
                            segments=[TimedText("a b", 0.1 + 0.2, 2 / 3)])
    document = json.loads(render(transcript, "json"))
    assert document["words"] == [{"text": "a", "start": 0.3, "end": 0.3}, {"text": "b", "start": 0.333, "end": 0.667}]
    assert document["segments"] == [{"text": "a b", "start": 0.3, "end": 0.667}]
    assert rounded_times({"text": "x"}) == {"text": "x"}
