"""TracingMiddleware: every web request that does traced work becomes one trace, tied to its
request id, session and user.

Pure ASGI (``BaseHTTPMiddleware`` breaks ContextVar propagation). Per HTTP request it:

1. reads the request id (echoed back in the response, also on errors), the session from a
   session cookie (and session and user from headers, only where the app trusts them), and a
   W3C ``traceparent``;
2. opens the request's root, so every plugin span and the user's own MLflow spans in the
   handler, its background tasks and its streamed body nest under it; the trace and its root
   span are made only when the first of those starts (a health check costs a few fields);
3. when the response starts, adds the request id (and the trace id, once something was
   traced) to the response headers;
4. when the app call returns (after the last body chunk, a disconnect and Starlette's
   background tasks), ends the root span with the route template, status and timings, the
   user from the authenticated scope or the ``identify`` callable (the app's own middleware
   has run by then), and who may give feedback on the trace (core/feedback.py). A request
   that traced nothing leaves no trace.

Every step is guarded: a failure of ours never reaches the app or the client.

Add it outermost so the request id is echoed on the 500s of unhandled exceptions too:
Starlette's ``ServerErrorMiddleware`` sits outside everything ``add_middleware`` adds, so wrap
the app instead: ``app = TracingMiddleware(app)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import context as request_context
from tracewire.core import feedback as feedback_rules
from tracewire.core import guard, ids, span_context, spans
from tracewire.core.attributes import SpanType
from tracewire.core.context import MAX_SESSION_ID, MAX_USER_ID
from tracewire.middleware import feedback, identity

logger = logging.getLogger("tracewire")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Marks a scope an outer TracingMiddleware has seen.
_TRACED = "tracewire.traced"

# A captured request body is cut past this (it is recorded as the root span's inputs).
MAX_BODY = 64 * 1024


class _Request(span_context.RequestRoot):
    """A request's root with what the middleware carries from its start to its end."""

    __slots__ = (
        "status",
        "first_byte_ns",
        "last_byte_ns",
        "identified",
        "body",
        "header_session",
        "header_user",
        "own_request_id",
    )
    status: int | None
    first_byte_ns: int | None
    last_byte_ns: int | None
    identified: bool
    body: Any
    header_session: str | None
    header_user: str | None
    own_request_id: bool


class TracingMiddleware:
    """Trace every web request that does traced work (LLM, chain, graph or your own MLflow
    spans) as one trace whose root span is the request.

    Args:
        app: the ASGI app.
        request_id_header: read (if valid) or generated, set as the trace's
            ``client_request_id`` and echoed in the response.
        trace_id_header: the trace id, in the response when something was traced before the
            headers went out.
        trust_identity_headers: headers whose values become the request's session and user,
            e.g. ``{"session": "X-Session-ID", "user": "X-User-ID"}``. Only for an app behind
            a gateway that sets them (and strips them from what clients send): a header is
            whatever the client writes in it. By default no header names anyone.
        session_cookie: a cookie naming the session; recorded only as a keyed hash
            (``session_cookie_key`` or ``TRACEWIRE_SESSION_COOKIE_KEY``), never as its value.
        identify: ``identify(scope) -> (session_id, user_id)``, called when a request that
            leaves a trace ends; ``None`` in either place keeps what was found otherwise.
        exclude_paths: path prefixes passed through untouched.
        trace_all_requests: also trace requests that do no traced work.
        capture_request_body: record the request body (cut at 64 KiB, passed through the
            ``redact`` hook; never with ``capture_content=False``) as the root span's inputs.
        feedback_path: serve ``POST <feedback_path>`` with a JSON body
            ``{request_id | trace_id, name?, value, rationale?}`` (see middleware/feedback.py).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        request_id_header: str = "X-Request-ID",
        trace_id_header: str = "X-Trace-ID",
        trust_identity_headers: Mapping[str, str] | None = None,
        session_cookie: str | None = None,
        session_cookie_key: str | bytes | None = None,
        identify: Callable[[Scope], tuple[str | None, str | None]] | None = None,
        exclude_paths: Iterable[str] = (),
        trace_all_requests: bool = False,
        capture_request_body: bool = False,
        feedback_path: str | None = None,
    ) -> None:
        self.app = app
        self._request_id = request_id_header.lower().encode("latin-1")
        self._trace_id = trace_id_header.lower().encode("latin-1")
        trusted = config.identity_headers("trust_identity_headers", trust_identity_headers or {})
        self._session, self._user = (
            trusted[kind].lower().encode("latin-1") if kind in trusted else None
            for kind in ("session", "user")
        )
        self._cookie = session_cookie
        key = session_cookie_key or config.from_environment("TRACEWIRE_SESSION_COOKIE_KEY")
        if session_cookie is not None and not key:
            raise config.ConfigError(
                "session_cookie needs session_cookie_key (or TRACEWIRE_SESSION_COOKIE_KEY): the "
                "cookie is recorded only as a keyed hash, with the same key in every worker"
            )
        self._cookie_key = key.encode() if isinstance(key, str) else key
        self._identify = identify
        self._identify_failed = False
        self._exclude = tuple(exclude_paths)
        self._trace_all = trace_all_requests
        self._capture_body = capture_request_body
        self._feedback_path = feedback_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Websockets and lifespan pass through untouched; so do requests an outer
        # TracingMiddleware has seen (a mounted app; zero-code beside one added by hand: the
        # outer one's settings, excluded paths included, decide) and excluded paths.
        if scope["type"] != "http" or _TRACED in scope:
            await self.app(scope, receive, send)
            return
        scope[_TRACED] = True
        if self._exclude and scope["path"].startswith(self._exclude):
            await self.app(scope, receive, send)
            return
        request = guard.call(self._start, scope)
        if request is None:  # our failure: the request goes on untraced
            await self.app(scope, receive, send)
            return
        try:
            if self._feedback_path is not None and scope["path"] == self._feedback_path:
                # Who is asking: the source user, and whose traces it may give feedback on.
                guard.call(self._identify_late, scope, request)
                poster = guard.call(self._owner, request) or feedback_rules.ANONYMOUS
                await feedback.serve(scope, receive, self._sender(request, send), request, poster)
                return
            if request.body is not None:
                receive = self._recording(receive, request.body)
            await self.app(scope, receive, self._sender(request, send))
        except Exception as exc:
            request.error = exc
            raise
        finally:
            root = guard.call(span_context.leave_request, request, self._trace_all)
            if root is not None:
                guard.call(self._describe, scope, request, root)
                guard.call(root.end)

    # ------------------------------------------------------------------ steps

    def _start(self, scope: Scope) -> _Request:
        # One C-level pass over the headers (a repeated name keeps its last value), then a
        # helper only for a header present.
        headers = dict(scope["headers"])
        session = user = traceparent = None
        if self._session is not None and (value := headers.get(self._session)) is not None:
            session = identity.header_text(value, MAX_SESSION_ID)
        header_session = session
        if self._user is not None and (value := headers.get(self._user)) is not None:
            user = identity.header_text(value, MAX_USER_ID)
        if self._cookie is not None and b"cookie" in headers:
            assert self._cookie_key is not None
            # HTTP/2 may split cookies over several headers.
            cookies = b"; ".join(v for n, v in scope["headers"] if n == b"cookie")
            session = (
                identity.cookie_session(identity.cookie(cookies, self._cookie), self._cookie_key)
                or session
            )
        if (value := headers.get(b"traceparent")) is not None:
            traceparent = identity.traceparent(value)
        value = headers.get(self._request_id)
        chosen = None if value is None else identity.request_id(value)
        body: list[bytes] | None = None
        inputs = None
        if self._capture_body and config.active().capture_content:
            body = []
            inputs = spans.Deferred(_body_text, body)
        request = _Request(
            scope["method"],
            SpanType.CHAIN,
            inputs,
            traceparent,
            chosen or ids.request_id(),
            session,
            user,
        )
        request.own_request_id = chosen is None
        # Trusted headers still yield to what the app itself sets (see _identify_late).
        request.claimed_user = request.header_user = user
        request.header_session = header_session
        if session is not None and session == header_session:
            request.claimed_session = session
        request.status = request.first_byte_ns = request.last_byte_ns = None
        request.identified = False
        request.body = body
        span_context.enter_request(request)  # the trace reads the request context at its end
        return request

    def _sender(self, request: _Request, send: Send) -> Send:
        # A plain function handing back the server's awaitable: a coroutine of ours around
        # each message would cost more than what it does.
        def send_traced(message: Message) -> Awaitable[None]:
            kind = message["type"]
            if kind == "http.response.start":
                message = guard.call(self._on_response_start, request, message) or message
            elif kind == "http.response.body":
                now = time.time_ns()
                if request.first_byte_ns is None and message.get("body"):
                    request.first_byte_ns = now
                if not message.get("more_body", False):
                    request.last_byte_ns = now
            return send(message)

        return send_traced

    def _on_response_start(self, request: _Request, message: Message) -> Message:
        request.status = message["status"]
        headers = list(message.get("headers") or ())
        # An id the app set itself wins (ASGI apps send lowercase header names).
        own_request_id = own_trace_id = False
        for name, _ in headers:
            if name == self._request_id:
                own_request_id = True
            elif name == self._trace_id:
                own_trace_id = True
        if not own_request_id:
            headers.append((self._request_id, request.request_id.encode("latin-1")))
        if not own_trace_id and (self._trace_all or request.span is not None):
            headers.append((self._trace_id, request.trace_id.encode("latin-1")))
        return {**message, "headers": headers}

    def _identify_late(self, scope: Scope, request: _Request) -> None:
        """Identity only the app knows: its auth middleware's scope user, ``identify``. A
        user set by the handler (``tracewire.set_user``) wins over both; they win over the
        client's own header."""
        if request.identified:
            return
        request.identified = True
        session = user = None
        if self._identify is not None:
            try:
                session, user = self._identify(scope)
            except Exception as exc:  # the app's callable, not ours: log it, trace on
                if not self._identify_failed:
                    self._identify_failed = True
                    logger.warning(
                        "tracewire: the identify callable raised %r; requests are "
                        "traced without its session and user",
                        exc,
                    )
        user = user or identity.scope_user(scope)
        if user is not None and request.user_id == request.claimed_user:
            request.user_id = request_context.valid_id(user, MAX_USER_ID)
        if session is not None:
            request.session_id = request_context.valid_id(session, MAX_SESSION_ID)

    @staticmethod
    def _owner(request: _Request) -> str | None:
        """The identity the app established for the request (core/feedback.py::owner): not
        what a served agent's request body claims (core/context.py::claim)."""
        user, session = request.user_id, request.session_id
        if user == request.claimed_user and user != request.header_user:
            user = None
        if session == request.claimed_session and session != request.header_session:
            session = None
        return feedback_rules.owner(user, session)

    def _describe(self, scope: Scope, request: _Request, root: spans.Span) -> None:
        """The kept root span's route, status and timings, identity only the app knows, and
        who may give feedback on the trace through the feedback route."""
        self._identify_late(scope, request)
        feedback_from = self._owner(request) or (
            feedback_rules.BEARER if request.own_request_id else None
        )
        if feedback_from is not None:
            request.tags[keys.FEEDBACK_FROM_TAG] = feedback_from
        root.attributes[keys.HTTP_METHOD] = scope["method"]
        root.attributes[keys.URL_PATH] = scope["path"]
        route = getattr(scope.get("route"), "path", None)
        if isinstance(route, str):
            root.name = f"{scope['method']} {scope.get('root_path', '')}{route}"
            root.attributes[keys.HTTP_ROUTE] = route
        # An exception with no response started: the server answers 500.
        root.attributes[keys.HTTP_STATUS_CODE] = request.status or 500
        for key, at in (
            (keys.HTTP_TIME_TO_FIRST_BYTE, request.first_byte_ns),
            (keys.HTTP_TIME_TO_LAST_BYTE, request.last_byte_ns),
        ):
            if at is not None:
                root.attributes[key] = round((at - root.start_ns) / 1e6, 3)

    @staticmethod
    def _recording(receive: Receive, body: list[bytes]) -> Receive:
        size = 0

        async def receive_recorded() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request" and size <= MAX_BODY:
                chunk = message.get("body", b"")
                body.append(chunk[: MAX_BODY + 1 - size])
                size += len(chunk)
            return message

        return receive_recorded


def _body_text(chunks: list[bytes]) -> str:
    """The request body as recorded (on the export worker): text, cut with a marker."""
    data = b"".join(chunks)
    text = data[:MAX_BODY].decode("utf-8", "replace")
    if len(data) > MAX_BODY:
        text += f"... [tracewire: request body cut at {MAX_BODY} bytes]"
    return text
