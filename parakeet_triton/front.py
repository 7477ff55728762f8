"""The HTTP front: a validating proxy between HTTP clients and Triton's own HTTP server.

Triton 2.51's HTTP front end crashes the whole server on some small malicious requests: a `shape` of 2**40
elements with no data aborts it (`std::bad_alloc`, the buffer is sized from the shape alone; fixed in Triton
2.59 by `--http-max-input-size`), and JSON nested very deeply overflows its stack (a limit on "data" came in 2.58,
iterative parsing of the whole document only in 2.69). We pin 2.51, so the fix is ours: tritonserver's HTTP
listens on a Unix socket in a private directory that only this process reaches, and this front takes the public
HTTP port. Every request is checked before a byte reaches Triton:

- the body has a Content-Length within `max_body_bytes` (else 411 / 413, refused before it is read), and no
  Content-Encoding (415: Triton's decompression is not exposed); responses are never compressed;
- a JSON body (or the JSON header of a binary-tensor request) is at most `max_json_bytes`, parses, and nests at
  most `MAX_JSON_DEPTH` levels;
- each input of an inference request has a well-formed shape whose element count matches its data: the JSON
  `data` (counted, nested no deeper than the shape), or `binary_data_size` (= elements x the datatype's size, and
  the binary sizes add up to the rest of the body).

Anything else (health, metadata, config, statistics, the operator-key APIs) is forwarded as it is. The gRPC port
is Triton's own: its front end sizes buffers from the data received, not from the shape.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import math
import re
import socket
import socketserver
import threading
from typing import Any, Callable

from .protocol import DEFAULT_MAX_AUDIO_SECONDS, SAMPLE_RATE

MAX_JSON_DEPTH = 32
DEFAULT_MAX_JSON_BYTES = 64 << 20
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "accept-encoding", "content-length", "host"}
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer/?$")
DATATYPE_BYTES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4,
                  "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8, "BYTES": None}
MAX_DIMENSION = 1 << 40


def default_max_request_bytes(max_audio_seconds: float) -> int:
    """One clip of `max_audio_seconds` as FP32 binary tensor data, plus 64 MiB (headers, other inputs)."""
    return int(max_audio_seconds * SAMPLE_RATE * 4) + (64 << 20)


class Refused(Exception):
    """A request the front answers itself, with `status` and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (list, dict)))
    return True


def parse_json(text: bytes, what: str = "request body") -> Any:
    """The parsed JSON document, or Refused(400) naming why not (invalid, or nested too deeply)."""
    if len(text) == 0:
        raise Refused(400, f"{what} is empty")
    depth = 0
    # Bound the nesting before parsing: a cheap scan (brackets inside strings can only overstate the depth).
    for match in re.finditer(rb"[\[\]{}]", text):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > MAX_JSON_DEPTH:
            raise Refused(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise Refused(400, f"{what} is not valid JSON: {error}") from None
    if not _depth_ok(document, MAX_JSON_DEPTH):
        raise Refused(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return document


def _count_leaves(data: Any, max_depth: int) -> int:
    count = 0
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= max_depth:
                raise Refused(400, "input 'data' is nested deeper than its shape")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            raise Refused(400, "input 'data' holds an object; expected numbers, booleans or strings")
        else:
            count += 1
    return count


def check_infer_request(header: Any, binary_bytes: int) -> None:
    """Refused(400) unless every input's shape, datatype and data agree (see the module docstring)."""
    if not isinstance(header, dict):
        raise Refused(400, "inference request must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused(400, "inference request needs a non-empty 'inputs' list")
    binary_total = 0
    for index, entry in enumerate(inputs):
        if not isinstance(entry, dict):
            raise Refused(400, f"input {index} must be a JSON object")
        name = entry.get("name")
        label = f"input {name!r}" if isinstance(name, str) else f"input {index}"
        if not isinstance(name, str) or not name:
            raise Refused(400, f"{label} needs a 'name'")
        datatype = entry.get("datatype")
        if datatype not in DATATYPE_BYTES:
            raise Refused(400, f"{label}: unknown datatype {datatype!r}")
        shape = entry.get("shape")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIMENSION for d in shape)):
            raise Refused(400, f"{label}: 'shape' must be a list of at most 16 integers in 0..2^40; got {shape!r:.80}")
        elements = math.prod(shape)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise Refused(400, f"{label}: 'parameters' must be an object")
        binary_size = parameters.get("binary_data_size")
        if "data" in entry:
            if binary_size is not None:
                raise Refused(400, f"{label} has both 'data' and 'binary_data_size'")
            counted = _count_leaves(entry["data"], max(1, len(shape)))
            if counted != elements:
                raise Refused(400, f"{label}: shape {shape} holds {elements} elements but 'data' has {counted}")
        elif binary_size is not None:
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise Refused(400, f"{label}: 'binary_data_size' must be a non-negative integer")
            size = DATATYPE_BYTES[datatype]
            if size is not None and binary_size != elements * size:
                raise Refused(400, f"{label}: shape {shape} of {datatype} needs {elements * size} bytes but "
                                   f"'binary_data_size' is {binary_size}")
            binary_total += binary_size
        elif "shared_memory_region" not in parameters:
            raise Refused(400, f"{label} has no 'data', 'binary_data_size' or shared-memory region")
    if binary_total != binary_bytes:
        raise Refused(400, f"the inputs' binary_data_size add up to {binary_total} bytes but the body carries "
                           f"{binary_bytes} bytes after the JSON header")


@dataclasses.dataclass(frozen=True)
class FrontConfig:
    upstream_socket: str
    """Path of the Unix socket tritonserver's HTTP server listens on (`--http-address=unix:PATH`)."""
    max_body_bytes: int
    """Largest request body accepted (413 beyond, before it is read)."""
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    """Largest JSON document (a whole JSON body, or the JSON header of a binary-tensor request)."""
    max_connections: int = 512
    """Connections served at once; more get 503 and are closed."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=None)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.path)
        self.sock = sock


def _handler(config: FrontConfig, slots: threading.BoundedSemaphore) -> type[http.server.BaseHTTPRequestHandler]:
    class FrontHandler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "parakeet-front"
        sys_version = ""
        timeout = 300  # an idle keep-alive connection is closed after this many seconds
        upstream: _UnixConnection | None = None

        def setup(self) -> None:
            super().setup()
            self._slot = slots.acquire(blocking=False)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if self._slot:
                    slots.release()
                if self.upstream is not None:
                    self.upstream.close()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _serve(self) -> None:
            try:
                if not self._slot:
                    raise Refused(503, "too many connections; retry later")
                body = self._read_body()
                if self.command == "POST" and body:
                    self._check(body)
            except Refused as refusal:
                self._reply_error(refusal.status, str(refusal))
                return
            self._forward(body)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "identity").lower() != "identity":
                self.close_connection = True
                raise Refused(411, "chunked request bodies are not accepted; send Content-Length")
            encoding = self.headers.get("Content-Encoding", "identity").lower()
            if encoding not in ("", "identity"):
                self.close_connection = True
                raise Refused(415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed")
            raw = self.headers.get("Content-Length")
            if raw is None:
                if self.command == "POST":
                    self.close_connection = True
                    raise Refused(411, "POST needs a Content-Length header")
                return b""
            if not raw.isdigit():
                self.close_connection = True
                raise Refused(400, f"Content-Length {raw!r:.40} is not a number")
            length = int(raw)
            if length > config.max_body_bytes:
                self.close_connection = True
                raise Refused(413, f"request body of {length} bytes is over the limit of {config.max_body_bytes} "
                                   "bytes (--max-request-mb)")
            body = self.rfile.read(length)
            if len(body) != length:
                self.close_connection = True
                raise Refused(400, f"request body ended after {len(body)} of {length} bytes")
            return body

        def _check(self, body: bytes) -> None:
            raw = self.headers.get("Inference-Header-Content-Length")
            if raw is not None:
                if not raw.isdigit() or int(raw) > len(body):
                    raise Refused(400, f"Inference-Header-Content-Length {raw!r:.40} does not fit the body of "
                                       f"{len(body)} bytes")
                header_length = int(raw)
            else:
                header_length = len(body)
            if header_length > config.max_json_bytes:
                raise Refused(413, f"JSON of {header_length} bytes is over the limit of {config.max_json_bytes} "
                                   "bytes; send long audio as binary tensor data (tritonclient does)")
            document = parse_json(body[:header_length])
            if INFER_PATH.match(self.path.split("?", 1)[0]):
                check_infer_request(document, len(body) - header_length)

        def _forward(self, body: bytes) -> None:
            headers = {key: value for key, value in self.headers.items() if key.lower() not in HOP_BY_HOP}
            if body or self.command == "POST":
                headers["Content-Length"] = str(len(body))
            for attempt in (0, 1):
                if self.upstream is None:
                    self.upstream = _UnixConnection(config.upstream_socket)
                try:
                    self.upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = self.upstream.getresponse()
                    payload = response.read()
                    break
                except (OSError, http.client.HTTPException) as error:
                    self.upstream.close()
                    self.upstream = None
                    if attempt == 1:
                        self._reply_error(502, f"the server behind the HTTP front is not available: {error}")
                        return
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _reply_error(self, status: int, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return FrontHandler


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, family: int):
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:  # HTTPServer's would resolve the host name (a DNS query)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class HttpFront:
    """The front on `host:port`, serving from its own threads until `stop()`."""

    def __init__(self, host: str, port: int, config: FrontConfig):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.config = config
        self.server = _Server((host, port), _handler(config, threading.BoundedSemaphore(config.max_connections)), family)
        self._thread: threading.Thread | None = None

    def start(self) -> "HttpFront":
        self._thread = threading.Thread(target=self.server.serve_forever, name="http-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def main(argv: list[str] | None = None, on_ready: Callable[[HttpFront], None] | None = None) -> int:
    import argparse
    import os
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m parakeet_triton.front", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--upstream-socket", required=True, help="tritonserver's HTTP Unix socket")
    parser.add_argument("--max-audio-seconds", type=float,
                        default=float(os.environ.get("PARAKEET_MAX_AUDIO_SECONDS") or DEFAULT_MAX_AUDIO_SECONDS),
                        help="the server's longest clip, which sets the default --max-request-mb "
                             "(env PARAKEET_MAX_AUDIO_SECONDS; default %(default)s)")
    parser.add_argument("--max-request-mb", type=int, default=int(os.environ.get("PARAKEET_MAX_REQUEST_MB") or 0),
                        help="largest request body, MiB (env PARAKEET_MAX_REQUEST_MB; default: one clip of "
                             "--max-audio-seconds as FP32 + 64)")
    args = parser.parse_args(argv)
    limit = (args.max_request_mb << 20) if args.max_request_mb else default_max_request_bytes(args.max_audio_seconds)
    front = HttpFront(args.host, args.port, FrontConfig(args.upstream_socket, limit)).start()
    print(f"parakeet-front: HTTP on {args.host}:{args.port} -> unix:{args.upstream_socket}", file=sys.stderr, flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    if on_ready is not None:
        on_ready(front)
    stopped.wait()
    front.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
