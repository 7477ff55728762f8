"""Clients nobody here wrote, as they call the server: the requests of yuekaizhang/Triton-ASR-Client's `client.py`
and k2-fsa/sherpa's `triton/client/decode_manifest_triton.py`, rebuilt from reading them (none of their code is
copied), against the real server of conftest.py. Both ask for the model `transducer` by default (a fixed choice
in Triton-ASR-Client), which `parakeet-serve` serves as an alias of `parakeet` unless told otherwise."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

from parakeet_triton import protocol
from parakeet_triton.render import DEFAULT_MODEL_ALIASES

from conftest import FIXTURES, ROOT, start_server, stop_server

grpc_aio = pytest.importorskip("tritonclient.grpc.aio")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

RATE = protocol.SAMPLE_RATE
CLIPS = ("speech_en", "speech_de", "short", "long")
THEIR_MODEL_NAME = "transducer"


@pytest.fixture(scope="module")
def nemo_texts() -> dict[str, str]:
    clips = json.loads((FIXTURES / "v3_small" / "reference.json").read_text())["clips"]
    return {name: clips[name]["text"] for name in CLIPS}


def read_like_them(name: str) -> np.ndarray:
    """Both clients read with soundfile's default dtype (float64) and cast to float32 when padding."""
    samples, rate = soundfile.read(FIXTURES / "audio" / f"{name}.wav")
    assert rate == RATE and samples.dtype == np.float64
    return samples


def triton_asr_client_batch(waveforms: list[np.ndarray], padding_seconds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Triton-ASR-Client's `send`: the batch zero-padded to the next multiple of 10 s strictly above its longest
    clip (a 10.0 s clip is padded to 20 s), WAV [B, T] FP32 and WAV_LENS [B, 1] INT32."""
    longest = max(len(w) / RATE for w in waveforms)
    padded = int(RATE * padding_seconds * (longest // padding_seconds + 1))
    wav = np.stack([np.pad(w, (0, padded - len(w))).astype(np.float32) for w in waveforms])
    lens = np.array([len(w) for w in waveforms], dtype=np.int32).reshape(-1, 1)
    return wav, lens


def sherpa_request(waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sherpa's offline `send`: one clip per request in a zeros buffer of 10 s x (whole tens of seconds + 1)."""
    wav = np.zeros((1, 10 * RATE * (int(len(waveform) / RATE // 10) + 1)), dtype=np.float32)
    wav[0, :len(waveform)] = waveform
    return wav, np.array([[len(waveform)]], dtype=np.int32)


async def infer_transcripts(url: str, model: str, wav: np.ndarray, lens: np.ndarray, request_id: int):
    """The call both clients make: tritonclient.grpc.aio, WAV + WAV_LENS in, only TRANSCRIPTS asked for."""
    client = grpc_aio.InferenceServerClient(url=url, verbose=False)
    try:
        inputs = [grpc_aio.InferInput("WAV", wav.shape, np_to_triton_dtype(wav.dtype)),
                  grpc_aio.InferInput("WAV_LENS", lens.shape, np_to_triton_dtype(lens.dtype))]
        inputs[0].set_data_from_numpy(wav)
        inputs[1].set_data_from_numpy(lens)
        outputs = [grpc_aio.InferRequestedOutput("TRANSCRIPTS")]
        response = await client.infer(model, inputs, request_id=str(request_id), outputs=outputs)
        return response.as_numpy("TRANSCRIPTS")
    finally:
        await client.close()


def joined(row) -> str:
    """Both clients turn an array row into text with b" ".join, a bare bytes value with .decode."""
    return b" ".join(row).decode("utf-8") if isinstance(row, np.ndarray) else row.decode("utf-8")


def test_transducer_is_served_by_default():
    assert THEIR_MODEL_NAME in DEFAULT_MODEL_ALIASES


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_triton_asr_client_request_gives_nemo_transcripts(triton_server, nemo_texts, batch_size):
    names = list(CLIPS)
    texts: dict[str, str] = {}
    for start in range(0, len(names), batch_size):
        batch = names[start:start + batch_size]
        wav, lens = triton_asr_client_batch([read_like_them(name) for name in batch])
        assert wav.dtype == np.float32 and wav.shape[1] % (10 * RATE) == 0
        rows = asyncio.run(infer_transcripts(triton_server.grpc_url, THEIR_MODEL_NAME, wav, lens, 10086 + start))
        assert len(rows) == len(batch)
        texts.update({name: joined(row) for name, row in zip(batch, rows)})
    assert texts == nemo_texts


def test_sherpa_offline_request_gives_nemo_transcripts(triton_server, nemo_texts):
    for index, name in enumerate(CLIPS):
        wav, lens = sherpa_request(read_like_them(name))
        assert wav.shape[1] == 10 * RATE * (math.floor(lens[0, 0] / RATE / 10) + 1)
        result = asyncio.run(infer_transcripts(triton_server.grpc_url, THEIR_MODEL_NAME, wav, lens, 10086 + index))
        assert joined(result[0]) == nemo_texts[name]


def test_alias_and_public_name_answer_alike(triton_server):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        for model in (protocol.ENSEMBLE_MODEL, THEIR_MODEL_NAME):
            assert client.is_model_ready(model)
            config = client.get_model_config(model, as_json=True)["config"]
            assert config["platform"] == "ensemble"
            assert float(config["parameters"]["max_audio_seconds"]["string_value"]) > 0
    finally:
        client.close()


def test_model_name_and_aliases_are_configurable(tmp_path):
    """--model-name renames the public model and --model-aliases '' serves no other name; the project's client
    finds the server's limit on the public model alone."""
    from parakeet_client import ParakeetClient

    handle = start_server(tmp_path / "serve.log", "--model-name", "asr", "--model-aliases", "",
                          "--max-audio-seconds", "30")
    try:
        client = grpcclient.InferenceServerClient(handle.grpc_url)
        try:
            assert client.is_model_ready("asr")
            for gone in (protocol.ENSEMBLE_MODEL, THEIR_MODEL_NAME):
                with pytest.raises(InferenceServerException, match="unknown model"):
                    client.get_model_config(gone)
        finally:
            client.close()
        with ParakeetClient(handle.grpc_url, model="asr") as parakeet:
            assert parakeet.is_ready()
            assert parakeet.max_audio_seconds == 30.0
            transcript = parakeet.transcribe(str(FIXTURES / "audio" / "speech_en.wav"))
        reference = json.loads((FIXTURES / "v3_small" / "reference.json").read_text())["clips"]["speech_en"]
        assert transcript.text == reference["text"]
        assert "model 'asr'" in handle.log()
    finally:
        stop_server(handle)


def documented_commands(marker: str) -> str:
    """The bash block that follows `<!-- commands run by ...::marker -->` in docs/serving.md."""
    text = (ROOT / "docs" / "serving.md").read_text()
    match = re.search(rf"<!-- commands run by tests/test_existing_clients.py::{marker} -->\n```bash\n(.*?)```",
                      text, re.S)
    assert match, f"docs/serving.md has no command block for {marker}"
    return match.group(1)


def run_documented(commands: str, server, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run the commands as a reader would, with only the server's addresses changed to the test server's."""
    script = commands.replace("localhost:8000", server.http_url).replace("127.0.0.1:8001", server.grpc_url)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(not all(shutil.which(tool) for tool in ("curl", "jq", "ffmpeg")), reason="needs curl, jq, ffmpeg")
def test_documented_curl_commands(triton_server, nemo_texts, tmp_path):
    shutil.copyfile(FIXTURES / "audio" / "speech_en.wav", tmp_path / "talk.wav")
    result = run_documented(documented_commands("test_documented_curl_commands"), triton_server, tmp_path, 120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [nemo_texts["speech_en"]] * 2


def test_one_dimensional_wav_is_refused_as_too_many_clips(triton_server):
    samples = read_like_them("speech_en").astype(np.float32)
    body = json.dumps({"inputs": [{"name": "WAV", "shape": [len(samples)], "datatype": "FP32",
                                   "data": samples.tolist()}]}).encode()
    request = urllib.request.Request(f"http://{triton_server.http_url}/v2/models/{protocol.ENSEMBLE_MODEL}/infer",
                                     data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 400
    assert "batch-size must be <= " in json.loads(refused.value.read())["error"]


def test_documented_perf_analyzer_recipe(triton_server, tmp_path):
    from benchmarks.loadtest import perf_analyzer

    if perf_analyzer.binary_in_tritonclient_wheel() is None and shutil.which("perf_analyzer") is None:
        pytest.skip("no perf_analyzer (tritonclient==2.51.0 wheel) installed")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (the recipe's generated speech)")
    commands = documented_commands("test_documented_perf_analyzer_recipe")
    commands = commands.replace("--concurrency 2", "--concurrency 2 --window-ms 1000")  # shorter windows in CI
    result = run_documented(commands, triton_server, tmp_path, 300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command = (tmp_path / "pa.sh").read_text()
    assert command.startswith("LD_LIBRARY_PATH=") or "perf_analyzer" in command.split()[0]
    assert f"-u {triton_server.grpc_url}" in command
    assert re.search(r"Concurrency: 2, throughput: [0-9.]+ infer/sec", result.stdout), result.stdout[-2000:]
