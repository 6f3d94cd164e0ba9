"""Starlette/FastAPI plugin: every app gets ``TracingMiddleware`` without a line of code.

It wraps ``Starlette.__call__`` (FastAPI's ``__call__`` ends in it), so the middleware runs
outside the app's whole middleware stack, ``ServerErrorMiddleware`` included: the request id
is echoed on unhandled-exception 500s too. It is installed once per request path: not when the
app already lists ``TracingMiddleware`` in its own middleware, and an outer ``TracingMiddleware``
(the app wrapped by hand, or a parent app a Starlette app is mounted in) makes inner ones pass
through. While the plugin is disabled the wrapper passes every call straight through.
``TRACEWIRE_FEEDBACK_PATH=/feedback`` gives it the feedback route,
``TRACEWIRE_TRUST_IDENTITY_HEADERS`` the identity headers it trusts (none by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tracewire import config
from tracewire.core import guard
from tracewire.plugins.base import WrappingPlugin


def _listed_by_app(app: Any) -> bool:
    from tracewire.middleware import TracingMiddleware

    return any(
        getattr(entry, "cls", None) is TracingMiddleware
        for entry in getattr(app, "user_middleware", ())
    )


class StarlettePlugin(WrappingPlugin):
    name = "starlette"
    module = "starlette.applications"
    distribution = "starlette"
    extra = "fastapi"
    supported = ("0.40", "2")

    def targets(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        from starlette.applications import Starlette

        return [(Starlette, "__call__", self._call)]

    def _call(
        self,
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        middleware = (
            instance.__dict__.get("_tracewire_middleware")
            or guard.call(self._install, instance, wrapped)
            or wrapped
        )
        return middleware(*args, **kwargs)

    @staticmethod
    def _install(app: Any, call: Callable[..., Any]) -> Callable[..., Any]:
        from tracewire.middleware import TracingMiddleware

        # `call` is this app's own __call__: the middleware wraps the whole app.
        settings = config.active()
        middleware = (
            call
            if _listed_by_app(app)
            else TracingMiddleware(
                call,
                feedback_path=settings.feedback_path,
                trust_identity_headers=settings.trust_identity_headers,
            )
        )
        app.__dict__["_tracewire_middleware"] = middleware
        return middleware
