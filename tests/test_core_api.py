"""The public API: transcribe() inputs and outputs, stages, audio handling, validation errors and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

import parakeet_core
from parakeet_core import InvalidAudioError, ParakeetError, Transcript, check_waveform
from core_fixtures import load_fixture, load_model

NAME = "v3_small"


@pytest.fixture(scope="module")
def model():
    return load_model(NAME)


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(NAME)


def test_one_item_in_one_transcript_out(model, fixture):
    transcript = model.transcribe(str(fixture.clip_path("speech_en")))
    assert isinstance(transcript, Transcript)
    expected = fixture.reference["clips"]["speech_en"]
    assert transcript.text == expected["text"]
    assert transcript.token_ids == expected["tokens"]
    assert transcript.words is None and transcript.segments is None


def test_list_in_list_out_in_order_whatever_the_batch_size(model, fixture):
    clips = ["short", "speech_en", "silence", "speech_de", "noise"]
    items = [fixture.clip_samples(c) for c in clips]
    expected = [fixture.reference["clips"][c]["text"] for c in clips]
    for batch_size in (1, 2, 16):
        assert [t.text for t in model.transcribe(items, batch_size=batch_size)] == expected


def test_tensor_and_array_and_path_inputs_agree(model, fixture):
    samples = fixture.clip_samples("speech_de")
    results = model.transcribe([samples, torch.from_numpy(samples), str(fixture.clip_path("speech_de"))])
    assert len({t.text for t in results}) == 1


def test_other_sample_rates_are_resampled(model, fixture):
    samples = fixture.clip_samples("speech_en")
    import soxr

    at_48k = soxr.resample(samples, 16000, 48000, quality="HQ").astype(np.float32)
    direct = model.transcribe((at_48k, 48000))
    assert direct.text == model.transcribe(soxr.resample(at_48k, 48000, 16000, quality="HQ").astype(np.float32)).text


def test_timestamps_are_ordered_and_within_the_clip(model, fixture):
    transcript = model.transcribe(str(fixture.clip_path("speech_en")), timestamps=True)
    frames = fixture.reference["clips"]["speech_en"]["encoder_length"]
    latest_end = (frames + max(model.config.decoder.durations)) * model.config.seconds_per_encoder_frame
    assert transcript.words and transcript.segments
    for word in transcript.words:
        assert 0 <= word.start <= word.end <= latest_end + 1e-9  # a TDT token's duration may reach past the last frame
    starts = [w.start for w in transcript.words]
    assert starts == sorted(starts)
    assert json.loads(json.dumps(transcript.timestamps_dict()))["words"][0]["text"] == transcript.words[0].text


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not on PATH")
def test_formats_soundfile_cannot_read_go_through_ffmpeg(model, fixture, tmp_path):
    target = tmp_path / "clip.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(fixture.clip_path("speech_en")), str(target)], check=True)
    transcript = model.transcribe(str(target))
    assert isinstance(transcript.text, str)


def test_corrupt_file_error_names_the_file(model, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage")
    with pytest.raises(InvalidAudioError, match="broken.wav"):
        model.transcribe(str(bad))


@pytest.mark.parametrize(
    "samples,message",
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.array([0.1, np.nan] * 800, dtype=np.float32), "NaN"),
        (np.array([0.1, np.inf] * 800, dtype=np.float32), "NaN or infinity"),
        (np.zeros(1600, dtype=np.int16), "float32"),
        (np.zeros((2, 1600), dtype=np.float32), "1-D"),
        (np.zeros(10, dtype=np.float32), "too short"),
        (np.full(1600, 0.1e30, dtype=np.float32), "not audio"),
        (np.zeros(16001, dtype=np.float32), "too long"),
    ],
)
def test_check_waveform_names_the_problem(samples, message):
    with pytest.raises(InvalidAudioError, match=message):
        check_waveform(samples, min_samples=160, max_samples=16000)


def test_transcribe_rejects_bad_audio_with_its_index(model):
    good = np.zeros(16000, dtype=np.float32)
    with pytest.raises(InvalidAudioError, match="item 1: samples contain NaN"):
        model.transcribe([good, np.full(16000, np.nan, dtype=np.float32)])


def test_stage_subset_loads_only_its_modules(fixture):
    encoder_only = parakeet_core.from_pretrained(fixture.checkpoint, device="cpu", stages=["encode"])
    assert encoder_only.preprocessor is None and encoder_only.decoder is None
    with pytest.raises(ParakeetError, match="'featurize' is not among them"):
        encoder_only.featurize(torch.zeros(1, 1600), torch.tensor([1600]))


def test_stages_chain_equals_transcribe(model, fixture):
    samples = torch.from_numpy(fixture.clip_samples("noise"))
    features, feature_lengths = model.featurize(samples[None], torch.tensor([len(samples)]))
    assert features.dtype == torch.float32 and features.shape[1] == model.config.preprocessor.features
    encoded, encoded_lengths = model.encode(features, feature_lengths)
    assert encoded.shape[2] == model.config.encoder.d_model
    transcript = model.to_transcript(model.decode(encoded, encoded_lengths)[0])
    assert transcript.text == model.transcribe(samples.numpy()).text


def test_padding_past_length_does_not_change_the_result(model, fixture):
    samples = torch.from_numpy(fixture.clip_samples("speech_en"))
    padded = torch.cat([samples, torch.randn(16000) * 0.5])[None]
    features, feature_lengths = model.featurize(padded, torch.tensor([len(samples)]))
    hypothesis = model.decode(*model.encode(features, feature_lengths))[0]
    assert hypothesis.token_ids == fixture.reference["clips"]["speech_en"]["tokens"]


def test_warmup_runs_every_loaded_stage(model):
    model.warmup(batch_sizes=(1, 2), seconds=0.5)


def test_cli_prints_json(fixture, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "parakeet_core", str(fixture.clip_path("speech_en")), "--checkpoint",
         str(fixture.checkpoint), "--device", "cpu", "--json", "--timestamps"],
        capture_output=True, text=True, check=True,
    )
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["text"] == fixture.reference["clips"]["speech_en"]["text"]
    assert record["words"] and record["segments"]


def test_cli_reports_unknown_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "parakeet_core", "x.wav", "--checkpoint", str(tmp_path / "none.nemo")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "checkpoint not found" in result.stderr


@pytest.mark.parametrize("padding", [0, 160, 1000, 16000, 48000])
def test_digital_silence_is_batch_invariant(model, fixture, padding):
    """Constant input normalises a pure rounding residue: it must not depend on the batch's padded length."""
    silence = np.zeros(8562, dtype=np.float32)
    alone = model.transcribe(silence)
    speech = fixture.clip_samples("speech_en")
    longer = np.zeros(len(silence) + padding, dtype=np.float32)
    batch = model.transcribe([silence, speech, longer[: max(len(silence), len(longer))]], batch_size=3)
    assert batch[0] == alone


def test_concurrent_transcribe_on_one_instance_is_safe(model, fixture):
    import concurrent.futures

    clips = ["speech_en", "speech_de", "noise", "short"]
    expected = [fixture.reference["clips"][c]["text"] for c in clips]
    threads_before = torch.get_num_threads()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda c: model.transcribe(fixture.clip_samples(c)).text, clips * 2))
    assert texts == expected * 2
    assert torch.get_num_threads() == threads_before


def test_cpu_decoder_sees_weights_modified_in_place():
    """The CPU loop derives packed weights and a token table from the parameters; editing them must not go stale."""
    from core_fixtures import load_fixture

    fixture = load_fixture("v3_small")
    model = parakeet_core.from_pretrained(fixture.checkpoint, device="cpu")
    samples = torch.from_numpy(fixture.clip_samples("speech_en"))[None]
    encoded, lengths = model.encode(*model.featurize(samples, torch.tensor([samples.shape[1]])))
    before = model.decode(encoded, lengths)[0]
    assert before.token_ids
    embedding = model.decoder.prediction.embed.weight
    with torch.no_grad():
        embedding.mul_(-1.0)
    flipped = model.decode(encoded, lengths)[0]
    assert flipped != before
    with torch.no_grad():
        embedding.mul_(-1.0)
        model.decoder.joint.joint_net[2].weight[model.config.decoder.blank_id].add_(1e4)
    assert model.decode(encoded, lengths)[0].token_ids == []


def test_cpu_loop_token_table_equals_the_per_step_product():
    """The first LSTM layer's input product, looked up per token, is what computing it per step would give."""
    from core_fixtures import load_fixture
    from parakeet_core import kernels
    from parakeet_core.decoding import _HostLoopWeights

    if not kernels.onednn_available():
        pytest.skip("exact row independence is a property of oneDNN's packed products")
    model = parakeet_core.from_pretrained(load_fixture("v3_small").checkpoint, device="cpu")
    weights = _HostLoopWeights(model.decoder)
    embedding = model.decoder.prediction.embed.weight
    with torch.no_grad():
        for tokens in ([5], [17, 300, 8000], list(range(16))):
            rows = torch.tensor(tokens)
            assert torch.equal(weights.input_products[0](embedding[rows]), weights.first_layer_input[rows])


def test_onednn_products_run_on_bounded_row_counts_without_changing_a_value(monkeypatch):
    """Row blocks padded to their bucket give the unpadded product bit for bit, and only bucket sizes reach oneDNN."""
    from parakeet_core import kernels

    if not kernels.onednn_available():
        pytest.skip("the row buckets apply to oneDNN's products only")
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 40, generator=generator), torch.randn(48, generator=generator)
    seen = set()
    pointwise = torch.ops.mkldnn._linear_pointwise

    class RecordingOps:
        @staticmethod
        def _linear_pointwise(x, *args):
            seen.add(x.shape[0])
            return pointwise(x, *args)

        _reorder_linear_weight = staticmethod(torch.ops.mkldnn._reorder_linear_weight)

    packed = kernels.fixed_linear(weight, bias)
    packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, kernels._PACKING_ROWS_HINT)
    with torch.no_grad():
        for rows in (1, 3, 17, 64, 65, 300, kernels.MAX_BLOCK_ROWS + 5):
            x = torch.randn(rows, 40, generator=generator)
            direct = pointwise(x, weight, bias, "none", [], "")
            packed_direct = pointwise(x, packed_weight, bias, "none", [], "")
            with monkeypatch.context() as patch:
                patch.setattr(torch.ops, "mkldnn", RecordingOps)
                assert torch.equal(kernels.linear(x, weight, bias), direct), rows
                assert torch.equal(packed(x), packed_direct), rows
        batch = torch.randn(5, 60, 40, generator=generator)
        flat = pointwise(batch.reshape(-1, 40), weight, bias, "none", [], "")
        assert torch.equal(kernels.linear(batch, weight, bias), flat.view(5, 60, 48))
        assert kernels.linear(torch.empty(0, 7, 40), weight, bias).shape == (0, 7, 48)
    assert seen <= {kernels.padded_rows(n) for n in range(1, kernels.MAX_BLOCK_ROWS + 1)}
    assert len({kernels.padded_rows(n) for n in range(1, kernels.MAX_BLOCK_ROWS + 1)}) == 7 + 31
