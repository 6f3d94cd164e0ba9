"""A local, deterministic, OpenAI-compatible HTTP server for tests and demos.

Point the real ``openai`` client at it over HTTP::

    with OpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        client.chat.completions.create(model="gpt-4o", messages=[...])
        assert server.requests[-1].body["model"] == "gpt-4o"

or run it in the foreground (the base URL is printed on one line, then it serves
until interrupted)::

    python -m tracewire.testing.openai_server [--port N] [--reject-unknown-args [openai|pydantic]]

Only the standard library is used, so it works wherever the core package does.

Endpoints (everything else answers 404 with an OpenAI error body; a body that is
not a JSON object answers 400)
    POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings,
    POST /v1/completions (legacy). Every endpoint streams when ``stream`` is true,
    except embeddings. Azure-style paths (``/v1/deployments/<name>/chat/completions``)
    are served too.

Replies (the same for streamed and non-streamed requests)
    * ``model`` echoes the requested model; ``n`` is treated as 1.
    * With function ``tools`` (and ``tool_choice`` not ``"none"``) and a user
      message last: one call to the *first* function tool, id ``call_<k>`` where
      k is 1 + the number of tool calls already in the conversation (so
      ``call_1`` on the first turn). Its arguments fill the tool's JSON schema
      (see below); chat: ``content`` is null and ``finish_reason`` is
      ``"tool_calls"``; Responses: a ``function_call`` item.
    * With a tool result last (chat ``tool`` message, Responses
      ``function_call_output`` item): ``"Result: <tool output>"``.
    * With a JSON-schema response format (chat ``response_format``, Responses
      ``text.format``): the JSON text of an object filling the schema.
    * Otherwise: ``"Echo: <text of the last user message>"``; the legacy
      completions endpoint answers ``"Echo: <prompt>"``, one choice per prompt.
    * Filling a schema: an object gets its ``required`` properties (all of them
      when there is no ``required``), strings get the last user text, integers and
      numbers 1, booleans true, arrays [], ``enum``/``const`` their first value,
      ``anyOf``/``oneOf`` their first non-null branch, ``$ref`` is followed.

Special model names (``error-*`` on every endpoint, the stream ones when streaming)
    * ``error-429``: HTTP 429 with ``Retry-After: 0`` (``openai.RateLimitError``).
    * ``error-500``: HTTP 500 (``openai.InternalServerError``).
    * ``stream-error``: two content deltas, then an error event, then the stream
      ends. Chat/completions send ``data: {"error": {...}}``. Responses sends
      ``event: error`` whose data has the flat fields of ``ResponseErrorEvent``
      *and* a nested ``error`` object, as live OpenAI does; the nested object is
      what makes the openai client raise. Either way iterating raises
      ``openai.APIError``.
    * ``empty-stream``: no events at all, only ``data: [DONE]``.
    * a name ending in ``-cached``: reports ``prompt_tokens // 2`` cached tokens.

Token counting
    * ``count_tokens(text)``: number of whitespace-separated words.
    * Prompt (chat and Responses, see ``count_prompt_tokens``): for every message
      or input item, 3 + the words of its text: its content (a string, or the
      ``text`` of each part of a list), a function call's arguments (chat
      ``tool_calls`` included) and a function call output. Responses
      ``instructions`` count as one more message; a string ``input`` is one user
      message. Tool definitions are not counted.
    * Legacy completions: the words of the prompt(s). Embeddings: the words of
      each string input, the length of each token-array input.
    * Completion: the words of the reply text; for a tool call, the words of its
      JSON arguments + 1.
    * Cached tokens: ``prompt_tokens // 2`` for ``*-cached`` models, else 0;
      reasoning tokens are always 0.

Streaming follows OpenAI's wire format: chat sends a role chunk (carrying the
start of the tool call, if any), one chunk per word (leading whitespace attached,
so the deltas concatenate to the full text; tool-call arguments likewise), a
finish chunk, and with ``stream_options.include_usage`` ``"usage": null`` on every
chunk plus one final chunk with ``choices == []`` and the usage; then
``data: [DONE]``. The Responses API sends typed events with ``sequence_number``,
from ``response.created`` to ``response.completed`` (which carries usage) and no
``[DONE]``, like OpenAI. Bodies are sent with chunked transfer encoding so the
connection stays reusable.

Unknown arguments (``OpenAIServer(reject_unknown_args=...)``, ``--reject-unknown-args``)
    By default every argument is accepted. Like servers that validate strictly (some
    OpenAI-compatible servers, older deployments), chat and legacy completions can
    instead reject any argument outside OpenAI's (``stream`` and the arguments of the
    openai client's ``create``) minus ``stream_options``, so ``stream_options`` and
    unknown ``extra_body`` fields are rejected before anything else is checked:
    ``"openai"`` (or ``True``) answers HTTP 400 ``Unrecognized request argument
    supplied: stream_options`` in an OpenAI error body (``openai.BadRequestError``);
    ``"pydantic"`` answers HTTP 422 with a FastAPI/pydantic body, ``{"detail": [{"type":
    "extra_forbidden", "loc": ["body", "stream_options"], "msg": "Extra inputs are not
    permitted", ...}]}`` (``openai.UnprocessableEntityError``). Rejected requests are
    recorded like any other. Responses and embeddings accept every argument.

Embeddings are ``dimensions`` (default 8) float32 values in [-1, 1) derived from
a SHA-256 of the input (``embedding_vector``); ``encoding_format="base64"`` (what
the openai client requests when the caller does not choose) sends the same
float32 values little-endian and base64-encoded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from tracewire.testing.openai_chat import chat_reply, completions_reply
from tracewire.testing.openai_embeddings import embeddings_reply
from tracewire.testing.openai_replies import JSONReply, Reply, sse_frames
from tracewire.testing.openai_responses import responses_reply
from tracewire.testing.openai_strict import REJECT_STYLES, reject_unknown
from tracewire.testing.openai_tokens import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    APIError,
    RecordedRequest,
    bad_request,
    count_prompt_tokens,
    count_tokens,
    embedding_vector,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "OpenAIServer",
    "RecordedRequest",
    "count_prompt_tokens",
    "count_tokens",
    "embedding_vector",
]


_ENDPOINTS: dict[str, Callable[[Mapping[str, Any], int], Reply]] = {
    "/v1/chat/completions": chat_reply,
    "/v1/completions": completions_reply,
    "/v1/responses": responses_reply,
    "/v1/embeddings": embeddings_reply,
}


# --------------------------------------------------------------------------
# HTTP plumbing.


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A thread pool opens hundreds of connections at once; with the default
    # backlog of 5 the kernel drops SYNs and clients stall on 1 s retransmits.
    request_queue_size = 1024

    def __init__(self, port: int, owner: OpenAIServer) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), a DNS
        # lookup that can take seconds on some machines; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def track(self, connection: socket.socket, *, open: bool) -> None:
        with self._connections_lock:
            if open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        # Idle keep-alive connections park their handler threads in recv();
        # shutting the sockets down lets those threads finish immediately.
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients may hang up mid-stream (the openai sync Stream closes right after
        # [DONE] without reading the final chunk); that is not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, as httpx expects.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm each reply would wait
    # for the client's delayed ACK (about 40 ms a call).
    disable_nagle_algorithm = True
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, open=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, open=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: no per-request lines on stderr."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}
        seq = self.server.owner.record(RecordedRequest(self.command, self.path, headers, body))
        # Azure clients put the deployment in the path: /v1/deployments/<name>/chat/completions.
        path = re.sub(r"/deployments/[^/]+/", "/", urlsplit(self.path).path)
        endpoint = _ENDPOINTS.get(path) if self.command == "POST" else None
        try:
            if endpoint is None:
                raise APIError(
                    404,
                    f"Invalid URL ({self.command} {self.path})",
                    "invalid_request_error",
                    code="unknown_url",
                )
            if not isinstance(body, dict):
                raise bad_request(
                    "We could not parse the JSON body of your request: expected a JSON object."
                )
            if self.server.owner.reject_unknown_args:
                reject_unknown(self.server.owner.reject_unknown_args, path, body)
            reply = endpoint(body, seq)
        except APIError as error:
            self._send_json(error.status, error.body, seq, error.headers)
            return
        if isinstance(reply, JSONReply):
            self._send_json(200, reply.body, seq)
        else:
            self._send_stream(sse_frames(reply, body["model"]), seq)

    def _send_json(
        self,
        status: int,
        body: Mapping[str, Any],
        seq: int,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{seq}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, frames: list[bytes], seq: int) -> None:
        # Chunked encoding marks the end of the body without closing the
        # connection, so keep-alive clients can reuse it for the next request.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_{seq}")
        self.end_headers()
        for frame in frames:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(frame), frame))
        self.wfile.write(b"0\r\n\r\n")


class OpenAIServer:
    """A deterministic OpenAI-compatible server on 127.0.0.1 (see the module docstring).

    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, port: int = 0, *, reject_unknown_args: bool | str = False) -> None:
        """``port=0`` picks a free port. ``reject_unknown_args``: ``True``/``"openai"`` or
        ``"pydantic"`` rejects arguments a strict server does not know, ``stream_options``
        included (see the module docstring)."""
        if reject_unknown_args is True:
            reject_unknown_args = "openai"
        if reject_unknown_args and reject_unknown_args not in REJECT_STYLES:
            raise ValueError(
                f"reject_unknown_args must be one of {REJECT_STYLES}, got {reject_unknown_args!r}"
            )
        self.reject_unknown_args: str | None = reject_unknown_args or None
        self._requested_port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._sequence = itertools.count(1)

    def start(self) -> OpenAIServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("OpenAIServer is already running")
        self._httpd = _HTTPServer(self._requested_port, self)
        # A short poll interval keeps stop() prompt.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tracewire-openai-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join the server thread. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("OpenAIServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The URL to pass as the openai client's ``base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def record(self, request: RecordedRequest) -> int:
        """Store a request; returns its sequence number, used in response ids."""
        with self._lock:
            self._requests.append(request)
            return next(self._sequence)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server in the foreground, printing its base URL on one line."""
    parser = argparse.ArgumentParser(
        description="Run a local deterministic OpenAI-compatible server."
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to bind on 127.0.0.1 (default: a free one)"
    )
    parser.add_argument(
        "--reject-unknown-args",
        nargs="?",
        const="openai",
        choices=REJECT_STYLES,
        default=None,
        help="reject chat/completions arguments a strict server does not know, stream_options "
        "included: HTTP 400 like OpenAI (openai, the default) or 422 like FastAPI (pydantic)",
    )
    args = parser.parse_args(argv)
    with OpenAIServer(
        port=args.port, reject_unknown_args=args.reject_unknown_args or False
    ) as server:
        print(server.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
