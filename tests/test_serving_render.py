"""The model-repository renderer and the launcher's plumbing (no server started here)."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from parakeet_triton import protocol, serve
from parakeet_triton.render import (ALL_MODELS, COMPOSING_MODELS, RenderOptions, render_config, render_repository,
                                    usable_cpus)
from parakeet_triton.server import Endpoints, find_tritonserver, stub_environment, tritonserver_command

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "tests" / "fixtures" / "v3_small" / "v3_small.nemo"


def parsed(options: RenderOptions, model: str):
    """Rendered config.pbtxt parsed by Triton's own ModelConfig protobuf (catches any syntax error)."""
    return text_format.Parse(render_config(options, model), model_config_pb2.ModelConfig())


def params(config) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


KIND = model_config_pb2.ModelInstanceGroup.Kind


@pytest.mark.parametrize(
    "device, instance_kind, expected_kind, force_cpu_inputs",
    [
        ("cpu", "auto", KIND.KIND_CPU, "yes"),
        ("cuda", "auto", KIND.KIND_GPU, "no"),
        ("auto", "auto", KIND.KIND_AUTO, "no"),
        ("cuda", "KIND_CPU", KIND.KIND_CPU, "yes"),  # Jetson-style: CPU instances computing on cuda
        ("auto", "KIND_GPU", KIND.KIND_GPU, "no"),
    ],
)
def test_variants_render_valid_configs(device, instance_kind, expected_kind, force_cpu_inputs):
    options = RenderOptions(checkpoint="nvidia/parakeet-tdt-0.6b-v3", device=device, instance_kind=instance_kind,
                            instances=3, max_batch_size=8, max_queue_delay_us=2500, max_audio_seconds=90)
    for model in COMPOSING_MODELS:
        config = parsed(options, model)
        assert config.name == model and config.backend == "python" and config.max_batch_size == 8
        assert [(g.count, g.kind) for g in config.instance_group] == [(3, expected_kind)]
        p = params(config)
        assert p["checkpoint"] == "nvidia/parakeet-tdt-0.6b-v3" and p["device"] == device
        assert p["FORCE_CPU_ONLY_INPUT_TENSORS"] == force_cpu_inputs
        assert "EXECUTION_ENV_PATH" not in p
        if expected_kind == KIND.KIND_CPU or device == "cpu":  # CPU stage processes share the cores
            assert p["cpu_threads"] == str(max(1, usable_cpus() // 9))
        else:
            assert "cpu_threads" not in p
        assert config.HasField("dynamic_batching")
        policy = config.dynamic_batching.default_queue_policy
        assert policy.max_queue_size == 128 and policy.default_timeout_microseconds == 0
    for model in (protocol.ENCODER_MODEL, protocol.DECODER_MODEL):
        batching = parsed(options, model).dynamic_batching
        assert batching.max_queue_delay_microseconds == 2500
        assert list(batching.preferred_batch_size) == [2, 4, 8]
    assert params(parsed(options, protocol.PREPROCESSOR_MODEL))["max_audio_seconds"] == "90.0"


def test_ensemble_contract():
    config = parsed(RenderOptions(max_batch_size=4), protocol.ENSEMBLE_MODEL)
    assert config.platform == "ensemble" and config.max_batch_size == 4
    inputs = {i.name: i for i in config.input}
    assert inputs[protocol.WAV].data_type == model_config_pb2.TYPE_FP32 and list(inputs[protocol.WAV].dims) == [-1]
    assert inputs[protocol.WAV_LENS].data_type == model_config_pb2.TYPE_INT32 and list(inputs[protocol.WAV_LENS].dims) == [1]
    assert inputs[protocol.WAV_LENS].optional and not inputs[protocol.WAV].optional
    outputs = {o.name: o for o in config.output}
    for name in (protocol.TRANSCRIPTS, protocol.TIMESTAMPS):
        assert outputs[name].data_type == model_config_pb2.TYPE_STRING and list(outputs[name].dims) == [1]
    steps = [step.model_name for step in config.ensemble_scheduling.step]
    assert steps == [protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL, protocol.DECODER_MODEL]


def test_stage_tensors_chain_up():
    """Each step's inputs are the previous step's outputs, with the same types (names from protocol.py)."""
    options = RenderOptions()
    configs = {m: parsed(options, m) for m in ALL_MODELS}
    for upstream, downstream in ((protocol.PREPROCESSOR_MODEL, protocol.ENCODER_MODEL), (protocol.ENCODER_MODEL, protocol.DECODER_MODEL)):
        produced = {o.name: (o.data_type, list(o.dims)) for o in configs[upstream].output}
        consumed = {i.name: (i.data_type, list(i.dims)) for i in configs[downstream].input}
        assert produced == consumed
    # variable-length inputs are ragged so the dynamic batcher batches different lengths together
    for model in COMPOSING_MODELS:
        ragged = [i.name for i in configs[model].input if -1 in i.dims]
        assert ragged and all(i.allow_ragged_batch for i in configs[model].input if i.name in ragged)


def test_checkpoint_is_rendered_once_per_model_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    options = RenderOptions(checkpoint="tests/fixtures/v3_small/v3_small.nemo", execution_env_path="/opt/env")
    out = render_repository(options, tmp_path / "repo")
    for model in COMPOSING_MODELS:
        text = (out / model / "config.pbtxt").read_text()
        assert text.count(str(CHECKPOINT)) == 1
        assert params(parsed(options, model))["EXECUTION_ENV_PATH"] == "/opt/env"
        assert (out / model / "1" / "model.py").read_text() == (ROOT / "model_repository" / model / "1" / "model.py").read_text()
    assert (out / protocol.ENSEMBLE_MODEL / "1").is_dir()
    assert "$" not in "".join((out / m / "config.pbtxt").read_text() for m in ALL_MODELS)


def test_quotes_in_checkpoint_are_escaped():
    options = RenderOptions(checkpoint='/models/we"ird\\name.nemo')
    assert params(parsed(options, protocol.ENCODER_MODEL))["checkpoint"] == '/models/we"ird\\name.nemo'


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "tpu"}, "device must be one of"),
        ({"instance_kind": "KIND_TPU"}, "instance_kind must be one of"),
        ({"instance_kind": "KIND_GPU", "device": "cpu"}, "KIND_GPU cannot compute on device cpu"),
        ({"instances": 0}, "instances must be an integer >= 1"),
        ({"max_batch_size": 0}, "max_batch_size must be"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"max_audio_seconds": 0}, "max_audio_seconds"),
        ({"cpu_threads": 0}, "cpu_threads must be an integer >= 1"),
        ({"cpu_threads": "2"}, "cpu_threads must be an integer >= 1"),
        ({"checkpoint": " "}, "checkpoint must be"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RenderOptions(**kwargs)


def test_max_batch_size_one_has_no_preferred_sizes():
    config = parsed(RenderOptions(max_batch_size=1), protocol.ENCODER_MODEL)
    assert config.max_batch_size == 1 and list(config.dynamic_batching.preferred_batch_size) == []


def test_render_only_cli_and_env_vars(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARAKEET_CHECKPOINT", "some/hf-repo")
    monkeypatch.setenv("PARAKEET_INSTANCES", "2")
    monkeypatch.setenv("PARAKEET_DEVICE", "cuda")
    assert serve.main(["--render-only", str(tmp_path), "--max-batch-size", "32"]) == 0
    assert "model repository written to" in capsys.readouterr().out
    text = (tmp_path / protocol.ENCODER_MODEL / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert params(config)["checkpoint"] == "some/hf-repo" and config.max_batch_size == 32
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, KIND.KIND_GPU)]


def test_cli_rejects_contradictory_options(capsys):
    with pytest.raises(SystemExit) as exited:
        serve.main(["--render-only", "/tmp/unused", "--device", "cpu", "--instance-kind", "KIND_GPU"])
    assert exited.value.code == 2 and "KIND_GPU cannot compute on device cpu" in capsys.readouterr().err


def test_cli_flags_are_stable():
    """Flags used by the Dockerfiles / Kubernetes manifests (docs/serving.md)."""
    actions = {option for action in serve.build_parser()._actions for option in action.option_strings}
    for flag in ("--checkpoint", "--device", "--instance-kind", "--instances", "--max-batch-size", "--max-audio-seconds",
                 "--max-queue-delay-us", "--host", "--http-port", "--grpc-port", "--metrics-port", "--render-only",
                 "--log-verbose", "--execution-env-path", "--tritonserver", "--max-queue-size", "--queue-timeout-s",
                 "--admin-key", "--attention", "--full-attention-max-seconds"):
        assert flag in actions


# ------------------------------------------------------------------------------------------------ launcher


def test_wheel_tritonserver_gets_a_stub_backend_for_this_python(tmp_path, monkeypatch):
    pytest.importorskip("pytriton")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no tritonserver on PATH here
    binary = find_tritonserver(tmp_path)
    assert binary.executable.name == "tritonserver" and "nvidia-pytriton" in binary.origin
    python_backend = binary.backend_dir / "python"
    assert (python_backend / "libtriton_python.so").exists()
    assert (python_backend / "triton_python_backend_stub").resolve().parent.name == f"{sys.version_info.major}.{sys.version_info.minor}"
    env = stub_environment(binary, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0].endswith("nvidia_pytriton.libs") and sysconfig.get_config_var("LIBDIR") in libs and libs[-1] == "/x"


def test_tritonserver_command(tmp_path):
    pytest.importorskip("pytriton")
    binary = find_tritonserver(tmp_path)
    command = tritonserver_command(binary, tmp_path / "repo", Endpoints("0.0.0.0", 1, 2, 3), shm_prefix="p_1_",
                                   admin_key="k3y")
    assert f"--model-repository={tmp_path / 'repo'}" in command
    assert "--model-control-mode=none" in command
    restricted = "shared-memory,logging,trace,model-repository:parakeet-admin-key=k3y"
    assert f"--http-restricted-api={restricted}" in command and f"--grpc-restricted-protocol={restricted}" in command
    with pytest.raises(ValueError, match="admin key"):
        tritonserver_command(binary, tmp_path / "repo", Endpoints(), shm_prefix="p", admin_key="a:b")
    for flag in ("--http-port=1", "--grpc-port=2", "--metrics-port=3", "--http-address=0.0.0.0",
                 "--backend-config=python,shm-region-prefix-name=p_1_", "--exit-timeout-secs=8"):
        assert flag in command


def test_endpoints_urls():
    endpoints = Endpoints("0.0.0.0", 8000, 8001, 8002)
    assert endpoints.http_url == "127.0.0.1:8000" and endpoints.grpc_url == "127.0.0.1:8001"
    assert endpoints.metrics_url == "http://127.0.0.1:8002/metrics"
    assert Endpoints("::1", 1, 2, 3).ready_url == "http://[::1]:1/v2/health/ready"


def test_missing_tritonserver_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("parakeet_triton.server._pytriton_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="no tritonserver found"):
        find_tritonserver(tmp_path)


def test_queue_limits_rendered_into_every_composing_model():
    options = RenderOptions(checkpoint="x", device="cpu", max_queue_size=4, queue_timeout_s=2.5)
    for model in COMPOSING_MODELS:
        policy = parsed(options, model).dynamic_batching.default_queue_policy
        assert policy.max_queue_size == 4 and policy.default_timeout_microseconds == 2_500_000
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    with pytest.raises(ValueError, match="max_queue_size must be an integer >= 0"):
        RenderOptions(checkpoint="x", max_queue_size=-1)
    with pytest.raises(ValueError, match="queue_timeout_s must be >= 0"):
        RenderOptions(checkpoint="x", queue_timeout_s=-1)


def test_default_cpu_threads_share_the_usable_cores(monkeypatch):
    from parakeet_triton import render

    monkeypatch.setattr(render, "usable_cpus", lambda: 16)
    assert RenderOptions(checkpoint="x", device="cpu").stage_cpu_threads == 5
    assert RenderOptions(checkpoint="x", device="cpu", instances=2).stage_cpu_threads == 2
    assert RenderOptions(checkpoint="x", device="cpu", instances=8).stage_cpu_threads == 1
    assert RenderOptions(checkpoint="x", device="cuda").stage_cpu_threads is None
    assert RenderOptions(checkpoint="x", device="cuda", instance_kind="KIND_CPU").stage_cpu_threads == 5
    assert RenderOptions(checkpoint="x", device="cpu", cpu_threads=3).stage_cpu_threads == 3


def test_usable_cpus_respects_affinity():
    from parakeet_triton.render import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_cpu_threads_rendered_into_every_composing_model():
    options = RenderOptions(checkpoint="x", device="cpu", cpu_threads=1)
    for model in COMPOSING_MODELS:
        assert params(parsed(options, model))["cpu_threads"] == "1"
