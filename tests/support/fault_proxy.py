"""A fault-injecting HTTP/1.1 proxy on loopback, between a client and a real server.

    with MlflowServer(tmp_path) as server, FaultProxy(server.port) as proxy:
        client = TracingClient(proxy.url)               # the client only ever sees the proxy
        proxy.set_fault("status", status=503, path_prefix="/api/3.0/mlflow/traces", times=2)
        ...                                             # the next 2 trace calls get a 503
        proxy.set_fault("refuse")                       # connects are refused, pooled ones closed
        proxy.clear()                                   # listening again, on the same port
        assert proxy.count("/api/3.0/mlflow/traces") == 3

Faults (``set_fault(kind, ...)``; each decides the fate of requests read after it is set):

- ``pass``: forward to the upstream and back.
- ``refuse``: stop listening (connects are refused) and close every open client connection;
  ``clear()`` or any other fault listens again on the same port. No ``path_prefix``/``times``.
- ``reset``: read the request, then reset the connection (SO_LINGER 0) without answering.
- ``hang``: read the request and never answer, until the fault is set again or cleared (not when
  ``times`` runs out) or the proxy closes; then the connection is closed unanswered.
- ``drip``: forward, but send the response ``chunk`` bytes at a time, ``delay`` seconds apart.
- ``status``: answer ``status`` (default 503) without contacting the upstream, with a JSON body like
  MLflow's (``{"error_code": ..., "message": ...}``) and ``Retry-After: retry_after`` if given.
- ``truncate``: forward, send only the first ``after`` bytes of the response, then close.

``path_prefix`` limits a fault to matching request paths (others pass); ``times=K`` applies it to
the next K matching requests only, then the proxy reverts to ``pass``. ``counts`` holds requests
seen per path (query string removed), faulted or not. Keep-alive works on both sides: requests
are parsed (Content-Length or chunked bodies) and so are responses (Content-Length, chunked or
close-delimited), so each request on a pooled connection meets the fault in force when it
arrives. If the upstream cannot be reached, the client's connection is reset.

Standard library only; one thread per connection. ``close()`` (and ``__exit__``) closes every
socket and joins the threads, so no thread or port is left behind.
"""

from __future__ import annotations

import collections
import http
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the module needs nothing outside the standard library
    from typing import Self

__all__ = ["Fault", "FaultProxy"]

KINDS = ("pass", "refuse", "reset", "hang", "drip", "status", "truncate")
ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "ENDPOINT_NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL_ERROR",
    502: "TEMPORARILY_UNAVAILABLE",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MAX_HEAD = 64 * 1024


class _Closed(Exception):
    """The peer closed the connection (or sent something that is not HTTP/1.x)."""


@dataclass
class Fault:
    kind: str = "pass"
    path_prefix: str | None = None
    times: int | None = None  # remaining matching requests; None = until changed
    status: int = 503
    retry_after: str | None = None
    chunk: int = 8  # drip
    delay: float = 0.01  # drip
    after: int = 0  # truncate


@dataclass
class _Message:
    head: bytes  # start line and headers, with the blank line
    body: bytes  # raw, as framed on the wire (chunked stays chunked)
    first_line: str
    headers: dict[str, str]  # lower-case names
    close: bool  # the connection ends after this message


class _Reader:
    """Buffered reads from a socket (unlike ``makefile``, it never keeps the socket open)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer, self.received = sock, bytearray(), 0  # received: ever, in bytes

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.received += len(data)
        self.buffer += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def readline(self, limit: int = _MAX_HEAD) -> bytes:
        while self.buffer.find(b"\n", 0, limit) < 0 and len(self.buffer) < limit and self._fill():
            pass
        end = self.buffer.find(b"\n", 0, limit)
        return self._take(min(len(self.buffer), limit) if end < 0 else end + 1)

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self.buffer) < size) and self._fill():
            pass
        return self._take(len(self.buffer) if size < 0 else size)


def _read_head(rfile: _Reader) -> tuple[bytes, str, dict[str, str]]:
    lines: list[bytes] = []
    while True:
        line = rfile.readline()
        if not line or not line.endswith(b"\n"):
            raise _Closed()
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue  # tolerate stray CRLF between keep-alive messages
        lines.append(line)
        if sum(map(len, lines)) > _MAX_HEAD:
            raise _Closed()
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return b"".join(lines) + b"\r\n", lines[0].decode("latin-1").strip(), headers


def _read_exact(rfile: _Reader, size: int) -> bytes:
    data = rfile.read(size)
    if len(data) != size:
        raise _Closed()
    return data


def _read_body(rfile: _Reader, headers: dict[str, str], until_eof: bool) -> tuple[bytes, bool]:
    """The raw body and whether it was delimited by the connection closing."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = rfile.readline()
            if not size_line.endswith(b"\n"):
                raise _Closed()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            parts.append(_read_exact(rfile, size + 2))
        while True:  # trailers, up to the blank line
            line = rfile.readline()
            if not line.endswith(b"\n"):
                raise _Closed()
            parts.append(line)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts), False
    if "content-length" in headers:
        return _read_exact(rfile, int(headers["content-length"])), False
    return (rfile.read(), True) if until_eof else (b"", False)


def _wants_close(first_line: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    return "close" in connection or ("HTTP/1.0" in first_line and "keep-alive" not in connection)


def _read_request(rfile: _Reader) -> _Message:
    head, first_line, headers = _read_head(rfile)
    if len(first_line.split()) != 3:
        raise _Closed()
    body, _ = _read_body(rfile, headers, until_eof=False)
    return _Message(head, body, first_line, headers, _wants_close(first_line, headers))


def _read_response(rfile: _Reader, method: str) -> _Message:
    interim = b""
    while True:
        head, first_line, headers = _read_head(rfile)
        status = int(first_line.split()[1])
        if status >= 200:
            break
        interim += head  # 100 Continue and friends: pass them along, read the real one
    if method == "HEAD" or status in (204, 304):
        body, eof = b"", False
    else:
        body, eof = _read_body(rfile, headers, until_eof=True)
    return _Message(
        interim + head, body, first_line, headers, eof or _wants_close(first_line, headers)
    )


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """An HTTP/1.1 proxy from its own port on 127.0.0.1 to ``upstream_port``, faults on demand."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.counts: collections.Counter[str] = collections.Counter()
        self._fault = Fault()
        self._generation = 0  # bumped by set_fault/clear (not when `times` runs out)
        self._cond = threading.Condition()  # guards everything below and wakes hung requests
        self._closed = False
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.port = 0
        self._listen()

    # ------------------------------------------------------------------ public surface

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_fault(
        self,
        kind: str,
        *,
        path_prefix: str | None = None,
        times: int | None = None,
        **options: object,
    ) -> None:
        """Apply ``kind`` (see the module doc) to requests from now on; replaces any fault."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {KINDS}")
        if kind == "refuse" and (path_prefix is not None or times is not None):
            raise ValueError("'refuse' acts on connections: no path_prefix or times")
        fault = Fault(kind, path_prefix, times, **options)  # type: ignore[arg-type]
        with self._cond:
            if self._closed:
                raise RuntimeError("the proxy is closed")
            self._fault = fault
            self._generation += 1
            self._cond.notify_all()
            if kind == "refuse":
                self._close_listener()
                for sock in list(self._sockets):  # a server that went away drops its connections
                    self._shutdown(sock)
        if kind != "refuse":
            self._listen()

    def clear(self) -> None:
        """Back to ``pass`` (listening again after ``refuse``; hung requests are released)."""
        self.set_fault("pass")

    @property
    def fault(self) -> Fault:
        with self._cond:
            return self._fault

    def count(self, prefix: str = "") -> int:
        """Requests seen whose path starts with ``prefix``."""
        with self._cond:
            return sum(n for path, n in self.counts.items() if path.startswith(prefix))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._close_listener()
            for sock in list(self._sockets):
                self._shutdown(sock)
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.url} -> {self.upstream[0]}:{self.upstream[1]} {self.fault.kind}>"

    # ------------------------------------------------------------------ internals

    def _listen(self) -> None:
        with self._cond:
            if self._listener is not None or self._closed:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for attempt in range(100):  # the old listener may take a moment to let go
                try:
                    sock.bind(("127.0.0.1", self.port))
                    break
                except OSError:
                    if attempt == 99 or not self.port:
                        sock.close()
                        raise
                    time.sleep(0.02)
            sock.listen(64)
            sock.settimeout(0.1)  # the accept loop notices a closed listener within 0.1 s
            self.port = sock.getsockname()[1]
            self._listener = sock
            self._spawn(self._accept_loop, sock)

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._shutdown(self._listener)  # on Linux, refuses new connects at once
            self._listener.close()
            self._listener = None

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        """Start a daemon thread (under the lock); ``close()`` joins every one still alive."""
        self._threads = {t for t in self._threads if t.is_alive()}
        thread = threading.Thread(
            target=target, args=args, daemon=True, name=f"fault-proxy-{self.port}"
        )
        self._threads.add(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            with self._cond:
                if self._listener is not listener:
                    return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # drip: each piece alone
            with self._cond:
                if self._listener is not listener:
                    _reset(client)
                    return
                self._sockets.add(client)
                self._spawn(self._serve, client)

    def _shutdown(self, sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it
        except OSError:
            pass

    def _take_fault(self, path: str) -> tuple[Fault, int]:
        with self._cond:
            self.counts[path] += 1
            fault = self._fault
            if fault.path_prefix is not None and not path.startswith(fault.path_prefix):
                return Fault(), self._generation
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._fault = Fault()
            return fault, self._generation

    def _serve(self, client: socket.socket) -> None:
        reader = _Reader(client)
        upstream: _Reader | None = None
        try:
            while True:
                request = _read_request(reader)
                method, target, _ = request.first_line.split()
                fault, generation = self._take_fault(target.split("?")[0])
                if fault.kind == "refuse":
                    return  # a request already in flight on a pooled connection: just drop it
                if fault.kind == "reset":
                    _reset(client)
                    return
                if fault.kind == "hang":
                    with self._cond:
                        self._cond.wait_for(
                            lambda g=generation: self._closed or self._generation != g
                        )
                    return
                if fault.kind == "status":
                    client.sendall(self._status_response(fault))
                    if request.close:
                        return
                    continue
                upstream, response = self._forward(upstream, request, method)
                if response is None:
                    _reset(client)  # the upstream is unreachable: so is the "server"
                    return
                raw = response.head + response.body
                if fault.kind == "truncate":
                    client.sendall(raw[: fault.after])
                    return
                step = max(1, fault.chunk) if fault.kind == "drip" else len(raw) or 1
                for start in range(0, len(raw), step):
                    if self._closed:
                        return
                    client.sendall(raw[start : start + step])
                    if fault.kind == "drip":
                        time.sleep(fault.delay)
                if response.close and upstream is not None:
                    self._drop(upstream.sock)
                    upstream = None
                if request.close or response.close:
                    return
        except (OSError, _Closed, ValueError):
            return
        finally:
            if upstream is not None:
                self._drop(upstream.sock)
            self._drop(client)

    def _forward(
        self, upstream: _Reader | None, request: _Message, method: str
    ) -> tuple[_Reader | None, _Message | None]:
        """Send ``request`` upstream (reusing the connection if it is still open); the reply."""
        for _ in range(2):
            reused = upstream is not None and not self._readable(upstream.sock)
            if not reused:
                if upstream is not None:
                    self._drop(upstream.sock)
                try:
                    sock = socket.create_connection(self.upstream)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    return None, None
                with self._cond:
                    self._sockets.add(sock)
                upstream = _Reader(sock)
            assert upstream is not None
            before = upstream.received
            try:
                upstream.sock.sendall(request.head + request.body)
                return upstream, _read_response(upstream, method)
            except (OSError, _Closed, ValueError):
                self._drop(upstream.sock)
                # Retry once, on a new connection, only if a reused one closed before answering.
                if not reused or upstream.received != before:
                    return None, None
                upstream = None
        return None, None

    @staticmethod
    def _readable(sock: socket.socket) -> bool:
        """An idle keep-alive connection that is readable was closed (or spoke out of turn)."""
        try:
            sock.setblocking(False)
            sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            sock.setblocking(True)

    def _drop(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    @staticmethod
    def _status_response(fault: Fault) -> bytes:
        try:
            reason = http.HTTPStatus(fault.status).phrase
        except ValueError:
            reason = "Error"
        body = json.dumps(
            {
                "error_code": ERROR_CODES.get(fault.status, "INTERNAL_ERROR"),
                "message": f"fault proxy: injected HTTP {fault.status} {reason}",
            }
        )
        headers = [
            f"HTTP/1.1 {fault.status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if fault.retry_after is not None:
            headers.append(f"Retry-After: {fault.retry_after}")
        return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()
