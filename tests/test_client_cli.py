"""parakeet-client CLI without a server: file discovery, output planning, per-file errors, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import threading
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import soundfile
from tritonclient.utils import InferenceServerException

from parakeet_client import AsyncParakeetClient, ParakeetClient, cli
from parakeet_client.errors import (ModelNotReadyError, ServerUnreachableError, not_ready_message, protocol_hint,
                                    unreachable_message)
from parakeet_triton.protocol import SAMPLE_RATE, TIMESTAMPS, TRANSCRIPTS, WAV
from parakeet_triton.server import free_loopback_ports


class EchoConnection:
    """Answers every request with the clip's length in samples, and one word/segment spanning it (its end a little
    off the exact length, as float arithmetic leaves it)."""

    model_ready = True

    def infer(self, model, inputs, outputs=None, **kwargs):
        samples = next(i for i in inputs if i.name() == WAV).shape()[1]
        seconds = samples / SAMPLE_RATE + 3e-7
        timing = json.dumps({"words": [{"text": str(samples), "start": 0.0, "end": seconds}],
                             "segments": [{"text": str(samples), "start": 0.0, "end": seconds}]})

        class Result:
            def as_numpy(self, name):
                return np.array([[{TRANSCRIPTS: str(samples), TIMESTAMPS: timing}[name].encode()]], dtype=object)

        return Result()

    def get_model_config(self, model, **kwargs):
        return {"config": {"parameters": {"max_audio_seconds": {"string_value": "1.0"}}}}

    def is_server_live(self, **kwargs):
        return True

    def is_model_ready(self, model, **kwargs):
        return self.model_ready

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


def test_output_name_is_the_full_file_name_plus_the_suffix() -> None:
    assert cli.output_name(Path("in/talk.mp4"), "srt") == "talk.mp4.srt"
    assert cli.output_name(Path("talk.wav"), "json") == "talk.wav.json"
    assert cli.output_name(Path("talk.tar.gz.wav"), "text") == "talk.tar.gz.wav.txt"


def test_a_result_name_does_not_depend_on_the_other_inputs(tmp_path: Path) -> None:
    alone = cli.plan_jobs([tmp_path / "a.wav"], [], "srt", None)
    together = cli.plan_jobs([tmp_path / "a.mp3", tmp_path / "a.wav"], [], "srt", None)
    assert alone[0].destination == together[1].destination == tmp_path / "a.wav.srt"
    assert together[0].destination == tmp_path / "a.mp3.srt"
    assert not any(job.clashes_with for job in together)


def test_plan_jobs_mirrors_directories(tmp_path: Path) -> None:
    root = tmp_path / "in"
    sources = [root / "x.wav", root / "x.mp3", root / "sub" / "y.wav"]
    jobs = cli.plan_jobs(sources, [root], "srt", tmp_path / "out")
    assert [j.destination for j in jobs] == [tmp_path / "out" / "x.wav.srt", tmp_path / "out" / "x.mp3.srt",
                                             tmp_path / "out" / "sub" / "y.wav.srt"]
    beside = cli.plan_jobs(sources[2:], [], "vtt", None, writable=lambda folder: True)
    assert beside[0].destination == root / "sub" / "y.wav.vtt"
    two_roots = cli.plan_jobs([root / "x.wav", tmp_path / "more" / "z.wav"], [root, tmp_path / "more"], "json",
                              tmp_path / "out")
    assert [j.destination for j in two_roots] == [tmp_path / "out" / "in" / "x.wav.json",
                                                  tmp_path / "out" / "more" / "z.wav.json"]


def test_stdout_jobs_have_no_destination(tmp_path: Path) -> None:
    jobs = cli.plan_jobs([tmp_path / "a.wav", tmp_path / "b.wav"], [], "json", None, to_stdout=True)
    assert [j.destination for j in jobs] == [None, None]


def test_same_name_from_two_folders_clashes_under_one_output_dir(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "z.wav", tmp_path / "b" / "z.wav"
    jobs = cli.plan_jobs([first, second], [], "json", tmp_path / "out")
    assert jobs[0].clashes_with is None and jobs[0].destination == tmp_path / "out" / "z.wav.json"
    assert jobs[1].clashes_with == first and jobs[1].destination == jobs[0].destination


@pytest.mark.parametrize("format, output_dir, single_file, expected", [
    ("text", None, False, True),
    ("json", None, True, True),
    ("json", None, False, False),
    ("srt", None, True, False),
    ("vtt", None, True, False),
    ("srt", cli.STDOUT, False, True),
    ("json", cli.STDOUT, False, True),
    ("text", Path("out"), True, False),
    ("json", Path("out"), True, False),
])
def test_results_to_stdout(format: str, output_dir: Path | None, single_file: bool, expected: bool) -> None:
    assert cli.results_to_stdout(format, output_dir, single_file) is expected


def test_unwritable_folder_falls_back_to_another_folder(tmp_path: Path) -> None:
    locked, fallback = tmp_path / "locked", tmp_path / "cwd"
    jobs = cli.plan_jobs([locked / "a.wav", tmp_path / "b.wav"], [], "srt", None,
                         writable=lambda folder: folder != locked, fallback_dir=fallback)
    assert jobs[0].destination == fallback / "a.wav.srt" and jobs[0].moved_from == locked
    assert jobs[1].destination == tmp_path / "b.wav.srt" and jobs[1].moved_from is None
    assert cli.moved_results_notices(jobs) == [f"cannot write in {locked} (not writable): its results go to "
                                               f"{fallback} instead"]
    nowhere = cli.plan_jobs([locked / "a.wav"], [], "srt", None, writable=lambda folder: False,
                            fallback_dir=fallback)
    assert nowhere[0].destination == locked / "a.wav.srt"  # fails when written, naming the path


def test_is_writable_dir(tmp_path: Path) -> None:
    assert cli.is_writable_dir(tmp_path)
    assert not cli.is_writable_dir(tmp_path / "absent")


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
        f"a.wav{suffix}", f"sub/b.flac{suffix}"]
    if fmt == "json":
        assert json.loads((out / "a.wav.json").read_text())["words"][0] == {"text": "8000", "start": 0.0, "end": 0.5}


def test_subtitles_beside_inputs_by_default(media: Path, fake_server: None, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), "--format", "srt", "--no-progress"]) == 0
    assert (media / "a.wav.srt").read_text().startswith("1\n00:00:00,000 --> 00:00:00,500\n8000")
    assert "wrote 1 srt file next to the input" in capsys.readouterr().err


def test_json_of_one_file_goes_to_stdout_with_millisecond_times(media: Path, fake_server: None,
                                                                capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), "--format", "json", "--no-progress"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {"text": "8000", "words": [{"text": "8000", "start": 0.0, "end": 0.5}],
                        "segments": [{"text": "8000", "start": 0.0, "end": 0.5}]}
    assert not list(media.glob("*.json"))


def test_json_of_a_folder_is_written_beside_the_inputs(media: Path, fake_server: None) -> None:
    assert cli.main([str(media), "--format", "json", "--no-progress"]) == 1
    assert json.loads((media / "sub" / "b.flac.json").read_text())["text"] == "4000"


def test_output_dir_dash_writes_json_lines_to_stdout(media: Path, fake_server: None,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), str(media / "sub" / "b.flac"), "--format", "json", "--output-dir", "-",
                     "--no-progress"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["file"], r["text"], r["words"][0]["end"]) for r in records] == [
        (str(media / "a.wav"), "8000", 0.5), (str(media / "sub" / "b.flac"), "4000", 0.25)]
    assert not list(media.rglob("*.json"))


def test_output_dir_dash_prints_subtitles(media: Path, fake_server: None, capsys: pytest.CaptureFixture) -> None:
    assert cli.main([str(media / "a.wav"), "--format", "vtt", "--output-dir", "-", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.500\n8000")
    assert not list(media.glob("*.vtt"))


def test_read_only_input_folder_writes_to_the_current_directory(
        media: Path, tmp_path: Path, fake_server: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    locked = media / "sub"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    real_access = os.access

    def access_as_a_user(path, mode):  # root passes os.access on a 0555 folder: answer as its mode bits say
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode)

    locked.chmod(0o555)
    try:
        monkeypatch.setattr(cli.os, "access", access_as_a_user)
        assert cli.main([str(media / "a.wav"), str(locked / "b.flac"), "--format", "srt", "--no-progress"]) == 0
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write in {locked} (not writable): its results go to {cwd} instead" in err
    assert (cwd / "b.flac.srt").exists() and not (locked / "b.flac.srt").exists()
    assert (media / "a.wav.srt").exists()
    assert "wrote 2 srt files next to the inputs or in the current directory" in err


def test_clashing_input_is_skipped_and_counted(tmp_path: Path, fake_server: None,
                                               capsys: pytest.CaptureFixture) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        soundfile.write(tmp_path / folder / "z.wav", np.zeros(1600, dtype=np.float32), SAMPLE_RATE)
    out = tmp_path / "out"
    code = cli.main([str(tmp_path / "x" / "z.wav"), str(tmp_path / "y" / "z.wav"), "--format", "srt",
                     "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_SOME_FAILED
    assert f"{tmp_path / 'y' / 'z.wav'}: skipped: its result {out / 'z.wav.srt'} would overwrite that of " \
           f"{tmp_path / 'x' / 'z.wav'}" in err
    assert "1 of 2 files failed" in err and (out / "z.wav.srt").exists()


def test_nothing_listening_says_connection_refused(media: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_loopback_ports(1)[0]
    assert cli.main([str(media / "a.wav"), "--url", f"127.0.0.1:{port}", "--no-progress"]) == cli.EXIT_SOME_FAILED
    err = capsys.readouterr().err
    assert f"error: connection refused at 127.0.0.1:{port} (grpc)" in err
    assert "use --protocol" not in err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_says_connection_refused(protocol: str) -> None:
    port = free_loopback_ports(1)[0]

    async def check() -> None:
        async with AsyncParakeetClient(f"127.0.0.1:{port}", protocol=protocol, timeout=10) as client:
            await client.check_ready()

    with pytest.raises(ServerUnreachableError, match=f"^connection refused at 127.0.0.1:{port} \\({protocol}\\)$"):
        asyncio.run(check())


def test_model_not_ready_is_told_apart(media: Path, fake_server: None, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(EchoConnection, "model_ready", False)
    assert cli.main([str(media / "a.wav"), "--no-progress"]) == cli.EXIT_SOME_FAILED
    assert "is up, but model 'parakeet' is not ready" in capsys.readouterr().err
    with FakeClient() as client, pytest.raises(ModelNotReadyError):
        client.check_ready()


def test_grpc_to_an_http_port_suggests_protocol_http(media: Path, capsys: pytest.CaptureFixture) -> None:
    port = free_loopback_ports(1)[0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert cli.main([str(media / "a.wav"), "--url", f"127.0.0.1:{port}", "--no-progress"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert f"at 127.0.0.1:{port} (grpc); is this the HTTP port? use --protocol http" in capsys.readouterr().err


def test_http_to_a_grpc_port_suggests_protocol_grpc() -> None:
    grpc = pytest.importorskip("grpc")
    port = free_loopback_ports(1)[0]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with ParakeetClient(f"127.0.0.1:{port}", protocol="http", timeout=10) as client, \
                pytest.raises(ServerUnreachableError) as error:
            client.check_ready()
    finally:
        server.stop(None)
    assert str(error.value).endswith(f"at 127.0.0.1:{port} (http); is this the gRPC port? use --protocol grpc")


@pytest.mark.parametrize("error, url, protocol, expected", [
    (InferenceServerException("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8001: "
                              "Failed to connect to remote host: Connection refused", status="StatusCode.UNAVAILABLE"),
     "127.0.0.1:8001", "grpc", "connection refused at 127.0.0.1:8001 (grpc)"),
    (ConnectionRefusedError(111, "Connection refused"), "127.0.0.1:8001", "http",
     "connection refused at 127.0.0.1:8001 (http); is this the gRPC port? use --protocol grpc"),
    (ConnectionRefusedError(111, "Connection refused"), "127.0.0.1:8000", "grpc",
     "connection refused at 127.0.0.1:8000 (grpc); is this the HTTP port? use --protocol http"),
    (InferenceServerException("failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:9000: "
                              "Failed parsing HTTP/2 (Expected SETTINGS frame as the first frame, got frame type 79)",
                              status="StatusCode.UNAVAILABLE"),
     "127.0.0.1:9000", "grpc",
     "no gRPC answer (the port speaks HTTP/1.x) at 127.0.0.1:9000 (grpc); is this the HTTP port? use --protocol http"),
    (InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"), "10.0.0.5:8001", "grpc",
     "no answer in time at 10.0.0.5:8001 (grpc)"),
    (OSError("something odd"), "h:1", "http", "cannot connect (something odd) at h:1 (http)"),
])
def test_unreachable_message(error: BaseException, url: str, protocol: str, expected: str) -> None:
    assert unreachable_message(error, url, protocol) == expected


def test_protocol_hint_and_not_ready_message() -> None:
    assert protocol_hint("localhost:8001", "grpc") is None
    assert protocol_hint("localhost:8000", "http") is None
    assert protocol_hint("localhost:9999", "http", spoke_other_protocol=True) == \
        "is this the gRPC port? use --protocol grpc"
    assert not_ready_message("parakeet", "h:8001", "grpc") == (
        "the server at h:8001 (grpc) is up, but model 'parakeet' is not ready (still loading, or it failed to load: "
        "see the server's log)")


def test_every_option_states_its_default() -> None:
    options = [action for action in cli.build_parser()._actions if action.option_strings and action.dest != "help"]
    assert options and all("(default: " in (action.help or "") for action in options), [
        action.dest for action in options if "(default: " not in (action.help or "")]
    assert "talk.mp4 -> talk.mp4.srt" in cli.build_parser().format_help()


def test_bad_arguments_exit_2(media: Path) -> None:
    for arguments in (["--concurrency", "0"], ["--format", "docx"], ["--protocol", "smtp"], ["--retries", "-1"],
                      ["--timeout", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(media / "a.wav"), *arguments])
        assert exit_info.value.code == 2


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
