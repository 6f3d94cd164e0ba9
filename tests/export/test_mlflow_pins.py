"""The private MLflow API each export module relies on, pinned, one test per module: if an
MLflow upgrade moves any of it, these fail first, with the name of what moved. Each module's
docstring lists what it uses."""

from __future__ import annotations

import inspect
import json
from typing import Any

import mlflow
from mlflow.entities import Span, TraceInfo, TraceLocation, TraceState

from tracewire.export import hooks, store, store_http


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def test_destination_pins() -> None:
    from mlflow.tracking import fluent

    assert hasattr(fluent, "_active_experiment_id")  # what mlflow.set_experiment() chose
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from tracewire.export import destination

    assert (
        set(_tracking_store_registry._registry)
        == set(destination._STORE_SCHEMES) | destination._plugin_schemes()
    )


def test_hooks_pins() -> None:
    low, high = hooks.SUPPORTED_MLFLOW
    assert low <= _version(mlflow.__version__) < high, mlflow.__version__

    from mlflow.tracing import provider

    params = inspect.signature(provider._get_mlflow_span_processor).parameters
    assert list(params) == ["tracking_uri"]
    assert callable(provider.provider.reset)
    assert callable(provider.get_current_context)
    # The request placeholder is served by shadowing the runtime context's get_current on the
    # instance: MLflow must read its context through it.
    runtime = provider.mlflow_runtime_context
    ours = vars(runtime).pop("get_current", None)  # installed when tracewire is on
    marker = object()
    runtime.get_current = lambda: marker
    try:
        assert provider.get_current_context() is marker
    finally:
        del runtime.get_current
        if ours is not None:
            runtime.get_current = ours

    from mlflow.tracing.processor.mlflow_v3 import MlflowV3SpanProcessor
    from mlflow.tracing.trace_manager import InMemoryTraceManager, _Trace
    from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS

    params = inspect.signature(MlflowV3SpanProcessor.__init__).parameters
    assert {"span_exporter", "export_metrics", "use_batch_processor"} <= set(params)
    manager = InMemoryTraceManager.get_instance()
    for name in ("_lock", "_traces", "_otel_id_to_mlflow_trace_id"):
        assert hasattr(manager, name), name
    assert {"info", "span_dict"} <= set(_Trace.__dataclass_fields__)
    assert isinstance(AUTOLOGGING_INTEGRATIONS, dict)

    # MLflow's trace APIs find the current span through this module attribute at each call.
    from mlflow.tracing import fluent

    for api in (fluent.update_current_trace, fluent.get_active_trace_id):
        assert "get_current_active_span" in api.__code__.co_names, api


def test_mlflow_context_pins() -> None:
    from mlflow.tracing import provider
    from mlflow.tracing.trace_manager import InMemoryTraceManager

    assert hasattr(provider.mlflow_runtime_context, "attach")
    assert hasattr(provider.mlflow_runtime_context, "detach")
    assert callable(InMemoryTraceManager.get_instance().get_mlflow_trace_id_from_otel_id)
    # A served model's id and an evaluation's row id live in the prediction context.
    from mlflow.pyfunc.context import Context, get_prediction_context

    assert get_prediction_context() is None
    assert {"model_id", "request_id", "is_evaluate"} <= set(vars(Context()))
    from mlflow.tracing.context import get_configured_trace_metadata, get_configured_trace_tags

    with mlflow.tracing.context(metadata={"m": "1"}, tags={"t": "1"}):
        assert (get_configured_trace_metadata(), get_configured_trace_tags()) == (
            {"m": "1"},
            {"t": "1"},
        )
    # MLflow's LiveSpan writes through its OpenTelemetry span's set_attribute, JSON text.
    from mlflow.entities import LiveSpan
    from opentelemetry.sdk.trace import ReadableSpan

    written: dict[str, Any] = {}

    class Recording(ReadableSpan):
        def set_attribute(self, key: str, value: Any) -> None:
            written[key] = value

    LiveSpan(Recording(name="x"), "tr-1", "LLM").set_inputs({"q": 1})
    assert json.loads(written["mlflow.spanInputs"]) == {"q": 1}


def _info(trace_id: str, **fields: Any) -> TraceInfo:
    """A finished trace's info in experiment 0."""
    return TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id("0"),
        request_time=1,
        execution_duration=2,
        state=TraceState.OK,
        **fields,
    )


def _span(trace_id: str, **attributes: str) -> Span:
    """One finished root span, from a dict in the format records.py writes."""
    return Span.from_dict(
        {
            "trace_id": "AAAAAAAAAAAAAAAAAAAAAQ==",
            "span_id": "AAAAAAAAAAE=",
            "parent_span_id": None,
            "name": "x",
            "start_time_unix_nano": 1,
            "end_time_unix_nano": 2,
            "events": [],
            "status": {"code": "STATUS_CODE_OK", "message": ""},
            "attributes": {"mlflow.traceRequestId": json.dumps(trace_id), **attributes},
            "links": [],
        }
    )


def test_encode_pins() -> None:
    """The encoder encode serializes a trace with takes what JSON has no form of (a pydantic
    reply) as ``dump_span_attribute_value`` does; a TraceInfo survives its dict round trip;
    MLflow's trace metadata is read where encode reads it."""
    import pydantic
    from mlflow.tracing.utils import TraceJSONEncoder, dump_span_attribute_value

    class Reply(pydantic.BaseModel):
        text: str

    assert json.loads(dump_span_attribute_value({"a": [1]})) == {"a": [1]}
    assert json.dumps({"r": Reply(text="t")}, cls=TraceJSONEncoder) == '{"r": {"text": "t"}}'
    info = _info(
        "tr-" + "a" * 32, trace_metadata={"k": "v"}, tags={"t": "1"}, client_request_id="req-1"
    )
    again = TraceInfo.from_dict(info.to_dict())
    assert (again.trace_id, again.client_request_id, again.tags["t"]) == (
        info.trace_id,
        "req-1",
        "1",
    )

    from mlflow.tracing.utils.environment import resolve_env_metadata
    from mlflow.tracking.fluent import _get_active_model_id_global, _get_latest_active_run

    assert isinstance(resolve_env_metadata(), dict)
    assert _get_active_model_id_global() is None and _get_latest_active_run() is None


def test_records_pins() -> None:
    """The span dict format records writes is what ``Span.from_dict`` reads; the log level and
    the preview MLflow would set."""
    span = _span("tr-" + "a" * 32, **{"mlflow.spanType": json.dumps("LLM")})
    assert (span.name, span.span_type, span.trace_id) == ("x", "LLM", "tr-" + "a" * 32)
    assert Span.from_dict(span.to_dict()).span_id == span.span_id

    from mlflow.entities import SpanLogLevel
    from mlflow.tracing.utils.default_log_level import default_log_level_for_span_type
    from mlflow.tracing.utils.truncation import _get_truncated_preview

    assert default_log_level_for_span_type("LLM") == SpanLogLevel.INFO
    assert (
        _get_truncated_preview(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ),
            role="assistant",
        )
        == "a"
    )


def test_store_pins(tracking_uri: str) -> None:
    """HTTP calls go through ``rest_utils.http_request`` as the REST store calls it; a batch
    shares one SQL session and one flush: the store opens its sessions through the instance's
    ``ManagedSessionMaker`` and looks experiments up through ``get_experiment``; the size stats
    MLflow's exporter adds to a trace's metadata (the store checks the span count)."""
    from mlflow.store.tracking import rest_store
    from mlflow.store.tracking.dbmodels.models import SqlTraceInfo
    from mlflow.tracing.client import TracingClient
    from mlflow.utils import rest_utils

    params = inspect.signature(rest_utils.http_request).parameters
    assert {"max_retries", "timeout", "raise_on_status", "kwargs"} <= set(params)
    # A failed probe of the server's version is cached for the process: clearable.
    from mlflow.store.tracking.rest_store import RestStore

    assert callable(RestStore._get_server_version.cache_clear)
    assert (
        rest_store.http_request is rest_utils.http_request
        or rest_store.http_request is store_http.http_request
    )

    sql = TracingClient(tracking_uri).store
    assert store.is_sql(sql)
    assert "ManagedSessionMaker" in vars(sql) and "get_experiment" not in vars(sql)
    for method in (sql._start_trace_once, sql._log_spans_once):
        source = inspect.getsource(method)
        assert "self.ManagedSessionMaker(" in source, method.__name__
    assert "self.get_experiment(" in inspect.getsource(sql._start_trace_once)
    # Its flush per trace is held back for a batch (store._one_flush), except under rollups.
    assert "session.flush()" in inspect.getsource(sql._start_trace_once)
    from mlflow.store.tracking.utils.sql_trace_rollups import rollups_enabled

    assert isinstance(rollups_enabled(), bool)
    assert hasattr(SqlTraceInfo, "request_id")

    from mlflow.entities import Trace, TraceData
    from mlflow.tracing.utils import add_size_stats_to_trace_metadata

    info = _info("tr-" + "b" * 32, trace_metadata={})
    span = _span(info.trace_id)
    add_size_stats_to_trace_metadata(Trace(info, TraceData(spans=[span])))
    assert json.loads(info.trace_metadata["mlflow.trace.sizeStats"])["num_spans"] == 1


def test_sqlite_store_pins() -> None:
    """A fresh store is built by MLflow's own store builder, on an engine handed to it through
    the class-level engine map."""
    from mlflow.store.db.utils import create_sqlalchemy_engine
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    assert isinstance(SqlAlchemyStore._engine_map, dict)
    assert "_engine_map" in inspect.getsource(SqlAlchemyStore._get_or_create_engine)
    assert "_get_or_create_engine(" in inspect.getsource(SqlAlchemyStore.__init__)
    assert list(inspect.signature(_get_sqlalchemy_store).parameters)[:2] == [
        "store_uri",
        "artifact_uri",
    ]
    assert callable(create_sqlalchemy_engine)
