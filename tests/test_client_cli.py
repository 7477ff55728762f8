"""parakeet-client CLI without a server: file discovery, output planning, per-file errors, exit codes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from parakeet_client import ParakeetClient, cli
from parakeet_triton.protocol import SAMPLE_RATE, TIMESTAMPS, TRANSCRIPTS, WAV


class EchoConnection:
    """Answers every request with the clip's length in samples, and one word/segment spanning it."""

    def infer(self, model, inputs, outputs=None, **kwargs):
        samples = next(i for i in inputs if i.name() == WAV).shape()[1]
        seconds = samples / SAMPLE_RATE
        timing = json.dumps({"words": [{"text": str(samples), "start": 0.0, "end": seconds}],
                             "segments": [{"text": str(samples), "start": 0.0, "end": seconds}]})

        class Result:
            def as_numpy(self, name):
                return np.array([[{TRANSCRIPTS: str(samples), TIMESTAMPS: timing}[name].encode()]], dtype=object)

        return Result()

    def get_model_config(self, model, **kwargs):
        return {"config": {"parameters": {"max_audio_seconds": {"string_value": "1.0"}}}}

    def is_model_ready(self, model, **kwargs):
        return True

    def close(self):
        pass


class FakeClient(ParakeetClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        connection = EchoConnection()
        self._connection = lambda: contextlib.nullcontext(connection)  # type: ignore[method-assign]


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """in/a.wav (0.5 s), in/sub/b.flac (0.25 s), in/c.wav (corrupt), in/notes.txt, in/long.wav (2 s > limit)."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    soundfile.write(root / "a.wav", np.zeros(8000, dtype=np.float32), SAMPLE_RATE)
    soundfile.write(root / "sub" / "b.flac", np.zeros(4000, dtype=np.float32), SAMPLE_RATE)
    soundfile.write(root / "long.wav", np.zeros(32000, dtype=np.float32), SAMPLE_RATE)
    (root / "c.wav").write_bytes(b"not audio at all" * 10)
    (root / "notes.txt").write_text("not media")
    return root


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "ParakeetClient", FakeClient)


def test_find_media_recurses_and_filters(media: Path) -> None:
    found = cli.find_media([str(media), str(media / "a.wav"), str(media / "notes.txt")])
    names = [p.name for p in found]
    assert names == ["a.wav", "c.wav", "long.wav", "b.flac", "notes.txt"]  # sorted walk, duplicate dropped


def test_missing_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(tmp_path / "absent.wav")]) == cli.EXIT_USAGE
    assert "absent.wav: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main([str(tmp_path / "empty")]) == cli.EXIT_USAGE


def test_plan_jobs_mirrors_directories_and_resolves_clashes(tmp_path: Path) -> None:
    root = tmp_path / "in"
    sources = [root / "x.wav", root / "x.mp3", root / "sub" / "y.wav"]
    jobs = cli.plan_jobs(sources, [root], "srt", tmp_path / "out")
    assert [j.destination for j in jobs] == [tmp_path / "out" / "x.wav.srt", tmp_path / "out" / "x.mp3.srt",
                                             tmp_path / "out" / "sub" / "y.srt"]
    beside = cli.plan_jobs(sources[2:], [], "vtt", None)
    assert beside[0].destination == root / "sub" / "y.vtt"
    assert cli.plan_jobs(sources, [root], "text", None)[0].destination is None
    twice = cli.plan_jobs([root / "a" / "z.wav", root / "b" / "z.wav"], [], "json", tmp_path / "out")
    assert [j.destination.name for j in twice] == ["z.wav.json", "z.wav.1.json"]


def test_text_to_stdout_in_input_order_with_per_file_errors(media: Path, fake_server: None,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = cli.main([str(media), "--concurrency", "3", "--no-progress"])
    captured = capsys.readouterr()
    assert code == cli.EXIT_SOME_FAILED
    assert captured.out.splitlines() == [f"{media / 'a.wav'}: 8000", f"{media / 'sub' / 'b.flac'}: 4000"]
    assert "c.wav: cannot read this file" in captured.err
    assert "long.wav is 2.0 s long; the server accepts at most 1 s" in captured.err
    assert "2 of 4 files failed" in captured.err


def test_single_file_prints_just_the_text(media: Path, fake_server: None, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), "--no-progress"]) == cli.EXIT_OK
    assert capsys.readouterr().out == "8000\n"


@pytest.mark.parametrize("fmt", ["json", "srt", "vtt", "text"])
def test_output_dir_files(media: Path, tmp_path: Path, fake_server: None, fmt: str) -> None:
    out = tmp_path / "out"
    assert cli.main([str(media), "--format", fmt, "--output-dir", str(out), "--no-progress"]) == 1
    suffix = {"text": ".txt"}.get(fmt, f".{fmt}")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        f"a{suffix}", f"sub/b{suffix}"]
    if fmt == "json":
        assert json.loads((out / "a.json").read_text())["words"][0] == {"text": "8000", "start": 0.0, "end": 0.5}


def test_subtitles_beside_inputs_by_default(media: Path, fake_server: None, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), "--format", "srt", "--no-progress"]) == 0
    assert (media / "a.srt").read_text().startswith("1\n00:00:00,000 --> 00:00:00,500\n8000")
    assert "wrote 1 srt file next to the input" in capsys.readouterr().err


def test_unreachable_server_fails_fast(media: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), "--url", "127.0.0.1:1", "--no-progress"]) == cli.EXIT_SOME_FAILED
    assert "no ready 'parakeet' model at 127.0.0.1:1" in capsys.readouterr().err


def test_bad_arguments_exit_2(media: Path) -> None:
    for arguments in (["--concurrency", "0"], ["--format", "docx"], ["--protocol", "smtp"], ["--retries", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(media / "a.wav"), *arguments])
        assert exit_info.value.code == 2
