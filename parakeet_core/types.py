"""Result types: a decoded hypothesis and the user-facing transcript."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Hypothesis:
    """Greedy TDT output for one clip: token ids with the encoder frame and duration of each."""

    token_ids: list[int]
    token_frames: list[int]
    token_durations: list[int]

    def __post_init__(self):
        if not (len(self.token_ids) == len(self.token_frames) == len(self.token_durations)):
            raise ValueError("token_ids, token_frames and token_durations must have the same length")


@dataclass(frozen=True)
class TimedText:
    """A word or a segment with its start and end time in seconds."""

    text: str
    start: float
    end: float


@dataclass
class Transcript:
    """Text of one clip, its tokens, and (when asked for) word and segment timestamps."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    token_frames: list[int] = field(default_factory=list)
    token_durations: list[int] = field(default_factory=list)
    words: list[TimedText] | None = None
    segments: list[TimedText] | None = None

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)

    def timestamps_dict(self) -> dict:
        """The `words` and `segments` lists as plain JSON (empty lists when timestamps were not computed)."""
        return {
            "words": [asdict(w) for w in self.words or []],
            "segments": [asdict(s) for s in self.segments or []],
        }
