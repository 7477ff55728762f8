"""End to end: a real tritonserver (started by `parakeet-serve`, see conftest.py) serving the v3_small fixture on
CPU, driven through tritonclient over gRPC and HTTP on loopback."""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

from parakeet_triton import protocol

from conftest import FIXTURES, SERVED_CHECKPOINT, start_server, stop_server

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

CLIPS = ("speech_en", "speech_de", "noise", "silence", "short", "long")
RATE = protocol.SAMPLE_RATE


# ------------------------------------------------------------------------------------------------- helpers


def load_clip(name: str) -> np.ndarray:
    samples, rate = soundfile.read(FIXTURES / "audio" / f"{name}.wav", dtype="float32")
    assert rate == RATE and samples.ndim == 1
    return samples


@pytest.fixture(scope="session")
def audio() -> dict[str, np.ndarray]:
    return {name: load_clip(name) for name in CLIPS}


@pytest.fixture(scope="session")
def nemo_reference() -> dict:
    return json.loads((FIXTURES / "v3_small" / "reference.json").read_text())["clips"]


@pytest.fixture(scope="session")
def in_process():
    """parakeet_core in this process (CPU, fp32): the reference the server must equal."""
    import parakeet_core

    return parakeet_core.from_pretrained(str(SERVED_CHECKPOINT), device="cpu")


@pytest.fixture(scope="session")
def in_process_results(in_process, audio) -> dict[str, dict]:
    results = {}
    for name in CLIPS:
        transcript = in_process.transcribe(audio[name], timestamps=True)
        results[name] = {"text": transcript.text, "timestamps": transcript.timestamps_dict()}
    return results


@pytest.fixture(scope="session")
def grpc(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def http(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    yield client
    client.close()


def infer(client, wav: np.ndarray, lens: np.ndarray | None = None, *, wav_datatype: str = "FP32",
          lens_datatype: str = "INT32", module=None) -> tuple[list[str], list[dict]]:
    """One request to the ensemble; returns the TRANSCRIPTS and parsed TIMESTAMPS of each clip."""
    module = module or (grpcclient if isinstance(client, grpcclient.InferenceServerClient) else httpclient)
    inputs = [module.InferInput(protocol.WAV, list(wav.shape), wav_datatype)]
    inputs[0].set_data_from_numpy(wav)
    if lens is not None:
        inputs.append(module.InferInput(protocol.WAV_LENS, list(lens.shape), lens_datatype))
        inputs[1].set_data_from_numpy(lens)
    outputs = [module.InferRequestedOutput(protocol.TRANSCRIPTS), module.InferRequestedOutput(protocol.TIMESTAMPS)]
    result = client.infer(protocol.ENSEMBLE_MODEL, inputs, outputs=outputs)
    texts = result.as_numpy(protocol.TRANSCRIPTS)
    stamps = result.as_numpy(protocol.TIMESTAMPS)
    assert texts.shape == stamps.shape == (wav.shape[0], 1)
    return [t.decode("utf-8") for t in texts[:, 0]], [json.loads(s) for s in stamps[:, 0]]


def infer_one(client, samples: np.ndarray) -> tuple[str, dict]:
    texts, stamps = infer(client, samples[None, :])
    return texts[0], stamps[0]


def encoder_batch_counts(client) -> dict[int, int]:
    stats = client.get_inference_statistics(protocol.ENCODER_MODEL, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


# ---------------------------------------------------------------------------------------- health, metadata


def test_health_and_metadata_grpc(grpc):
    assert grpc.is_server_live() and grpc.is_server_ready()
    for model in (protocol.ENSEMBLE_MODEL, protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL, protocol.DECODER_MODEL):
        assert grpc.is_model_ready(model), model
    metadata = grpc.get_model_metadata(protocol.ENSEMBLE_MODEL, as_json=True)
    inputs = {i["name"]: (i["datatype"], [int(d) for d in i["shape"]]) for i in metadata["inputs"]}
    outputs = {o["name"]: (o["datatype"], [int(d) for d in o["shape"]]) for o in metadata["outputs"]}
    assert inputs == {protocol.WAV: ("FP32", [-1, -1]), protocol.WAV_LENS: ("INT32", [-1, 1])}
    assert outputs == {protocol.TRANSCRIPTS: ("BYTES", [-1, 1]), protocol.TIMESTAMPS: ("BYTES", [-1, 1])}
    config = grpc.get_model_config(protocol.ENSEMBLE_MODEL, as_json=True)["config"]
    assert int(config["max_batch_size"]) > 0
    assert [i for i in config["input"] if i["name"] == protocol.WAV_LENS][0].get("optional") is True


def test_health_and_metadata_http(http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready(protocol.ENSEMBLE_MODEL)
    metadata = http.get_model_metadata(protocol.ENSEMBLE_MODEL)
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        protocol.WAV: ("FP32", [-1, -1]), protocol.WAV_LENS: ("INT32", [-1, 1])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        protocol.TRANSCRIPTS: ("BYTES", [-1, 1]), protocol.TIMESTAMPS: ("BYTES", [-1, 1])}


def test_launcher_printed_where_it_listens(triton_server, grpc):
    log = triton_server.log()
    assert f"ready: HTTP http://{triton_server.http_url}" in log
    assert f"gRPC {triton_server.grpc_url}" in log and triton_server.metrics_url in log
    # each instance logs what it loaded and where
    for model, stage in (("preprocessor", "featurize"), ("encoder", "encode"), ("decoder", "decode")):
        assert f"loaded stage '{stage}' of checkpoint '{SERVED_CHECKPOINT}' on cpu" in log, model


# -------------------------------------------------------------------------------------------- correctness


def _assert_same_as_references(name, text, stamps, in_process_results, nemo_reference):
    assert text == in_process_results[name]["text"], name
    assert stamps == in_process_results[name]["timestamps"], name
    nemo = nemo_reference[name]
    assert text == nemo["text"], name
    assert [w["text"] for w in stamps["words"]] == [w["word"] for w in nemo["words"]], name
    for ours, theirs in zip(stamps["words"], nemo["words"]):
        assert math.isclose(ours["start"], theirs["start"], abs_tol=1e-6) and math.isclose(ours["end"], theirs["end"], abs_tol=1e-6)
    assert [s["text"] for s in stamps["segments"]] == [s["segment"] for s in nemo["segments"]], name


@pytest.mark.parametrize("name", CLIPS)
def test_grpc_results_equal_in_process_and_nemo(grpc, audio, in_process_results, nemo_reference, name):
    text, stamps = infer_one(grpc, audio[name])
    _assert_same_as_references(name, text, stamps, in_process_results, nemo_reference)


@pytest.mark.parametrize("name", [c for c in CLIPS if c != "long"])
def test_http_results_equal_in_process_and_nemo(http, audio, in_process_results, nemo_reference, name):
    text, stamps = infer_one(http, audio[name])
    _assert_same_as_references(name, text, stamps, in_process_results, nemo_reference)


def test_padded_multi_clip_request_like_triton_asr_client(grpc, audio, in_process_results):
    """WAV [B, T] zero-padded to whole seconds + WAV_LENS [B, 1], as Triton-ASR-Client sends a batch."""
    names = ["speech_en", "short", "speech_de", "noise", "silence"]
    longest = max(len(audio[n]) for n in names)
    padded_len = int(math.ceil(longest / RATE) * RATE)
    wav = np.zeros((len(names), padded_len), dtype=np.float32)
    for row, name in enumerate(names):
        wav[row, : len(audio[name])] = audio[name]
    lens = np.array([[len(audio[n])] for n in names], dtype=np.int32)
    texts, stamps = infer(grpc, wav, lens)
    for name, text, stamp in zip(names, texts, stamps):
        assert text == in_process_results[name]["text"], name
        assert stamp == in_process_results[name]["timestamps"], name

    # What lies past WAV_LENS is ignored, whatever it is.
    noisy = wav.copy()
    for row, name in enumerate(names):
        noisy[row, len(audio[name]):] = np.random.default_rng(row).uniform(-1, 1, padded_len - len(audio[name]))
    assert infer(grpc, noisy, lens)[0] == texts


def test_wav_lens_is_optional_and_equal_to_full_length(grpc, audio, in_process_results):
    samples = audio["speech_de"]
    with_lens = infer(grpc, samples[None], np.array([[len(samples)]], dtype=np.int32))
    without = infer(grpc, samples[None])
    assert with_lens == without
    assert without[0][0] == in_process_results["speech_de"]["text"]


def test_32_concurrent_mixed_lengths_equal_single_and_batch_in_encoder(triton_server, grpc, audio):
    rng = np.random.default_rng(1234)
    sources = ["speech_en", "speech_de", "noise", "silence"]
    clips = []
    for index in range(32):
        source = audio[sources[index % len(sources)]]
        clips.append(source[: int(rng.integers(RATE // 4, min(len(source), 3 * RATE) + 1))])
    assert len({len(c) for c in clips}) > 16  # really mixed lengths
    single = [infer_one(grpc, clip) for clip in clips]

    before = encoder_batch_counts(grpc)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(lambda clip: infer_one(client, clip), clips))
    elapsed = time.perf_counter() - started
    client.close()
    after = encoder_batch_counts(grpc)

    assert together == single
    executed = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    print(f"\n32 concurrent requests in {elapsed:.2f} s; encoder batch sizes executed: "
          f"{ {s: n for s, n in sorted(executed.items()) if n} }")
    assert any(size > 1 and count > 0 for size, count in executed.items()), executed
    assert sum(size * count for size, count in executed.items()) == 32


# ------------------------------------------------------------------------------------------- bad requests


def _nan_clip(samples):
    bad = samples[None].copy()
    bad[0, 100] = np.nan
    return bad


def _inf_clip(samples):
    bad = samples[None].copy()
    bad[0, -1] = -np.inf
    return bad


BAD_REQUESTS = {
    # name: (wav builder, lens or None, wav datatype, lens datatype, expected text in the error)
    "empty": (lambda s: np.zeros((1, 0), np.float32), None, "FP32", "INT32", "empty audio"),
    "empty_by_lens": (lambda s: s[None], np.array([[0]], np.int32), "FP32", "INT32", "empty audio"),
    "nan": (_nan_clip, None, "FP32", "INT32", "NaN or infinity"),
    "inf": (_inf_clip, None, "FP32", "INT32", "NaN or infinity"),
    "float64": (lambda s: s[None].astype(np.float64), None, "FP64", "INT32", "data-type is 'FP64', but model 'parakeet' expects 'FP32'"),
    "int16_pcm": (lambda s: (s[None] * 32767).astype(np.int16), None, "INT16", "INT32", "expects 'FP32'"),
    "rank3": (lambda s: s[None, None], None, "FP32", "INT32", "unexpected shape for input 'WAV'"),
    "too_long": (lambda s: np.zeros((1, 61 * RATE), np.float32), None, "FP32", "INT32", "too long"),
    "too_short": (lambda s: s[None, :100], None, "FP32", "INT32", "too short"),
    "lens_past_end": (lambda s: s[None], np.array([[10**7]], np.int32), "FP32", "INT32", "outside"),
    "lens_negative": (lambda s: s[None], np.array([[-5]], np.int32), "FP32", "INT32", "outside"),
    "lens_int64": (lambda s: s[None], np.array([[1000]], np.int64), "FP32", "INT64", "data-type is 'INT64'"),
    "lens_batch_mismatch": (lambda s: np.stack([s, s]), np.array([[1000]], np.int32), "FP32", "INT32", "batch size does not match"),
    "too_many_clips": (lambda s: np.zeros((17, 1600), np.float32), None, "FP32", "INT32", "batch-size must be <= 16"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_error_and_server_keeps_serving(grpc, audio, in_process_results, case):
    build, lens, wav_type, lens_type, expected = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as raised:
        infer(grpc, build(audio["speech_en"]), lens, wav_datatype=wav_type, lens_datatype=lens_type)
    assert expected in raised.value.message(), raised.value.message()
    assert "INVALID_ARG" in str(raised.value.status())
    # a good request right after succeeds
    assert infer_one(grpc, audio["noise"])[0] == in_process_results["noise"]["text"]


def test_bad_request_over_http(http, audio, in_process_results):
    with pytest.raises(InferenceServerException) as raised:
        infer(http, _nan_clip(audio["speech_de"]))
    assert "NaN or infinity" in raised.value.message()
    assert raised.value.status() == "400"
    assert infer_one(http, audio["speech_de"])[0] == in_process_results["speech_de"]["text"]


def test_bad_clip_in_multi_clip_request_names_the_clip(grpc, audio):
    wav = np.zeros((3, RATE), dtype=np.float32)
    wav[:, :] = audio["noise"][:RATE]
    wav[1, 10] = np.nan
    with pytest.raises(InferenceServerException) as raised:
        infer(grpc, wav, np.full((3, 1), RATE, dtype=np.int32))
    assert "clip 1 of 3" in raised.value.message() and "NaN" in raised.value.message()


def test_bad_requests_among_concurrent_good_ones(triton_server, audio, in_process_results):
    """Good and bad requests arriving together (dynamically batched): only the bad ones fail."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    jobs = []
    for index in range(12):
        if index % 4 == 1:
            jobs.append(("bad", _nan_clip(audio["speech_en"])))
        elif index % 4 == 3:
            jobs.append(("bad", np.zeros((1, 61 * RATE), np.float32)))
        else:
            name = ("speech_en", "speech_de")[index % 2 == 0]
            jobs.append((name, audio[name][None]))

    def run(job):
        try:
            return infer(client, job[1])[0][0]
        except InferenceServerException as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    client.close()
    for (name, _), result in zip(jobs, results):
        if name == "bad":
            assert isinstance(result, InferenceServerException)
        else:
            assert result == in_process_results[name]["text"]


# ------------------------------------------------------------------------------------- metrics, lifecycle


def test_metrics_endpoint(triton_server, grpc, audio):
    infer_one(grpc, audio["short"])
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        body = response.read().decode()
    assert "nv_inference_request_success" in body and "nv_inference_count" in body
    assert f'nv_inference_request_success{{model="{protocol.ENSEMBLE_MODEL}"' in body
    assert f'nv_inference_queue_duration_us{{model="{protocol.ENCODER_MODEL}"' in body


def _shm_regions(launcher_pid: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"parakeet_{launcher_pid}_*"))


def test_sigterm_shuts_down_cleanly_within_10s(tmp_path):
    handle = start_server(tmp_path / "serve.log", "--instances", "1")
    try:
        assert _shm_regions(handle.pid), "the Python backend stubs should hold shared memory while serving"
        started = time.monotonic()
        os.kill(handle.pid, signal.SIGTERM)
        code = handle.process.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        stop_server(handle)
    assert code == 0, handle.log()[-3000:]
    assert elapsed < 10, f"shutdown took {elapsed:.1f} s"
    assert _shm_regions(handle.pid) == []
    assert "tritonserver stopped" in handle.log()


def test_bad_checkpoint_fails_with_the_reason(tmp_path):
    """A missing checkpoint is refused by the launcher before Triton starts (test_model_glue.py covers a corrupt
    one inside a model): non-zero exit within seconds, the path and the reason shown."""
    checkpoint = tmp_path / "model.nemo"
    started = time.monotonic()
    handle = start_server(tmp_path / "serve.log", checkpoint=checkpoint, wait=False)
    try:
        code = handle.process.wait(timeout=60)
    finally:
        stop_server(handle)
    log = handle.log()
    assert code == 2, log[-3000:]
    assert "checkpoint not found" in log and str(checkpoint) in log
    assert "starting tritonserver" not in log
    assert time.monotonic() - started < 30
    assert _shm_regions(handle.pid) == []
