"""MLflow agent plugin: the session and user a served agent's request names.

A ``ResponsesAgent`` served by MLflow (``mlflow models serve``, or any pyfunc loader) receives
``{"input": [...], "context": {"conversation_id": ..., "user_id": ...}}``: that is where clients
following MLflow's agent guide send them, not in headers. They become the request's session
and user, as a client's claim: what the app establishes (``set_session``/``set_user``,
``identify``, a LangGraph run's ``thread_id``) still wins (core/context.py::claim).

The spans themselves come from MLflow (a ``ResponsesAgent`` traces its own ``predict``) and the
other plugins; this one wraps the loader's input conversion, which ``predict`` and
``predict_stream`` both call on the request's thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tracewire.core import context as request_context
from tracewire.plugins.base import WrappingPlugin, after_call


def _claim(request: Any, *_: Any) -> None:
    """The request's conversation and user, from the converted input."""
    context = getattr(request, "context", None)
    if context is not None:
        request_context.claim(
            getattr(context, "conversation_id", None), getattr(context, "user_id", None)
        )


class MlflowAgentPlugin(WrappingPlugin):
    name = "mlflow_agent"
    module = "mlflow.pyfunc.loaders.responses_agent"
    distribution = "mlflow-skinny"  # full mlflow depends on it; the tracing-only SDK has no pyfunc
    extra = "local"
    supported = ("3.0", "4")

    def targets(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        from mlflow.pyfunc.loaders.responses_agent import _ResponsesAgentPyfuncWrapper

        return [(_ResponsesAgentPyfuncWrapper, "_convert_input", after_call(_claim))]
