"""`python -m parakeet_core` like the client: directories expanded to media files, a bad file reported by name while
the others are transcribed, a non-zero exit when any failed, and a plain message for a file without audio."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile

import parakeet_core.__main__ as core_cli
from core_fixtures import AUDIO, load_fixture, load_model
from parakeet_client import audio as client_audio
from parakeet_client.audio import MEDIA_SUFFIXES
from parakeet_core import InvalidAudioError, load_audio

NAME = "v3_small"
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not on PATH")


@pytest.fixture
def fixture_model(monkeypatch: pytest.MonkeyPatch):
    """The CLI loads the (cached) fixture model instead of reading the checkpoint again."""
    model = load_model(NAME)
    monkeypatch.setattr(core_cli, "from_pretrained", lambda *args, **kwargs: model)
    return model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """in/speech_en.wav, in/sub/short.wav, in/broken.wav (corrupt) and in/notes.txt (not media)."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    shutil.copy(AUDIO / "speech_en.wav", root / "speech_en.wav")
    shutil.copy(AUDIO / "short.wav", root / "sub" / "short.wav")
    (root / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    (root / "notes.txt").write_text("not media")
    return root


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[dict], str]:
    code = core_cli.main([*args, "--checkpoint", "unused", "--device", "cpu", "--json", "--timestamps"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_directory_is_expanded_and_bad_files_do_not_stop_the_others(
        fixture_model, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.wav"
    code, records, err = run(capsys, str(folder), str(missing), "--batch-size", "2")
    assert code == 1
    assert [r["file"] for r in records] == [str(folder / "speech_en.wav"), str(folder / "sub" / "short.wav")]
    expected = load_fixture(NAME).reference["clips"]["speech_en"]["text"]
    assert records[0]["text"] == expected
    assert f"error: {folder / 'broken.wav'}: " in err
    assert f"error: {missing}: no such file" in err
    assert "notes.txt" not in err and len(err.strip().splitlines()) == 2


def test_json_times_are_rounded_to_milliseconds(fixture_model, capsys: pytest.CaptureFixture) -> None:
    code, records, _ = run(capsys, str(AUDIO / "speech_en.wav"))
    assert code == 0
    times = [item[key] for item in records[0]["words"] + records[0]["segments"] for key in ("start", "end")]
    assert times and all(value == round(value, 3) for value in times)


@needs_ffmpeg
def test_file_without_audio_says_so(fixture_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    video = tmp_path / "silent.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:d=1",
                    "-c:v", "libx264", str(video)], check=True, timeout=60)
    code, records, err = run(capsys, str(video), str(AUDIO / "short.wav"))
    assert code == 1
    assert [r["file"] for r in records] == [str(AUDIO / "short.wav")]
    assert err.strip() == f"error: no audio stream in {video}"
    with pytest.raises(InvalidAudioError, match="^no audio stream in .*silent.mp4$"):
        load_audio(video, 16000)


def test_empty_directory_counts_as_a_failure(fixture_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code, records, err = run(capsys, str(tmp_path / "empty"), str(AUDIO / "short.wav"))
    assert code == 1 and len(records) == 1
    assert f"{tmp_path / 'empty'}: no media files in this directory" in err


def test_expand_inputs_uses_the_clients_media_list(folder: Path) -> None:
    assert core_cli.MEDIA_SUFFIXES is MEDIA_SUFFIXES
    reported: list[str] = []
    found = list(core_cli.expand_inputs([str(folder), "given.xyz"], MEDIA_SUFFIXES, reported.append))
    assert found == [str(folder / "broken.wav"), str(folder / "speech_en.wav"), str(folder / "sub" / "short.wav"),
                     "given.xyz"]
    assert reported == []


@pytest.mark.parametrize("ffmpeg_output, expected", [
    ("Stream map '0:a:0' matches no streams.\nTo ignore this, add a trailing '?' to the map.",
     "no audio stream in {path}"),
    ("Output file #0 does not contain any stream", "no audio stream in {path}"),
    ("{path}: Invalid data found when processing input",
     "{path}: cannot read this file: not audio or video that soundfile or ffmpeg recognise, or damaged "
     "(soundfile: Format not recognised; ffmpeg: {path}: Invalid data found when processing input)"),
    ("", "{path}: cannot read this file (soundfile: Format not recognised; ffmpeg: exit code 1)"),
])
def test_ffmpeg_failure_messages(ffmpeg_output: str, expected: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A file neither decoder reads: parakeet_core raises InvalidAudioError with parakeet_client's message."""
    path = tmp_path / "v.mp4"
    path.write_bytes(bytes(64))

    def soundfile_refuses(*args, **kwargs):
        raise RuntimeError("Format not recognised")

    def ffmpeg_fails(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, b"", ffmpeg_output.format(path=path).encode())

    monkeypatch.setattr(client_audio.soundfile, "read", soundfile_refuses)
    monkeypatch.setattr(client_audio.shutil, "which", lambda name: "/usr/bin/ffmpeg")
    monkeypatch.setattr(client_audio.subprocess, "run", ffmpeg_fails)
    with pytest.raises(InvalidAudioError) as error:
        load_audio(path, 16000)
    assert str(error.value) == expected.format(path=path)


def test_too_short_clip_is_reported_by_name(fixture_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny = tmp_path / "tiny.wav"
    soundfile.write(tiny, np.zeros(10, dtype=np.float32), 16000)
    code, records, err = run(capsys, str(tiny), str(AUDIO / "short.wav"))
    assert code == 1 and len(records) == 1
    assert f"error: {tiny}: too short" in err
