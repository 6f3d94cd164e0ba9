"""The feedback route: ``POST <feedback_path>`` with a JSON body

    {"request_id": "..." | "trace_id": "...", "name": "thumbs", "value": false, "rationale": "..."}

queues the feedback for that request's trace, as ``tracewire.log_feedback`` does: it never
blocks, and feedback that arrives before its trace is stored waits in the spool. It lands only
where this request may give feedback (core/feedback.py): on a trace of the identity the app
established for this request, or by an id that only the trace's client was given. The source
user is the request's own (``identify``, trusted headers), never a field of the body.

Answers: 202 accepted; 400 not a JSON object; 413 body over 16 KiB; 405 not a POST; 422 a
malformed field (the message says which); 503 tracewire is not enabled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tracewire.core.context import RequestContext
from tracewire.core.feedback import Feedback

MAX_BODY = 16 * 1024

_FIELDS = {"request_id", "trace_id", "name", "value", "rationale"}

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def serve(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Any]],
    send: Send,
    context: RequestContext,
    poster: str,
) -> None:
    if scope["method"] != "POST":
        await _answer(send, 405, {"error": "use POST"}, [(b"allow", b"POST")])
        return
    body = await _read(receive)
    if body is None:
        await _answer(send, 413, {"error": f"the body is over {MAX_BODY} bytes"})
        return
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        await _answer(send, 400, {"error": "the body must be a JSON object"})
        return
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        await _answer(
            send, 422, {"error": f"unknown field(s) {unknown}; allowed: {sorted(_FIELDS)}"}
        )
        return
    if "value" not in data:
        await _answer(send, 422, {"error": "value is required (a bool, a number or a string)"})
        return
    from tracewire import config
    from tracewire.export import pipeline

    try:
        accepted = pipeline.submit_feedback(
            Feedback(
                request_id=data.get("request_id"),
                trace_id=data.get("trace_id"),
                name=data.get("name", "feedback"),
                value=data["value"],
                rationale=data.get("rationale"),
                source_id=context.user_id,
                poster=poster,
                expires=time.time() + config.active().feedback_retention,
            )
        )
    except ValueError as exc:  # Feedback's own validation: the message names the field
        await _answer(send, 422, {"error": str(exc)})
        return
    if not accepted:
        await _answer(send, 503, {"error": "tracing is not enabled"})
        return
    await _answer(send, 202, {"status": "accepted"})


async def _read(receive: Callable[[], Awaitable[Any]]) -> bytes | None:
    """The whole body, or None past the size limit (the rest is not read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""  # the client went away
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(
    send: Send,
    status: int,
    payload: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
