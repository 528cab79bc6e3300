"""A fault-injecting HTTP proxy in front of the LocalHub, for tests of the Hub client's bounds.

`FaultProxy(upstream)` listens on 127.0.0.1 and forwards every request to ``upstream`` (the
session's LocalHub) unchanged, until a test injects `Fault`s: each applies to the requests its
``when`` accepts, ``times`` times (or always), and does one of

- ``stall``: read the request and send nothing, until the test ends;
- ``stall_body``: send the headers and the first ``keep`` bytes of the body, then nothing;
- ``drip``: send the answer one byte every ``interval`` seconds;
- ``reset``: close the connection with a TCP reset, nothing sent;
- ``short``: send the headers (the full Content-Length) and half of the body, then close;
- ``shift_range``: ask upstream for the requested range moved by ``offset`` bytes and pass its
  206 on, so the Content-Range names other bytes than those asked for;
- ``ignore_range``: drop the Range header upstream, so the whole file comes back with 200;
- ``status``: answer ``status`` with ``headers`` (429 + Retry-After, 503, ...) from the proxy.

`requests` records every request with the fault it got and the body bytes that reached the
client's socket. Each connection is served by its own thread; `clear` (and `close`) ends stalls.
"""

from __future__ import annotations

import http.client
import re
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, NamedTuple
from urllib.parse import urlsplit

_HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade")
)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_CHUNK = 64 * 1024


@dataclass
class ProxiedRequest:
    """A request the proxy saw (recorded on arrival): the fault it got and the body bytes that
    went out so far."""

    method: str
    path: str
    range: str | None
    fault: str | None
    nbytes: int


@dataclass
class Fault:
    """What to do to the requests ``when(method, path, range_header)`` accepts."""

    kind: str
    when: Callable[[str, str, str | None], bool] = lambda method, path, range_: True
    times: int | None = None  # None: every matching request
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    keep: int = 0
    offset: int = 4
    interval: float = 0.05


class _Request(NamedTuple):
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class FaultProxy:
    """Forward to ``upstream`` (http://host:port), applying the injected faults."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._release = threading.Event()
        self.requests: list[ProxiedRequest] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="FaultProxy", daemon=True
        )
        self._thread.start()

    def inject(self, *faults: Fault) -> None:
        """Apply these faults from now on (the first that matches a request wins)."""
        with self._lock:
            self._faults.extend(faults)

    def clear(self) -> None:
        """Forget faults and records; stalled answers end (their connections close)."""
        with self._lock:
            self._faults.clear()
            self.requests.clear()
            self._release.set()
            self._release = threading.Event()

    def close(self) -> None:
        self.clear()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def matching(self, fault: str | None) -> list[ProxiedRequest]:
        """The recorded requests that got ``fault`` (None: passed through unharmed)."""
        with self._lock:
            return [r for r in self.requests if r.fault == fault]

    def _take(self, request: _Request) -> tuple[Fault | None, threading.Event, ProxiedRequest]:
        """The fault for a request (None: pass it on), the event ending stalls, its record."""
        path, range_ = urlsplit(request.target).path, request.header("range")
        with self._lock:
            chosen = None
            for fault in self._faults:
                if fault.times != 0 and fault.when(request.method, path, range_):
                    if fault.times is not None:
                        fault.times -= 1
                    chosen = fault
                    break
            record = ProxiedRequest(request.method, path, range_, chosen and chosen.kind, 0)
            self.requests.append(record)
            return chosen, self._release, record


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while (request := _read_request(self.rfile)) is not None:
            fault, release, record = self.server.proxy._take(request)
            try:
                keep_open = self._answer(request, fault, release, record)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client gave up on the answer
            if not keep_open:
                return

    def _answer(
        self,
        request: _Request,
        fault: Fault | None,
        release: threading.Event,
        record: ProxiedRequest,
    ) -> bool:
        """Answer one request, counting body bytes in ``record``; whether to keep the
        connection open."""
        kind = fault.kind if fault else None
        if kind == "stall":
            release.wait(60)
            return False
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if kind == "status":
            assert fault is not None
            body = b'{"error": "injected by FaultProxy"}'
            headers = [("Content-Type", "application/json"), *fault.headers.items()]
            self._head(fault.status, "Injected", headers, len(body))
            self.wfile.write(body)
            record.nbytes = len(body)
            return True
        headers = [(k, v) for k, v in request.headers if k.lower() not in _HOP_BY_HOP]
        if kind in ("shift_range", "ignore_range"):
            assert fault is not None
            asked = request.header("range") or ""
            headers = [(k, v) for k, v in headers if k.lower() != "range"]
            match = _RANGE.fullmatch(asked.strip())
            if kind == "shift_range" and match:
                first, last = int(match[1]) + fault.offset, int(match[2]) + fault.offset
                headers.append(("Range", f"bytes={first}-{last}"))
        upstream = http.client.HTTPConnection(*self.server.proxy._upstream, timeout=60)
        try:
            upstream.putrequest(request.method, request.target, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() != "content-length":
                    upstream.putheader(name, value)
            upstream.putheader("Content-Length", str(len(request.body)))
            upstream.endheaders(request.body)
            response = upstream.getresponse()
            declared = int(response.getheader("Content-Length") or 0)
            length = 0 if request.method == "HEAD" else declared  # body bytes to pass on
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
            ]
            self._head(response.status, response.reason, kept, declared)
            if kind == "stall_body":
                assert fault is not None
                self._copy(response, min(fault.keep, length), record)
                release.wait(60)
                return False
            if kind == "short":
                self._copy(response, length // 2, record)
                return False
            if kind == "drip":
                assert fault is not None
                self._copy(response, length, record, fault.interval, release)
                return False
            self._copy(response, length, record)
            return True
        finally:
            upstream.close()

    def _head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int) -> None:
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"Content-Length: {length}")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.wfile.flush()

    def _copy(
        self,
        response: http.client.HTTPResponse,
        count: int,
        record: ProxiedRequest,
        interval: float | None = None,
        release: threading.Event | None = None,
    ) -> None:
        """Send ``count`` bytes of the upstream body; one byte per ``interval`` s if given,
        until ``release`` is set."""
        while record.nbytes < count and not (release and release.is_set()):
            step = 1 if interval else min(_CHUNK, count - record.nbytes)
            chunk = response.read(step)
            if not chunk:
                return
            self.wfile.write(chunk)
            self.wfile.flush()
            record.nbytes += len(chunk)
            if interval:
                time.sleep(interval)


def _read_request(rfile: IO[bytes]) -> _Request | None:
    """The next request on a connection, or None when the client closed it."""
    try:
        line = rfile.readline(65537)
    except (ConnectionResetError, OSError):
        return None
    if not line.strip():
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    message = http.client.parse_headers(rfile)  # type: ignore[arg-type]
    headers = list(message.items())
    if (message.get("Transfer-Encoding") or "").lower() == "chunked":
        body = bytearray()
        while size := int(rfile.readline().split(b";")[0].strip() or b"0", 16):
            body += rfile.read(size)
            rfile.readline()
        while rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return _Request(method, target, headers, bytes(body))
    return _Request(method, target, headers, rfile.read(int(message.get("Content-Length") or 0)))
