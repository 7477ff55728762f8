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
from typing import Mapping

from . import protocol
from .drain import drain
from .front import FrontConfig, HttpFront, default_max_request_bytes
from .render import RenderOptions, render_repository
from .server import (Endpoints, TritonServerProcess, busy_ports, choose_allocator, find_tritonserver, stub_environment,
                     tritonserver_command)
from .settings import BY_NAME, REPOSITORY_SETTINGS, SERVER_SETTINGS, add_arguments
from .watchdog import StubWatchdog, stop_process


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line: one option per setting of parakeet_triton.settings, defaulting to its variable in
    `environ` (os.environ); a variable that does not parse is a usage error naming it."""
    parser = argparse.ArgumentParser(
        prog="parakeet-serve",
        description="Serve a Parakeet TDT checkpoint with Triton Inference Server (ensemble model "
        f"'{protocol.ENSEMBLE_MODEL}': {protocol.WAV} + {protocol.WAV_LENS} -> {protocol.TRANSCRIPTS}, {protocol.TIMESTAMPS}).",
        epilog="Every option but --render-only can also be set as an environment variable PARAKEET_<OPTION> "
        "(upper case, dashes as underscores, e.g. PARAKEET_CHECKPOINT); flags win.",
    )
    groups = (
        (parser.add_argument_group("model repository (rendered into every model's config.pbtxt)"), REPOSITORY_SETTINGS),
        (parser.add_argument_group("launcher and server"), SERVER_SETTINGS),
    )
    try:
        for group, settings in groups:
            add_arguments(group, settings, os.environ if environ is None else environ)
    except ValueError as error:
        parser.error(str(error))
    return parser


def render_options(args: argparse.Namespace) -> RenderOptions:
    """The model-repository settings of parsed arguments (ValueError naming the first invalid one)."""
    return RenderOptions(**{setting.name: getattr(args, setting.name) for setting in REPOSITORY_SETTINGS})


def _checked_checkpoint(source: str) -> Path:
    """The local `.nemo` for `source` (a Hugging Face id is fetched once, here), checked before Triton starts."""
    from parakeet_core.checkpoint import check_nemo, resolve_checkpoint

    path = resolve_checkpoint(source)
    check_nemo(path)
    return path


LOCAL_CHECKPOINT_HINT = (f"{BY_NAME['checkpoint'].flag} /path/to/model.nemo, "
                         f"or {BY_NAME['checkpoint'].env}=/path/to/model.nemo")


def _checkpoint_error(source: str, error: Exception) -> str:
    """The message for a checkpoint that cannot be used; one not on disk also says how to pass a local file."""
    message = str(error) if source in str(error) else f"checkpoint {source!r}: {error}"
    if not Path(source).expanduser().exists():
        message += f" ({LOCAL_CHECKPOINT_HINT})"
    return message


def _writable_log_file(path: str) -> Path:
    """`path` made absolute, its folder created and the file opened once for writing (OSError if it cannot be)."""
    log_file = Path(path).expanduser().absolute()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.open("a").close()
    return log_file


def _model_names(options: RenderOptions) -> str:
    def named(name: str, aliases: tuple[str, ...]) -> str:
        return f"{name!r}" + (f" (also as {', '.join(repr(a) for a in aliases)})" if aliases else "")

    streaming = (f", streaming model {named(options.streaming_model_name, options.streaming_model_aliases)}"
                 if options.streaming else "")
    return named(options.model_name, options.model_aliases) + streaming


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
        log_file = _writable_log_file(args.log_file) if args.log_file else None
    except OSError as error:
        _say(f"error: --log-file {args.log_file}: {error.strerror or error}")
        return 2
    try:
        options = dataclasses.replace(options, checkpoint=str(_checked_checkpoint(options.checkpoint)))
    except Exception as error:  # CheckpointError, or anything the Hub client raises
        _say(f"error: {_checkpoint_error(options.checkpoint, error)}")
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
        server = TritonServerProcess(command, stub_environment(binary, preload=preload), endpoints, shm_prefix=shm_prefix,
                                     log_path=log_file)
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
            if log_file is not None:
                _say(f"tritonserver's log goes to {log_file}; its errors are shown here too")
            server.start()
            if args.openai_port:
                gateway.append(subprocess.Popen(
                    [sys.executable, "-m", "parakeet_openai", "--triton-url", endpoints.grpc_url,
                     "--triton-model", options.model_name, "--host", endpoints.host, "--port", str(args.openai_port)], stdin=subprocess.DEVNULL))
            ready = server.wait_ready(args.ready_timeout, should_stop=lambda: bool(stop_signals))
            if ready and not stop_signals:
                openai = f"  OpenAI API http://{endpoints.host}:{args.openai_port}/v1" if args.openai_port else ""
                _say(f"ready: HTTP http://{endpoints.http_url}  gRPC {endpoints.grpc_url}  metrics {endpoints.metrics_url}"
                     f"{openai}  model {_model_names(options)} (pid {server.pid})")

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
