"""`parakeet-serve`: render the model repository and run a real tritonserver on it.

    parakeet-serve [--checkpoint PATH|HF_ID] [--device auto|cpu|cuda] [--http-port 8000] [--grpc-port 8001] ...
    parakeet-serve --render-only DIR [...]     # write the rendered model repository and exit

Every option can also be given as an environment variable PARAKEET_<OPTION> (e.g. PARAKEET_CHECKPOINT,
PARAKEET_HTTP_PORT); a command-line flag wins over the variable. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import protocol
from .drain import drain
from .front import FrontConfig, HttpFront, default_max_request_bytes
from .render import DEFAULT_CHECKPOINT, DEVICES, INSTANCE_KINDS, RenderOptions, render_repository
from .server import (ALLOCATORS, DEFAULT_ALLOCATOR, Endpoints, TritonServerProcess, busy_ports, choose_allocator,
                     find_tritonserver, stub_environment, tritonserver_command)
from .watchdog import StubWatchdog, stop_process

ENV_PREFIX = "PARAKEET_"


def _env(name: str, default):
    return os.environ.get(ENV_PREFIX + name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parakeet-serve",
        description="Serve a Parakeet TDT checkpoint with Triton Inference Server (ensemble model "
        f"'{protocol.ENSEMBLE_MODEL}': {protocol.WAV} + {protocol.WAV_LENS} -> {protocol.TRANSCRIPTS}, {protocol.TIMESTAMPS}).",
        epilog="Every option can also be set as an environment variable PARAKEET_<OPTION> "
        "(upper case, dashes as underscores, e.g. PARAKEET_CHECKPOINT); flags win.",
    )
    model = parser.add_argument_group("model repository (rendered into every model's config.pbtxt)")
    model.add_argument("--checkpoint", default=_env("CHECKPOINT", DEFAULT_CHECKPOINT),
                       help="local .nemo file or Hugging Face repo id (default: %(default)s)")
    model.add_argument("--device", choices=DEVICES, default=_env("DEVICE", "auto"),
                       help="where the models compute; auto = each instance's GPU for KIND_GPU instances, else CPU (default: %(default)s)")
    model.add_argument("--instance-kind", choices=INSTANCE_KINDS, default=_env("INSTANCE_KIND", "auto"),
                       help="Triton instance kind; auto = KIND_GPU for --device cuda, KIND_CPU for cpu, KIND_AUTO for auto. "
                       "Jetson-style: --instance-kind KIND_CPU --device cuda (default: %(default)s)")
    model.add_argument("--instances", type=int, default=int(_env("INSTANCES", 1)),
                       help="instances of each model (per GPU for KIND_GPU) (default: %(default)s)")
    model.add_argument("--max-batch-size", type=int, default=int(_env("MAX_BATCH_SIZE", 16)),
                       help="largest batch in clips, per request and per dynamic batch (default: %(default)s)")
    model.add_argument("--max-queue-delay-us", type=int, default=int(_env("MAX_QUEUE_DELAY_US", 1000)),
                       help="dynamic-batching queue delay of the encoder and decoder, microseconds (default: %(default)s)")
    model.add_argument("--max-queue-size", type=int, default=int(_env("MAX_QUEUE_SIZE", 128)),
                       help="requests each stage holds waiting; past it requests are refused at once with UNAVAILABLE "
                       "(0: unbounded) (default: %(default)s)")
    model.add_argument("--queue-timeout-s", type=float, default=float(_env("QUEUE_TIMEOUT_S", 0.0)),
                       help="longest wait in a stage's queue before a request is refused with UNAVAILABLE "
                       "(0: no limit) (default: %(default)s)")
    model.add_argument("--max-audio-seconds", type=float, default=float(_env("MAX_AUDIO_SECONDS", 10800.0)),
                       help="longest clip accepted; longer clips get an error response (default: %(default)s = 3 h)")
    model.add_argument("--attention", default=_env("ATTENTION", "auto"),
                       help="encoder attention: auto (full up to --full-attention-max-seconds, local 256 frames each "
                       "side beyond), full, or N = local attention to N encoder frames (80 ms each) on each side "
                       "(default: %(default)s)")
    model.add_argument("--full-attention-max-seconds", type=float,
                       default=float(_env("FULL_ATTENTION_MAX_SECONDS", 600.0)),
                       help="longest clip that --attention auto gives full attention (default: %(default)s)")
    model.add_argument("--shm-growth-mb", type=int, default=int(_env("SHM_GROWTH_MB", 64)),
                       help="growth step of each Python-backend stub's /dev/shm region in MiB (default: %(default)s)")
    model.add_argument("--cpu-threads", type=int, default=_env("CPU_THREADS", None) or None,
                       help="torch intra-op threads per model instance (default for CPU instances: the usable cores "
                       "divided among the 3 x --instances stage processes, at least 1; GPU instances: torch's)")
    model.add_argument("--execution-env-path", default=_env("EXECUTION_ENV_PATH", None) or None,
                       help="EXECUTION_ENV_PATH for the Python backend stub (venv/conda directory or packed .tar.gz); "
                       "not needed when the stub's `python3` on PATH has parakeet-triton installed")
    model.add_argument("--render-only", metavar="DIR", default=None,
                       help="write the rendered model repository into DIR and exit (for containers / Kubernetes)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                        help="address for HTTP, gRPC and metrics (default: %(default)s; 0.0.0.0 in containers)")
    server.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", 8000)), help="(default: %(default)s)")
    server.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", 8001)), help="(default: %(default)s)")
    server.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", 8002)), help="(default: %(default)s)")
    server.add_argument("--log-verbose", type=int, nargs="?", const=1, default=int(_env("LOG_VERBOSE", 0)),
                        help="tritonserver --log-verbose level (flag alone: 1) (default: %(default)s)")
    server.add_argument("--tritonserver", default=_env("TRITONSERVER", None) or None,
                        help="tritonserver binary (default: the one on PATH, else the nvidia-pytriton wheel's)")
    server.add_argument("--ready-timeout", type=float, default=float(_env("READY_TIMEOUT", 1800)),
                        help="seconds to wait for the server to load and become ready (default: %(default)s)")
    server.add_argument("--admin-key", default=_env("ADMIN_KEY", None) or None,
                        help=f"operator key for Triton's admin APIs (shared-memory registration, logging, trace, "
                        f"model repository): callers send it as the '{protocol.ADMIN_KEY_HEADER}' HTTP header or the "
                        f"'{protocol.GRPC_ADMIN_KEY_HEADER}' gRPC metadata. "
                        "Default: a random key per start, i.e. closed to everyone")
    server.add_argument("--max-request-mb", type=int, default=_env("MAX_REQUEST_MB", None) or None,
                        help="largest HTTP request body in MiB, refused with 413 before it is read (default: one clip "
                        "of --max-audio-seconds as FP32 binary data + 64). gRPC is bounded by --max-audio-seconds")
    server.add_argument("--malloc", choices=sorted(ALLOCATORS), default=_env("MALLOC", None) or None,
                        help=f"allocator preloaded into tritonserver and the stage processes (LD_PRELOAD). Default: "
                        f"{DEFAULT_ALLOCATOR} when installed, else the system's; tcmalloc keeps the server's memory "
                        "flat under mixed request lengths (docs/load-test.md, Soak)")
    server.add_argument("--openai-port", type=int, default=int(_env("OPENAI_PORT", 0)) or None,
                        help="also run the OpenAI-compatible API (parakeet-openai) on this port of --host, stopped "
                        "with the server; its other settings come from its PARAKEET_OPENAI_* variables (docs/openai.md)")
    server.add_argument("--exit-timeout-secs", type=int, default=int(_env("EXIT_TIMEOUT_SECS", 8)),
                        help="on SIGTERM/SIGINT, seconds the requests in flight get to finish while new ones are refused "
                        "with UNAVAILABLE, before tritonserver is stopped (default: %(default)s)")
    return parser


def render_options(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions(
        checkpoint=args.checkpoint,
        device=args.device,
        instance_kind=args.instance_kind,
        instances=args.instances,
        max_batch_size=args.max_batch_size,
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        queue_timeout_s=args.queue_timeout_s,
        max_audio_seconds=args.max_audio_seconds,
        attention=args.attention,
        full_attention_max_seconds=args.full_attention_max_seconds,
        shm_growth_mb=args.shm_growth_mb,
        execution_env_path=args.execution_env_path,
        cpu_threads=args.cpu_threads,
    )


def _checked_checkpoint(source: str) -> Path:
    """The local `.nemo` for `source` (a Hugging Face id is fetched once, here), checked before Triton starts."""
    from parakeet_core.checkpoint import check_nemo, resolve_checkpoint

    path = resolve_checkpoint(source)
    check_nemo(path)
    return path


def _say(message: str) -> None:
    print(f"parakeet-serve: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = render_options(args)
    except ValueError as error:
        parser.error(str(error))
    if args.render_only:
        out = render_repository(options, args.render_only)
        _say(f"model repository written to {out} (checkpoint {options.resolved_checkpoint!r}, "
             f"instances {options.instances} x {options.triton_instance_kind}, device {options.device})")
        return 0

    endpoints = Endpoints(args.host, args.http_port, args.grpc_port, args.metrics_port)
    if args.openai_port:
        import importlib.util

        missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
        if missing:
            _say(f"error: --openai-port needs {', '.join(missing)}: pip install 'parakeet-triton[openai]'")
            return 2
    busy = busy_ports(endpoints, {"OpenAI API": args.openai_port} if args.openai_port else None)
    if busy:
        _say("error: " + "; ".join(busy))
        return 2
    try:
        options = dataclasses.replace(options, checkpoint=str(_checked_checkpoint(options.checkpoint)))
    except Exception as error:  # CheckpointError, or anything the Hub client raises
        _say(f"error: checkpoint {options.checkpoint!r}: {error}")
        return 2
    try:
        preload, note = choose_allocator(args.malloc)
    except FileNotFoundError as error:
        _say(f"error: --malloc {args.malloc}: {error}")
        return 2
    if note:
        _say(f"note: {note}")
    admin_key = args.admin_key or secrets.token_urlsafe(24)
    stop_signals: list[int] = []
    watchdogs: list[StubWatchdog] = []
    deaths: list[str] = []

    with tempfile.TemporaryDirectory(prefix="parakeet-serve-") as work:
        repository = render_repository(options, Path(work) / "model_repository")
        try:
            binary = find_tritonserver(Path(work) / "tritonserver", args.tritonserver)
        except FileNotFoundError as error:
            _say(f"error: {error}")
            return 2
        shm_prefix = f"parakeet_{os.getpid()}_"
        # In a private (0700) directory, which only this front reaches; a Unix socket's path must stay short.
        http_socket = Path(work) / "triton-http.sock"
        if len(str(http_socket)) > 100:
            http_socket = Path(tempfile.mkdtemp(prefix="parakeet-http-", dir="/tmp")) / "triton.sock"
        command = tritonserver_command(binary, repository, endpoints, shm_prefix=shm_prefix,
                                       log_verbose=args.log_verbose, exit_timeout_secs=args.exit_timeout_secs,
                                       shm_growth_bytes=options.shm_growth_mb << 20, admin_key=admin_key,
                                       http_socket=http_socket)
        server = TritonServerProcess(command, stub_environment(binary, preload=preload), endpoints, shm_prefix=shm_prefix)
        max_request_bytes = ((args.max_request_mb << 20) if args.max_request_mb
                             else default_max_request_bytes(options.max_audio_seconds))
        try:
            front = HttpFront(endpoints.host, endpoints.http_port, FrontConfig(str(http_socket), max_request_bytes))
        except OSError as error:
            _say(f"error: HTTP port {endpoints.http_port} on {endpoints.host}: {error.strerror or error}")
            return 2
        front.start()

        serving = threading.Event()

        def drain_then_stop() -> None:
            result = drain(repository, f"http://{endpoints.http_url}", args.exit_timeout_secs, say=_say)
            if result.drained:
                _say(f"drained: {result.in_flight_at_start} request(s) in flight finished in {result.seconds:.1f} s")
            else:
                _say(f"warning: stopping with requests in flight after {result.seconds:.1f} s: {result.detail}")
            if len(stop_signals) == 1:
                server.signal(signal.SIGTERM)

        gateway: list[subprocess.Popen] = []

        def forward(signum, _frame):
            stop_signals.append(signum)
            for process in gateway:  # uvicorn stops accepting and lets its requests in flight finish
                process.send_signal(signal.SIGTERM if len(stop_signals) == 1 else signal.SIGKILL)
            for watchdog in watchdogs:
                watchdog.stop()
            # first signal: drain, then graceful shutdown (at once if not yet serving); a second one: kill
            if len(stop_signals) > 1:
                server.signal(signal.SIGKILL)
            elif serving.is_set():
                threading.Thread(target=drain_then_stop, name="drain", daemon=True).start()
            else:
                server.signal(signal.SIGTERM)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            _say(f"starting tritonserver from {binary.origin}; checkpoint {options.resolved_checkpoint!r}, "
                 f"device {options.device}, {options.instances} x {options.triton_instance_kind}")
            server.start()
            if args.openai_port:
                gateway.append(subprocess.Popen(
                    [sys.executable, "-m", "parakeet_openai", "--triton-url", endpoints.grpc_url,
                     "--host", endpoints.host, "--port", str(args.openai_port)], stdin=subprocess.DEVNULL))
            ready = server.wait_ready(args.ready_timeout, should_stop=lambda: bool(stop_signals))
            if ready and not stop_signals:
                openai = f"  OpenAI API http://{endpoints.host}:{args.openai_port}/v1" if args.openai_port else ""
                _say(f"ready: HTTP http://{endpoints.http_url}  gRPC {endpoints.grpc_url}  metrics {endpoints.metrics_url}"
                     f"{openai}  model '{protocol.ENSEMBLE_MODEL}' (pid {server.pid})")

                def on_death(model: str, pid: int) -> None:
                    deaths.append(f"the {model!r} stage's backend process (pid {pid}) died")
                    _say(f"error: {deaths[-1]}; stopping tritonserver so that it can be restarted")
                    stop_process(server.pid, grace=3.0)

                watchdogs.append(StubWatchdog(server.pid, on_death))
                watchdogs[0].start()
                serving.set()
            elif not stop_signals:
                if server.poll() is None:
                    _say(f"error: tritonserver not ready after {args.ready_timeout:.0f} s; stopping it")
                    server.stop()
                    return 1
                code = server.wait()
                _say(f"error: tritonserver exited with code {code} before it was ready:\n{server.failure_reason()}")
                return code or 1
            code = server.wait()
            for watchdog in watchdogs:
                watchdog.stop()
            if deaths:
                _say(f"error: tritonserver stopped (exit code {code}) because {deaths[0]}")
                return 3
            if stop_signals:
                _say(f"tritonserver stopped (exit code {code})")
                return code
            _say(f"error: tritonserver exited unexpectedly with code {code}:\n{server.failure_reason()}")
            return code or 1
        finally:
            if server.poll() is None:
                server.stop()
            for process in gateway:
                if process.poll() is None:
                    process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            front.stop()
            if http_socket.parent != Path(work):
                shutil.rmtree(http_socket.parent, ignore_errors=True)
            leftovers = server.cleanup_shared_memory()
            if leftovers:
                _say(f"removed {len(leftovers)} shared-memory region(s) left behind: {', '.join(leftovers)}")
            for sig, handler in previous.items():
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
