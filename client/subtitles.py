"""Subtitle cues built from word timings, capped the way subtitle tools expect.

A cue holds at most MAX_CUE_LINES lines of at most MAX_LINE_CHARACTERS characters and lasts at most
MAX_CUE_SECONDS; it starts when its first word starts and ends when its last word ends. Lines and cues break only
between words, so a single word longer than a line or a cue is kept whole, alone in its cue. A word that ends a
sentence also ends its cue.
"""

from __future__ import annotations

from typing import Sequence

from .transcript import TimedText

MAX_LINE_CHARACTERS = 42
MAX_CUE_LINES = 2
MAX_CUE_SECONDS = 7.0
MAX_CUE_CHARACTERS = MAX_LINE_CHARACTERS * MAX_CUE_LINES + MAX_CUE_LINES - 1
"""Longest cue text with its lines joined by spaces (two full lines and the space between them)."""
SENTENCE_ENDS = (".", "?", "!", "…")


def group_words(words: Sequence[TimedText], *, max_line: int = MAX_LINE_CHARACTERS, max_lines: int = MAX_CUE_LINES,
                max_seconds: float = MAX_CUE_SECONDS) -> list[TimedText]:
    """Join consecutive words into cues that fit `max_lines` lines of `max_line` characters and `max_seconds`."""
    cues: list[TimedText] = []
    current: list[TimedText] = []
    for word in words:
        if not word.text.strip():
            continue
        if current and (count_lines([w.text for w in current] + [word.text], max_line) > max_lines
                        or word.end - current[0].start > max_seconds):
            cues.append(join_words(current))
            current = []
        current.append(word)
        if word.text.rstrip().endswith(SENTENCE_ENDS):
            cues.append(join_words(current))
            current = []
    if current:
        cues.append(join_words(current))
    return cues


def join_words(words: Sequence[TimedText]) -> TimedText:
    """One cue from consecutive words: their texts joined by spaces, from the first start to the last end."""
    return TimedText(" ".join(word.text.strip() for word in words), words[0].start, max(w.end for w in words))


def count_lines(words: Sequence[str], max_line: int = MAX_LINE_CHARACTERS) -> int:
    """How many lines of at most `max_line` characters the words fill, broken greedily between words."""
    lines, length = 0, 0
    for word in words:
        if lines and length + 1 + len(word) <= max_line:
            length += 1 + len(word)
        else:
            lines, length = lines + 1, len(word)
    return lines


def break_lines(text: str, max_line: int = MAX_LINE_CHARACTERS, max_lines: int = MAX_CUE_LINES) -> list[str]:
    """The cue text as display lines: one line when it fits, else the most even split into `max_lines` lines (the
    first line the shorter on a tie); text that cannot fit that many lines is broken greedily."""
    words = text.split()
    if len(" ".join(words)) <= max_line or not words:
        return [" ".join(words)] if words else []
    if max_lines == 2:
        splits = [(" ".join(words[:k]), " ".join(words[k:])) for k in range(1, len(words))]
        fitting = [pair for pair in splits if max(len(pair[0]), len(pair[1])) <= max_line]
        if fitting:
            return list(min(fitting, key=lambda pair: (max(len(pair[0]), len(pair[1])), len(pair[0]))))
    return _greedy_lines(words, max_line)


def estimate_word_times(span: TimedText) -> list[TimedText]:
    """Words of a segment that came without word timings, its duration shared in proportion to their lengths."""
    texts = span.text.split()
    total = sum(len(text) for text in texts)
    words, done = [], 0
    for number, text in enumerate(texts):
        start = span.start + (span.end - span.start) * done / total
        done += len(text)
        end = span.end if number == len(texts) - 1 else span.start + (span.end - span.start) * done / total
        words.append(TimedText(text, start, end))
    return words


def words_by_segment(segments: Sequence[TimedText], words: Sequence[TimedText]) -> list[list[TimedText]]:
    """Each segment's words: a word belongs to the first segment that has not ended when the word starts (both
    lists in time order, as the server sends them); words after the last segment join the last one."""
    groups: list[list[TimedText]] = [[] for _ in segments]
    index = 0
    for word in words:
        while index < len(segments) - 1 and word.start >= segments[index].end:
            index += 1
        if groups:
            groups[index].append(word)
    return groups


def cues_from_segments(segments: Sequence[TimedText], words: Sequence[TimedText], **limits: float) -> list[TimedText]:
    """Cues that never cross a segment boundary: each segment's words grouped by `group_words`, with word times
    estimated for a segment that has no words."""
    cues: list[TimedText] = []
    for segment, its_words in zip(segments, words_by_segment(segments, words)):
        cues.extend(group_words(its_words or estimate_word_times(segment), **limits))
    return cues


def _greedy_lines(words: Sequence[str], max_line: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= max_line:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines
