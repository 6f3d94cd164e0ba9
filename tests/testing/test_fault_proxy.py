"""tests/support/fault_proxy.py: every fault, over real sockets, keep-alive included.

The upstream is a tiny stdlib HTTP/1.1 server; one test puts the proxy in front of a real
``mlflow server`` and drives MLflow's own TracingClient through it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import requests

from tests.support.fault_proxy import FaultProxy
from tests.support.mlflow_server import MlflowServer

BIG = b"0123456789abcdef" * 16  # 256 bytes


class Upstream(BaseHTTPRequestHandler):
    """GET /any -> JSON {path, peer}; POST echoes the body; /chunked and /close frame otherwise."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are separate writes: no 40 ms delayed ACKs
    seen: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self) -> None:
        self.seen.append(self.path)
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/close":  # no length: the body ends when the connection does
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BIG)
            self.close_connection = True
            return
        body = json.dumps(
            {"path": self.path, "peer": self.client_address[1], "big": BIG.decode()}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.seen.append(self.path)
        body = self._body()
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve_upstream(idle_timeout: float | None = None) -> ThreadingHTTPServer:
    handler = type("Handler", (Upstream,), {"timeout": idle_timeout, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadingHTTPServer]:
    server = serve_upstream()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(upstream: ThreadingHTTPServer) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.server_address[1]) as proxy:
        yield proxy


def connect(proxy: FaultProxy, timeout: float = 5) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def test_pass_forwards_every_framing_over_one_keep_alive_connection(proxy: FaultProxy) -> None:
    conn = connect(proxy)
    status, body = get(conn, "/a?x=1")
    sock, peer = conn.sock, json.loads(body)["peer"]
    assert (status, json.loads(body)["path"]) == (200, "/a?x=1")
    assert get(conn, "/chunked") == (200, b"hello chunked world")
    conn.request("POST", "/post", body=b"x" * 1000)
    assert conn.getresponse().read() == b"x" * 1000
    conn.request(
        "POST",
        "/post",
        body=iter([b"abc", b"defg"]),  # a chunked request body
        headers={"Transfer-Encoding": "chunked"},
        encode_chunked=True,
    )
    assert conn.getresponse().read() == b"abcdefg"
    conn.request("HEAD", "/head")
    assert conn.getresponse().read() == b""
    status, body = get(conn, "/b")
    # One client connection, and one upstream connection behind it, for all of them.
    assert conn.sock is sock and json.loads(body)["peer"] == peer
    assert get(conn, "/close") == (200, BIG)  # close-delimited: forwarded whole, then closed
    assert proxy.counts == {"/a": 1, "/chunked": 1, "/post": 2, "/head": 1, "/b": 1, "/close": 1}
    with requests.Session() as session:  # requests' pool, as MLflow's client uses it
        for i in range(5):
            assert session.get(f"{proxy.url}/s{i}").json()["path"] == f"/s{i}"
    assert proxy.count("/s") == 5


def test_each_request_on_a_pooled_connection_meets_the_fault_of_its_time(
    proxy: FaultProxy, upstream: ThreadingHTTPServer
) -> None:
    conn = connect(proxy)
    assert get(conn, "/one")[0] == 200
    sock = conn.sock
    before = len(upstream.RequestHandlerClass.seen)  # type: ignore[attr-defined]
    proxy.set_fault("status", status=503)
    status, body = get(conn, "/two")
    assert status == 503 and json.loads(body)["error_code"] == "TEMPORARILY_UNAVAILABLE"
    proxy.clear()
    assert get(conn, "/three")[0] == 200
    assert conn.sock is sock
    assert upstream.RequestHandlerClass.seen[before:] == ["/three"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "status,code",
    [
        (500, "INTERNAL_ERROR"),
        (502, "TEMPORARILY_UNAVAILABLE"),
        (503, "TEMPORARILY_UNAVAILABLE"),
        (401, "UNAUTHENTICATED"),
        (403, "PERMISSION_DENIED"),
        (429, "RESOURCE_EXHAUSTED"),
    ],
)
def test_status(proxy: FaultProxy, status: int, code: str) -> None:
    proxy.set_fault("status", status=status, retry_after="7" if status == 429 else None)
    response = requests.get(f"{proxy.url}/x")
    assert response.status_code == status
    assert response.json()["error_code"] == code and "message" in response.json()
    assert response.headers.get("Retry-After") == ("7" if status == 429 else None)


def test_refuse_stops_listening_and_drops_pooled_connections(proxy: FaultProxy) -> None:
    port = proxy.port
    conn = connect(proxy)
    assert get(conn, "/before")[0] == 200
    proxy.set_fault("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        get(conn, "/pooled")  # the old connection was closed by the "server"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{proxy.url}/x", timeout=2)
    proxy.clear()
    assert proxy.port == port and requests.get(f"{proxy.url}/after").status_code == 200
    with pytest.raises(ValueError):
        proxy.set_fault("refuse", times=1)


def test_reset_reads_the_request_then_resets(proxy: FaultProxy) -> None:
    proxy.set_fault("reset")
    conn = connect(proxy)
    with pytest.raises(ConnectionResetError):
        get(conn, "/r")
    assert proxy.counts["/r"] == 1  # the request was read before the reset


def test_hang_until_timeout_then_until_cleared(proxy: FaultProxy) -> None:
    proxy.set_fault("hang")
    with pytest.raises(socket.timeout):
        get(connect(proxy, timeout=0.3), "/h1")
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            get(connect(proxy), "/h2")
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=call)
    started = time.monotonic()
    thread.start()
    while proxy.counts["/h2"] == 0:
        time.sleep(0.01)
    time.sleep(0.2)
    assert thread.is_alive()
    proxy.clear()  # the hung request is released: closed, never answered
    thread.join(5)
    assert isinstance(outcome[0], (http.client.RemoteDisconnected, ConnectionError))
    assert 0.2 <= time.monotonic() - started < 5
    assert get(connect(proxy), "/after")[0] == 200


def test_hang_is_released_by_close(upstream: ThreadingHTTPServer) -> None:
    proxy = FaultProxy(upstream.server_address[1])
    proxy.set_fault("hang")
    conn = connect(proxy)
    threading.Timer(0.2, proxy.close).start()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        get(conn, "/h")


def test_drip_sends_the_response_slowly_but_whole(proxy: FaultProxy) -> None:
    proxy.set_fault("drip", chunk=32, delay=0.01)
    conn = connect(proxy)
    started = time.monotonic()
    status, body = get(conn, "/d")
    elapsed = time.monotonic() - started
    assert status == 200 and json.loads(body)["big"] == BIG.decode()
    assert elapsed >= (len(body) // 32) * 0.01  # at least one delay per 32 bytes of body
    assert get(conn, "/d2")[0] == 200  # still keep-alive


def raw_get(proxy: FaultProxy, path: str) -> bytes:
    """Everything the proxy sends back for one request, up to the connection's close."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received


def test_truncate_cuts_the_response_and_closes(proxy: FaultProxy) -> None:
    whole = raw_get(proxy, "/t")
    head = whole.index(b"\r\n\r\n") + 4
    proxy.set_fault("truncate", after=head + 10)
    assert raw_get(proxy, "/t") == whole[: head + 10]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # IncompleteRead inside
        requests.get(f"{proxy.url}/t")
    proxy.set_fault("truncate", after=20)  # inside the headers: "HTTP/1.1 200 OK\r\nSer"
    # Worth knowing: urllib3 only logs the HeaderParsingError, and the caller sees a 200 whose
    # body (close-delimited, now that no Content-Length was read) is empty.
    response = requests.get(f"{proxy.url}/t")
    assert (response.status_code, response.content) == (200, b"")


def test_path_prefix_and_times(proxy: FaultProxy) -> None:
    proxy.set_fault("status", status=500, path_prefix="/v1/traces", times=2)
    with requests.Session() as session:
        assert session.get(f"{proxy.url}/api/other").status_code == 200
        assert session.post(f"{proxy.url}/v1/traces", data=b"{}").status_code == 500
        assert session.get(f"{proxy.url}/api/other").status_code == 200
        assert session.post(f"{proxy.url}/v1/traces", data=b"{}").status_code == 500
        assert session.post(f"{proxy.url}/v1/traces", data=b"{}").status_code == 201
    assert proxy.fault.kind == "pass"
    assert proxy.counts == {"/api/other": 2, "/v1/traces": 3}


def test_a_stale_upstream_connection_is_replaced() -> None:
    upstream = serve_upstream(idle_timeout=0.1)  # the upstream drops idle connections fast
    try:
        with FaultProxy(upstream.server_address[1]) as proxy, requests.Session() as session:
            peers = set()
            for i in range(3):
                peers.add(session.get(f"{proxy.url}/p{i}").json()["peer"])
                time.sleep(0.3)
            assert len(peers) == 3 and proxy.count("/p") == 3
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_close_leaves_no_thread_and_no_listener(upstream: ThreadingHTTPServer) -> None:
    proxy = FaultProxy(upstream.server_address[1])
    conn = connect(proxy)
    assert get(conn, "/x")[0] == 200
    proxy.close()
    assert not [t for t in threading.enumerate() if t.name == f"fault-proxy-{proxy.port}"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()


def test_mlflow_tracing_client_through_the_proxy(tmp_path, monkeypatch) -> None:
    from mlflow.entities import TraceInfo, TraceLocation, TraceState
    from mlflow.exceptions import MlflowException
    from mlflow.tracing.client import TracingClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # one try: the fault shows
    with MlflowServer(tmp_path) as server, FaultProxy(server.port) as proxy:
        client = TracingClient(proxy.url)

        def start() -> TraceInfo:
            info = TraceInfo(
                trace_id=f"tr-{uuid.uuid4().hex}",
                trace_location=TraceLocation.from_experiment_id("0"),
                request_time=int(time.time() * 1000),
                state=TraceState.OK,
                execution_duration=1,
            )
            return client.start_trace(info)

        stored = start()
        assert client.get_trace_info(stored.trace_id).trace_id == stored.trace_id
        proxy.set_fault("status", status=503, path_prefix="/api/3.0/mlflow/traces")
        with pytest.raises(MlflowException, match="503"):  # urllib3: "too many 503 error responses"
            start()
        proxy.clear()
        assert client.get_trace_info(start().trace_id).state == TraceState.OK
        assert proxy.count("/api/3.0/mlflow/traces") == 5
