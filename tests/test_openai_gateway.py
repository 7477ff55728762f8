"""The OpenAI-compatible gateway (parakeet_openai): its wire format, then the official `openai` SDK against
`parakeet-serve --openai-port` (real Triton on loopback), answers compared with the ensemble's own."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

from parakeet_client import formats
from parakeet_client.transcript import TimedText, Transcript
from parakeet_openai import api
from parakeet_openai.settings import SETTINGS, GatewayConfig

from conftest import FIXTURES, free_ports, start_server, stop_server, tritonserver_available

API_KEY = "sk-test-gateway-key"
MODEL = "parakeet-tdt-0.6b-v3"
SPEECH = FIXTURES / "audio" / "speech_en.wav"
MAX_UPLOAD_MB = 3
MAX_CONCURRENCY = 4


# ---------------------------------------------------------------------------- wire format, no server


def _request(**fields) -> api.TranscriptionRequest:
    form = {"model": [MODEL], **{k: v if isinstance(v, list) else [v] for k, v in fields.items()}}
    return api.TranscriptionRequest.from_form(form, (MODEL, "whisper-1"))


@pytest.mark.parametrize("fields, param", [
    ({"response_format": "xml"}, "response_format"),
    ({"timestamp_granularities[]": "word"}, "timestamp_granularities[]"),
    ({"response_format": "verbose_json", "timestamp_granularities[]": "char"}, "timestamp_granularities[]"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": "1.5"}, "temperature"),
    ({"language": "english!"}, "language"),
    ({"stream": "maybe"}, "stream"),
    ({"stream": "true", "response_format": "srt"}, "stream"),
    ({"model": "gpt-4o-transcribe"}, "model"),
    ({"colour": "blue"}, "colour"),
    ({"response_format": ["json", "text"]}, "response_format"),
])
def test_bad_fields_are_refused_with_the_field_named(fields, param):
    with pytest.raises(api.ApiError) as caught:
        _request(**fields)
    error = caught.value
    assert error.status == 400 and error.param == param and param.rstrip("[]").split("_")[0] in error.message
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_accepted_fields_and_their_defaults():
    request = _request(response_format="verbose_json", language="de", prompt="Namen: Müller", temperature="0.2",
                       **{"timestamp_granularities[]": ["word", "segment", "word"]})
    assert request.timestamp_granularities == ("word", "segment") and request.needs_timestamps
    assert request.language == "de" and request.temperature == 0.2 and not request.stream
    assert _request().response_format == "json" and not _request().needs_timestamps
    assert _request(model="whisper-1").model == "whisper-1"
    with pytest.raises(api.ApiError, match="required"):
        api.TranscriptionRequest.from_form({}, (MODEL,))


TRANSCRIPT = Transcript(
    text="Hello there, world.  Again",
    words=(TimedText("Hello", 0.1, 0.4), TimedText("there,", 0.4, 0.8), TimedText("world.", 0.9, 1.3),
           TimedText("Again", 2.0, 2.4)),
    segments=(TimedText("Hello there, world.", 0.1, 1.3), TimedText("Again", 2.0, 2.4)),
    audio_seconds=2.5,
)


def test_stream_deltas_add_up_to_the_text():
    import json

    events = [json.loads(e.removeprefix("data: ")) for e in api.stream_events(TRANSCRIPT)]
    assert all(e["type"] == "transcript.text.delta" for e in events[:-1])
    assert "".join(e["delta"] for e in events[:-1]) == TRANSCRIPT.text
    assert events[-1] == {"type": "transcript.text.done", "text": TRANSCRIPT.text}
    assert [json.loads(e[6:]) for e in api.stream_events(Transcript(""))] == [
        {"type": "transcript.text.done", "text": ""}]


def test_verbose_json_carries_the_server_timings():
    request = _request(response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]})
    body = api.verbose_json(TRANSCRIPT, request, 2.5)
    assert body["task"] == "transcribe" and body["duration"] == 2.5 and body["text"] == TRANSCRIPT.text
    assert [(w["word"], w["start"], w["end"]) for w in body["words"]] == [(w.text, w.start, w.end) for w in TRANSCRIPT.words]
    assert [(s["id"], s["text"], s["start"], s["end"]) for s in body["segments"]] == [
        (i, s.text, s.start, s.end) for i, s in enumerate(TRANSCRIPT.segments)]
    assert "words" not in api.verbose_json(TRANSCRIPT, _request(response_format="verbose_json"), 2.5)


def test_every_setting_is_a_config_field():
    fields = {f.name for f in dataclasses.fields(GatewayConfig)}
    assert {s.name for s in SETTINGS} - {"api_key_file"} | {"api_key"} == fields
    assert len({s.env for s in SETTINGS}) == len(SETTINGS)
    with pytest.raises(ValueError, match="max_concurrency"):
        GatewayConfig(max_concurrency=0)


# ---------------------------------------------------------------------------- through the openai SDK

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
served = pytest.mark.skipif(not tritonserver_available(), reason="no tritonserver")


@dataclasses.dataclass
class Gateway:
    base_url: str
    grpc_url: str
    handle: object


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _wait_for(url: str, status: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _status(url) != status:
        assert time.monotonic() < deadline, f"{url} did not answer {status}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    (openai_port,) = free_ports(1)
    env = {"PARAKEET_API_KEY": API_KEY, "PARAKEET_OPENAI_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
           "PARAKEET_OPENAI_MAX_CONCURRENCY": str(MAX_CONCURRENCY)}
    handle = start_server(tmp_path_factory.mktemp("openai") / "serve.log", "--openai-port", str(openai_port), env=env)
    try:
        _wait_for(f"http://127.0.0.1:{openai_port}/health", 200)
        yield Gateway(f"http://127.0.0.1:{openai_port}/v1", handle.grpc_url, handle)
    finally:
        stop_server(handle)


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ensemble(gateway):
    """The ensemble's own answer (with timestamps) for a file, through parakeet-client over gRPC."""
    from parakeet_client.client import ParakeetClient

    cache = {}

    def transcribe(path: Path) -> Transcript:
        if path not in cache:
            with ParakeetClient(gateway.grpc_url) as client:
                cache[path] = client.transcribe(path, timestamps=True)
        return cache[path]

    return transcribe


@served
def test_models_and_health(gateway, sdk):
    assert [m.id for m in sdk.models.list().data] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    assert _status(gateway.base_url.removesuffix("/v1") + "/health") == 200


@served
def test_json_text_srt_vtt_equal_the_ensembles(sdk, ensemble):
    reference = ensemble(SPEECH)
    assert reference.text and reference.segments
    with SPEECH.open("rb") as f:
        assert sdk.audio.transcriptions.create(model=MODEL, file=f).text == reference.text
    for kind, expected in (("text", reference.text + "\n"), ("srt", formats.to_srt(reference)),
                           ("vtt", formats.to_vtt(reference))):
        with SPEECH.open("rb") as f:
            assert sdk.audio.transcriptions.create(model=MODEL, file=f, response_format=kind) == expected, kind


@served
def test_verbose_json_words_and_segments_are_the_ensembles_timestamps(sdk, ensemble):
    reference = ensemble(SPEECH)
    with SPEECH.open("rb") as f:
        verbose = sdk.audio.transcriptions.create(model=MODEL, file=f, response_format="verbose_json",
                                                  timestamp_granularities=["word", "segment"], language="en")
    assert verbose.text == reference.text and verbose.language == "en"
    assert verbose.duration == pytest.approx(soundfile.info(str(SPEECH)).duration)
    assert [(w.word, w.start, w.end) for w in verbose.words] == [(w.text, w.start, w.end) for w in reference.words]
    assert [(s.text, s.start, s.end) for s in verbose.segments] == [(s.text, s.start, s.end) for s in reference.segments]


def _encoded(tmp_path: Path, suffix: str) -> Path:
    out = tmp_path / f"speech{suffix}"
    if suffix == ".flac":
        samples, rate = soundfile.read(str(SPEECH))
        soundfile.write(str(out), samples, rate)
    else:
        if shutil.which("ffmpeg") is None:
            pytest.skip("ffmpeg is needed to write mp3")
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(SPEECH), "-b:a", "64k", str(out)],
                       check=True)
    return out


@served
@pytest.mark.parametrize("suffix", [".flac", ".mp3"])
def test_flac_and_mp3_uploads(sdk, ensemble, tmp_path, suffix):
    path = _encoded(tmp_path, suffix)
    with path.open("rb") as f:
        got = sdk.audio.transcriptions.create(model=MODEL, file=f)
    assert got.text == ensemble(path).text
    if suffix == ".flac":  # lossless: the same samples as the wav
        assert got.text == ensemble(SPEECH).text


@served
def test_concurrent_requests_through_async_openai(gateway, ensemble):
    clips = [SPEECH, FIXTURES / "audio" / "speech_de.wav", FIXTURES / "audio" / "short.wav"] * 2
    clips = clips[:MAX_CONCURRENCY]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        try:
            answers = await asyncio.gather(*(client.audio.transcriptions.create(model=MODEL, file=(p.name, p.read_bytes()))
                                             for p in clips))
        finally:
            await client.close()
        return [a.text for a in answers]

    assert asyncio.run(run()) == [ensemble(p).text for p in clips]


@served
def test_past_max_concurrency_requests_get_429_with_retry_after(gateway):
    clip = io.BytesIO()
    soundfile.write(clip, np.zeros(16000 * 20, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    payload = clip.getvalue()

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(client.audio.transcriptions.create(model=MODEL, file=("z.wav", payload))
                                          for _ in range(4 * MAX_CONCURRENCY)), return_exceptions=True)
        finally:
            await client.close()

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused and all(not isinstance(r, Exception) or isinstance(r, openai.RateLimitError) for r in results), results
    assert refused[0].response.headers["retry-after"] == "1"
    assert "--max-concurrency" in refused[0].message


@served
@pytest.mark.parametrize("name, payload, words", [
    ("corrupt.wav", b"RIFF\x00\x00\x00\x00WAVEjunk" * 50, "cannot decode"),
    ("empty.wav", b"", "empty"),
])
def test_unreadable_uploads_get_400_naming_the_file(sdk, name, payload, words):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.audio.transcriptions.create(model=MODEL, file=(name, payload))
    error = caught.value
    assert error.status_code == 400 and words in error.message and error.body["param"] == "file"


@served
def test_upload_over_the_limit_gets_413(sdk):
    with pytest.raises(openai.APIStatusError) as caught:
        sdk.audio.transcriptions.create(model=MODEL, file=("big.wav", b"\0" * ((MAX_UPLOAD_MB << 20) + 1)))
    assert caught.value.status_code == 413 and f"{MAX_UPLOAD_MB:g} MiB" in caught.value.message


@served
@pytest.mark.parametrize("key", ["sk-wrong", ""])
def test_wrong_or_missing_key_gets_401(gateway, key):
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key or "unused", max_retries=0,
                           default_headers={} if key else {"Authorization": ""})
    with pytest.raises(openai.AuthenticationError):
        with SPEECH.open("rb") as f:
            client.audio.transcriptions.create(model=MODEL, file=f)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@served
def test_streaming_events_parse_back(sdk, ensemble):
    with SPEECH.open("rb") as f:
        events = list(sdk.audio.transcriptions.create(model=MODEL, file=f, stream=True))
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert events[-1].type == "transcript.text.done" and events[-1].text == ensemble(SPEECH).text
    assert "".join(e.delta for e in events[:-1]) == ensemble(SPEECH).text


@served
def test_audio_over_the_servers_limit_is_refused_naming_it(sdk, gateway):
    clip = io.BytesIO()
    seconds = gateway.handle.max_audio_seconds + 5
    soundfile.write(clip, np.zeros(int(8000 * seconds), dtype=np.float32), 8000, format="FLAC")
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.audio.transcriptions.create(model=MODEL, file=("long.flac", clip.getvalue()))
    assert f"at most {gateway.handle.max_audio_seconds:g} s" in caught.value.message


def test_triton_unreachable_gives_503(tmp_path):
    port, triton_port = free_ports(2)
    process = subprocess.Popen([sys.executable, "-m", "parakeet_openai", "--triton-url", f"127.0.0.1:{triton_port}",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while _status(f"http://127.0.0.1:{port}/health") == 0:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert _status(f"http://127.0.0.1:{port}/health") == 503
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            with SPEECH.open("rb") as f:
                client.audio.transcriptions.create(model=MODEL, file=f)
        assert caught.value.status_code == 503 and "unavailable" in caught.value.message
    finally:
        process.terminate()
        process.wait(30)
