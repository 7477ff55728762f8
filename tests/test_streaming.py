"""Streaming (parakeet_core.streaming) against NeMo's buffered streaming script: exact token ids, frames and text.

The references (tests/fixtures/<ckpt>/streaming_reference.json) were made by tools/make_streaming_fixtures.py, which
runs NeMo's own `speech_to_text_streaming_infer_rnnt.py` (docs/streaming.md).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from functools import cache

import numpy as np
import pytest
import soundfile
import torch

import parakeet_core
from core_fixtures import AUDIO, FIXTURES, load_fixture, load_model
from parakeet_core import streaming as streaming_module
from parakeet_core.decoding import DecoderState
from parakeet_core.streaming import StreamingContext, feed_many, finish_many

CHECKPOINTS = ["v3_small", "v2_small"]
SETTINGS = ["10-2-2", "10-10-5", "2-0.5-0.5"]


@cache
def reference(name: str) -> dict:
    return json.loads((FIXTURES / name / "streaming_reference.json").read_text(encoding="utf-8"))


@cache
def _samples(clip: str) -> np.ndarray:
    samples, rate = soundfile.read(AUDIO / f"{clip}.wav", dtype="float32")
    assert rate == 16000
    samples.flags.writeable = False
    return samples


def samples(clip: str) -> np.ndarray:
    return _samples(clip).copy()


def seconds(name: str, setting: str) -> tuple[float, float, float]:
    return tuple(reference(name)["settings"][setting]["seconds"])


def stream(model, name: str, setting: str):
    left, chunk, right = seconds(name, setting)
    return model.stream(left_seconds=left, chunk_seconds=chunk, right_seconds=right)


def random_pieces(x: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Pieces of very different sizes, empty and one-sample pieces included."""
    sizes = [0, 1, 2, 159, 160, 1279, 1280, 1281, 4000, 7681, 16000, 40000]
    pieces, position = [], 0
    while position < len(x):
        size = int(rng.choice(sizes))
        pieces.append(x[position : position + size])
        position += size
    return pieces


def assert_equals_nemo(transcript, expected: dict, what: str) -> None:
    assert transcript.token_ids == expected["tokens"], what
    assert transcript.token_frames == expected["frames"], what
    assert transcript.text == expected["text"], what


# --------------------------------------------------------------------------------------------------------------
# The fixtures themselves


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_reference_made_from_nemo_script_on_the_committed_audio(name):
    ref = reference(name)
    assert ref["script"]["path"].endswith("speech_to_text_streaming_infer_rnnt.py")
    assert ref["versions"]["nemo"].startswith("3.0.0")
    assert set(ref["settings"]) == set(SETTINGS)
    for clip, info in ref["audio"].items():
        assert hashlib.sha256((FIXTURES / info["audio"]).read_bytes()).hexdigest() == info["sha256"], clip
        assert len(samples(clip)) == info["samples"]
    # The batched runs of the script disagree with its one-clip runs on a few clips (see
    # test_nemo_batched_results_come_from_its_shared_buffer); everything else agrees.
    for setting in SETTINGS:
        for batch in ref["settings"][setting]["batched"].values():
            assert batch["batch_size"] > 1
            assert any(c["same_tokens_as_alone"] for c in batch["clips"].values())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_contexts_are_rounded_to_whole_encoder_frames_like_nemo(name):
    model = load_model(name)
    for setting in SETTINGS:
        context = StreamingContext.from_seconds(model, *seconds(name, setting))
        assert [context.left, context.chunk, context.right] == reference(name)["settings"][setting]["context_samples"]
    # 5 s is 62.5 encoder frames: NeMo truncates to 62 (4.96 s); 0.5 s is 6 frames (0.48 s).
    assert StreamingContext.from_seconds(model, 10, 10, 5).seconds == (10.0, 10.0, 4.96)
    assert StreamingContext.from_seconds(model, 2, 0.5, 0.5).seconds == (2.0, 0.48, 0.48)
    assert StreamingContext.from_seconds(model, 10, 2, 2).latency_seconds == 4.0


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_buffer_steps_follow_nemo(name, setting, monkeypatch):
    """Buffer sizes and left/chunk/right contexts of every step equal the script's, whatever the piece sizes
    (the model is not run: this checks only the buffer arithmetic)."""
    model = load_model(name)
    steps: list[dict] = []

    def record(_model, planned):
        for step in planned:
            steps.append({"context": list(step.session._buffer_context), "buffer_samples": len(step.buffer)})
            step.session._record(None, None, step.chunk_frames)

    monkeypatch.setattr(streaming_module, "_run_steps", record)
    rng = np.random.default_rng(7)
    for clip, expected in reference(name)["settings"][setting]["clips"].items():
        steps.clear()
        session = stream(model, name, setting)
        for piece in random_pieces(samples(clip), rng):
            session.feed(piece)
        session.finish()
        assert steps == expected["buffer_steps"], clip


# --------------------------------------------------------------------------------------------------------------
# Results equal NeMo's


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_stream_fed_in_random_pieces_equals_nemo(name, setting):
    """One session per clip, fed in random pieces, equals the script run on that clip alone (batch_size=1)."""
    model = load_model(name)
    rng = np.random.default_rng(zlib.crc32(f"{name} {setting}".encode()))
    expected = reference(name)["settings"][setting]["clips"]
    for clip in expected:
        session = stream(model, name, setting)
        texts = ""
        for piece in random_pieces(samples(clip), rng):
            update = session.feed(piece)
            texts = texts[: len(texts) - update.retracted_chars] + update.new_text
            assert update.text == texts == session.text
        transcript = session.finish()
        assert_equals_nemo(transcript, expected[clip], f"{name} {setting} {clip}")
        assert transcript.words is not None and transcript.segments is not None
        assert session.decoded_frames == len(samples(clip)) // 1280  # a last partial encoder frame is not decoded


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_batched_streams_equal_nemo(name, setting):
    """All clips advancing together (one encoder batch per round of chunks) give each clip's one-clip result, and
    the script's batched result wherever that agrees with its one-clip result."""
    model = load_model(name)
    ref = reference(name)["settings"][setting]
    clips = list(ref["clips"])
    transcripts = model.transcribe([samples(c) for c in clips], streaming=seconds(name, setting), batch_size=len(clips))
    for clip, transcript in zip(clips, transcripts):
        assert_equals_nemo(transcript, ref["clips"][clip], f"{name} {setting} {clip}")
        for batch_name, batch in ref["batched"].items():
            nemo_batched = batch["clips"][clip]
            if nemo_batched["same_tokens_as_alone"] and nemo_batched["same_frames_as_alone"]:
                assert_equals_nemo(transcript, nemo_batched, f"{name} {setting} {clip} batch {batch_name}")


def _nemo_shared_buffer_batch(model, waveforms, context: StreamingContext):
    """The script's batched loop with our building blocks: ONE buffer for the whole zero-padded batch, trimmed by
    the batch-wide context, while each clip's length comes from its own context (`ContextSizeBatch`). A clip that
    ends while the batch goes on then gets less left context than alone, and zero padding counted as audio."""
    chunk, right, frame, total = context.chunk, context.right, context.frame_samples, context.total
    batch = len(waveforms)
    lengths = [len(w) for w in waveforms]
    longest = max(lengths)
    padded = np.zeros((batch, longest), np.float32)
    for row, w in enumerate(waveforms):
        padded[row, : len(w)] = w
    rest = list(lengths)
    left_sample, right_sample = 0, min(chunk + right, longest)
    shared = [0, 0, 0]
    own = [[0, 0, 0] for _ in range(batch)]
    buffer = np.zeros((batch, 0), np.float32)
    states = [model.decoder.initial_state(1) for _ in range(batch)]
    decoded = [0] * batch
    results = [([], []) for _ in range(batch)]
    while left_sample < longest:
        added = min(right_sample, longest) - left_sample
        last = right_sample >= longest
        left, middle, tail = shared
        left, tail = left + middle, tail + added
        middle, tail = (tail, 0) if last else ((chunk, tail - chunk) if tail > chunk else (0, tail))
        extra = max(left + middle + tail - total, 0)
        shared = [left - extra, middle, tail]
        adds = []
        for row in range(batch):
            ends = added >= rest[row]
            adds.append(rest[row] if ends else added)
            left, middle, tail = own[row]
            left, tail = left + middle, tail + adds[-1]
            middle, tail = (tail, 0) if ends else (chunk, tail - chunk)
            left = left if middle > 0 else 0
            own[row] = [max(left - max(left + middle + tail - total, 0), 0), middle, tail]
        buffer = np.concatenate([buffer, padded[:, left_sample:right_sample]], axis=1)[:, extra:]
        rows = [r for r in range(batch) if own[r][1] // frame > 0]
        if rows:
            features, feature_lengths = model.featurize(torch.from_numpy(buffer[rows].copy()),
                                                        torch.tensor([sum(own[r]) for r in rows]))
            encoded, _ = model.encode(features, feature_lengths, attention="full")
            frames = [own[r][1] // frame for r in rows]
            first = shared[0] // frame
            hypotheses, state = model.decoder.decode_from(
                encoded[:, first : first + max(frames)], torch.tensor(frames),
                DecoderState.cat([states[r] for r in rows]))
            for k, (row, hypothesis) in enumerate(zip(rows, hypotheses)):
                results[row][0].extend(hypothesis.token_ids)
                results[row][1].extend(f + decoded[row] for f in hypothesis.token_frames)
                decoded[row] += frames[k]
                states[row] = state.select([k])
        rest = [r - a for r, a in zip(rest, adds)]
        left_sample, right_sample = right_sample, min(right_sample + chunk, longest)
    return results


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_nemo_batched_results_come_from_its_shared_buffer(name):
    """Where the script's batched tokens differ from its one-clip tokens, its shared-buffer arithmetic, replayed with
    parakeet_core's featurize/encode/decode_from, reproduces them exactly: the difference is the script's batching,
    which parakeet_core's batched streaming does not copy (a stream's result never depends on its batch)."""
    model = load_model(name)
    ref = reference(name)["settings"]
    checked = 0
    for setting in SETTINGS:
        context = StreamingContext.from_seconds(model, *seconds(name, setting))
        for batch in ref[setting]["batched"].values():
            order, size = batch["order"], batch["batch_size"]
            for start in range(0, len(order), size):
                group = order[start : start + size]
                differing = [c for c in group if not batch["clips"][c]["same_tokens_as_alone"]]
                if not differing:
                    continue
                waveforms = [samples(c) for c in group]
                longest = max(len(w) for w in waveforms)
                others = max(len(w) for c, w in zip(group, waveforms) if c in differing)
                # The other rows see the longest clip only through the batch's length: while it goes on, cutting it
                # (to a point well past their end, not on a chunk boundary) changes nothing for them.
                cut = others + 2 * context.chunk + context.right + 1
                if longest > cut:
                    waveforms = [w[:cut] if len(w) == longest else w for w in waveforms]
                results = _nemo_shared_buffer_batch(model, waveforms, context)
                for clip, (tokens, frames) in zip(group, results):
                    if clip in differing:
                        expected = batch["clips"][clip]
                        assert tokens == expected["tokens"] and frames == expected["frames"], (setting, clip)
                        assert model.tokenizer.text(tokens) == expected["text"]
                        checked += 1
    print(f"{name}: {checked} batched NeMo results that differ from its one-clip results reproduced")


# --------------------------------------------------------------------------------------------------------------
# Decoder state hand-over


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("loop", ["host", "fixed_shape"])
def test_decoding_in_pieces_with_carried_state_equals_decoding_at_once(name, loop):
    """Greedy TDT is sequential over frames: decoding an encoder output in consecutive pieces, each continuing from
    the state the previous one stopped at, gives exactly the one-pass result (frames, durations too); both loops
    (the CPU host loop and the fixed-shape loop the CUDA graph captures)."""
    fixture = load_fixture(name)
    model = load_model(name)
    decoder = model.decoder

    def run(frames, lengths, state):
        return decoder.decode_from(frames, lengths, state, loop=loop)
    rng = np.random.default_rng(3)
    clips = ["speech_en", "speech_de", "noise", "silence", "short"]
    encoded = [torch.from_numpy(fixture.arrays[f"encoder.{c}"]) for c in clips]
    lengths = [fixture.reference["clips"][c]["encoder_length"] for c in clips]
    for clip, frames, n in zip(clips, encoded, lengths):
        whole = decoder(frames[None, :n], torch.tensor([n]))[0]
        assert whole.token_ids == fixture.reference["clips"][clip]["tokens"]
        for _ in range(3 if loop == "host" else 2):
            cuts = sorted({0, n, *rng.integers(0, n + 1, size=int(rng.integers(1, 6))).tolist()})
            state = decoder.initial_state(1)
            tokens, token_frames, durations = [], [], []
            for a, b in zip(cuts, cuts[1:]):
                hypotheses, state = run(frames[None, a:b], torch.tensor([b - a]), state)
                tokens += hypotheses[0].token_ids
                token_frames += [f + a for f in hypotheses[0].token_frames]
                durations += hypotheses[0].token_durations
            assert (tokens, token_frames, durations) == (whole.token_ids, whole.token_frames,
                                                        whole.token_durations), (clip, cuts)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_decode_from_without_state_equals_forward_and_state_is_per_clip(name):
    fixture = load_fixture(name)
    decoder = load_model(name).decoder
    clips = ["speech_en", "speech_de", "noise"]
    lengths = [fixture.reference["clips"][c]["encoder_length"] for c in clips]
    batch = torch.zeros(len(clips), max(lengths), fixture.arrays["encoder.speech_en"].shape[1])
    for row, (clip, n) in enumerate(zip(clips, lengths)):
        batch[row, :n] = torch.from_numpy(fixture.arrays[f"encoder.{clip}"][:n])
    hypotheses, state = decoder.decode_from(batch, torch.tensor(lengths))
    assert hypotheses == decoder(batch, torch.tensor(lengths))
    # Decoding stops at or past the last frame, by less than the longest duration.
    assert state.batch == 3
    assert all(0 <= t < max(decoder.config.durations) for t in state.time_offset.tolist())
    # Selecting and re-joining clips keeps each one's state.
    rejoined = DecoderState.cat([state.select([2]), state.select([0, 1])])
    assert torch.equal(rejoined.hidden[:, 0], state.hidden[:, 2]) and torch.equal(rejoined.cell[:, 1], state.cell[:, 0])
    assert rejoined.time_offset.tolist() == [state.time_offset[2].item(), *state.time_offset[:2].tolist()]
    with pytest.raises(ValueError, match="decoder state of 2 clips for a batch of 3"):
        decoder.decode_from(batch, torch.tensor(lengths), state.select([0, 1]))


# --------------------------------------------------------------------------------------------------------------
# Sessions: pieces, batches, memory, errors


def test_piece_sizes_and_batch_partners_do_not_change_the_result():
    model = load_model("v3_small")
    x = samples("speech_en")
    whole = model.transcribe(x, streaming=(2.0, 0.5, 0.5), timestamps=True)
    rng = np.random.default_rng(11)
    for _ in range(2):
        session = model.stream(left_seconds=2.0, chunk_seconds=0.5, right_seconds=0.5)
        for piece in random_pieces(x, rng):
            session.feed(piece)
        assert session.finish() == whole
    # Fed together with other streams, in different piece sizes, started at different times.
    a, b, c = (model.stream(left_seconds=2.0, chunk_seconds=0.5, right_seconds=0.5) for _ in range(3))
    noise, de = samples("noise"), samples("speech_de")
    feed_many([b], [de[:5000]])
    position = 0
    for size in (3000, 17, 9000, 0, 24000):
        feed_many([a, b, c], [x[position : position + size], de[5000 + position : 5000 + position + size],
                              noise[position : position + size]])
        position += size
    feed_many([a, b], [x[position:], de[5000 + position :]])
    c.feed(noise[position:])
    ta, tb = finish_many([a, b])
    assert ta == whole
    assert tb == model.transcribe(de, streaming=(2.0, 0.5, 0.5), timestamps=True)
    assert c.finish() == model.transcribe(noise, streaming=(2.0, 0.5, 0.5), timestamps=True)


def test_zero_right_context_decodes_every_chunk_once():
    """right_seconds=0 (no look-ahead): parakeet_core's per-stream arithmetic, not the script's (docs/streaming.md)."""
    model = load_model("v2_small")
    x = samples("speech_en")
    whole = model.transcribe(x, streaming=(4.0, 0.5, 0.0), timestamps=True)
    session = model.stream(left_seconds=4.0, chunk_seconds=0.5, right_seconds=0.0)
    for piece in random_pieces(x, np.random.default_rng(2)):
        session.feed(piece)
    assert session.finish() == whole
    assert session.decoded_frames == len(x) // 1280
    assert whole.token_frames == sorted(whole.token_frames) and max(whole.token_frames) < len(x) // 1280


def test_transcribe_streaming_options():
    model = load_model("v2_small")
    x = samples("speech_de")
    plain = model.transcribe(x, streaming=True)
    assert plain.words is None
    timed = model.transcribe([x], streaming=(10, 2, 2), timestamps=True)[0]
    assert timed.token_ids == plain.token_ids and timed.words
    session = model.stream()
    session.feed(x)
    assert session.finish() == timed
    assert session.finish() is session.finish()  # idempotent
    assert model.transcribe(str(AUDIO / "speech_de.wav"), streaming=True).text == plain.text
    with pytest.raises(ValueError, match="full attention"):
        model.transcribe(x, streaming=True, attention="full")
    with pytest.raises(ValueError, match="streaming must be"):
        model.transcribe(x, streaming=(1.0, 2.0))


def _feed_noise(session, seconds: int, seed: int = 5) -> int:
    """Feed `seconds` of noise in 1 s pieces, checking the session's memory bound after every piece."""
    context = session.context
    bound = context.left + 2 * context.chunk + context.right
    rng = np.random.default_rng(seed)
    most = tokens = 0
    for _ in range(seconds):
        update = session.feed((0.1 * rng.standard_normal(16000)).astype(np.float32))
        tokens += len(update.new_token_ids)
        most = max(most, session.buffered_samples)
        assert session.buffered_samples <= bound
    assert most > context.left + context.chunk  # the buffer did fill up
    assert session.received_samples == seconds * 16000
    return tokens


def test_memory_is_bounded_by_the_buffer_on_a_ten_minute_stream(monkeypatch):
    """10 minutes of noise in 1 s pieces (10-2-2, v3_small): the session never holds more than left + 2 chunks +
    right samples between feeds. The buffer bookkeeping is all there is to memory, so here the model does not run
    (the real-model run below is shorter)."""
    model = load_model("v3_small")
    steps = []

    def plan_only(_model, planned):
        for step in planned:
            assert len(step.buffer) <= step.session.context.total
            steps.append(len(step.buffer))
            step.session._record(None, None, step.chunk_frames)

    monkeypatch.setattr(streaming_module, "_run_steps", plan_only)
    session = model.stream()
    _feed_noise(session, 600)
    session.finish()
    assert session.buffered_samples == 0
    # 4 s, then 2 s per step: 299 steps, every buffer full (14 s) from the 6th on.
    assert len(steps) == 299 and set(steps[5:]) == {session.context.total}
    assert session.decoded_frames == 600 * 16000 // 1280


def test_memory_is_bounded_with_the_model_running():
    model = load_model("v3_small")
    session = model.stream()  # 10-2-2
    tokens = _feed_noise(session, 120)
    state = session._decoder_state
    assert state.hidden.shape == (model.config.decoder.pred_rnn_layers, 1, model.config.decoder.pred_hidden)
    transcript = session.finish()
    assert session.buffered_samples == 0
    assert len(transcript.token_ids) >= tokens > 300
    assert session.decoded_frames == 120 * 16000 // 1280
    assert max(transcript.token_frames) < session.decoded_frames


def test_clear_errors():
    model = load_model("v3_small")
    session = model.stream()
    with pytest.raises(parakeet_core.InvalidAudioError, match="NaN"):
        session.feed(np.array([0.0, np.nan, 0.1], dtype=np.float32))
    with pytest.raises(parakeet_core.InvalidAudioError, match="float32"):
        session.feed(np.zeros(100, dtype=np.int16))
    with pytest.raises(parakeet_core.InvalidAudioError, match="float32"):
        session.feed(np.zeros(100, dtype=np.float64))
    with pytest.raises(parakeet_core.InvalidAudioError, match="float32"):
        session.feed(np.zeros(0, dtype=np.int16))
    with pytest.raises(parakeet_core.InvalidAudioError, match="1-D"):
        session.feed(np.zeros((100, 2), dtype=np.float32))
    with pytest.raises(parakeet_core.InvalidAudioError, match="float32 array or tensor"):
        session.feed([0.0, 0.1])
    assert session.received_samples == 0  # rejected pieces leave no trace
    session.feed(torch.zeros(0))
    session.feed(torch.full((3000,), 0.01))
    session.feed(samples("short"))
    assert session.received_samples == 4600
    transcript = session.finish()
    with pytest.raises(parakeet_core.ParakeetError, match="after finish"):
        session.feed(samples("short"))
    assert session.finish() is transcript
    other = model.stream()
    with pytest.raises(parakeet_core.InvalidAudioError, match="stream 1.*NaN"):
        feed_many([other, model.stream()], [samples("short"), np.full(10, np.inf, dtype=np.float32)])
    assert other.received_samples == 0  # an error in one piece leaves every session as it was
    with pytest.raises(ValueError, match="2 sessions but 1 pieces"):
        feed_many([other, model.stream()], [samples("short")])
    with pytest.raises(ValueError, match="more than once"):
        feed_many([other, other], [samples("short"), samples("short")])
    with pytest.raises(ValueError, match="shorter than one encoder frame"):
        model.stream(chunk_seconds=0.05)
    with pytest.raises(ValueError, match="left_seconds"):
        model.stream(left_seconds=-1)
    with pytest.raises(ValueError, match="right_seconds"):
        model.stream(right_seconds=float("nan"))


def test_empty_and_tiny_streams():
    model = load_model("v2_small")
    empty = model.stream()
    assert empty.finish().token_ids == [] and empty.finish().text == ""
    tiny = model.stream()
    update = tiny.feed(samples("short")[:1000])  # less than one encoder frame: nothing to decode
    assert update.new_token_ids == [] and update.text == ""
    assert tiny.finish().token_ids == []
