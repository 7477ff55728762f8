"""Stop tritonserver when one of its Python-backend stub processes dies.

Triton 2.51 does not recover from a dead stub (killed by the OOM killer, `kill -9`, a crash in native code):
every later request to that model fails with "Stub process ... is not healthy" while `/v2/health/ready` keeps
answering 200, so a load balancer keeps sending traffic to a server that can only fail. The watchdog notices the
death within about a second, logs which stage died, and stops the server (SIGTERM, then SIGKILL after a grace
period) so that the process supervisor (parakeet-serve's caller, the container runtime, Kubernetes) restarts it.

`parakeet-serve` runs it as a thread; the container entrypoint as a process:

    python -m parakeet_triton.watchdog --pid PID --ready-url http://127.0.0.1:8000/v2/health/ready
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from .drain import MARKER_NAME

STUB_NAME = "triton_python_backend_stub"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(c) for c in (task / "children").read_text().split())
    except OSError:
        pass
    return found


def _alive(pid: int) -> bool:
    """Running (not exited, not a zombie waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def backend_stubs(server_pid: int) -> dict[int, str]:
    """The live Python-backend stubs under `server_pid`: {pid: model name} (the model.py path in their command)."""
    stubs: dict[int, str] = {}
    frontier = [server_pid]
    while frontier:
        for child in _children(frontier.pop()):
            frontier.append(child)
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and Path(argv[0].decode(errors="replace")).name == STUB_NAME and _alive(child):
                model_path = Path(argv[1].decode(errors="replace")) if len(argv) > 1 else Path("?/?/?")
                stubs[child] = model_path.parent.parent.name or "?"
    return stubs


class StubWatchdog:
    """Calls `on_death(model, pid)` once, from its own thread, when a stub present at `start()` dies."""

    def __init__(self, server_pid: int, on_death: Callable[[str, int], None], interval: float = 0.5):
        self.server_pid = server_pid
        self.on_death = on_death
        self.interval = interval
        self.stubs: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> dict[int, str]:
        self.stubs = backend_stubs(self.server_pid)
        self._thread = threading.Thread(target=self._run, name="stub-watchdog", daemon=True)
        self._thread.start()
        return self.stubs

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not _alive(self.server_pid):
                return
            for pid, model in self.stubs.items():
                if not _alive(pid):
                    if not self._stop.is_set():
                        self.on_death(model, pid)
                    return


def stop_process(pid: int, grace: float) -> None:
    """SIGTERM, then SIGKILL if `pid` still runs after `grace` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parakeet_triton.watchdog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True, help="tritonserver's process id")
    parser.add_argument("--ready-url", required=True, help="the server's /v2/health/ready URL")
    parser.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL (default 3)")
    parser.add_argument("--repository", type=Path, default=None,
                        help="the served model repository: once it is draining (parakeet_triton.drain), stub exits "
                        "are the shutdown's, not deaths")
    args = parser.parse_args(argv)
    draining = (lambda: False) if args.repository is None else (args.repository / MARKER_NAME).exists
    while not _ready(args.ready_url):
        if not _alive(args.pid):
            return 0
        time.sleep(1)
    died = threading.Event()

    def on_death(model: str, pid: int) -> None:
        if draining():
            return
        print(f"parakeet-watchdog: error: the {model!r} stage's backend process (pid {pid}) died; stopping "
              f"tritonserver (pid {args.pid}) so that it is restarted", file=sys.stderr, flush=True)
        stop_process(args.pid, args.grace)
        died.set()

    watchdog = StubWatchdog(args.pid, on_death)
    stubs = watchdog.start()
    print(f"parakeet-watchdog: watching {len(stubs)} backend processes of tritonserver (pid {args.pid})",
          file=sys.stderr, flush=True)
    while _alive(args.pid) and not died.is_set() and not draining():
        time.sleep(1)
    watchdog.stop()
    return 1 if died.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
