"""The interface between core and export: what core/spans.py and core/span_context.py need
from the export side (runs on the app's threads). export/hooks.py implements it over MLflow's
span context (export/mlflow_context.py) and the export queue; before it is connected,
:class:`Unconnected` stands in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tracewire.core.spans import Trace


class Bridge(Protocol):
    """What core needs from the export side, which implements it (export/hooks.py) and installs
    it with ``spans.connect``: where finished traces go, and how MLflow's span context is read and
    written so that our spans and the user's MLflow spans nest both ways."""

    def finished(self, trace: Trace) -> None:
        """A trace ended (on the caller's thread: it must not block)."""

    def origin(self) -> Any:
        """What MLflow's context says about a trace starting here (the served model it runs
        in, ``mlflow.tracing.context`` metadata); read when the trace is made."""

    def mlflow_parent(self) -> tuple[int, int] | None:
        """(trace id, span id) of the user's MLflow span recording in this context, if any."""

    def attach(self, trace_id: int, span_id: int) -> Any:
        """Make our span with these ids MLflow's current parent here; a token for detach."""

    def detach(self, token: Any) -> None:
        """Undo one attach."""

    def attach_request(self, trace_id: int, span_id: int) -> Any:
        """As attach, for a web request's root at its start; None where MLflow's context is
        served with the request's placeholder when read instead (cheaper)."""


class Unconnected:
    """The bridge before export is connected: traces go nowhere, MLflow is not touched."""

    def finished(self, trace: Trace) -> None:
        pass

    def origin(self) -> Any:
        return None

    def mlflow_parent(self) -> tuple[int, int] | None:
        return None

    def attach(self, trace_id: int, span_id: int) -> Any:
        return None

    def detach(self, token: Any) -> None:
        pass

    def attach_request(self, trace_id: int, span_id: int) -> Any:
        return None
