"""The streaming model (`parakeet-serve --streaming`) through a real tritonserver: Triton's sequence batcher, one
request per piece, results exactly those of parakeet_core's in-process streaming (docs/streaming.md, "Serving")."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

import parakeet_core
from parakeet_triton import protocol

from conftest import FIXTURES, start_server, stop_server, tritonserver_available

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

CLIENTS = {"grpc": grpcclient, "http": httpclient}
SETTINGS = {"10-2-2": (10.0, 2.0, 2.0), "2-0.5-0.5": (2.0, 0.5, 0.5)}
IDLE_TIMEOUT_S = 3.0  # of the 2-0.5-0.5 server
PIECE_SIZES = [0, 1, 1280, 4000, 8000, 16000, 40000]


@pytest.fixture(scope="module")
def model():
    return parakeet_core.from_pretrained(str(FIXTURES / "v3_small" / "v3_small.nemo"), device="cpu")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{setting: server}: 10-2-2 (the defaults) and 2-0.5-0.5 with a short idle timeout and a long batching wait."""
    if not tritonserver_available():
        pytest.skip("no tritonserver: install nvidia-pytriton (the `serve` extra)")
    folder = tmp_path_factory.mktemp("streaming")
    handles = {}
    try:
        handles["10-2-2"] = start_server(folder / "default.log", "--streaming")
        handles["2-0.5-0.5"] = start_server(
            folder / "short.log", "--streaming", "--streaming-contexts", "2,0.5,0.5",
            "--streaming-idle-timeout-s", str(IDLE_TIMEOUT_S), "--streaming-max-queue-delay-us", "20000",
            "--streaming-model-aliases", "streaming_wenet,live")
        yield handles
    finally:
        for handle in handles.values():
            stop_server(handle)


def clip(name: str) -> np.ndarray:
    return soundfile.read(FIXTURES / "audio" / f"{name}.wav", dtype="float32")[0]


def random_pieces(samples: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    pieces, position = [], 0
    while position < len(samples):
        size = int(rng.choice(PIECE_SIZES))
        pieces.append(samples[position:position + size])
        position += size
    return pieces + [samples[:0]]  # the last request carries no audio, as a client that stops talking sends


def send_piece(client, module, model: str, piece: np.ndarray, sequence_id, *, start: bool, end: bool,
               lens: bool = False):
    inputs = [module.InferInput(protocol.WAV, [1, len(piece)], "FP32")]
    inputs[0].set_data_from_numpy(piece.reshape(1, -1).astype(np.float32))
    if lens:
        inputs.append(module.InferInput(protocol.WAV_LENS, [1, 1], "INT32"))
        inputs[1].set_data_from_numpy(np.array([[len(piece)]], dtype=np.int32))
    result = client.infer(model, inputs, sequence_id=sequence_id, sequence_start=start, sequence_end=end)
    text = result.as_numpy(protocol.TRANSCRIPTS)
    timestamps = result.as_numpy(protocol.TIMESTAMPS)
    assert text.shape == timestamps.shape == (1,)
    return text[0].decode(), timestamps[0].decode()


def stream_through(server, protocol_name: str, pieces, sequence_id, model: str = protocol.STREAMING_MODEL):
    """Send the pieces as one stream; (texts after each piece, the final TIMESTAMPS JSON)."""
    module = CLIENTS[protocol_name]
    client = module.InferenceServerClient(server.grpc_url if protocol_name == "grpc" else server.http_url)
    try:
        answers = [send_piece(client, module, model, piece, sequence_id, start=index == 0,
                              end=index == len(pieces) - 1, lens=index % 2 == 1)
                   for index, piece in enumerate(pieces)]
    finally:
        client.close()
    assert all(timestamps == "" for _, timestamps in answers[:-1])
    return [text for text, _ in answers], json.loads(answers[-1][1])


def in_process(model, setting: str, pieces):
    """What parakeet_core gives for the same pieces: (texts after each piece, final transcript)."""
    left, chunk, right = SETTINGS[setting]
    session = model.stream(left_seconds=left, chunk_seconds=chunk, right_seconds=right)
    texts = [session.feed(piece).text for piece in pieces[:-1]]
    session.feed(pieces[-1])
    transcript = session.finish()
    return texts + [transcript.text], transcript


def assert_final_equal(final: dict, transcript) -> None:
    assert final["token_ids"] == transcript.token_ids
    assert final["token_frames"] == transcript.token_frames
    assert final["token_durations"] == transcript.token_durations
    assert {"words": final["words"], "segments": final["segments"]} == transcript.timestamps_dict()


def batch_sizes(server) -> dict[int, int]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        stats = client.get_inference_statistics(protocol.STREAMING_MODEL, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return {int(entry["batch_size"]): int(entry["compute_infer"].get("count", 0)) for entry in stats.get("batch_stats", [])}


@pytest.mark.parametrize("protocol_name", ["grpc", "http"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_streamed_through_the_server_equals_in_process(servers, model, setting, protocol_name):
    for seed, name in enumerate(("speech_en", "long", "short")):
        pieces = random_pieces(clip(name), seed)
        texts, final = stream_through(servers[setting], protocol_name, pieces, 1000 + seed)
        expected_texts, transcript = in_process(model, setting, pieces)
        assert texts == expected_texts, name
        assert_final_equal(final, transcript)
        whole = model.transcribe(clip(name), streaming=SETTINGS[setting], timestamps=True)
        assert texts[-1] == whole.text and final["token_ids"] == whole.token_ids


def test_concurrent_streams_are_batched_and_each_equals_in_process(servers, model):
    server = servers["2-0.5-0.5"]
    names = ["long", "speech_en", "speech_de", "noise", "long"]
    before = batch_sizes(server)
    results: dict[int, tuple] = {}

    def run(index: int) -> None:
        pieces = [clip(names[index])[i:i + 8000] for i in range(0, len(clip(names[index])), 8000)]
        results[index] = (stream_through(server, "grpc", pieces, f"stream-{index}"), in_process(model, "2-0.5-0.5", pieces))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(names))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert sorted(results) == list(range(len(names)))
    for (texts, final), (expected_texts, transcript) in results.values():
        assert texts == expected_texts
        assert_final_equal(final, transcript)
    after = batch_sizes(server)
    grown = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    assert any(size > 1 and count > 0 for size, count in grown.items()), grown


def test_end_frees_the_stream_and_start_replaces_an_open_one(servers):
    server = servers["2-0.5-0.5"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    piece = clip("speech_en")[:8000]
    try:
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 77, start=True, end=False)
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 77, start=False, end=True)
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 77, start=True, end=False)
        assert "sequence 77 started again" not in server.log()  # END freed the first stream
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 77, start=True, end=False)
        deadline = time.monotonic() + 10
        while "sequence 77 started again" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "sequence 77 started again; its earlier stream is dropped" in server.log()
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 77, start=False, end=True)
        with pytest.raises(InferenceServerException, match="START"):  # ended: a piece without START is refused
            send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 77, start=False, end=False)
    finally:
        client.close()


def test_a_piece_of_an_unknown_stream_without_start_is_refused(servers):
    client = grpcclient.InferenceServerClient(servers["2-0.5-0.5"].grpc_url)
    try:
        for sequence_id in (123456, "never-started"):
            with pytest.raises(InferenceServerException, match="must specify the START flag"):
                send_piece(client, grpcclient, protocol.STREAMING_MODEL, clip("short"), sequence_id,
                           start=False, end=False)
        with pytest.raises(InferenceServerException, match="correlation ID"):
            send_piece(client, grpcclient, protocol.STREAMING_MODEL, clip("short"), 0, start=False, end=False)
    finally:
        client.close()


def test_bad_audio_is_refused_and_neither_its_stream_nor_others_are_harmed(servers, model):
    server = servers["2-0.5-0.5"]
    samples = clip("speech_en")
    pieces = [samples[i:i + 8000] for i in range(0, len(samples), 8000)]
    bad = pieces[1].copy()
    bad[100] = np.nan
    others: dict[int, tuple] = {}

    def other(index: int) -> None:
        others[index] = stream_through(server, "grpc", pieces, 5000 + index)

    threads = [threading.Thread(target=other, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        texts = [send_piece(client, grpcclient, protocol.STREAMING_MODEL, pieces[0], 4242, start=True, end=False)[0]]
        with pytest.raises(InferenceServerException, match="NaN or infinity"):
            send_piece(client, grpcclient, protocol.STREAMING_MODEL, bad, 4242, start=False, end=False)
        with pytest.raises(InferenceServerException, match="batch-size 1"):
            inputs = [grpcclient.InferInput(protocol.WAV, [2, 10], "FP32")]
            inputs[0].set_data_from_numpy(np.zeros((2, 10), np.float32))
            client.infer(protocol.STREAMING_MODEL, inputs, sequence_id=4242)
        for index, piece in enumerate(pieces[1:], start=1):
            texts.append(send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 4242, start=False,
                                    end=index == len(pieces) - 1)[0])
    finally:
        client.close()
    for thread in threads:
        thread.join(300)
    expected_texts, transcript = in_process(model, "2-0.5-0.5", pieces)
    assert texts == expected_texts  # the refused piece changed nothing
    assert sorted(others) == [0, 1]
    for texts_of_other, final in others.values():
        assert texts_of_other == expected_texts
        assert_final_equal(final, transcript)


def test_idle_streams_are_dropped(servers):
    server = servers["2-0.5-0.5"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    piece = clip("speech_en")[:4000]
    try:
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 9001, start=True, end=False)
        time.sleep(IDLE_TIMEOUT_S + 1.5)
        send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 9002, start=True, end=True)
        assert f"dropped 1 idle stream(s) (9001): no request for {IDLE_TIMEOUT_S:g} s" in server.log()
        with pytest.raises(InferenceServerException, match="START"):
            send_piece(client, grpcclient, protocol.STREAMING_MODEL, piece, 9001, start=False, end=True)
    finally:
        client.close()


def test_aliases_are_the_same_model(servers, model):
    pieces = [clip("speech_de")[i:i + 12000] for i in range(0, len(clip("speech_de")), 12000)] + [clip("short")[:0]]
    expected_texts, transcript = in_process(model, "2-0.5-0.5", pieces)
    for alias in ("streaming_wenet", "live"):
        texts, final = stream_through(servers["2-0.5-0.5"], "grpc", pieces, f"alias-{alias}", model=alias)
        assert texts == expected_texts
        assert_final_equal(final, transcript)


def test_triton_asr_client_streaming_request_pattern(servers, model):
    """Triton-ASR-Client's `--streaming` mode (rebuilt from reading its client.py, none of it copied): soundfile
    float64 samples, a first piece of 0.85 s and then 0.64 s ones, each zero-padded to that size with WAV_LENS, int
    sequence id 10086, model `streaming_wenet`, and the text as b" ".join of the whole TRANSCRIPTS array."""
    samples, rate = soundfile.read(FIXTURES / "audio" / "long.wav")
    first, other = int(0.85 * rate), int(0.64 * rate)
    bounds = [0, first] + list(range(first + other, len(samples), other)) + [len(samples)]
    bounds = sorted(set(b for b in bounds if b <= len(samples)))
    client = grpcclient.InferenceServerClient(servers["2-0.5-0.5"].grpc_url)
    try:
        for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
            padded = np.zeros((1, first if index == 0 else other), dtype=np.float32)
            padded[0, :end - start] = samples[start:end]
            inputs = [grpcclient.InferInput("WAV", list(padded.shape), "FP32"),
                      grpcclient.InferInput("WAV_LENS", [1, 1], "INT32")]
            inputs[0].set_data_from_numpy(padded)
            inputs[1].set_data_from_numpy(np.array([[end - start]], dtype=np.int32))
            result = client.infer("streaming_wenet", inputs, outputs=[grpcclient.InferRequestedOutput("TRANSCRIPTS")],
                                  sequence_id=10086, sequence_start=index == 0, sequence_end=end == len(samples))
            text = b" ".join(result.as_numpy("TRANSCRIPTS")).decode("utf-8")
    finally:
        client.close()
    assert text == model.transcribe(samples.astype(np.float32), streaming=SETTINGS["2-0.5-0.5"]).text != ""


# ---------------------------------------------------------------------------------------- client and CLI


def test_client_stream_yields_the_text_so_far_and_the_final_transcript(servers, model):
    import asyncio

    from parakeet_client import AsyncParakeetClient

    path = FIXTURES / "audio" / "speech_de.wav"
    samples = clip("speech_de")
    pieces = [samples[i:i + 8000] for i in range(0, len(samples), 8000)] + [samples[:0]]
    expected_texts, transcript = in_process(model, "2-0.5-0.5", pieces)

    async def collect(realtime: bool):
        async with AsyncParakeetClient(servers["2-0.5-0.5"].grpc_url) as client:
            started = time.monotonic()
            updates = [update async for update in client.stream(path, piece_seconds=0.5, realtime=realtime)]
            return updates, time.monotonic() - started

    for realtime in (False, True):
        updates, elapsed = asyncio.run(collect(realtime))
        assert [u.text for u in updates] == expected_texts
        assert [u.final for u in updates] == [False] * (len(updates) - 1) + [True]
        assert updates[-1].audio_seconds == pytest.approx(len(samples) / 16000)
        final = updates[-1].transcript
        assert final.text == transcript.text
        assert [w.to_dict() for w in final.words] == transcript.timestamps_dict()["words"]
        if realtime:  # never ahead of the audio
            assert elapsed >= len(samples) / 16000 - 0.05


@pytest.mark.parametrize("stdin_format", ["wav", "s16le"])
def test_cli_streams_stdin(servers, model, stdin_format):
    import subprocess
    import sys

    wav_bytes = (FIXTURES / "audio" / "speech_en.wav").read_bytes()
    data = wav_bytes if stdin_format == "wav" else soundfile.read(FIXTURES / "audio" / "speech_en.wav",
                                                                  dtype="int16")[0].tobytes()
    result = subprocess.run(
        [sys.executable, "-m", "parakeet_client.cli", "--stream", "-", "--stdin-format", stdin_format,
         "--url", servers["2-0.5-0.5"].grpc_url, "--as-fast-as-possible"],
        input=data, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    samples = clip("speech_en")
    pieces = [samples[i:i + 8000] for i in range(0, len(samples), 8000)] + [samples[:0]]
    expected_texts, transcript = in_process(model, "2-0.5-0.5", pieces)
    changes = [text for index, text in enumerate(expected_texts[:-1]) if text != (expected_texts[index - 1] if index else None)]
    assert lines == changes + [transcript.text]
