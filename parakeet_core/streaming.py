"""Streaming recognition with an offline TDT model, exactly as NeMo's buffered streaming script does it.

NeMo's `examples/asr/asr_chunked_inference/rnnt/speech_to_text_streaming_infer_rnnt.py` (docs/streaming.md has
the details and the fixtures that pin it down):

- Contexts are whole encoder frames: `frames = int(seconds * (1 / window_stride) / subsampling)` (truncated), one
  encoder frame being `subsampling * window_stride * sample_rate` samples (1280 at 16 kHz): 10-2-2 s stays
  10-2-2, a 5 s right context becomes 62 frames (4.96 s), a 0.5 s chunk 6 frames (0.48 s).
- Step k adds the next audio to a buffer [left | chunk | right]: first `chunk + right` samples, then `chunk` at a
  time. A step is the last one when it reaches the end of the audio: then everything after the left context is
  chunk (right context empty). The buffer keeps at most `left + chunk + right` samples, dropping the oldest, so the
  last buffer of a long clip reaches further left than `left` by what the last addition fell short of `chunk`.
- The encoder (the checkpoint's full attention) runs on the whole buffer; the chunk's frames are
  `[left // F, left // F + chunk // F)` of its output (F = samples per encoder frame; both truncated), so the end of
  a clip that does not fill a whole encoder frame is not decoded, and the last chunk of a clip longer than its
  buffer sits on the buffer's own frame grid.
- Greedy TDT decoding continues from the previous chunk: prediction-network state and output, and the time index
  past the chunk's end that the last duration jumped to. The per-frame symbol count does not carry (a frame
  belongs to one chunk). Token frames are counted from the clip's first decoded frame.

A `StreamingSession` does this for one stream fed in pieces of any size: it runs a step as soon as it has one
sample past the step's right context (only then is the step known not to be the last one) and the last step at
`finish()`. Results do not depend on the piece sizes, nor on which sessions advance together (`feed_many`): each
session has its own buffer and decoder state, and a batched step encodes every session's own buffer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .audio import check_waveform
from .decoding import DecoderState
from .errors import InvalidAudioError, ParakeetError
from .types import Hypothesis, Transcript

if TYPE_CHECKING:
    from .model import ParakeetTDT

DEFAULT_STREAMING_SECONDS = (10.0, 2.0, 2.0)
"""Left context, chunk and right context in seconds: NeMo's recommendation for live use (10-10-5 for long files)."""


@dataclass(frozen=True)
class StreamingContext:
    """Left context, chunk and right context in samples, whole encoder frames of `frame_samples` each."""

    left: int
    chunk: int
    right: int
    frame_samples: int
    sample_rate: int

    @classmethod
    def from_seconds(cls, model: "ParakeetTDT", left_seconds: float, chunk_seconds: float,
                     right_seconds: float) -> "StreamingContext":
        """Round the contexts down to whole encoder frames, with NeMo's script's arithmetic."""
        for name, value in (("left_seconds", left_seconds), ("chunk_seconds", chunk_seconds),
                            ("right_seconds", right_seconds)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        pre = model.config.preprocessor
        factor = model.config.encoder.subsampling_factor
        stride_seconds = pre.window_stride_seconds
        features_per_second = 1.0 / stride_seconds
        feature_samples = (int(pre.sample_rate * stride_seconds) // factor) * factor
        frame_samples = feature_samples * factor

        def frames(seconds: float) -> int:
            return int(seconds * features_per_second / factor)

        if frames(chunk_seconds) < 1:
            raise ValueError(f"chunk_seconds={chunk_seconds} is shorter than one encoder frame "
                             f"({frame_samples / pre.sample_rate} s)")
        return cls(frames(left_seconds) * frame_samples, frames(chunk_seconds) * frame_samples,
                   frames(right_seconds) * frame_samples, frame_samples, pre.sample_rate)

    @property
    def total(self) -> int:
        """Largest buffer, in samples."""
        return self.left + self.chunk + self.right

    @property
    def seconds(self) -> tuple[float, float, float]:
        """(left, chunk, right) as used, in seconds."""
        return (self.left / self.sample_rate, self.chunk / self.sample_rate, self.right / self.sample_rate)

    @property
    def latency_seconds(self) -> float:
        """Audio a token waits for before it is final, at most (chunk + right), model time excluded."""
        return (self.chunk + self.right) / self.sample_rate


@dataclass
class StreamingUpdate:
    """What became final with one `feed`.

    `new_token_ids`: tokens decided by this feed. `text`: the whole text so far. To turn the previous `text` into
    this one, drop its last `retracted_chars` characters (almost always 0: detokenisation removes a space before a
    punctuation mark that follows) and append `new_text`. `decoded_seconds`: audio decoded so far.
    """

    new_token_ids: list[int]
    new_text: str
    text: str
    retracted_chars: int = 0
    decoded_seconds: float = 0.0


@dataclass
class _Step:
    """One planned chunk of one session: its buffer and which of the buffer's encoder frames are the chunk."""

    session: "StreamingSession"
    buffer: np.ndarray
    left_frames: int
    chunk_frames: int


@dataclass
class _Tokens:
    ids: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    durations: list[int] = field(default_factory=list)


class StreamingSession:
    """One audio stream transcribed chunk by chunk; see the module docstring. Create with `ParakeetTDT.stream()`.

    `feed(samples)` takes float32 mono samples at the model's rate, pieces of any length, and returns the newly final
    tokens; `finish()` decodes the rest and returns the whole `Transcript` with word and segment timestamps. The
    session holds at most `left + 2 * chunk + right` samples between feeds (plus, during one call, what that call
    brought), whatever the stream's length; features and encoder outputs live only during a step.
    """

    def __init__(self, model: "ParakeetTDT", context: StreamingContext):
        for stage, module in (("featurize", model.preprocessor), ("encode", model.encoder), ("decode", model.decoder)):
            model._require(stage, module)
        self.model = model
        self.context = context
        self._retained = np.zeros(0, dtype=np.float32)  # audio from absolute sample `_origin` on
        self._pieces: list[np.ndarray] = []  # received after `_retained`, not yet joined
        self._origin = 0
        self._received = 0
        self._left_sample = 0  # where the next step's new audio starts
        self._right_sample = context.chunk + context.right  # where it ends (unless the audio ends first)
        self._buffer_context = [0, 0, 0]  # the buffer's left, chunk, right (samples) after the last step
        self._decoder_state: DecoderState | None = None
        self._decoded_frames = 0
        self._tokens = _Tokens()
        self._text = ""
        self._transcript: Transcript | None = None
        self._failed: BaseException | None = None

    # ---------------------------------------------------------------------------------------------------------
    # Public API

    @property
    def finished(self) -> bool:
        return self._transcript is not None

    @property
    def received_samples(self) -> int:
        """Samples fed so far."""
        return self._received

    @property
    def buffered_samples(self) -> int:
        """Samples the session holds now (its audio buffer and what has not been used yet)."""
        return self._retained.shape[0] + sum(p.shape[0] for p in self._pieces)

    @property
    def decoded_frames(self) -> int:
        """Encoder frames decoded so far."""
        return self._decoded_frames

    @property
    def text(self) -> str:
        """Text of the tokens final so far."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        return list(self._tokens.ids)

    def feed(self, samples) -> StreamingUpdate:
        """Add samples (1-D float32, the model's sample rate; any length, also 0) and decode every chunk that is
        complete. Returns the tokens that became final."""
        return feed_many([self], [samples])[0]

    def finish(self) -> Transcript:
        """End of the stream: decode the last chunk and return the transcript (with timestamps). Idempotent."""
        return finish_many([self])[0]

    # ---------------------------------------------------------------------------------------------------------
    # Steps

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise ParakeetError(f"this streaming session failed earlier and cannot continue: {self._failed}")

    def _check_open(self) -> None:
        self._check_usable()
        if self.finished:
            raise ParakeetError("feed() after finish(): the stream has ended; start a new session with stream()")

    @staticmethod
    def _validated(samples, name: str) -> np.ndarray:
        """The piece as a private float32 copy, or InvalidAudioError naming what is wrong with it."""
        if isinstance(samples, (np.ndarray, torch.Tensor)) and samples.ndim == 1 and samples.shape[0] == 0:
            if samples.dtype not in (np.dtype(np.float32), torch.float32):
                raise InvalidAudioError(f"{name}: samples must be float32, got {samples.dtype}")
            return np.zeros(0, dtype=np.float32)
        check_waveform(samples, name=name)
        if isinstance(samples, torch.Tensor):
            samples = samples.detach().cpu().numpy()
        return np.array(samples, dtype=np.float32, copy=True)

    def _accept(self, piece: np.ndarray) -> None:
        if piece.shape[0]:
            self._pieces.append(piece)
            self._received += piece.shape[0]

    def _ready(self) -> bool:
        """A step that is certainly not the last: the audio goes on past its right context."""
        return self._received > self._right_sample

    def _audio(self, start: int, end: int) -> np.ndarray:
        if self._pieces:
            self._retained = np.concatenate([self._retained, *self._pieces])
            self._pieces = []
        return self._retained[start - self._origin : end - self._origin]

    def _plan(self, last: bool) -> _Step:
        """Advance the buffer by one step (NeMo's context arithmetic for one utterance) and return the step."""
        expected = self.context
        end = self._received if last else self._right_sample
        added = end - self._left_sample
        left, chunk, right = self._buffer_context
        left += chunk
        right += added
        if last:  # everything after the left context is chunk
            chunk, right = right, 0
        else:
            chunk, right = expected.chunk, right - expected.chunk
        left -= max(left + chunk + right - expected.total, 0)  # the buffer keeps at most `total` samples
        self._buffer_context = [left, chunk, right]
        total = left + chunk + right
        start = end - total
        buffer = self._audio(start, end).copy()
        # Later buffers start at or after this one's start: forget what lies before it (a copy, so the memory goes).
        self._retained = self._retained[start - self._origin :].copy()
        self._origin = start
        self._left_sample = end
        self._right_sample = end + expected.chunk
        return _Step(self, buffer, left // expected.frame_samples, chunk // expected.frame_samples)

    def _record(self, hypothesis: Hypothesis | None, state: DecoderState | None, frames: int) -> None:
        if hypothesis is not None:
            self._tokens.ids.extend(hypothesis.token_ids)
            self._tokens.frames.extend(f + self._decoded_frames for f in hypothesis.token_frames)
            self._tokens.durations.extend(hypothesis.token_durations)
            self._decoder_state = state
        self._decoded_frames += frames

    def _update_since(self, tokens_before: int) -> StreamingUpdate:
        previous = self._text
        self._text = self.model.tokenizer.text(self._tokens.ids) if len(self._tokens.ids) != tokens_before else previous
        if self._text.startswith(previous):
            common = len(previous)
        else:  # rare: the new tokens changed the end of the previous text
            common = len(os.path.commonprefix([previous, self._text]))
        seconds_per_frame = self.context.frame_samples / self.context.sample_rate
        return StreamingUpdate(new_token_ids=self._tokens.ids[tokens_before:], new_text=self._text[common:],
                               text=self._text, retracted_chars=len(previous) - common,
                               decoded_seconds=self._decoded_frames * seconds_per_frame)

    def _close(self) -> Transcript:
        hypothesis = Hypothesis(list(self._tokens.ids), list(self._tokens.frames), list(self._tokens.durations))
        self._transcript = self.model.to_transcript(hypothesis, timestamps=True)
        self._retained = np.zeros(0, dtype=np.float32)
        self._pieces = []
        self._decoder_state = None
        return self._transcript


def _run_steps(model: "ParakeetTDT", steps: Sequence[_Step]) -> None:
    """Encode the buffers of several sessions' steps as one batch and decode each chunk from its session's state."""
    work = [s for s in steps if s.chunk_frames > 0]
    for step in steps:
        if step.chunk_frames <= 0:
            step.session._record(None, None, 0)
    if not work:
        return
    lengths = torch.tensor([s.buffer.shape[0] for s in work], dtype=torch.long)
    waveforms = torch.zeros(len(work), int(lengths.max()), dtype=torch.float32)
    for row, step in enumerate(work):
        waveforms[row, : step.buffer.shape[0]] = torch.from_numpy(step.buffer)
    features, feature_lengths = model.featurize(waveforms, lengths)
    encoded, encoded_lengths = model.encode(features, feature_lengths, attention="full")
    available = encoded_lengths.tolist()
    chunk_frames = [s.chunk_frames for s in work]
    for step, valid in zip(work, available):
        if step.left_frames + step.chunk_frames > valid:  # cannot happen with NeMo's arithmetic; never read padding
            raise ParakeetError(f"streaming chunk frames [{step.left_frames}, {step.left_frames + step.chunk_frames})"
                                f" beyond the buffer's {valid} encoder frames")
    chunks = encoded.new_zeros(len(work), max(chunk_frames), encoded.shape[2])
    for row, step in enumerate(work):
        chunks[row, : step.chunk_frames] = encoded[row, step.left_frames : step.left_frames + step.chunk_frames]
    decoder = model.decoder
    states = [s.session._decoder_state or decoder.initial_state(1, chunks.device) for s in work]
    hypotheses, state = decoder.decode_from(chunks, torch.tensor(chunk_frames, device=chunks.device),
                                            DecoderState.cat(states))
    for row, (step, hypothesis) in enumerate(zip(work, hypotheses)):
        step.session._record(hypothesis, state.select([row]), step.chunk_frames)


def _advance(sessions: Sequence[StreamingSession], finishing: bool) -> None:
    """Run every step the sessions can take, one step per session per batch, until none is left."""
    if not sessions:
        return
    model = sessions[0].model
    if any(s.model is not model for s in sessions):
        raise ValueError("sessions advanced together must belong to the same model")
    pending = list(sessions)
    while pending:
        steps = []
        for session in pending:
            if session._ready():
                steps.append(session._plan(last=False))
            elif finishing and session._left_sample < session._received:
                steps.append(session._plan(last=True))
        if not steps:
            return
        try:
            with torch.inference_mode():
                _run_steps(model, steps)
        except BaseException as exc:
            for step in steps:
                step.session._failed = exc
            raise
        pending = [s.session for s in steps]


def feed_many(sessions: Sequence[StreamingSession], pieces: Sequence) -> list[StreamingUpdate]:
    """Feed one piece to each session and advance them together (one encoder batch per round of chunks).

    Each session's result is exactly what feeding it alone gives."""
    if len(sessions) != len(pieces):
        raise ValueError(f"{len(sessions)} sessions but {len(pieces)} pieces")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session appears more than once")
    for session in sessions:
        session._check_open()
    # Every piece is checked before any session takes its own: an error leaves all sessions as they were.
    checked = [StreamingSession._validated(samples, "samples" if len(sessions) == 1 else f"samples of stream {index}")
               for index, samples in enumerate(pieces)]
    before = [len(s._tokens.ids) for s in sessions]
    for session, piece in zip(sessions, checked):
        session._accept(piece)
    _advance(sessions, finishing=False)
    return [session._update_since(count) for session, count in zip(sessions, before)]


def finish_many(sessions: Sequence[StreamingSession]) -> list[Transcript]:
    """End several streams together (last chunks in one batch) and return their transcripts."""
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session appears more than once")
    for session in sessions:
        session._check_usable()
    open_sessions = [s for s in sessions if not s.finished]
    _advance(open_sessions, finishing=True)
    for session in open_sessions:
        session._update_since(len(session._tokens.ids))
        session._close()
    return [s._transcript for s in sessions]


def parse_streaming(streaming) -> tuple[float, float, float]:
    """`streaming=` of `transcribe`: True (the defaults) or (left, chunk, right) seconds."""
    if streaming is True:
        return DEFAULT_STREAMING_SECONDS
    try:
        left, chunk, right = streaming
    except (TypeError, ValueError):
        raise ValueError(f"streaming must be True or (left_seconds, chunk_seconds, right_seconds), "
                         f"got {streaming!r}") from None
    return left, chunk, right


def transcribe_streaming(model: "ParakeetTDT", waveforms: Sequence[np.ndarray], context: StreamingContext,
                         *, batch_size: int, timestamps: bool) -> list[Transcript]:
    """Whole clips through streaming sessions, `batch_size` sessions advancing together (results do not depend on
    it): the same as feeding each clip in any piece sizes."""
    order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]), reverse=True)  # similar lengths together
    results: list[Transcript | None] = [None] * len(waveforms)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        sessions = [StreamingSession(model, context) for _ in chosen]
        feed_many(sessions, [waveforms[i] for i in chosen])
        for index, transcript in zip(chosen, finish_many(sessions)):
            if not timestamps:
                transcript.words = transcript.segments = None
            results[index] = transcript
    return results
