"""GPU end to end (skipped without CUDA): the ensemble served on a GPU, three ways:

- `gpu`:    --device cuda             -> KIND_GPU instances; tensors stay on the GPU between stages (DLPack);
- `auto`:   the defaults              -> KIND_AUTO, which Triton resolves to KIND_GPU on a GPU machine;
- `jetson`: --instance-kind KIND_CPU --device cuda -> CPU instances that place their work on cuda themselves.

Requests go over plain HTTP/JSON (urllib), so this runs where tritonclient is not installed.
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile
import torch

from parakeet_triton import protocol

from conftest import FIXTURES, SERVED_CHECKPOINT, start_server, stop_server, tritonserver_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLIPS = ("speech_en", "speech_de", "noise", "silence", "short")
QUEUE_DELAY_US = 10_000
VARIANTS = {
    "gpu": ("--device", "cuda"),
    "auto": ("--device", "auto"),
    "jetson": ("--device", "cuda", "--instance-kind", "KIND_CPU"),
}


def http_infer(http_url: str, wav: np.ndarray, lens: np.ndarray | None = None) -> tuple[list[str], list[dict]]:
    inputs = [{"name": protocol.WAV, "shape": list(wav.shape), "datatype": "FP32", "data": wav.ravel().tolist()}]
    if lens is not None:
        inputs.append({"name": protocol.WAV_LENS, "shape": list(lens.shape), "datatype": "INT32", "data": lens.ravel().tolist()})
    body = json.dumps({"inputs": inputs, "outputs": [{"name": protocol.TRANSCRIPTS}, {"name": protocol.TIMESTAMPS}]})
    request = urllib.request.Request(f"http://{http_url}/v2/models/{protocol.ENSEMBLE_MODEL}/infer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        outputs = {o["name"]: o["data"] for o in json.loads(response.read())["outputs"]}
    return outputs[protocol.TRANSCRIPTS], [json.loads(s) for s in outputs[protocol.TIMESTAMPS]]


def encoder_batch_counts(http_url: str) -> dict[int, int]:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{protocol.ENCODER_MODEL}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


@pytest.fixture(scope="module")
def audio():
    return {name: soundfile.read(FIXTURES / "audio" / f"{name}.wav", dtype="float32")[0] for name in CLIPS}


@pytest.fixture(scope="module")
def expected(audio):
    """parakeet_core in this process on the GPU (its default dtype): what every variant must return."""
    import parakeet_core

    model = parakeet_core.from_pretrained(str(SERVED_CHECKPOINT), device="cuda")
    results = {name: model.transcribe(audio[name], timestamps=True) for name in CLIPS}
    nemo = json.loads((FIXTURES / "v3_small" / "reference.json").read_text())["clips"]
    same = [name for name in CLIPS if results[name].text == nemo[name]["text"]]
    print(f"\nin-process on {model.device} ({model.dtype}): text equal to NeMo (fp32 CPU) for {same} of {list(CLIPS)}")
    del model
    return {name: (t.text, t.timestamps_dict()) for name, t in results.items()}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def gpu_server(request, tmp_path_factory):
    if not tritonserver_available():
        pytest.skip("no tritonserver")
    handle = start_server(tmp_path_factory.mktemp(f"gpu-{request.param}") / "serve.log", *VARIANTS[request.param],
                          "--max-queue-delay-us", str(QUEUE_DELAY_US))
    handle.variant = request.param
    try:
        yield handle
    finally:
        stop_server(handle)


def test_where_each_stage_runs(gpu_server):
    log = gpu_server.log()
    for model in (protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL, protocol.DECODER_MODEL):
        assert f"{model}_0_0: loaded stage" in log, model
    if gpu_server.variant == "jetson":
        assert "on cuda (" in log and "1 x KIND_CPU" in log
    else:
        assert "on cuda:0 (" in log


def test_results_equal_in_process_gpu(gpu_server, audio, expected):
    for name in CLIPS:
        texts, stamps = http_infer(gpu_server.http_url, audio[name][None])
        assert (texts[0], stamps[0]) == expected[name], name
    log = gpu_server.log()
    # GPU tensors between the stages (KIND_GPU); the Jetson-style setup hands CPU tensors on.
    for model in (protocol.ENCODER_MODEL, protocol.DECODER_MODEL):
        line = [l for l in log.splitlines() if f"{model}_0_0: first batch:" in l]
        assert line, model
        if gpu_server.variant == "jetson":
            assert "inputs on cpu, computing on cuda" in line[0], line[0]
        else:
            assert "inputs on cuda:0, computing on cuda:0, outputs left where computed" in line[0], line[0]
    print(f"\n[{gpu_server.variant}] " + " | ".join(l.split('"')[1] for l in log.splitlines() if "first batch:" in l))


def core_as_served(model, padded: np.ndarray, lens: np.ndarray) -> list[str]:
    """What the three glue stages compute for one multi-clip request, in process: the same padded batch,
    features trimmed to the longest valid length, encoder output likewise."""
    waveforms = torch.from_numpy(padded)
    features, feature_lengths = model.featurize(waveforms, torch.from_numpy(lens[:, 0].astype(np.int64)))
    features = features[:, :, : int(feature_lengths.max())].float()
    encoded, encoded_lengths = model.encode(features, feature_lengths)
    encoded = encoded[:, : int(encoded_lengths.max())].float()
    return [model.to_transcript(h).text for h in model.decode(encoded, encoded_lengths)]


def test_padded_batch_and_concurrency_equal_single(gpu_server, audio, expected):
    import parakeet_core

    names = ["speech_en", "short", "speech_de", "noise"]
    padded = np.zeros((len(names), 5 * protocol.SAMPLE_RATE), np.float32)
    for row, name in enumerate(names):
        padded[row, : len(audio[name])] = audio[name]
    lens = np.array([[len(audio[n])] for n in names], np.int32)
    texts, _ = http_infer(gpu_server.http_url, padded, lens)
    model = parakeet_core.from_pretrained(str(SERVED_CHECKPOINT), device="cuda")
    # The server computes exactly what parakeet_core computes for that batch ...
    assert texts == core_as_served(model, padded, lens)
    padded_differs = [n for n, t in zip(names, texts) if t != expected[n][0]]

    rng = np.random.default_rng(7)
    sources = ["speech_en", "speech_de", "noise"]
    clips = [audio[sources[i % 3]][: int(rng.integers(4000, len(audio[sources[i % 3]])))] for i in range(32)]
    single = [http_infer(gpu_server.http_url, c[None])[0][0] for c in clips]
    before = encoder_batch_counts(gpu_server.http_url)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda c: http_infer(gpu_server.http_url, c[None])[0][0], clips))
    after = encoder_batch_counts(gpu_server.http_url)
    executed = {s: after.get(s, 0) - before.get(s, 0) for s in after if after.get(s, 0) - before.get(s, 0)}
    mismatched = [i for i, (a, b) in enumerate(zip(single, together)) if a != b]
    print(f"\n[{gpu_server.variant}] {model.dtype}: padded request differs from single for {padded_differs}; "
          f"32 concurrent: {len(mismatched)} differ from single; encoder batch sizes {executed}")
    assert any(size > 1 for size in executed)
    if (padded_differs or mismatched) and model.dtype != torch.float32:
        # ... but in bf16 parakeet_core itself is not batch-invariant on the GPU (its own GPU check shows
        # 'batch = single' False for some clips: docs/results/gpu_check_h200.log).
        pytest.xfail(f"parakeet_core {model.dtype} on GPU is not batch-invariant")
    assert not padded_differs and not mismatched


def test_bad_request_then_good_on_gpu(gpu_server, audio, expected):
    bad = audio["speech_en"][None].copy()
    bad[0, 7] = np.nan
    with pytest.raises(urllib.error.HTTPError) as raised:
        http_infer(gpu_server.http_url, bad)
    assert raised.value.code == 400 and "NaN" in raised.value.read().decode()
    assert http_infer(gpu_server.http_url, audio["noise"][None])[0][0] == expected["noise"][0]


def test_round_trip_time(gpu_server, audio):
    samples = audio["speech_en"][None]
    http_infer(gpu_server.http_url, samples)
    times = []
    for _ in range(10):
        started = time.perf_counter()
        http_infer(gpu_server.http_url, samples)
        times.append(time.perf_counter() - started)
    print(f"\n[{gpu_server.variant}] HTTP/JSON round trip, {samples.shape[1] / protocol.SAMPLE_RATE:.2f} s clip: "
          f"median {statistics.median(times) * 1000:.1f} ms, min {min(times) * 1000:.1f} ms "
          f"(queue delay {QUEUE_DELAY_US} us in encoder and decoder)")
