"""Find, configure, start and stop a real `tritonserver` process (used by `parakeet-serve` and the tests).

The binary is the `tritonserver` on PATH (as in NGC's tritonserver containers), else the one shipped in the
`nvidia-pytriton` wheel. For the wheel's binary this module assembles what the wheel leaves to its caller: a
backend directory holding the Python backend stub built for this interpreter's Python version, the wheel's
bundled libraries on LD_LIBRARY_PATH, and an environment in which the stub finds this interpreter's packages
(this interpreter's bin directory first on PATH, its libpython directory on LD_LIBRARY_PATH).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence, TextIO

# Admin surfaces closed to callers without the operator key (header `protocol.ADMIN_KEY_HEADER`): registering
# shared memory (a client can point Triton at the Python backend's own regions), log settings, tracing, and
# repository control. Health, metadata, model config, statistics and inference stay open (clients and
# perf_analyzer use them).
RESTRICTED_APIS = ("shared-memory", "logging", "trace", "model-repository")

ERROR_LINE = re.compile(r"^E\d{4} |UNAVAILABLE:|^error: |failed to load")
LOAD_FAILURE = re.compile(r"UNAVAILABLE:|^error: |failed to load")
# Error-level lines that tritonserver prints on every start without a usable GPU, though nothing is wrong.
HARMLESS_CPU_ERRORS = (
    "CudaDriverHelper has not been initialized",
    "unable to create stream for",  # the ensemble scheduler's CUDA stream; the ensemble runs without one
    "Failed to initialize NVML",
    "DCGM",
)


def is_real_error(line: str) -> bool:
    """Whether a tritonserver log line is an error worth showing: error-level, and not one of the known-harmless
    lines of a machine without a GPU (`HARMLESS_CPU_ERRORS`), unless it reports a model that failed to load."""
    if not ERROR_LINE.search(line):
        return False
    return bool(LOAD_FAILURE.search(line)) or not any(pattern in line for pattern in HARMLESS_CPU_ERRORS)


@dataclasses.dataclass(frozen=True)
class TritonBinary:
    """A runnable tritonserver and what it needs."""

    executable: Path
    backend_dir: Path | None  # None: the binary's built-in default (/opt/tritonserver/backends)
    cache_dir: Path | None
    library_dirs: tuple[str, ...]
    origin: str  # where it was found, for messages


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def _prepare_wheel_backends(root: Path, runtime_dir: Path) -> Path:
    """A backend directory with the wheel's Python backend and the stub for this Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} (has {available})")
    python_dir = runtime_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in [*sorted((root / "backends" / "python").glob("*.*")), stub]:
        target = python_dir / source.name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)
    return runtime_dir / "backends"


def find_tritonserver(runtime_dir: str | os.PathLike, explicit: str | None = None) -> TritonBinary:
    """The tritonserver to run: `explicit`, else the one on PATH, else the nvidia-pytriton wheel's."""
    found = explicit or shutil.which("tritonserver")
    if found:
        executable = Path(shutil.which(found) or found).resolve()
        if not executable.is_file():
            raise FileNotFoundError(f"tritonserver not found at {found}")
        backends = executable.parent.parent / "backends"
        caches = executable.parent.parent / "caches"
        return TritonBinary(
            executable,
            backends if backends.is_dir() else None,
            caches if caches.is_dir() else None,
            (),
            f"{'--tritonserver' if explicit else 'PATH'} ({executable})",
        )
    root = _pytriton_root()
    if root is None:
        raise FileNotFoundError(
            "no tritonserver found: put one on PATH (NGC tritonserver container) or install the serving extra "
            "(pip install 'parakeet-triton[serve]', which brings the nvidia-pytriton wheel)"
        )
    backends = _prepare_wheel_backends(root, Path(runtime_dir))
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonBinary(root / "bin" / "tritonserver", backends, root / "caches", (str(libs),), f"nvidia-pytriton wheel ({root})")


ALLOCATORS = {"tcmalloc": "libtcmalloc.so.4", "jemalloc": "libjemalloc.so.2", "system": None}
"""`--malloc` choices and the shared library each preloads (Debian: libgoogle-perftools4, libjemalloc2)."""
DEFAULT_ALLOCATOR = "tcmalloc"


def allocator_library(name: str) -> Path | None:
    """The installed library of allocator `name` (None for `system`); FileNotFoundError naming the package."""
    if name not in ALLOCATORS:
        raise ValueError(f"malloc must be one of {', '.join(ALLOCATORS)}; got {name!r}")
    library = ALLOCATORS[name]
    if library is None:
        return None
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    for folder in (f"/usr/lib/{multiarch}", "/usr/lib", "/usr/local/lib", "/usr/lib64"):
        candidate = Path(folder) / library
        if candidate.is_file():
            return candidate
    package = "libgoogle-perftools4" if name == "tcmalloc" else "libjemalloc2"
    raise FileNotFoundError(f"{library} not found (apt-get install {package}, or --malloc system)")


def choose_allocator(requested: str | None) -> tuple[Path | None, str | None]:
    """(library to preload, note) for `--malloc requested`; unset means DEFAULT_ALLOCATOR when it is installed, else
    the system's with a note. FileNotFoundError when an allocator asked for by name is missing."""
    try:
        return allocator_library(requested or DEFAULT_ALLOCATOR), None
    except FileNotFoundError as error:
        if requested:
            raise
        return None, f"{error}; using the system allocator, whose memory grows more under mixed request lengths"


def stub_environment(binary: TritonBinary, base: dict[str, str] | None = None,
                     preload: Path | None = None) -> dict[str, str]:
    """Environment for tritonserver in which the Python backend stub runs this interpreter's environment."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]).rstrip(os.pathsep)
    library_dirs = list(binary.library_dirs)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        library_dirs.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        library_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_dirs)
    # Idle OpenMP threads sleep instead of spinning: three stage processes share the cores, and spinning threads
    # of an idle stage take them from the busy one (and from neighbours on the node).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if preload is not None:
        env["LD_PRELOAD"] = os.pathsep.join(p for p in (str(preload), env.get("LD_PRELOAD", "")) if p)
    return env


@dataclasses.dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def address(self, port: int) -> str:
        """host:port for a client on this machine (a wildcard host becomes loopback), as tritonclient takes it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    http_url = property(lambda self: self.address(self.http_port), doc="host:port of HTTP, for tritonclient.http")
    grpc_url = property(lambda self: self.address(self.grpc_port), doc="host:port of gRPC, for tritonclient.grpc")
    metrics_url = property(lambda self: f"http://{self.address(self.metrics_port)}/metrics")

    @property
    def ready_url(self) -> str:
        return f"http://{self.http_url}/v2/health/ready"


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (for test and benchmark servers)."""
    import socket

    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclasses.dataclass
class LaunchedServer:
    """A `parakeet-serve` child process on free loopback ports, for tests and benchmarks: started with
    :meth:`start`, ready when Triton's `/v2/health/ready` answers 200, stopped by PID with :meth:`stop`."""

    process: subprocess.Popen
    endpoints: Endpoints
    log_path: Path

    @classmethod
    def start(cls, checkpoint: str | os.PathLike, args: Sequence[str] = (), *, log_path: str | os.PathLike,
              env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> "LaunchedServer":
        """Start `python -m parakeet_triton.serve` in this interpreter, in the caller's environment less its
        PARAKEET_* and OMP_* variables (the server picks its own threads), plus `env`; output to `log_path`."""
        endpoints = Endpoints("127.0.0.1", *free_loopback_ports(3))
        command = [sys.executable, "-m", "parakeet_triton.serve", "--checkpoint", str(checkpoint),
                   "--host", endpoints.host, "--http-port", str(endpoints.http_port),
                   "--grpc-port", str(endpoints.grpc_port), "--metrics-port", str(endpoints.metrics_port), *args]
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PARAKEET_", "OMP_"))} | (env or {})
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=clean, cwd=None if cwd is None else str(cwd))
        return cls(process, endpoints, Path(log_path))

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def grpc_url(self) -> str:
        return self.endpoints.grpc_url

    @property
    def http_url(self) -> str:
        return self.endpoints.http_url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoints.ready_url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float) -> None:
        """Until ready; RuntimeError with the log's tail if the launcher exits or `timeout` passes first (the
        launcher is stopped then)."""
        deadline = time.monotonic() + timeout
        # Alive first, then ready: a launcher that exited (say, on a port taken meanwhile) must not be taken for
        # ready because another server answers on that port.
        while self.process.poll() is not None or not self.is_ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.stop()
                raise RuntimeError(f"parakeet-serve did not become ready (exit code {code}):\n{self.log()[-6000:]}")
            time.sleep(0.25)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the launcher (it drains and stops tritonserver); SIGKILL past `timeout`. Its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def busy_ports(endpoints: Endpoints, extra: dict[str, int] | None = None) -> list[str]:
    """The endpoints' ports (and `extra` named ones) that something else already listens on, as messages."""
    import socket

    busy = []
    host = endpoints.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports = {"HTTP": endpoints.http_port, "gRPC": endpoints.grpc_port, "metrics": endpoints.metrics_port, **(extra or {})}
    for name, port in ports.items():
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as error:
                busy.append(f"{name} port {port} on {host} is not available ({error.strerror or error})")
    return busy


def tritonserver_command(
    binary: TritonBinary,
    model_repository: str | os.PathLike,
    endpoints: Endpoints,
    *,
    shm_prefix: str,
    log_verbose: int = 0,
    exit_timeout_secs: int = 8,
    shm_growth_bytes: int = 64 << 20,
    admin_key: str,
    http_socket: str | os.PathLike | None = None,
) -> list[str]:
    """tritonserver's command line; `admin_key` is the value callers must send in `ADMIN_KEY_HEADER` to reach
    the restricted APIs (`RESTRICTED_APIS`). With `http_socket`, Triton's HTTP server listens on that Unix
    socket instead of `endpoints.http_port` (parakeet_triton.front then serves the port)."""
    from . import protocol

    if not admin_key or any(c in admin_key for c in " ,:=\n"):
        raise ValueError("admin key must be non-empty, without blanks, ',', ':' or '='")
    restricted = f"{','.join(RESTRICTED_APIS)}:{protocol.ADMIN_KEY_HEADER}={admin_key}"
    command = [str(binary.executable), f"--model-repository={model_repository}"]
    if binary.backend_dir is not None:
        command.append(f"--backend-directory={binary.backend_dir}")
    if binary.cache_dir is not None:
        command.append(f"--cache-directory={binary.cache_dir}")
    command += [
        *((f"--http-address=unix:{http_socket}", "--http-port=0") if http_socket is not None
          else (f"--http-address={endpoints.host}", f"--http-port={endpoints.http_port}")),
        f"--grpc-address={endpoints.host}",
        f"--grpc-port={endpoints.grpc_port}",
        "--allow-metrics=true",
        f"--metrics-address={endpoints.host}",
        f"--metrics-port={endpoints.metrics_port}",
        "--model-control-mode=none",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--disable-auto-complete-config",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--exit-timeout-secs={exit_timeout_secs}",
        f"--log-verbose={log_verbose}",
        # A unique prefix lets us remove the Python backend's /dev/shm regions should the server die uncleanly.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        # Large requests (3 h of FP32 audio is ~690 MB) grow the stubs' regions in big steps, not 1 MiB ones.
        f"--backend-config=python,shm-growth-byte-size={shm_growth_bytes}",
    ]
    return command


def _write_line(stream: TextIO, line: str) -> None:
    try:
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):
        pass


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort (not Linux/glibc)
        pass


class TritonServerProcess:
    """One tritonserver child process: output forwarded to `sink`, error lines kept for the failure reason.

    With `log_path`, the whole output goes to that file (overwritten at start) and `sink` gets only the real
    errors (`is_real_error`)."""

    def __init__(self, command: list[str], env: dict[str, str], endpoints: Endpoints, *, shm_prefix: str,
                 sink: TextIO | None = None, log_path: str | os.PathLike | None = None):
        self.command = command
        self.env = env
        self.endpoints = endpoints
        self.shm_prefix = shm_prefix
        self.sink = sink if sink is not None else sys.stderr
        self.log_path = None if log_path is None else Path(log_path)
        self.process: subprocess.Popen | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=60)
        self._errors: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> None:
        log = None if self.log_path is None else self.log_path.open("w", encoding="utf-8", errors="replace")
        try:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # terminal signals reach us only; we forward exactly one
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            if log is not None:
                log.close()
            raise
        self._reader = threading.Thread(target=self._pump, args=(log,), name="tritonserver-log", daemon=True)
        self._reader.start()

    def _pump(self, log: TextIO | None) -> None:
        assert self.process is not None and self.process.stdout is not None
        try:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                self._tail.append(line.rstrip("\n"))
                real_error = is_real_error(line)
                if real_error and len(self._errors) < 200:
                    self._errors.append(line.rstrip("\n"))
                if log is not None:
                    _write_line(log, line)
                if log is None or real_error:
                    _write_line(self.sink, line)
        finally:
            if log is not None:
                log.close()

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoints.ready_url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """True once the server reports ready; False if it exited, `should_stop()` or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not should_stop():
            if self.poll() is not None:
                return False
            if self.is_ready():
                return True
            time.sleep(0.2)
        return False

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; then remove any shared-memory regions left behind."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.wait()
        self.cleanup_shared_memory()
        return code

    def cleanup_shared_memory(self) -> list[str]:
        """Remove /dev/shm regions of this server's Python backend stubs (none remain after a clean exit)."""
        removed = []
        for path in glob.glob(os.path.join("/dev/shm", glob.escape(self.shm_prefix) + "*")):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
        return removed

    def failure_reason(self) -> str:
        """The server's own error lines (model load failures first), else the tail of its log."""
        errors = list(dict.fromkeys(self._errors))
        lines = [line for line in errors if LOAD_FAILURE.search(line)] or errors or list(self._tail)[-20:]
        return "\n".join(lines) if lines else "(tritonserver printed nothing)"
