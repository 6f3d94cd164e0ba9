"""The request context: who and what a trace belongs to.

One mutable :class:`RequestContext` per request (or per ``tracewire.context(...)`` block) lives in
a ContextVar. It is mutable on purpose: a handler that runs in a thread pool (Starlette's sync
endpoints, FastAPI dependencies) works on a *copy* of the caller's contextvars, so setting a new
value there would never reach the request's trace; mutating the shared object does. A trace keeps
a reference to the context it started in and reads it when it finishes, so ``set_user()`` called
late in a handler still lands on the trace.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# MLflow's limits: its SQL store holds client_request_id in a 50-character column and rejects
# sessions over 250 characters.
MAX_REQUEST_ID = 50
MAX_SESSION_ID = 250
MAX_USER_ID = 250


@dataclass(eq=False)  # one request's, changed in place: the same context only if the same object
class RequestContext:
    request_id: str | None = None
    session_id: str | None = None
    user_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # What the client named (headers, a served agent's request context), as opposed to what the
    # app established (set_session/set_user, identify, a LangGraph run's thread): app values
    # replace these, never the reverse.
    claimed_session: str | None = None
    claimed_user: str | None = None


_current: ContextVar[RequestContext | None] = ContextVar("tracewire_request", default=None)


def current() -> RequestContext | None:
    return _current.get()


def enter(ctx: RequestContext) -> Token[RequestContext | None]:
    """Make ``ctx`` this context's request context (a web request's root, see
    core/span_context.py)."""
    return _current.set(ctx)


def leave(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


def valid_id(value: object, limit: int) -> str | None:
    """A value the store accepts, or None: invalid ids are dropped, never made up."""
    if not isinstance(value, str) or not value or len(value) > limit:
        return None
    if not value.isprintable():
        return None
    return value


def _ensure() -> RequestContext:
    ctx = _current.get()
    if ctx is None:
        ctx = RequestContext()
        _current.set(ctx)
    return ctx


def set_session(session_id: str | None) -> None:
    """Attach the current request's traces to a session (``mlflow.trace.session``)."""
    _ensure().session_id = valid_id(session_id, MAX_SESSION_ID)


def set_user(user_id: str | None) -> None:
    """Attach the current request's traces to a user (``mlflow.trace.user``)."""
    _ensure().user_id = valid_id(user_id, MAX_USER_ID)


def claim(session_id: object, user_id: object) -> None:
    """Session and user the client named in the request itself (a served agent's request
    context): they replace what its headers claimed, never what the app established. Outside a
    request (no context) nothing is recorded."""
    ctx = _current.get()
    if ctx is None:
        return
    if (session := valid_id(session_id, MAX_SESSION_ID)) and ctx.session_id in (
        None,
        ctx.claimed_session,
    ):
        ctx.session_id = ctx.claimed_session = session
    if (user := valid_id(user_id, MAX_USER_ID)) and ctx.user_id in (None, ctx.claimed_user):
        ctx.user_id = ctx.claimed_user = user


def set_tags(tags: Mapping[str, str]) -> None:
    """Add trace tags to every trace of the current request."""
    _ensure().tags.update({str(k): str(v) for k, v in tags.items()})


@contextlib.contextmanager
def context(
    *,
    request_id: str | None = None,
    session_id: str | None = None,
    user_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[RequestContext]:
    """Scope a block of work to a request, session and user; restored on exit."""
    ctx = RequestContext(
        request_id=valid_id(request_id, MAX_REQUEST_ID),
        session_id=valid_id(session_id, MAX_SESSION_ID),
        user_id=valid_id(user_id, MAX_USER_ID),
        tags={str(k): str(v) for k, v in (tags or {}).items()},
    )
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def propagate(fn: F) -> F:
    """``fn`` bound to the caller's context: the current span, the request context and
    LangChain's run config go with it into ``ThreadPoolExecutor.submit`` or
    ``loop.run_in_executor``, which do not copy contextvars themselves.

    The context is captured when ``propagate`` is called; each call of the result runs in its
    own copy of it, so one wrapped function can run in several threads at once.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return captured.copy().run(fn, *args, **kwargs)

    return run  # type: ignore[return-value]
