"""Fast unit tests of parakeet_triton.glue with a mock of triton_python_backend_utils (no server).

They use the real parakeet_core and the small v3 fixture checkpoint; the end-to-end tests in test_serving.py
check the same behaviour through a real tritonserver.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch

import parakeet_core
from parakeet_triton import glue, protocol, render
from parakeet_triton.render import RenderOptions, model_parameters
from parakeet_triton.settings import BY_NAME, REPOSITORY_SETTINGS

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"
AUDIO = ROOT / "tests" / "fixtures" / "audio"


# ------------------------------------------------------------------------------- mock of pb_utils (minimal)


class MockTensor:
    def __init__(self, name, array):
        self._name = name
        self._array = np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(self._array)))

    @classmethod
    def from_dlpack(cls, name, capsule):
        return cls(name, torch.utils.dlpack.from_dlpack(capsule).cpu().numpy())


class MockError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class MockResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class MockLogger:
    lines: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, message):
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message):
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message):
        cls.lines.append(("error", message))


class MockPbUtils:
    Tensor = MockTensor
    TritonError = MockError
    InferenceResponse = MockResponse
    Logger = MockLogger

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)


def request(**arrays):
    return {name: MockTensor(name, array) for name, array in arrays.items() if array is not None}


def args_for(model, options=None, *, kind="CPU", device_id="0", max_batch_size=16):
    options = options or RenderOptions(checkpoint=str(CHECKPOINT), device="cpu")
    parameters = {k: {"string_value": v} for k, v in model_parameters(options, model).items()}
    config = {"name": model, "max_batch_size": max_batch_size, "parameters": parameters}
    return {"model_config": json.dumps(config), "model_instance_kind": kind, "model_instance_device_id": device_id,
            "model_name": model, "model_instance_name": f"{model}_0_0"}


def make(glue_class, model, **kwargs):
    cls = type("TritonPythonModel", (glue_class,), {"pb_utils": MockPbUtils})
    instance = cls()
    instance.initialize(args_for(model, **kwargs))
    return instance


@pytest.fixture(scope="module")
def stages():
    if not CHECKPOINT.is_file():
        pytest.fail(f"fixture checkpoint missing: {CHECKPOINT}")
    return (
        make(glue.PreprocessorGlue, protocol.PREPROCESSOR_MODEL),
        make(glue.EncoderGlue, protocol.ENCODER_MODEL),
        make(glue.DecoderGlue, protocol.DECODER_MODEL),
    )


@pytest.fixture(scope="module")
def reference():
    import parakeet_core

    return parakeet_core.from_pretrained(str(CHECKPOINT), device="cpu")


@pytest.fixture(scope="module")
def clips():
    return {name: soundfile.read(AUDIO / f"{name}.wav", dtype="float32")[0] for name in ("speech_en", "speech_de", "noise", "short")}


def run_pipeline(stages, requests):
    """Run requests through the three glue stages like the ensemble does; returns the final responses."""
    preprocessor, encoder, decoder = stages
    responses = preprocessor.execute(requests)
    out = [None] * len(requests)
    following = []
    for index, response in enumerate(responses):
        if response.error is not None:
            out[index] = response
        else:
            following.append((index, request(**response.outputs)))
    encoded = encoder.execute([r for _, r in following])
    decoded = decoder.execute([request(**response.outputs) for response in encoded])
    for (index, _), response in zip(following, decoded):
        out[index] = response
    return out


def texts(response):
    return [t.decode() for t in response.outputs[protocol.TRANSCRIPTS][:, 0]]


# ------------------------------------------------------------------------------------------------ settings


def test_settings_from_rendered_parameters():
    settings = glue.StageSettings.from_args(args_for(protocol.PREPROCESSOR_MODEL))
    assert settings.checkpoint == str(CHECKPOINT)
    assert settings.device == "cpu" and settings.outputs_on_cpu
    assert settings.max_audio_seconds == 10800.0 and settings.max_batch_size == 16
    assert glue.StageSettings.from_args(args_for(protocol.ENCODER_MODEL)).max_audio_seconds is None


def test_settings_errors_are_clear():
    bad = json.loads(args_for(protocol.ENCODER_MODEL)["model_config"])
    del bad["parameters"]["checkpoint"]
    with pytest.raises(ValueError, match="parameter 'checkpoint' is missing"):
        glue.StageSettings.from_args({"model_config": json.dumps(bad), "model_instance_kind": "CPU"})
    gpu_on_cpu = RenderOptions(checkpoint="x", device="cpu", instance_kind="KIND_CPU")
    with pytest.raises(ValueError, match="KIND_GPU instance"):
        glue.StageSettings.from_args(args_for(protocol.ENCODER_MODEL, gpu_on_cpu, kind="GPU"))


def test_cpu_threads_setting_parsed_and_checked():
    options = RenderOptions(checkpoint=str(CHECKPOINT), device="cpu", cpu_threads=1)
    assert glue.StageSettings.from_args(args_for(protocol.DECODER_MODEL, options)).cpu_threads == 1
    from parakeet_triton.render import usable_cpus

    assert glue.StageSettings.from_args(args_for(protocol.DECODER_MODEL)).cpu_threads == max(1, usable_cpus() // 3)
    gpu = RenderOptions(checkpoint=str(CHECKPOINT), device="cuda")
    assert "cpu_threads" not in model_parameters(gpu, protocol.DECODER_MODEL)  # GPU instances: torch's default
    bad = json.loads(args_for(protocol.DECODER_MODEL)["model_config"])
    bad["parameters"]["cpu_threads"] = {"string_value": "two"}
    with pytest.raises(ValueError, match="parameter 'cpu_threads' must be an integer >= 1; got 'two'"):
        glue.StageSettings.from_args({"model_config": json.dumps(bad), "model_instance_kind": "CPU"})


@pytest.mark.parametrize(
    "options",
    [
        RenderOptions(checkpoint=str(CHECKPOINT), device="cpu"),
        RenderOptions(checkpoint="some/hf-repo", device="cuda", instance_kind="KIND_CPU", cpu_threads=3,
                      max_audio_seconds=90, attention="FULL", full_attention_max_seconds=30),
        RenderOptions(checkpoint="some/hf-repo", device="auto", attention="128", execution_env_path="/opt/env"),
    ],
)
def test_rendered_parameters_read_back_as_rendered(options):
    """Round trip over the settings table: what render.model_parameters writes, glue.read_parameters reads back
    as the same values, for every setting the glue reads, in every composing model."""
    for model in render.COMPOSING_MODELS:
        expected = {}
        for setting in REPOSITORY_SETTINGS:
            parameter = setting.parameter
            if parameter and parameter.read_by_glue and model in parameter.models:
                value = getattr(options, parameter.source or setting.name)
                if value is not None:
                    expected[setting.name] = value.lower() if setting.name == "attention" else value
        read = glue.read_parameters(model_parameters(options, model), model)
        assert read == expected and read["checkpoint"] == options.resolved_checkpoint
        fields = {field.name for field in dataclasses.fields(glue.StageSettings)}
        assert set(read) - {"device"} <= fields  # every value read has its StageSettings field
        if options.device == "cpu":  # resolving `device` needs no GPU here
            settings = glue.StageSettings.from_args(args_for(model, options))
            assert {name: getattr(settings, name) for name in set(read) - {"device"}} == {
                name: value for name, value in read.items() if name != "device"}


def test_stage_settings_defaults_are_the_tables():
    for name in ("cpu_threads", "attention", "full_attention_max_seconds"):
        assert getattr(glue.StageSettings, name) == BY_NAME[name].default


@pytest.mark.parametrize(
    "key, text, message",
    [
        (protocol.DEVICE_PARAMETER, "tpu", "model 'encoder': parameter 'device' must be one of auto, cpu, cuda; got 'tpu'"),
        (protocol.MAX_AUDIO_SECONDS_PARAMETER, "long", "parameter 'max_audio_seconds' must be a number > 0; got 'long'"),
        (protocol.MAX_AUDIO_SECONDS_PARAMETER, "-1", "parameter 'max_audio_seconds' must be a number > 0; got '-1'"),
        (protocol.ATTENTION_PARAMETER, "64,32", "parameters 'attention' / 'full_attention_max_seconds': "),
    ],
)
def test_bad_parameters_are_named_with_their_model(key, text, message):
    config = json.loads(args_for(protocol.ENCODER_MODEL)["model_config"])
    config["parameters"][key] = {"string_value": text}
    with pytest.raises(ValueError, match=re.escape(message)):
        glue.StageSettings.from_args({"model_config": json.dumps(config), "model_instance_kind": "CPU"})


def test_initialize_refuses_a_checkpoint_at_another_sample_rate(monkeypatch):
    class EightKilohertz:
        config = SimpleNamespace(sample_rate=8000)

    monkeypatch.setattr(glue, "load_model", lambda *args, **kwargs: EightKilohertz())
    cls = type("TritonPythonModel", (glue.PreprocessorGlue,), {"pb_utils": MockPbUtils})
    with pytest.raises(ValueError, match=r"expects 8000 Hz audio, but this server takes 16000 Hz") as raised:
        cls().initialize(args_for(protocol.PREPROCESSOR_MODEL))
    assert "model 'preprocessor'" in str(raised.value) and str(CHECKPOINT) in str(raised.value)


def test_stages_chain_up():
    """Each stage's outputs are the next stage's inputs, along the same time axis; only the entry admits."""
    preprocessor, encoder, decoder = (glue.PreprocessorGlue.stage, glue.EncoderGlue.stage, glue.DecoderGlue.stage)
    assert preprocessor.inputs == (protocol.WAV, protocol.WAV_LENS)
    for upstream, downstream in ((preprocessor, encoder), (encoder, decoder)):
        assert upstream.outputs.names == downstream.inputs
        assert upstream.outputs.time_dim == downstream.time_dim
    assert decoder.outputs is glue.transcript_outputs
    assert [stage.name for stage in (preprocessor, encoder, decoder)] == list(parakeet_core.STAGES)
    assert [stage.admits for stage in (preprocessor, encoder, decoder)] == [True, False, False]


def test_initialize_applies_cpu_threads():
    options = RenderOptions(checkpoint=str(CHECKPOINT), device="cpu", cpu_threads=1)
    cls = type("TritonPythonModel", (glue.DecoderGlue,), {"pb_utils": MockPbUtils})
    saved = torch.get_num_threads()
    try:
        cls().initialize(args_for(protocol.DECODER_MODEL, options))
        assert torch.get_num_threads() == 1
        assert any("with 1 CPU threads" in line for _, line in MockLogger.lines)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    jetson = RenderOptions(checkpoint="x", device="cuda", instance_kind="KIND_CPU")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        glue.StageSettings.from_args(args_for(protocol.ENCODER_MODEL, jetson))


def test_device_resolution():
    assert glue._device_for_instance("cpu", "CPU", 0) == ("cpu", True)
    assert glue._device_for_instance("auto", "CPU", 0) == ("cpu", True)
    if torch.cuda.is_available():
        assert glue._device_for_instance("auto", "GPU", 0) == ("cuda:0", False)
        assert glue._device_for_instance("cuda", "CPU", 0) == ("cuda", True)  # Jetson-style


@pytest.mark.parametrize("content", [None, b"not a .nemo archive" * 100])
def test_bad_checkpoint_fails_initialize_with_the_reason(tmp_path, content):
    path = tmp_path / "model.nemo"
    if content is not None:
        path.write_bytes(content)
    options = RenderOptions(checkpoint=str(path), device="cpu")
    cls = type("TritonPythonModel", (glue.EncoderGlue,), {"pb_utils": MockPbUtils})
    with pytest.raises(RuntimeError, match="cannot load checkpoint .*model.nemo.* on cpu: CheckpointError: ") as raised:
        cls().initialize(args_for(protocol.ENCODER_MODEL, options))
    print(raised.value)


def test_initialize_logs_what_it_loaded(stages):
    assert any("loaded stage 'encode'" in line and "on cpu (float32)" in line for _, line in MockLogger.lines)


# ----------------------------------------------------------------------------------------- request parsing


def parse(wav, lens=None, **kwargs):
    wav = torch.as_tensor(wav)
    lens = None if lens is None else torch.as_tensor(lens)
    return glue.Clips.parse(wav, lens, max_samples=kwargs.get("max_samples", 16000 * 10), min_samples=160)


@pytest.mark.parametrize(
    "wav, lens, message",
    [
        (np.zeros((1, 0), np.float32), None, "empty audio"),
        (np.full((1, 1600), np.nan, np.float32), None, "NaN or infinity"),
        (np.full((1, 1600), np.inf, np.float32), None, "NaN or infinity"),
        (np.zeros((1, 1600), np.float64), None, "must be FP32"),
        (np.zeros((1600,), np.float32), None, r"shape \[batch, samples\]"),
        (np.zeros((1, 1, 1600), np.float32), None, r"shape \[batch, samples\]"),
        (np.zeros((1, 16000 * 11), np.float32), None, "too long"),
        (np.zeros((1, 100), np.float32), None, "too short"),
        (np.zeros((1, 1600), np.float32), [[1601]], "outside 0..1600"),
        (np.zeros((1, 1600), np.float32), [[-1]], "outside 0..1600"),
        (np.zeros((1, 1600), np.float32), [[0]], "empty audio"),
        (np.zeros((2, 1600), np.float32), [[1600]], r"shape \[2, 1\]"),
        (np.zeros((1, 1600), np.float32), np.array([[1.0]], np.float32), "must be INT32"),
    ],
)
def test_invalid_audio_is_refused_with_the_reason(wav, lens, message):
    with pytest.raises(glue.InvalidRequest, match=message):
        parse(wav, lens)


def test_bad_clip_is_named_in_a_multi_clip_request():
    wav = np.zeros((3, 1600), np.float32)
    wav[2, 5] = np.nan
    with pytest.raises(glue.InvalidRequest, match="clip 2 of 3: .*NaN"):
        parse(wav, [[1600]] * 3)


def test_padding_is_ignored_and_zeroed():
    wav = np.full((2, 1600), np.nan, np.float32)
    wav[0, :800] = 0.5
    wav[1, :1600] = 0.25
    clips = parse(wav, np.array([[800], [1600]], np.int32))
    assert clips.lengths.tolist() == [800, 1600]
    assert torch.isfinite(clips.samples).all() and clips.samples[0, 800:].abs().sum() == 0


def test_wav_lens_optional():
    clips = parse(np.zeros((2, 1600), np.float32) + 0.1)
    assert clips.lengths.tolist() == [1600, 1600]


def test_frames_validation():
    with pytest.raises(glue.InvalidRequest, match="outside 0..5"):
        glue.Frames.parse(torch.zeros(1, 4, 5), torch.tensor([[6]]), names=("A", "B"), time_dim=2)
    with pytest.raises(glue.InvalidRequest, match="rank 3"):
        glue.Frames.parse(torch.zeros(4, 5), torch.tensor([[5]]), names=("A", "B"), time_dim=2)
    frames = glue.Frames.parse(torch.zeros(2, 4, 5), torch.tensor([[5], [3]]), names=("A", "B"), time_dim=2)
    assert frames.lengths.tolist() == [5, 3]


# -------------------------------------------------------------------------------------------- batching


def test_pad_concat_and_split_rows():
    a, b = torch.ones(2, 3, 4), torch.ones(1, 3, 6) * 2
    joined = glue.pad_concat([a, b], time_dim=2, device="cpu")
    assert joined.shape == (3, 3, 6) and joined[:2, :, 4:].abs().sum() == 0 and (joined[2] == 2).all()
    assert glue.split_rows([2, 1, 3]) == [slice(0, 2), slice(2, 3), slice(3, 6)]


def test_run_isolated_retries_alone_after_a_batch_failure():
    def compute(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return [item.upper() for item in items]

    seen = []
    results = glue.run_isolated(["a", "bad", "c"], compute, seen.append)
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], RuntimeError)
    assert len(seen) == 1


def test_batched_requests_equal_each_alone_and_in_process(stages, reference, clips):
    """One execute() with requests of different lengths (one of them several padded clips) == each alone."""
    names = ["speech_en", "short", "speech_de", "noise"]
    expected = {name: reference.transcribe(clips[name], timestamps=True) for name in names}
    requests = [request(WAV=clips[name][None]) for name in names]
    padded = np.zeros((2, len(clips["speech_en"]) + 16000), np.float32)
    padded[0, : len(clips["speech_de"])] = clips["speech_de"]
    padded[1, : len(clips["speech_en"])] = clips["speech_en"]
    requests.append(request(WAV=padded, WAV_LENS=np.array([[len(clips["speech_de"])], [len(clips["speech_en"])]], np.int32)))

    together = run_pipeline(stages, requests)
    for name, response in zip(names, together):
        assert response.error is None
        assert texts(response) == [expected[name].text]
        assert json.loads(response.outputs[protocol.TIMESTAMPS][0, 0]) == expected[name].timestamps_dict()
    assert texts(together[-1]) == [expected["speech_de"].text, expected["speech_en"].text]
    for name, response in zip(names, together):
        assert texts(run_pipeline(stages, [request(WAV=clips[name][None])])[0]) == texts(response)


def test_digital_silence_batched_equals_alone(stages, clips):
    silence = np.zeros(8562, np.float32)
    alone = texts(run_pipeline(stages, [request(WAV=silence[None])])[0])
    together = run_pipeline(stages, [request(WAV=silence[None]), request(WAV=clips["speech_en"][None])])
    assert texts(together[0]) == alone


def test_bad_request_inside_a_batch_only_fails_itself(stages, clips, reference):
    nan = clips["noise"][None].copy()
    nan[0, 3] = np.nan
    requests = [
        request(WAV=clips["speech_en"][None]),
        request(WAV=nan),
        request(WAV=np.zeros((1, 0), np.float32)),
        request(WAV=clips["speech_de"][None]),
    ]
    responses = run_pipeline(stages, requests)
    assert len(responses) == len(requests)
    assert texts(responses[0]) == [reference.transcribe(clips["speech_en"]).text]
    assert texts(responses[3]) == [reference.transcribe(clips["speech_de"]).text]
    assert responses[1].error.code == MockError.INVALID_ARG and "NaN or infinity" in responses[1].error.message()
    assert responses[1].error.message().startswith("preprocessor: ")
    assert "empty audio" in responses[2].error.message()


def test_failure_inside_the_model_is_isolated_per_request(stages, clips, monkeypatch):
    preprocessor, encoder, _ = stages
    features = [preprocessor.execute([request(WAV=clips[name][None])])[0].outputs for name in ("speech_en", "noise")]
    original = encoder.model.encode

    def flaky_encode(values, lengths):  # fails whenever the noise clip (shortest) is in the batch
        if int(lengths.min()) < 250:
            raise RuntimeError("simulated device failure")
        return original(values, lengths)

    monkeypatch.setattr(encoder.model, "encode", flaky_encode)
    responses = encoder.execute([request(**features[0]), request(**features[1])])
    assert responses[0].error is None and protocol.ENCODED in responses[0].outputs
    assert responses[1].error.code == MockError.INTERNAL
    assert "RuntimeError: simulated device failure" in responses[1].error.message()
    assert any("retrying each request alone" in line for _, line in MockLogger.lines)


def test_preprocessor_refuses_new_requests_once_the_repository_drains(tmp_path, clips):
    """The admission gate of parakeet_triton.drain: after the marker appears, every request of a batch gets
    UNAVAILABLE (retryable) naming the shutdown; before it, and without a repository, requests are served."""
    from parakeet_triton import drain

    args = args_for(protocol.PREPROCESSOR_MODEL)
    args["model_repository"] = str(tmp_path / protocol.PREPROCESSOR_MODEL)
    cls = type("TritonPythonModel", (glue.PreprocessorGlue,), {"pb_utils": MockPbUtils})
    preprocessor = cls()
    preprocessor.initialize(args)
    batch = [request(WAV=clips["speech_en"][None]), request(WAV=clips["noise"][None])]
    assert all(response.error is None for response in preprocessor.execute(batch))
    assert drain.stage_counts(tmp_path) == {protocol.PREPROCESSOR_MODEL: (2, 0)}
    drain.marker_path(tmp_path).touch()
    refused = preprocessor.execute(batch)
    assert [response.error.code for response in refused] == [MockError.UNAVAILABLE] * 2
    assert all("shutting down" in response.error.message() for response in refused)
    assert drain.stage_counts(tmp_path) == {protocol.PREPROCESSOR_MODEL: (2, 2)}
    preprocessor.finalize()


def test_drain_waits_for_the_batch_the_preprocessor_admitted(tmp_path, monkeypatch):
    """drain() takes the admission lock only after an admitted batch is done, then reads the statistics until
    nothing is in the pipeline; a batch arriving after the marker is refused without waiting."""
    import threading
    import time

    from parakeet_triton import drain

    gate = drain.AdmissionGate(tmp_path)
    in_pipeline = iter([2, 1, 0, 0])
    monkeypatch.setattr(drain, "requests_in_pipeline", lambda repository, url: next(in_pipeline))
    admitted = threading.Event()
    finished: list[float] = []

    def admitted_batch():
        with gate.admitting() as open_:
            assert open_
            admitted.set()
            time.sleep(0.5)
            finished.append(time.monotonic())

    worker = threading.Thread(target=admitted_batch)
    worker.start()
    admitted.wait(5)
    result = drain.drain(tmp_path, "http://unused", timeout=10, poll=0.01)
    returned = time.monotonic()
    worker.join()
    assert result.drained and result.in_flight_at_start == 2
    assert finished and returned >= finished[0]
    with gate.admitting() as open_:
        assert not open_
    monkeypatch.setattr(drain, "requests_in_pipeline", lambda repository, url: 1)
    stuck = drain.drain(tmp_path, "http://unused", timeout=0.05, poll=0.01)
    assert not stuck.drained and "1 request(s) still in flight" in stuck.detail


def test_stage_outputs_match_the_rendered_config(stages, clips):
    preprocessor, encoder, decoder = stages
    features = preprocessor.execute([request(WAV=clips["speech_en"][None])])[0].outputs
    assert set(features) == {protocol.FEATURES, protocol.FEATURE_LENGTHS}
    assert features[protocol.FEATURES].dtype == np.float32 and features[protocol.FEATURES].ndim == 3
    assert features[protocol.FEATURE_LENGTHS].dtype == np.int64 and features[protocol.FEATURE_LENGTHS].shape == (1, 1)
    encoded = encoder.execute([request(**features)])[0].outputs
    assert encoded[protocol.ENCODED].dtype == np.float32 and encoded[protocol.ENCODED_LENGTHS].shape == (1, 1)
    decoded = decoder.execute([request(**encoded)])[0].outputs
    assert decoded[protocol.TRANSCRIPTS].dtype == object and decoded[protocol.TIMESTAMPS].shape == (1, 1)


def test_model_files_are_thin_subclasses():
    for model, cls in ((protocol.PREPROCESSOR_MODEL, "PreprocessorGlue"), (protocol.ENCODER_MODEL, "EncoderGlue"),
                       (protocol.DECODER_MODEL, "DecoderGlue")):
        path = ROOT / "model_repository" / model / "1" / "model.py"
        source = path.read_text()
        assert f"from parakeet_triton.glue import {cls}" in source and "class TritonPythonModel" in source
        import sys
        import types

        sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
        try:
            spec = importlib.util.spec_from_file_location(f"_model_{model}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            del sys.modules["triton_python_backend_utils"]
        assert issubclass(module.TritonPythonModel, getattr(glue, cls))


# ------------------------------------------------------------------------------------------ streaming glue


class MockSequenceRequest(dict):
    """A request of the streaming model: inputs by name, and the sequence id Triton's Python backend reports."""

    def __init__(self, sequence_id, *, start=False, end=False, wav=None, wav_lens=None):
        super().__init__(request(WAV=wav, WAV_LENS=wav_lens, START=np.array([[int(start)]], np.int32),
                                 END=np.array([[int(end)]], np.int32)))
        self._sequence_id = sequence_id

    def correlation_id(self):
        return self._sequence_id


def streaming_glue(idle_seconds=60.0, contexts=(2.0, 0.5, 0.5)):
    options = RenderOptions(checkpoint=str(CHECKPOINT), device="cpu", streaming=True, streaming_contexts=contexts)
    args = args_for(protocol.STREAMING_MODEL, options)
    config = json.loads(args["model_config"])
    config["sequence_batching"] = {"max_sequence_idle_microseconds": str(int(idle_seconds * 1e6))}
    args["model_config"] = json.dumps(config)
    cls = type("TritonPythonModel", (glue.StreamingGlue,), {"pb_utils": MockPbUtils})
    instance = cls()
    instance.initialize(args)
    return instance


def piece_request(sequence_id, piece, **flags):
    return MockSequenceRequest(sequence_id, wav=piece.reshape(1, -1).astype(np.float32), **flags)


def test_streaming_glue_batches_streams_and_equals_in_process(clips, reference):
    model = streaming_glue()
    streams = {7: clips["speech_en"], "talk": clips["speech_de"]}
    pieces = {key: [s[i:i + 6000] for i in range(0, len(s), 6000)] for key, s in streams.items()}
    rounds = max(len(p) for p in pieces.values()) + 1
    pieces = {key: p + [p[0][:0]] * (rounds - len(p)) for key, p in pieces.items()}  # empty pieces after the audio
    answers = {key: [] for key in streams}
    for index in range(rounds):
        batch = [piece_request(key, p[index], start=index == 0, end=index == rounds - 1) for key, p in pieces.items()]
        for key, response in zip(pieces, model.execute(batch)):
            assert response.error is None
            assert response.outputs[protocol.TRANSCRIPTS].shape == (1,)
            answers[key].append((response.outputs[protocol.TRANSCRIPTS][0].decode(),
                                 response.outputs[protocol.TIMESTAMPS][0].decode()))
    for key, samples in streams.items():
        session = reference.stream(left_seconds=2.0, chunk_seconds=0.5, right_seconds=0.5)
        texts = [session.feed(p).text for p in pieces[key]]
        transcript = session.finish()
        assert [text for text, _ in answers[key][:-1]] == texts[:-1]
        assert answers[key][-1][0] == transcript.text
        final = json.loads(answers[key][-1][1])
        assert final["token_ids"] == transcript.token_ids and final["words"] == transcript.timestamps_dict()["words"]
    assert model.streams == {}  # END freed both


def test_streaming_glue_refuses_bad_pieces_and_unknown_streams_alone(clips):
    model = streaming_glue()
    good = clips["speech_en"][:8000]
    bad = good.copy()
    bad[5] = np.inf
    responses = model.execute([piece_request(1, good, start=True), piece_request(2, bad, start=True),
                               piece_request(3, good), MockSequenceRequest(4, start=True),
                               piece_request(0, good, start=True)])
    errors = [r.error.message() if r.error else None for r in responses]
    assert errors[0] is None and errors[1] == "parakeet_streaming: WAV: samples contain NaN or infinity"
    assert "sequence 3 is not open here" in errors[2] and "sequence_start" in errors[2]
    assert errors[3] == f"parakeet_streaming: input {protocol.WAV} is missing"
    assert "no sequence id" in errors[4]
    assert responses[1].error.code == MockError.INVALID_ARG
    assert set(model.streams) == {1, 2, 4}  # a refused piece leaves its stream open and unchanged
    assert model.execute([piece_request(2, good)])[0].error is None
    wrong = model.execute([MockSequenceRequest(1, wav=np.zeros((1, 4), np.float32),
                                               wav_lens=np.array([[9]], np.int32))])[0]
    assert "WAV_LENS = 9 is outside 0..4" in wrong.error.message()


def test_streaming_glue_drops_idle_streams(clips, monkeypatch):
    model = streaming_glue(idle_seconds=5.0)
    now = [1000.0]
    monkeypatch.setattr(glue.time, "monotonic", lambda: now[0])
    piece = clips["speech_en"][:4000]
    model.execute([piece_request(1, piece, start=True), piece_request(2, piece, start=True)])
    now[0] += 4.0
    model.execute([piece_request(2, piece)])
    now[0] += 2.0  # stream 1: 6 s idle, stream 2: 2 s
    MockLogger.lines.clear()
    assert model.execute([piece_request(2, piece)])[0].error is None
    assert set(model.streams) == {2}
    assert ("info", "parakeet_streaming_0_0: dropped 1 idle stream(s) (1): no request for 5 s") in MockLogger.lines
    assert "dropped after 5 s without a request" in model.execute([piece_request(1, piece)])[0].error.message()
