"""The standalone client distribution (client/pyproject.toml, `parakeet-client`): it builds, installs into a fresh
virtual environment without torch and runs there, and it shares its protocol names with the server side."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "client"


def pyproject(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def run(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run `command` without this checkout on PYTHONPATH; fail with its output when it fails."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel --no-deps client/`, built from a copy so the checkout gets no build/ or egg-info folders."""
    source = tmp_path_factory.mktemp("source") / "client"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    wheels = tmp_path_factory.mktemp("wheels")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(wheels)],
        timeout=300)
    (wheel,) = wheels.glob("parakeet_client-*.whl")
    return wheel


def test_client_dependencies_equal_the_main_distributions_client_extra() -> None:
    client = pyproject(CLIENT_DIR / "pyproject.toml")["project"]
    main = pyproject(ROOT / "pyproject.toml")["project"]
    assert client["name"] == "parakeet-client"
    assert sorted(client["dependencies"]) == sorted(main["optional-dependencies"]["client"])
    assert set(client["dependencies"]) <= set(main["optional-dependencies"]["openai"])  # the gateway imports it
    assert not [dep for dep in client["dependencies"] if dep.startswith(("torch", "parakeet"))]
    assert client["scripts"] == {"parakeet-client": main["scripts"]["parakeet-client"]}
    assert (client["version"], client["requires-python"]) == (main["version"], main["requires-python"])
    assert pyproject(ROOT / "pyproject.toml")["tool"]["setuptools"]["package-dir"]["parakeet_client"] == "client"


def test_wheel_holds_every_module_of_the_client_folder(client_wheel: Path) -> None:
    with zipfile.ZipFile(client_wheel) as wheel:
        names = wheel.namelist()
        entry_points = wheel.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packaged = {Path(name).name for name in names if name.startswith("parakeet_client/")}
    assert packaged == {path.name for path in CLIENT_DIR.glob("*.py")}
    assert "protocol.py" in packaged and "audio.py" in packaged
    assert {name.split("/")[0] for name in names} == {"parakeet_client", "parakeet_client-0.1.0.dist-info"}
    assert "parakeet-client = parakeet_client.cli:main" in entry_points


def test_client_modules_import_nothing_from_the_server_or_core() -> None:
    for path in CLIENT_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not [name for name in imported if name.split(".")[0] in ("parakeet_triton", "parakeet_core", "torch")], \
            path.name


def test_protocol_names_are_the_servers() -> None:
    from parakeet_client import protocol as client_protocol
    from parakeet_triton import protocol as server_protocol

    assert set(client_protocol.__all__) == {"ENSEMBLE_MODEL", "STREAMING_MODEL", "WAV", "WAV_LENS", "TRANSCRIPTS",
                                            "TIMESTAMPS", "SAMPLE_RATE", "MAX_AUDIO_SECONDS_PARAMETER"}
    for name in client_protocol.__all__:
        assert getattr(server_protocol, name) is getattr(client_protocol, name), name
    assert (server_protocol.ENSEMBLE_MODEL, server_protocol.WAV, server_protocol.SAMPLE_RATE) == ("parakeet", "WAV",
                                                                                                   16000)


def test_every_public_name_is_imported_on_first_use() -> None:
    code = ("import sys, parakeet_client; assert 'parakeet_client.client' not in sys.modules; "
            "from parakeet_client import *; import parakeet_client.errors as errors; "
            "assert parakeet_client.AudioDecodeError is errors.AudioDecodeError; "
            "print(sorted(name for name in parakeet_client.__all__ if name not in globals()))")
    assert run([sys.executable, "-c", code], cwd=ROOT).stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        import parakeet_client

        parakeet_client.missing


@pytest.mark.parametrize("modules, unwanted", [
    ("parakeet_client.audio, parakeet_client.protocol", ("tritonclient", "torch", "parakeet_triton", "parakeet_core")),
    ("parakeet_client, parakeet_client.cli", ("torch", "parakeet_triton", "parakeet_core")),
])
def test_imports_stay_light(modules: str, unwanted: tuple[str, ...]) -> None:
    code = (f"import sys, {modules}; "
            f"loaded = [m for m in {unwanted!r} if m in sys.modules]; print(loaded); sys.exit(bool(loaded))")
    run([sys.executable, "-c", code], cwd=ROOT)


def test_wheel_installs_alone_in_a_fresh_venv_without_torch(client_wheel: Path, tmp_path: Path) -> None:
    """About 20 s when pip's cache holds the dependencies (as after scripts/test.sh's install); the first run on a
    machine downloads them (tritonclient's grpcio and gevent are the largest)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    run([*pip, "install", "--quiet", str(client_wheel)], timeout=900)

    listed = run([*pip, "list", "--format=freeze"]).stdout.split()
    installed = {line.split("==")[0].lower() for line in listed}
    assert {"parakeet-client", "tritonclient", "soundfile", "soxr"} <= installed
    assert not {"torch", "parakeet-triton"} & installed, listed

    usage = run([str(bin_dir / "parakeet-client"), "--help"], cwd=tmp_path).stdout
    assert usage.startswith("usage: parakeet-client") and "--protocol" in usage

    code = ("import importlib.util, sys, parakeet_client, parakeet_client.protocol, parakeet_client.cli; "
            "from parakeet_client import ParakeetClient; "
            "assert 'torch' not in sys.modules and importlib.util.find_spec('parakeet_triton') is None; "
            "print(parakeet_client.__file__, parakeet_client.protocol.WAV)")
    location, wav = run([str(python), "-c", code], cwd=tmp_path).stdout.split()
    assert Path(location).is_relative_to(venv) and wav == "WAV"
