"""Long audio through the real tritonserver: a 20-minute request over gRPC, and long with short clips in one batch.

The server here keeps the launcher's default `--max-audio-seconds` (3 hours) and `--attention auto`, with
`--full-attention-max-seconds 300` so that the 8-minute clip gets local attention and the short ones full attention.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import start_server, stop_server, tritonserver_available
from core_fixtures import load_fixture, load_model
from tools.long_audio import speech_like

grpcclient = pytest.importorskip("tritonclient.grpc")

from parakeet_client import ParakeetClient  # noqa: E402
from parakeet_triton import protocol  # noqa: E402

FULL_ATTENTION_MAX_SECONDS = 300.0


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    if not tritonserver_available():
        pytest.skip("no tritonserver: install nvidia-pytriton (the `serve` extra)")
    log_path = tmp_path_factory.mktemp("triton-long") / "parakeet-serve.log"
    # Flags after the conftest's defaults win: back to the launcher's 3-hour default limit.
    handle = start_server(log_path, "--max-audio-seconds", "10800",
                          "--full-attention-max-seconds", str(FULL_ATTENTION_MAX_SECONDS))
    try:
        yield handle
    finally:
        stop_server(handle)


@pytest.fixture(scope="module")
def clips():
    fixture = load_fixture("v3_small")
    return {"twenty_minutes": speech_like(20 * 60), "eight_minutes": speech_like(8 * 60),
            "speech_en": fixture.clip_samples("speech_en"), "short": fixture.clip_samples("short")}


@pytest.fixture(scope="module")
def expected(clips):
    model = load_model("v3_small")
    return {name: model.transcribe(samples, timestamps=True, full_attention_max_seconds=FULL_ATTENTION_MAX_SECONDS)
            for name, samples in clips.items()}


def _same(result, reference):
    assert result.text == reference.text
    assert [(w.text, w.start, w.end) for w in result.words] == [(w.text, w.start, w.end) for w in reference.words]
    assert [(s.text, s.start, s.end) for s in result.segments] == [(s.text, s.start, s.end) for s in reference.segments]


def test_limits_and_attention_rendered(long_server):
    client = grpcclient.InferenceServerClient(long_server.grpc_url)
    try:
        pre = client.get_model_config(protocol.PREPROCESSOR_MODEL, as_json=True)["config"]["parameters"]
        enc = client.get_model_config(protocol.ENCODER_MODEL, as_json=True)["config"]["parameters"]
    finally:
        client.close()
    assert float(pre["max_audio_seconds"]["string_value"]) == 10800.0
    assert enc["attention"]["string_value"] == "auto"
    assert float(enc["full_attention_max_seconds"]["string_value"]) == FULL_ATTENTION_MAX_SECONDS


def test_twenty_minute_request_over_grpc_equals_in_process(long_server, clips, expected):
    assert len(clips["twenty_minutes"]) / protocol.SAMPLE_RATE > 600  # local attention under auto
    with ParakeetClient(long_server.grpc_url, timeout=600) as client:
        assert client.max_audio_seconds == 10800.0
        result = client.transcribe(clips["twenty_minutes"], timestamps=True)
    _same(result, expected["twenty_minutes"])
    assert len(result.words) > 1000


def test_long_and_short_clips_in_one_batch_each_get_their_own_result(long_server, clips, expected):
    """One padded WAV [B, T] + WAV_LENS request: every stage sees the long and the short clips as one batch."""
    names = ["eight_minutes", "speech_en", "short"]
    wav = np.zeros((len(names), max(len(clips[n]) for n in names)), dtype=np.float32)
    for row, name in enumerate(names):
        wav[row, : len(clips[name])] = clips[name]
    lens = np.array([[len(clips[n])] for n in names], dtype=np.int32)
    client = grpcclient.InferenceServerClient(long_server.grpc_url)
    try:
        inputs = [grpcclient.InferInput(protocol.WAV, list(wav.shape), "FP32"),
                  grpcclient.InferInput(protocol.WAV_LENS, list(lens.shape), "INT32")]
        inputs[0].set_data_from_numpy(wav)
        inputs[1].set_data_from_numpy(lens)
        result = client.infer(protocol.ENSEMBLE_MODEL, inputs, client_timeout=600)
    finally:
        client.close()
    texts = [t.decode("utf-8") for t in result.as_numpy(protocol.TRANSCRIPTS).reshape(-1)]
    assert texts == [expected[n].text for n in names]


def test_long_and_short_requests_concurrently(long_server, clips, expected):
    names = ["eight_minutes", "speech_en", "short", "speech_en", "short"]
    with ParakeetClient(long_server.grpc_url, timeout=600) as client, ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: client.transcribe(clips[n], timestamps=True), names))
    for name, result in zip(names, results):
        _same(result, expected[name])

