"""The client library and CLI against the real server of the test session (`triton_server` in conftest)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import srt
import webvtt

from parakeet_client import (AsyncParakeetClient, AudioTooLongError, ParakeetClient, RetryPolicy,
                             ServerRejectedError, ServerUnavailableError)
from parakeet_triton.protocol import SAMPLE_RATE

AUDIO = Path(__file__).resolve().parent / "fixtures" / "audio"
SPEECH_EN = AUDIO / "speech_en.wav"
SHORT_CLIPS = [AUDIO / name for name in ("speech_en.wav", "speech_de.wav", "noise.wav", "silence.wav", "short.wav")]
PROTOCOLS = ("grpc", "http")


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def run_cli(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parakeet_client.cli", *arguments], capture_output=True, text=True,
                          timeout=timeout)


def words_of(text: str) -> list[str]:
    return text.split()


@pytest.fixture(scope="module")
def reference_texts(triton_server) -> dict[str, str]:
    """Each short clip transcribed one at a time (concurrency 1), the reference for the other tests."""
    with ParakeetClient(triton_server.grpc_url) as client:
        return {path.name: client.transcribe(path).text for path in SHORT_CLIPS}


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory) -> Path:
    """Several formats of the fixture speech, a video, a corrupt file and a non-media file."""
    folder = tmp_path_factory.mktemp("media")
    shutil.copy(SPEECH_EN, folder / "speech_en.wav")
    (folder / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    (folder / "README.txt").write_text("not media, skipped when a folder is given")
    if shutil.which("ffmpeg"):
        encode = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
        subprocess.run([*encode, "-i", str(AUDIO / "speech_de.wav"), "-ar", "44100", "-ac", "2", "-c:a", "libmp3lame",
                        str(folder / "speech_de.mp3")], check=True, timeout=60)
        (folder / "nested").mkdir()
        subprocess.run([*encode, "-i", str(SPEECH_EN), "-c:a", "aac", str(folder / "nested" / "speech_en.m4a")],
                       check=True, timeout=60)
        subprocess.run([*encode, "-i", str(AUDIO / "noise.wav"), "-c:a", "libopus", str(folder / "noise.opus")],
                       check=True, timeout=60)
        subprocess.run([*encode, "-f", "lavfi", "-i", "color=c=black:s=32x32:d=5", "-i", str(SPEECH_EN), "-shortest",
                        "-c:v", "libx264", "-c:a", "aac", str(folder / "talk.mp4")], check=True, timeout=60)
    else:
        import soundfile

        samples, rate = soundfile.read(AUDIO / "speech_de.wav")
        soundfile.write(folder / "speech_de.flac", samples, rate)
        soundfile.write(folder / "speech_de.ogg", samples, rate)
    return folder


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrency_gives_the_same_transcripts(triton_server, reference_texts, protocol: str) -> None:
    with ParakeetClient(url_of(triton_server, protocol), protocol=protocol) as client:
        serial = client.transcribe(SHORT_CLIPS, concurrency=1, timestamps=True)
        parallel = client.transcribe(SHORT_CLIPS * 2, concurrency=4, timestamps=True)
    assert [t.text for t in serial] == [reference_texts[p.name] for p in SHORT_CLIPS]
    assert [t.text for t in parallel] == [t.text for t in serial] * 2
    assert [t.words for t in parallel[: len(serial)]] == [t.words for t in serial]
    assert [t.segments for t in parallel[len(serial):]] == [t.segments for t in serial]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_client_matches(triton_server, reference_texts, protocol: str) -> None:
    async def transcribe_all():
        async with AsyncParakeetClient(url_of(triton_server, protocol), protocol=protocol) as client:
            assert await client.is_ready()
            assert await client.max_audio_seconds() == triton_server.max_audio_seconds
            return await client.transcribe(SHORT_CLIPS, concurrency=3)

    assert [t.text for t in asyncio.run(transcribe_all())] == [reference_texts[p.name] for p in SHORT_CLIPS]


def test_inputs_of_every_kind_agree(triton_server, reference_texts) -> None:
    import soundfile

    samples, rate = soundfile.read(SPEECH_EN, dtype="float32")
    assert rate == SAMPLE_RATE
    with ParakeetClient(triton_server.grpc_url) as client:
        by_path = client.transcribe(str(SPEECH_EN))
        by_array = client.transcribe(samples)
        by_pair = client.transcribe((samples, SAMPLE_RATE))
    assert by_path.text == by_array.text == by_pair.text == reference_texts[SPEECH_EN.name]
    assert by_path.audio_seconds == pytest.approx(samples.size / SAMPLE_RATE)


def test_timestamps_lie_within_the_clip(triton_server) -> None:
    with ParakeetClient(triton_server.grpc_url) as client:
        transcript = client.transcribe(SPEECH_EN, timestamps=True)
    assert transcript.words and transcript.segments
    assert words_of(" ".join(w.text for w in transcript.words)) == words_of(transcript.text)
    # A word ends where its last token's duration (up to 4 encoder frames of 80 ms) ends, which may be past the
    # last sample, as in NeMo.
    assert all(0 <= w.start <= w.end <= transcript.audio_seconds + 0.4 for w in transcript.words)


def test_too_long_is_refused_with_the_limit(triton_server) -> None:
    too_long = np.zeros(int((triton_server.max_audio_seconds + 1) * SAMPLE_RATE), dtype=np.float32)
    with ParakeetClient(triton_server.grpc_url) as client:
        assert client.max_audio_seconds == triton_server.max_audio_seconds
        with pytest.raises(AudioTooLongError, match=f"at most {triton_server.max_audio_seconds:g} s"):
            client.transcribe(too_long)


def test_server_rejection_is_not_retried(triton_server) -> None:
    """Skipping the client's own length check, the server's rejection arrives as ServerRejectedError at once."""
    too_long = np.zeros(int((triton_server.max_audio_seconds + 1) * SAMPLE_RATE), dtype=np.float32)
    with ParakeetClient(triton_server.grpc_url, retry=RetryPolicy(attempts=5, initial_backoff=5.0,
                                                                  max_backoff=5.0)) as client:
        client._limit_known, client._max_audio_seconds = True, None
        with pytest.raises(ServerRejectedError, match="too long"):
            client.transcribe(too_long)


def test_cli_on_a_folder_of_formats_with_a_corrupt_file(triton_server, media_folder, reference_texts,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "json"
    completed = run_cli(str(media_folder), "--url", triton_server.grpc_url, "--concurrency", "3", "--format", "json",
                        "--output-dir", str(out), "--no-progress")
    assert completed.returncode == 1, completed.stderr
    assert "broken.wav: cannot read this file" in completed.stderr
    assert "1 of" in completed.stderr and "failed" in completed.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    media = sorted(p for p in media_folder.rglob("*") if p.is_file() and p.suffix not in (".txt",)
                   and p.name != "broken.wav")
    assert len(written) == len(media)
    document = json.loads((out / "speech_en.wav.json").read_text())
    assert set(document) == {"text", "words", "segments"}
    assert document["text"] == reference_texts["speech_en.wav"]
    assert document["words"] and document["segments"]


def test_cli_text_to_stdout(triton_server, reference_texts) -> None:
    completed = run_cli(str(SPEECH_EN), "--url", triton_server.http_url, "--protocol", "http")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == reference_texts["speech_en.wav"] + "\n"


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse_back(triton_server, reference_texts, tmp_path: Path, fmt: str) -> None:
    completed = run_cli(str(SPEECH_EN), str(AUDIO / "speech_de.wav"), "--url", triton_server.grpc_url,
                        "--format", fmt, "--output-dir", str(tmp_path))
    assert completed.returncode == 0, completed.stderr
    for name in ("speech_en", "speech_de"):
        content = (tmp_path / f"{name}.wav.{fmt}").read_text(encoding="utf-8")
        if fmt == "srt":
            cues = [(s.start.total_seconds(), s.end.total_seconds(), s.content) for s in srt.parse(content)]
        else:
            cues = [(c.start_in_seconds, c.end_in_seconds, c.text) for c in webvtt.from_string(content).captions]
        assert cues
        assert words_of(" ".join(text for _, _, text in cues)) == words_of(reference_texts[f"{name}.wav"])
        assert all(start < end for start, end, _ in cues)
        assert all(a[1] <= b[0] + 1e-3 for a, b in zip(cues, cues[1:]))


def test_console_script_when_installed(triton_server) -> None:
    script = shutil.which("parakeet-client") or str(Path(sys.executable).parent / "parakeet-client")
    if not Path(script).exists():
        pytest.skip("parakeet-client console script not installed in this environment")
    completed = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0 and "--concurrency" in completed.stdout


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deadline_errors_are_retried_then_reported(triton_server, protocol: str) -> None:
    with ParakeetClient(url_of(triton_server, protocol), protocol=protocol, timeout=0.005,
                        retry=RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.01)) as client:
        client._limit_known = True  # the config lookup would time out too
        with pytest.raises(ServerUnavailableError, match="deadline exceeded") as error:
            client.transcribe(SPEECH_EN)
    assert error.value.attempts == 2
