"""SentencePiece detokenisation and word/segment timestamps, following NeMo's TDT rules.

Text: the pieces are decoded by SentencePiece, then one whitespace before a punctuation mark that the vocabulary
contains is removed. Timestamps: each token spans [frame, frame + duration) encoder frames; a token that is a
punctuation mark is moved to the end of the token before it; words start at pieces carrying the word-boundary
marker, punctuation attaches to the word before it, segments end at words ending in '.', '?' or '!'. Frames
become seconds as `frame * seconds_per_encoder_frame` (window stride x subsampling factor).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

import sentencepiece

from .errors import CheckpointError
from .types import Hypothesis, TimedText

_SPECIAL_PIECE = re.compile(r"^\[.*\]$|^<.*>$|^##|^▁|^\s*$")
_WORD_DELIMITER = " "
_BOUNDARY_PIECES = (" ", "_", "▁")
DEFAULT_SEGMENT_DELIMITERS = (".", "?", "!")


@dataclass
class _Span:
    text: str
    start: int
    end: int


class Tokenizer:
    """A SentencePiece model plus the punctuation set derived from its vocabulary."""

    def __init__(self, model_proto: bytes, *, segment_delimiters: Sequence[str] = DEFAULT_SEGMENT_DELIMITERS):
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise CheckpointError(f"the checkpoint's tokenizer is not a SentencePiece model: {exc}") from exc
        self.pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        self.punctuation = frozenset(
            char
            for piece in self.pieces
            if not _SPECIAL_PIECE.match(piece)
            for char in piece
            if unicodedata.category(char).startswith("P")
        )
        self._space_before_punctuation = (
            re.compile("(\\s)([" + "".join(re.escape(p) for p in sorted(self.punctuation)) + "])")
            if self.punctuation
            else None
        )
        self.segment_delimiters = tuple(segment_delimiters)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def decode_pieces(self, pieces: Sequence[str]) -> str:
        return self._sp.decode_pieces(list(pieces))

    def text(self, token_ids: Sequence[int]) -> str:
        """Detokenised text of a hypothesis."""
        text = self.decode_pieces([self.pieces[i] for i in token_ids])
        if self._space_before_punctuation is not None:
            text = self._space_before_punctuation.sub(r"\2", text)
        return text

    def timestamps(self, hypothesis: Hypothesis, seconds_per_encoder_frame: float) -> tuple[list[TimedText], list[TimedText]]:
        """Word and segment timestamps in seconds (`ModelConfig.seconds_per_encoder_frame`: window stride x
        subsampling factor, a power of two, so the product rounds as stride-then-factor does)."""
        tokens = self._token_spans(hypothesis)
        pieces = [self.pieces[i] for i in hypothesis.token_ids]
        words = self._words(tokens, pieces)
        segments = self._segments(words)

        def seconds(spans: list[_Span]) -> list[TimedText]:
            return [TimedText(s.text, s.start * seconds_per_encoder_frame, s.end * seconds_per_encoder_frame)
                    for s in spans]

        return seconds(words), seconds(segments)

    def _token_spans(self, hypothesis: Hypothesis) -> list[_Span]:
        spans: list[_Span] = []
        for token, frame, duration in zip(hypothesis.token_ids, hypothesis.token_frames, hypothesis.token_durations):
            text = self.decode_pieces([self.pieces[token]])
            span = _Span(text, frame, frame + duration)
            if spans and text in self.punctuation:
                span.start = span.end = spans[-1].end
            spans.append(span)
        return spans

    def _next_word_text(self, tokens: list[_Span], index: int) -> str | None:
        candidate: str | None = None
        while not candidate and index < len(tokens) - 1:
            index += 1
            text = tokens[index].text
            candidate = None if text == _WORD_DELIMITER else text
        return candidate

    def _starts_word(self, piece: str, text: str, next_text: str | None) -> bool:
        return piece != text or (text == _WORD_DELIMITER and next_text not in self.punctuation)

    def _words(self, tokens: list[_Span], pieces: list[str]) -> list[_Span]:
        words: list[_Span] = []
        built: list[str] = []
        first = 0
        for i, (token, piece) in enumerate(zip(tokens, pieces)):
            is_punctuation = bool(self.punctuation) and token.text in self.punctuation and token.text != _WORD_DELIMITER
            if not is_punctuation and self._starts_word(piece, token.text, self._next_word_text(tokens, i)):
                if built:
                    words.append(_Span(self.decode_pieces(built), tokens[first].start, tokens[i - 1].end))
                built = []
                if token.text != _WORD_DELIMITER:
                    built.append(piece)
                    first = i
            elif is_punctuation and not built and words:
                last = words[-1]
                last.end = token.end
                if last.text.endswith(" "):
                    last.text = last.text[:-1]
                last.text += token.text
            elif is_punctuation and built:
                if built[-1] in _BOUNDARY_PIECES:
                    built.pop()
                built.append(piece)
            else:
                if not built:
                    first = i
                built.append(piece)
        if not words:
            if built:
                words.append(_Span(self.decode_pieces(built), tokens[0].start, tokens[-1].end))
        else:
            words[0].start = tokens[0].start
            if built:
                words.append(_Span(self.decode_pieces(built), tokens[first].start, tokens[-1].end))
        return words

    def _segments(self, words: list[_Span]) -> list[_Span]:
        segments: list[_Span] = []
        pending: list[str] = []
        first = 0
        for i, word in enumerate(words):
            if word.text and (word.text[-1] in self.segment_delimiters or word.text in self.segment_delimiters):
                pending.append(word.text)
                segments.append(_Span(" ".join(pending), words[first].start, word.end))
                pending = []
                first = i + 1
                continue
            pending.append(word.text)
        if pending:
            segments.append(_Span(" ".join(pending), words[first].start, words[-1].end))
        return segments
