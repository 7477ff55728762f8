"""The model-repository renderer and the launcher's plumbing (no server started here)."""

from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig
from pathlib import Path

import pytest

from parakeet_triton import protocol, serve
from parakeet_triton.render import (ALL_MODELS, COMPOSING_MODELS, RenderOptions, render_config, render_repository,
                                    usable_cpus)
from parakeet_triton.server import Endpoints, find_tritonserver, stub_environment, tritonserver_command
from parakeet_triton.settings import BY_NAME, REPOSITORY_SETTINGS, SETTINGS, Setting

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


# ------------------------------------------------------------------------------------------ settings table


def example_text(setting: Setting, index: int) -> str:
    """A valid, non-default value of `setting` as a flag or variable would give it (index 0 and 1 differ)."""
    if setting.choices:
        return [choice for choice in setting.choices if choice != setting.default][index]
    if setting.name == "attention":
        return ["full", "128"][index]
    if setting.name == "streaming_model_name":
        return f"live{index}"
    if setting.name == "streaming_model_aliases":
        return f"live_alias{index},live_other{index}"
    if setting.name == "streaming_contexts":
        return ["4,1,1", "8,2,0.5"][index]
    if setting.type.__name__ == "switch":
        return ["on", "1"][index]
    kind = setting.type.__name__
    if kind == "int":
        return str((setting.default or 0) + 2 + index)
    if kind == "float":
        return str((setting.default or 0.0) + 1.5 + index)
    if kind == "names":
        return f"alias{index},other{index}"
    return f"value{index}"


@pytest.fixture
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PARAKEET_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_setting_is_a_flag_and_a_variable_and_the_flag_wins(clean_environment):
    for setting in SETTINGS:
        assert setting.flag == "--" + setting.name.replace("_", "-")
        if setting.env is not None:
            assert setting.env == "PARAKEET_" + setting.name.upper()
            clean_environment.setenv(setting.env, example_text(setting, 0))
    from_env = serve.build_parser().parse_args([])
    flags = [part for s in SETTINGS for part in (s.flag, example_text(s, 1))]
    from_flags = serve.build_parser().parse_args(flags)
    for setting in SETTINGS:
        if setting.env is not None:
            assert getattr(from_env, setting.name) == setting.parse(example_text(setting, 0)) != setting.default
        assert getattr(from_flags, setting.name) == setting.parse(example_text(setting, 1)) != setting.default
    for args, index in ((from_env, 0), (from_flags, 1)):  # every model-repository setting reaches RenderOptions
        options = serve.render_options(args)
        for setting in REPOSITORY_SETTINGS:
            assert getattr(options, setting.name) == setting.parse(example_text(setting, index))
    assert serve.build_parser().parse_args(["--log-verbose"]).log_verbose == 1


def test_defaults_come_from_the_table_only(clean_environment):
    import parakeet_core
    from parakeet_core.attention import DEFAULT_FULL_ATTENTION_MAX_SECONDS

    parsed = vars(serve.build_parser().parse_args([]))
    assert parsed == {setting.name: setting.default for setting in SETTINGS}
    options = RenderOptions()
    assert [field.name for field in dataclasses.fields(RenderOptions)] == [s.name for s in REPOSITORY_SETTINGS]
    assert all(getattr(options, s.name) == s.default for s in REPOSITORY_SETTINGS)
    assert serve.render_options(serve.build_parser().parse_args([])) == options
    # the constants owned elsewhere are imported, not repeated
    assert BY_NAME["checkpoint"].default is parakeet_core.DEFAULT_CHECKPOINT
    assert BY_NAME["full_attention_max_seconds"].default is DEFAULT_FULL_ATTENTION_MAX_SECONDS
    assert BY_NAME["max_audio_seconds"].default is protocol.DEFAULT_MAX_AUDIO_SECONDS
    package = ROOT / "parakeet_triton"
    assert not [p.name for p in package.glob("*.py") if parakeet_core.DEFAULT_CHECKPOINT in p.read_text()]


def test_help_states_each_variable_and_default(clean_environment):
    clean_environment.setenv("COLUMNS", "10000")  # no wrapping (argparse also breaks lines at hyphens)
    text = serve.build_parser().format_help()
    for setting in SETTINGS:
        assert setting.flag in text
        if setting.env is not None:
            assert f"(env {setting.env}; default: {setting.default_text})" in text


@pytest.mark.parametrize(
    "env, value, message",
    [
        ("PARAKEET_INSTANCES", "two", "PARAKEET_INSTANCES must be an integer >= 1; got 'two'"),
        ("PARAKEET_INSTANCES", "0", "PARAKEET_INSTANCES must be an integer >= 1; got '0'"),
        ("PARAKEET_DEVICE", "tpu", "PARAKEET_DEVICE must be one of auto, cpu, cuda; got 'tpu'"),
        ("PARAKEET_MAX_AUDIO_SECONDS", "long", "PARAKEET_MAX_AUDIO_SECONDS must be a number > 0; got 'long'"),
        ("PARAKEET_HTTP_PORT", "", "PARAKEET_HTTP_PORT must be an integer; got ''"),
    ],
)
def test_a_variable_that_does_not_parse_is_a_usage_error_naming_it(clean_environment, capsys, env, value, message):
    clean_environment.setenv(env, value)
    with pytest.raises(SystemExit) as exited:
        serve.main(["--render-only", "/tmp/unused"])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_blank_variables_leave_optional_settings_unset_and_empty_aliases_mean_none(clean_environment):
    for name in ("PARAKEET_CPU_THREADS", "PARAKEET_MAX_REQUEST_MB", "PARAKEET_LOG_FILE", "PARAKEET_MODEL_ALIASES"):
        clean_environment.setenv(name, "")
    args = serve.build_parser().parse_args([])
    assert args.cpu_threads is None and args.max_request_mb is None and args.log_file is None
    assert args.model_aliases == () and serve.render_options(args).public_models == (protocol.ENSEMBLE_MODEL,)


def test_rendered_parameters_follow_the_table():
    """Each model gets exactly the parameters the table assigns it, under the protocol.py keys."""
    options = RenderOptions(checkpoint="x", device="cpu", cpu_threads=2, execution_env_path="/opt/env")
    for model in ALL_MODELS:
        expected = {s.parameter.key for s in REPOSITORY_SETTINGS if s.parameter and model in s.parameter.models}
        assert set(params(parsed(options, model))) == expected
    assert set(params(parsed(options, protocol.ENSEMBLE_MODEL))) == {protocol.MAX_AUDIO_SECONDS_PARAMETER}
    keys = {name: value for name, value in vars(protocol).items() if name.endswith("_PARAMETER")}
    assert {s.parameter.key for s in SETTINGS if s.parameter} == set(keys.values())


def test_docs_list_every_option_and_parameter():
    text = (ROOT / "docs" / "serving.md").read_text()
    for setting in SETTINGS:
        assert f"`{setting.flag}" in text, setting.flag
        if setting.env is not None:
            assert f"`{setting.env}`" in text, setting.env
        if setting.parameter is not None:
            assert f"`{setting.parameter.key}`" in text, setting.parameter.key


# ------------------------------------------------------------------------------------------- streaming model


def test_streaming_model_is_rendered_only_when_on(tmp_path):
    off = render_repository(RenderOptions(checkpoint=str(CHECKPOINT), device="cpu"), tmp_path / "off")
    assert sorted(p.name for p in off.iterdir() if p.is_dir()) == sorted(COMPOSING_MODELS + ("parakeet", "transducer"))
    options = RenderOptions(checkpoint=str(CHECKPOINT), device="cpu", streaming=True, streaming_contexts=(4, 1, 0.5),
                            streaming_idle_timeout_s=2.5, streaming_max_streams=8, streaming_model_name="live",
                            streaming_model_aliases=("streaming_wenet",))
    on = render_repository(options, tmp_path / "on")
    assert (on / "live" / "1" / "model.py").read_text() == (ROOT / "model_repository" / protocol.STREAMING_MODEL / "1" /
                                                            "model.py").read_text()
    config = parsed(options, "live")
    assert config.backend == "python" and config.max_batch_size == options.max_batch_size
    batching = config.sequence_batching
    assert batching.max_sequence_idle_microseconds == 2_500_000
    assert batching.oldest.max_candidate_sequences == 8 and list(batching.oldest.preferred_batch_size) == [16]
    assert {c.name: c.control[0].kind for c in batching.control_input} == {
        "START": model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START,
        "END": model_config_pb2.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END}
    assert [i.name for i in config.input] == ["WAV", "WAV_LENS"] and config.input[1].optional
    assert [o.name for o in config.output] == ["TRANSCRIPTS", "TIMESTAMPS"]
    assert params(config) == {"checkpoint": str(CHECKPOINT), "device": "cpu", "FORCE_CPU_ONLY_INPUT_TENSORS": "yes",
                              "max_audio_seconds": "10800.0", "cpu_threads": str(options.stage_cpu_threads),
                              "streaming_contexts": "4,1,0.5"}
    alias = parsed(options, "streaming_wenet")
    assert alias.platform == "ensemble" and [s.model_name for s in alias.ensemble_scheduling.step] == ["live"]
    assert not (on / "streaming_wenet" / "1" / "model.py").exists()


def test_streaming_names_must_not_clash_and_contexts_are_checked():
    with pytest.raises(ValueError, match="'transducer' is given twice"):
        RenderOptions(checkpoint="x", streaming=True, streaming_model_aliases=("transducer",))
    with pytest.raises(ValueError, match="name of a composing model"):
        RenderOptions(checkpoint="x", streaming=True, streaming_model_name="encoder")
    RenderOptions(checkpoint="x", streaming=False, streaming_model_aliases=("transducer",))  # not served: no clash
    with pytest.raises(ValueError, match="streaming_contexts must be three numbers"):
        RenderOptions(checkpoint="x", streaming=True, streaming_contexts=(10, 0, 2))
    assert serve.build_parser().parse_args(["--streaming"]).streaming is True
    assert serve.build_parser().parse_args(["--streaming", "off"]).streaming is False
    assert serve.build_parser().parse_args(["--streaming-contexts", "10,10,5"]).streaming_contexts == (10, 10, 5)


def test_streaming_shares_the_cores(monkeypatch):
    from parakeet_triton import render

    monkeypatch.setattr(render, "usable_cpus", lambda: 16)
    assert RenderOptions(checkpoint="x", device="cpu", streaming=True).stage_cpu_threads == 4
