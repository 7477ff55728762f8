"""Long audio against NeMo: full attention past 5,000 encoder frames, local attention (256 and 128), alone and batched.

References: `tests/fixtures/<ckpt>/long_reference.json.gz`, made by `tools/make_reference_fixtures.py --long` with NeMo's
`change_attention_model("rel_pos_local_attn", [w, w])` and `change_subsampling_conv_chunking_factor(1)` on clips that
`tools/long_audio.py` builds from the committed audio.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from functools import cache

import numpy as np
import pytest
import torch

from core_fixtures import FIXTURES, load_fixture, load_model
from parakeet_core import AttentionPolicy
from parakeet_core.encoder import DepthwiseStridingSubsampling, RelativePositionalEncoding, RelPositionSelfAttention, _time_mask
from tools.long_audio import long_clip, sha256

ENCODER_TOLERANCE = 1e-4
LONG_NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/long_reference.json.gz"))
MODE_ATTENTION = {"full": "full", "local256": (256, 256), "local128": (128, 128)}


@cache
def long_reference(name: str) -> tuple[dict, dict]:
    folder = FIXTURES / name
    with gzip.open(folder / "long_reference.json.gz", "rt", encoding="utf-8") as f:
        reference = json.load(f)
    with np.load(folder / reference["arrays"]) as arrays:
        return reference, {key: arrays[key] for key in arrays.files}


@cache
def samples(name: str, clip: str) -> np.ndarray:
    if clip.startswith("long_"):
        return long_clip(clip)
    return load_fixture(name).clip_samples(clip)


def _alone_cases():
    return [(name, mode, clip) for name in LONG_NAMES for mode, record in long_reference(name)[0]["modes"].items()
            for clip in record["clips"]]


def _batch_cases():
    return [(name, mode) for name in LONG_NAMES for mode, record in long_reference(name)[0]["modes"].items()
            if "batch" in record]


@cache
def _run(name: str, clips: tuple[str, ...], attention) -> tuple:
    model = load_model(name)
    waveforms = [torch.from_numpy(samples(name, clip)) for clip in clips]
    lengths = torch.tensor([len(w) for w in waveforms])
    features, feature_lengths = model.featurize(torch.nn.utils.rnn.pad_sequence(waveforms, batch_first=True), lengths)
    encoded, encoded_lengths = model.encode(features, feature_lengths, attention=attention)
    return encoded, encoded_lengths, model.decode(encoded, encoded_lengths)


def _assert_same_as(name: str, hypothesis, expected: dict, label: str, durations: bool = True) -> None:
    assert hypothesis.token_ids == expected["tokens"], label
    assert hypothesis.token_frames == expected["frames"], label
    if durations:
        assert hypothesis.token_durations == expected["durations"], label
    transcript = load_model(name).to_transcript(hypothesis, timestamps=True)
    assert transcript.text == expected["text"], label
    assert [(w.text, w.start, w.end) for w in transcript.words] == [
        (w["word"], w["start"], w["end"]) for w in expected["words"]], label
    assert [(s.text, s.start, s.end) for s in transcript.segments] == [
        (s["segment"], s["start"], s["end"]) for s in expected["segments"]], label


def test_long_fixtures_present():
    assert {"v3_small"} <= set(LONG_NAMES)
    reference, _ = long_reference("v3_small")
    assert {"full", "local256", "local128"} <= set(reference["modes"])
    frames = [c["encoder_length"] for m in reference["modes"].values() for c in m["clips"].values()]
    assert max(frames) > 5000 and reference["modes"]["full"]["clips"]["long_8min"]["encoder_length"] > 5000
    assert max(a["seconds"] for a in reference["audio"].values()) >= 15 * 60


@pytest.mark.parametrize("name", LONG_NAMES)
def test_long_clips_are_the_samples_the_references_were_made_from(name):
    for clip, audio in long_reference(name)[0]["audio"].items():
        assert len(samples(name, clip)) == audio["samples"]
        assert sha256(samples(name, clip)) == audio["sha256"], clip


@pytest.mark.parametrize("name,mode,clip", _alone_cases())
def test_long_clip_alone_equals_nemo(name, mode, clip):
    reference, arrays = long_reference(name)
    expected = reference["modes"][mode]["clips"][clip]
    encoded, encoded_lengths, hypotheses = _run(name, (clip,), MODE_ATTENTION[mode])
    assert int(encoded_lengths[0]) == expected["encoder_length"]
    for where, piece in expected["encoder_slices"].items():
        first = piece["first_frame"]
        reference_frames = arrays[piece["key"]]
        np.testing.assert_allclose(encoded[0, first : first + len(reference_frames)].numpy(), reference_frames,
                                   atol=ENCODER_TOLERANCE, rtol=0, err_msg=f"{clip} {mode} encoder {where}")
    _assert_same_as(name, hypotheses[0], expected, f"{clip} {mode}")


def _expected_alone(name: str, mode: str, clip: str) -> dict:
    """NeMo's clip-alone reference; clips shorter than the local context have the full-attention references."""
    clips = long_reference(name)[0]["modes"][mode]["clips"]
    return clips[clip] if clip in clips else load_fixture(name).reference["clips"][clip]


@pytest.mark.parametrize("name,mode", _batch_cases())
def test_long_and_short_clips_batched_equal_nemo_and_alone(name, mode):
    record = long_reference(name)[0]["modes"][mode]
    order = tuple(record["batch"]["order"])
    _, encoded_lengths, hypotheses = _run(name, order, MODE_ATTENTION[mode])
    for row, clip in enumerate(order):
        expected = record["batch"]["clips"][clip]
        assert int(encoded_lengths[row]) == expected["encoder_length"], clip
        # NeMo's batched loop records some durations differently (tests/test_core_parity.py): tokens and frames
        # are compared with its batch, durations and timestamps with the clip alone.
        assert hypotheses[row].token_ids == expected["tokens"], clip
        assert hypotheses[row].token_frames == expected["frames"], clip
        _assert_same_as(name, hypotheses[row], _expected_alone(name, mode, clip), f"{clip} {mode} batched")
        if clip.startswith("long_"):
            assert hypotheses[row] == _run(name, (clip,), MODE_ATTENTION[mode])[2][0]


@pytest.mark.parametrize("name", LONG_NAMES)
def test_auto_attention_decides_per_clip_in_one_batch(name):
    """Past 600 s a clip gets local (256, 256) attention; its shorter batch-mates keep full attention."""
    modes = long_reference(name)[0]["modes"]
    order = ("long_16min", "long_8min", "speech_en", "short")
    model = load_model(name)
    lengths = torch.tensor([len(samples(name, c)) for c in order]) // model.config.preprocessor.window_stride
    assert model.local_contexts(lengths) == [256, None, None, None]
    _, _, hypotheses = _run(name, order, "auto")
    expected = [modes["local256"]["clips"]["long_16min"], modes["full"]["clips"]["long_8min"],
                load_fixture(name).reference["clips"]["speech_en"], load_fixture(name).reference["clips"]["short"]]
    for clip, hypothesis, reference in zip(order, hypotheses, expected):
        _assert_same_as(name, hypothesis, reference, f"{clip} auto")


@pytest.mark.parametrize("name", LONG_NAMES)
def test_transcribe_takes_attention_per_call_and_from_pretrained(name):
    import parakeet_core

    modes = long_reference(name)[0]["modes"]
    clip = samples(name, "long_8min")
    local = load_model(name).transcribe(clip, attention=256, timestamps=True)
    assert local.token_ids == modes["local256"]["clips"]["long_8min"]["tokens"]
    lowered = load_model(name).transcribe(clip, full_attention_max_seconds=300)
    assert lowered.token_ids == local.token_ids
    model = parakeet_core.from_pretrained(load_fixture(name).checkpoint, device="cpu", attention="128")
    assert str(model.attention) == "local(128, 128)"
    assert model.transcribe(clip).token_ids == modes["local128"]["clips"]["long_8min"]["tokens"]


@pytest.mark.parametrize("value,expected", [
    ("auto", "auto(full up to 600 s, then local(256, 256))"), ("full", "full"), (64, "local(64, 64)"),
    ((256, 256), "local(256, 256)"), ([128, 128], "local(128, 128)"), ("32", "local(32, 32)"), ("16,16", "local(16, 16)"),
])
def test_attention_values_accepted(value, expected):
    assert str(AttentionPolicy.parse(value)) == expected


@pytest.mark.parametrize("value,message", [
    ((256, 128), "asymmetric"), ([64, 32], "asymmetric"), (0, "positive"), (-4, "positive"), ("local", "attention must be"),
    (True, "attention must be"), (2.5, "attention must be"), ((1, 2, 3), "(left, right)"),
])
def test_attention_values_refused_with_a_reason(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AttentionPolicy.parse(value)


def test_full_attention_max_seconds_validated():
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="full_attention_max_seconds"):
            AttentionPolicy.parse("auto", full_attention_max_seconds=bad)


@pytest.mark.parametrize("steps,context,lengths", [(37, 5, [37, 20]), (64, 16, [64, 3]), (10, 16, [10, 7]),
                                                    (100, 7, [100, 99, 1])])
def test_banded_attention_equals_dense_attention_masked_to_the_band(steps, context, lengths):
    torch.manual_seed(steps)
    attention = RelPositionSelfAttention(32, 4, bias=True).eval()
    for parameter in attention.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    positions = RelativePositionalEncoding(32, 1)
    x = torch.randn(len(lengths), steps, 32)
    valid = _time_mask(torch.tensor(lengths), steps)
    index = torch.arange(steps)
    band = (index[:, None] - index[None, :]).abs() <= context
    with torch.inference_mode():
        dense = attention(x, positions(steps, x.dtype), ~(valid[:, None, :] & valid[:, :, None] & band))
        local = attention.forward_local(x, positions.local(context, x.dtype), valid, context)
    np.testing.assert_allclose(local[valid].numpy(), dense[valid].numpy(), atol=1e-5, rtol=0)


def test_full_attention_in_query_blocks_equals_one_pass(monkeypatch):
    """Long clips get full attention a block of query rows at a time: the same values as one pass, padded
    batch-mates included."""
    import parakeet_core.encoder as encoder_module

    model = load_model("v3_small")
    fixture = load_fixture("v3_small")
    waveforms = [torch.from_numpy(fixture.clip_samples(clip)) for clip in ("long", "speech_en")]
    features, lengths = model.featurize(torch.nn.utils.rnn.pad_sequence(waveforms, batch_first=True),
                                        torch.tensor([len(w) for w in waveforms]))
    whole, whole_lengths = model.encode(features, lengths, attention="full")
    steps = int(whole_lengths.max())
    heads = model.encoder.layers[0].self_attn.heads
    monkeypatch.setattr(encoder_module, "_FULL_SCORES_PER_BLOCK", heads * (2 * steps - 1) * 100)  # 100 rows
    blocked, blocked_lengths = model.encode(features, lengths, attention="full")
    assert torch.equal(whole_lengths, blocked_lengths) and steps > 300
    for row, length in enumerate(whole_lengths.tolist()):
        assert torch.equal(blocked[row, :length], whole[row, :length])


def test_subsampling_in_time_chunks_equals_one_pass(monkeypatch):
    encoder = load_model("v3_small").encoder
    clip = torch.from_numpy(samples("v3_small", "long"))
    features, lengths = load_model("v3_small").featurize(clip[None], torch.tensor([len(clip)]))
    with torch.inference_mode():
        whole, whole_lengths = encoder.pre_encode(features.transpose(1, 2), lengths)
        monkeypatch.setattr(DepthwiseStridingSubsampling, "_output_chunk", lambda self: 37)
        chunked, chunked_lengths = encoder.pre_encode(features.transpose(1, 2), lengths)
    assert torch.equal(whole_lengths, chunked_lengths)
    np.testing.assert_allclose(chunked.numpy(), whole.numpy(), atol=1e-5, rtol=0)


def test_subsampling_runs_unmasked_where_nemo_splits_a_clip_alone():
    """NeMo (chunking factor 1) splits, without masks, inputs over 2**31 / channels * 4 elements."""
    config = dataclasses.replace(load_model("v3_small").config.encoder, subsampling_conv_channels=256)
    subsampling = DepthwiseStridingSubsampling(config)
    limit = 2**31 // 256 * 4 // config.feat_in  # frames, feature_length + 1 of them for a clip alone
    assert not subsampling.runs_unmasked(limit - 1)
    assert subsampling.runs_unmasked(limit)
    always = DepthwiseStridingSubsampling(dataclasses.replace(config, subsampling_conv_chunking_factor=2))
    assert always.runs_unmasked(10)
