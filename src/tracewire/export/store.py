"""The tracking store, as the shipper process writes it (runs only in the shipper, and in the
CLI commands that ship or read).

Spool bytes -> MLflow's trace records and spans (:func:`decode`), written in batches
(:class:`Store`): one transaction per batch into a database store, spans only (many traces per
request) or ``start_trace`` + ``log_spans`` into a tracking server. MLflow's HTTP calls made while
shipping get our retry budget (:func:`install_http_budget`).

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): ``rest_utils.http_request``
as the REST store calls it, ``SqlAlchemyStore`` (``ManagedSessionMaker``, ``get_experiment``,
``_start_trace_once``, ``_log_spans_once``), ``SqlTraceInfo.request_id``, the OTLP intake's root
span attributes (``mlflow.traceTag.<key>``, ``session.id``, ``user.id``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Span as MlflowSpan
from mlflow.entities import Trace, TraceData, TraceInfo, TraceLocation, TraceState
from mlflow.tracing.constant import (
    MAX_CHARS_IN_TRACE_INFO_METADATA,
    MAX_CHARS_IN_TRACE_INFO_TAGS_KEY,
    MAX_CHARS_IN_TRACE_INFO_TAGS_VALUE,
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSION_KEY,
    TRUNCATION_SUFFIX,
    SpanAttributeKey,
    TraceMetadataKey,
)
from mlflow.tracing.utils import (
    add_size_stats_to_trace_metadata,
    aggregate_cost_from_spans,
    aggregate_usage_from_spans,
    should_compute_cost_client_side,
)
from mlflow.tracing.utils.truncation import set_request_response_preview
from mlflow.utils.mlflow_tags import TRACE_RESOLVE_TAGS_ALLOWLIST

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import cost, feedback, scrub
from tracewire.export import destination, records, sqlite_store

_original_http_request = None
# On the shipper's thread while it ships: the timeout of each request, and what the last
# answer said (its HTTP status, Retry-After in seconds), read by Store after a failure.
_shipping = threading.local()
_STAMPS_IN_FLIGHT = 4
_RETRY_AFTER_CAP = 300.0  # seconds: a server asking for more is asked again after this
# What a tracking server answers with: JSON for REST calls, protobuf for OTLP spans. A 2xx of
# another type (a proxy's HTML page), or of none (an answer cut off in its headers), is not an
# acknowledgement. Its /version answer is the one exception (MLflow serves it as text/html).
_ANSWER_TYPES = ("application/json", "application/x-protobuf")
_VERSION_ENDPOINT = "/version"


class StoreAnswerError(RuntimeError):
    """The store's HTTP answer cannot be an acknowledgement (a redirect, a page that is not
    MLflow's, a different trace id): retried like an outage, never taken for a write."""


def _http_request(*args: Any, **kwargs: Any) -> Any:
    """MLflow's HTTP call, with our retry budget on the shipper's thread: one attempt and our
    timeout (the shipper retries with backoff), instead of 7 retries x 120 s. The answer comes
    back whatever its status (MLflow turns an error status into its own exception after), so
    the real status and Retry-After are recorded; redirects are not followed."""
    if getattr(_shipping, "timeout", None) is None:
        return _original_http_request(*args, **kwargs)  # type: ignore[misc]
    kwargs.update(
        max_retries=0, timeout=_shipping.timeout, raise_on_status=False, allow_redirects=False
    )
    _shipping.status = _shipping.retry_after = None
    response = _original_http_request(*args, **kwargs)  # type: ignore[misc]
    _shipping.status = response.status_code
    _shipping.retry_after = _retry_after(response.headers.get("Retry-After"))
    if 300 <= response.status_code < 400:
        raise StoreAnswerError(
            f"the tracking server redirected ({response.status_code}) to "
            f"{scrub.text(response.headers.get('Location', '?'))}"
        )
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    endpoint = kwargs.get("endpoint", args[1] if len(args) > 1 else None)
    if response.status_code < 300 and kind not in _ANSWER_TYPES and endpoint != _VERSION_ENDPOINT:
        raise StoreAnswerError(
            f"the tracking server answered {response.status_code} with "
            f"{kind or 'no content type'}, not MLflow's answer"
        )
    return response


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number, or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        import email.utils

        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), _RETRY_AFTER_CAP)


def install_http_budget() -> None:
    """In the shipper process: MLflow's REST calls made while shipping get our retry budget."""
    global _original_http_request
    from mlflow.utils import rest_utils

    if _original_http_request is not None:
        return
    _original_http_request = rest_utils.http_request
    rest_utils.http_request = _http_request
    try:
        from mlflow.store.tracking import rest_store
    except ImportError:
        return
    rest_store.http_request = _http_request


@dataclass
class Decoded:
    """One spooled trace as MLflow entities."""

    info: TraceInfo | None  # its record; None for late spans of a trace already stored
    spans: list[MlflowSpan]
    # The record rides in the root span's attributes (a tracking server makes it from there):
    # no start_trace now.
    via_spans: bool = False
    # ... and what the spans cannot carry (the client request id, MLflow's metadata) is
    # written later, by a start_trace the server merges (Store.stamp).
    stamp: bool = False


# Trace metadata a tracking server derives from spans arriving for a trace it does not have,
# and metadata that describes rather than identifies (the process's source, sizes, the root's
# values cut short): neither is worth a request of its own (a ``start_trace`` each, the server's
# bottleneck, about 50 a second), and the latter rides along when a trace is stamped anyway.
_NO_STAMP = frozenset(
    {
        TRACE_SCHEMA_VERSION_KEY,
        keys.TRACE_SESSION,
        keys.TRACE_USER,
        keys.TRACE_TOKEN_USAGE,
        keys.TRACE_COST,
        keys.TRACE_INPUTS,
        keys.TRACE_OUTPUTS,
        TraceMetadataKey.SIZE_STATS,
        TraceMetadataKey.SIZE_BYTES,
        *TRACE_RESOLVE_TAGS_ALLOWLIST,
    }
)


def decode(payload: bytes, experiment_id: str, record_in_spans: bool, catalog: bool) -> Decoded:
    """Spool bytes -> MLflow's trace record and spans, in ``experiment_id`` unless the trace
    names its own. A payload of version 2 (what the app captured, export/records.py) is made
    into MLflow's span records here, with prices from MLflow's catalog if ``catalog`` (a store
    that does not price spans itself); version 1 (a spool an older tracewire left) has them.

    With ``record_in_spans`` (a tracking server, where each trace record is a request of its
    own), a trace of ours whose record the spans can carry is written as spans only: see
    :func:`_record_in_root_span`."""
    data = json.loads(payload)
    if data.get("v") == records.VERSION:
        data = records.expand(data, catalog)
    head, context = data["head"], data["context"]
    if head is not None:
        fields = head.get("set") or {}  # what MLflow's trace APIs set (export/encode.py)
        info: TraceInfo | None = TraceInfo(
            trace_id=head["trace_id"],
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=head["request_time"],
            execution_duration=head["execution_duration"],
            state=TraceState(fields.get("state", head["state"])),
            trace_metadata={
                TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
                **head.get("metadata", {}),
            },
            tags={keys.TRACE_NAME: head["name"], **head.get("tags", {})},
            client_request_id=fields.get("client_request_id"),
            # The app's own previews, else ours where MLflow's would be raw JSON (encode.py).
            request_preview=fields.get("request_preview")
            or head.get("previews", {}).get("request_preview"),
            response_preview=fields.get("response_preview")
            or head.get("previews", {}).get("response_preview"),
        )
    elif data["info"] is not None:
        info = TraceInfo.from_dict(data["info"])
        if info.experiment_id in (None, destination.PENDING_EXPERIMENT):
            info.trace_location = TraceLocation.from_experiment_id(experiment_id)
    else:
        info = None
    location = json.dumps(info.experiment_id if info is not None else experiment_id)
    for span in data["spans"]:
        if SpanAttributeKey.EXPERIMENT_ID in span["attributes"]:
            span["attributes"][SpanAttributeKey.EXPERIMENT_ID] = location
    if info is None:
        return Decoded(None, [MlflowSpan.from_dict(d) for d in data["spans"]])
    # Before the spans are built: the root's attributes may carry the record.
    via_spans = (
        head is not None
        and record_in_spans
        and not head.get("set")
        and _record_in_root_span(head, context, data["spans"])
    )
    trace_spans = [MlflowSpan.from_dict(d) for d in data["spans"]]
    _stamp(info, trace_spans, context)
    stamp = via_spans and bool(
        info.client_request_id or head.get("previews") or set(info.trace_metadata) - _NO_STAMP
    )
    return Decoded(info, trace_spans, via_spans, stamp)


def _storable_tags(tags: dict[str, str]) -> dict[str, str]:
    """The store refuses a whole trace over one long tag (a span named after a huge prompt, a
    tag set from request data): values cut to its limit, keys it cannot hold dropped."""
    return {
        key: value[:MAX_CHARS_IN_TRACE_INFO_TAGS_VALUE]
        for key, value in tags.items()
        if len(key) <= MAX_CHARS_IN_TRACE_INFO_TAGS_KEY
    }


def _context_tags(context: dict[str, Any]) -> dict[str, str]:
    """The trace tags the request context gives: deployment and request tags, the request id."""
    request_id = {keys.REQUEST_ID_TAG: context["request_id"]} if context["request_id"] else {}
    return {**context["tags"], **request_id}


def _record_in_root_span(
    head: dict[str, Any], context: dict[str, Any], span_dicts: list[dict[str, Any]]
) -> bool:
    """Put what ``start_trace`` would record into the root span, in the attributes a tracking
    server reads when spans arrive for a trace it does not have yet (MLflow's OTLP intake:
    ``SqlAlchemyStore._log_spans_once``): tags as ``mlflow.traceTag.<key>`` (the request id
    among them), the session as ``session.id``, the user as ``user.id``. It takes the state,
    times, previews, token usage and cost from the spans themselves. Many such traces go in one
    request, against one ``start_trace`` request each (3-4x the server's CPU), so web-request
    traces become visible several times faster; what no span attribute sets (the client request
    id, MLflow's metadata such as the model id) is stamped on afterwards. A trace continuing a
    remote parent keeps ``start_trace`` (its root has a parent: the server would see no root),
    and so does one whose state, previews or client request id the app set through MLflow's
    API (the server would take them from the spans first)."""
    root = next((d for d in span_dicts if d["parent_span_id"] is None), None)
    if root is None:
        return False
    attributes = root["attributes"]
    metadata = head.get("metadata", {})
    tags = _storable_tags(
        {keys.TRACE_NAME: head["name"], **_context_tags(context), **head.get("tags", {})}
    )
    for key, value in tags.items():
        attributes[SpanAttributeKey.TRACE_TAG_PREFIX + key] = json.dumps(value)
    if session := metadata.get(keys.TRACE_SESSION) or context["session_id"]:
        attributes[SpanAttributeKey.SESSION_ID] = json.dumps(session)
    if user := metadata.get(keys.TRACE_USER) or context["user_id"]:
        attributes[keys.USER_ID] = json.dumps(user)
    return True


def _stamp(info: TraceInfo, trace_spans: list[MlflowSpan], context: dict[str, Any]) -> None:
    """Trace-level fields: request context, deployment tags, token totals, previews."""
    metadata = info.trace_metadata
    # What the app set through MLflow's API (update_current_trace) wins.
    if context["session_id"] and keys.TRACE_SESSION not in metadata:
        metadata[keys.TRACE_SESSION] = context["session_id"]
    if context["user_id"] and keys.TRACE_USER not in metadata:
        metadata[keys.TRACE_USER] = context["user_id"]
    if context["request_id"] and not info.client_request_id:
        info.client_request_id = context["request_id"]
    info.tags = _storable_tags({**_context_tags(context), **info.tags})
    if usage := aggregate_usage_from_spans(trace_spans):  # type: ignore[arg-type]
        metadata[keys.TRACE_TOKEN_USAGE] = json.dumps(usage)
    # A store that prices spans sums the trace's cost itself; one that does not gets ours.
    if should_compute_cost_client_side() and (
        total := aggregate_cost_from_spans(trace_spans)  # type: ignore[arg-type]
    ):
        metadata[keys.TRACE_COST] = json.dumps(total)
    set_request_response_preview(info, TraceData(spans=trace_spans))
    if (root := next((s for s in trace_spans if s.parent_id is None), None)) is not None:
        # As MLflow's span processor records them (its trace table still reads them).
        attributes = root.to_dict()["attributes"]
        for key, attribute in (
            (keys.TRACE_INPUTS, SpanAttributeKey.INPUTS),
            (keys.TRACE_OUTPUTS, SpanAttributeKey.OUTPUTS),
        ):
            metadata.setdefault(key, _metadata_text(attributes.get(attribute) or ""))
    # MLflow's exporter adds them to each trace it writes; the store reads the span count to
    # tell a trace whose spans are all written from one still arriving.
    add_size_stats_to_trace_metadata(Trace(info, TraceData(spans=trace_spans)))


def _metadata_text(value: str) -> str:
    if len(value) <= MAX_CHARS_IN_TRACE_INFO_METADATA:
        return value
    return value[: MAX_CHARS_IN_TRACE_INFO_METADATA - len(TRUNCATION_SUFFIX)] + TRUNCATION_SUFFIX


_FEEDBACK_ID = "tracewire.feedback_id"
# What became of one feedback (Store.apply_feedback).
APPLIED, WAITING, REFUSED = "applied", "waiting", "refused"


class Undecodable(ValueError):
    """A spooled trace that cannot be turned into MLflow's records: like a trace the store
    refuses, it is set aside (kept and counted), never dropped silently."""


class Store:
    """The tracking store, as the shipper sees it: batches of spooled traces in, or an
    exception (then the batch stays spooled and is retried)."""

    def __init__(self, settings: config.Settings) -> None:
        self._settings = settings
        self._client: Any = None
        self._experiment_id: str | None = None
        # A database written directly (opening it may create it: local work, worth waiting
        # for at exit), not a tracking server.
        self.local = destination.is_database(destination.tracking_uri(settings))
        # Prices from MLflow's catalog for a store that does not price spans (core/cost.py).
        self._catalog = not cost.store_prices(destination.tracking_uri(settings))
        self.failed_status: int | None = None  # the HTTP status of the last failure, if any
        self.retry_after: float | None = None  # what the store asked for with it (429, 503)

    @property
    def ready(self) -> bool:
        return self._client is not None and self._experiment_id is not None

    def prepare(self) -> None:
        """Open the store and resolve the experiment now, before the first trace; raises as
        :meth:`ship` does."""
        with self._shipping():
            self.experiment()

    def reset(self) -> None:
        """After a failure: the next attempt opens the store afresh. MLflow's REST store caches
        a failed probe of the server's version for the life of the process (all clients share
        it), and then refuses every ``log_spans``: that cache is cleared too."""
        self._client = None
        try:
            from mlflow.store.tracking.rest_store import RestStore
        except ImportError:
            return
        getattr(RestStore._get_server_version, "cache_clear", lambda: None)()

    @contextlib.contextmanager
    def _shipping(self) -> Iterator[None]:
        """Our retry budget for the HTTP calls in the block; after a failure, what the store's
        last answer said (``failed_status``, ``retry_after``)."""
        _shipping.timeout = self._settings.ship_timeout
        _shipping.status = _shipping.retry_after = None
        try:
            yield
        except Exception:
            self.failed_status, self.retry_after = _shipping.status, _shipping.retry_after
            raise
        finally:
            _shipping.timeout = None

    def experiment(self) -> tuple[Any, str]:
        """(tracing client, experiment id) of the destination, opened (and made) on first use."""
        if self._client is None:
            from mlflow.tracing.client import TracingClient

            uri = destination.tracking_uri(self._settings)
            if (path := destination.sqlite_path(uri)) is not None:
                sqlite_store.create(path)  # a fresh local store: whole, or not at all
            client = TracingClient(uri)
            _ = client.store  # opens the store (a database one checks its schema)
            self._client = client
        if self._experiment_id is None:
            self._experiment_id = self._resolve_experiment()
        return self._client, self._experiment_id

    def _resolve_experiment(self) -> str:
        settings = self._settings
        if settings.experiment_id:
            return settings.experiment_id
        if settings.experiment_name:
            # The store API, not MlflowClient: the slim mlflow-tracing SDK has only the former.
            store = self._client.store
            experiment = store.get_experiment_by_name(settings.experiment_name)
            if experiment is not None:
                return experiment.experiment_id
            try:
                return store.create_experiment(settings.experiment_name)
            except Exception:
                # Created meanwhile by another process, or by MLflow itself (it resolves
                # MLFLOW_EXPERIMENT_NAME for user spans that carry an experiment).
                experiment = store.get_experiment_by_name(settings.experiment_name)
                if experiment is None:
                    raise
                return experiment.experiment_id
        from mlflow.tracking.fluent import _active_experiment_id

        return _active_experiment_id or "0"

    def apply_feedback(self, payload: bytes) -> str:
        """Log one feedback on its trace: ``APPLIED``; ``WAITING`` while no trace it may land on
        is in the store; ``REFUSED`` when its trace belongs to someone else (core/feedback.py)."""
        from mlflow.entities import AssessmentSource, Feedback
        from mlflow.exceptions import MlflowException

        data = json.loads(payload)
        poster = data.get("poster")
        with self._shipping():
            client, experiment_id = self.experiment()
            trace_id = data["trace_id"]
            if trace_id is None:
                trace_id = self._trace_of_request(client, experiment_id, data["request_id"], poster)
                if trace_id is None:
                    return WAITING
            try:
                info = client.get_trace_info(trace_id)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return WAITING
                raise
            if poster is not None and not feedback.may_post(
                info.tags.get(keys.FEEDBACK_FROM_TAG), poster
            ):
                return REFUSED
            if any(
                (a.metadata or {}).get(_FEEDBACK_ID) == data["feedback_id"]
                for a in info.assessments
            ):
                return APPLIED  # applied before a crash that kept it spooled
            client.log_assessment(
                trace_id,
                Feedback(
                    name=data["name"],
                    value=data["value"],
                    rationale=data["rationale"],
                    source=AssessmentSource(
                        source_type="HUMAN", source_id=data["source_id"] or "anonymous"
                    ),
                    metadata={_FEEDBACK_ID: data["feedback_id"]},
                ),
            )
            return APPLIED

    @staticmethod
    def _trace_of_request(
        client: Any, experiment_id: str, request_id: str, poster: str | None
    ) -> str | None:
        """The trace feedback by request id lands on: the newest with that id for the app's
        own feedback; for the route's, only one the poster may give feedback on, found by
        that in the filter, so that other clients' traces with the same id (as many as they
        like) cannot hide it. (The tags are there from a trace's first write; ids and
        digests are validated: no quote can reach the filter.)"""
        by_id = f"tags.`{keys.REQUEST_ID_TAG}` = '{request_id}'"
        if poster is None:
            wanted: list[str | None] = [None]
        else:  # the poster's own traces, then an anonymous one whose request id it holds
            wanted = (
                [poster, feedback.BEARER] if poster != feedback.ANONYMOUS else [feedback.BEARER]
            )
        for feedback_from in wanted:
            condition = (
                by_id
                if feedback_from is None
                else f"{by_id} AND tags.`{keys.FEEDBACK_FROM_TAG}` = '{feedback_from}'"
            )
            found = client.search_traces(
                locations=[experiment_id],
                max_results=1,
                include_spans=False,
                filter_string=condition,
            )
            if found:
                return found[0].info.trace_id
        return None

    def rejects(self, exc: Exception) -> bool:
        """Whether the store refused the data itself (a 4xx), so that sending the same bytes
        again cannot succeed. Throttling (429), timeouts (408) and credentials (401/403: fixed
        by configuration, not by changing the trace) are worth retrying. A tracking server's
        answer is judged by its real HTTP status (MLflow reads some 4xx bodies as a 500)."""
        from mlflow.exceptions import MlflowException

        if isinstance(exc, Undecodable):
            return True
        if isinstance(exc, MlflowException):
            code = self.failed_status or exc.get_http_status_code()
        else:
            code = 0  # the connection, not the data, failed
        return 400 <= code < 500 and code not in (401, 403, 408, 429)

    def ship(self, entries: Sequence[Any]) -> list[tuple[str, bytes]]:
        """Write a batch; idempotent by trace id, so a batch shipped twice lands once. Returns
        the ``(trace id, record)`` stamps still to be written for what the spans could not
        carry (:meth:`stamp`)."""
        with self._shipping():
            client, experiment_id = self.experiment()
            infos: list[TraceInfo] = []
            later: list[TraceInfo] = []
            by_experiment: dict[str, list[MlflowSpan]] = {}
            store = client.store
            sql = is_sql(store)
            for entry in entries:
                try:
                    decoded = decode(entry.payload, experiment_id, not sql, self._catalog)
                except Exception as exc:  # set aside with the reason, never with content
                    raise Undecodable(
                        f"{type(exc).__name__} in spooled trace {entry.trace_id}"
                    ) from None
                info = decoded.info
                if info is not None and not decoded.via_spans:
                    infos.append(info)
                elif decoded.stamp and info is not None:
                    later.append(info)
                location = (
                    info.experiment_id if info is not None and info.experiment_id else experiment_id
                )
                by_experiment.setdefault(location, []).extend(decoded.spans)
            if sql:
                _write_sql(store, infos, by_experiment)
            else:
                for info in infos:  # a tracking server merges a trace it already has
                    _start_trace(store, info)
                for location, batch in by_experiment.items():
                    _log_spans(store, location, batch)
            return [(info.trace_id, json.dumps(info.to_dict()).encode()) for info in later]

    def stamp(self, records: Sequence[bytes]) -> None:
        """Write the records of traces stored from their spans, for what the spans could not
        carry (the server merges them into the trace), a few requests in flight: the server handles
        them in parallel. Raises the first failure (the stamps stay queued)."""
        infos = [TraceInfo.from_dict(json.loads(record)) for record in records]
        with self._shipping():
            store = self.experiment()[0].store
            failures: list[Exception] = []
            status: list[tuple[int | None, float | None]] = []

            def write(part: Sequence[TraceInfo]) -> None:
                _shipping.timeout = self._settings.ship_timeout
                try:
                    for info in part:
                        _start_trace(store, info)
                except Exception as exc:
                    failures.append(exc)
                    status.append((_shipping.status, _shipping.retry_after))

            threads = [
                threading.Thread(
                    target=write,
                    args=(infos[i::_STAMPS_IN_FLIGHT],),
                    name="tracewire-stamp",
                    daemon=True,
                )
                for i in range(min(_STAMPS_IN_FLIGHT, len(infos)))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if failures:
                _shipping.status, _shipping.retry_after = status[0]
                raise failures[0]


def _log_spans(store: Any, location: str, batch: list[MlflowSpan]) -> None:
    try:
        store.log_spans(location, batch)
    except NotImplementedError as exc:  # MLflow's words hide the usual cause
        raise StoreAnswerError(
            f"{exc} (the server did not answer; or it is older than MLflow 3.4)"
        ) from None


def _start_trace(store: Any, info: TraceInfo) -> None:
    stored = store.start_trace(info)
    if stored.trace_id != info.trace_id:  # an empty answer read as a success (cut off)
        raise StoreAnswerError(
            f"the store answered start_trace for {info.trace_id} with "
            f"{stored.trace_id or 'no trace'}"
        )


def is_sql(store: Any) -> bool:
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:  # the slim SDK: only REST stores
        return False
    return isinstance(store, SqlAlchemyStore)


@contextlib.contextmanager
def _one_transaction(store: Any) -> Iterator[Any]:
    """Every store call in the block runs in one session and commits once, at the end.

    MLflow's SQL store opens, checks the experiment in and commits a session per
    ``start_trace``: about 60% of a trace's write time. Sharing one session (and one experiment
    lookup) across a batch makes it all-or-nothing too: a failed batch leaves nothing behind
    and is shipped again whole.
    """
    make_session, get_experiment = store.ManagedSessionMaker, store.get_experiment
    experiments: dict[str, Any] = {}

    def cached_experiment(experiment_id: str) -> Any:
        if experiment_id not in experiments:
            experiments[experiment_id] = get_experiment(experiment_id)
        return experiments[experiment_id]

    with make_session(read_only=False) as session:

        @contextlib.contextmanager
        def shared_session(read_only: bool = True) -> Iterator[Any]:
            yield session

        store.ManagedSessionMaker, store.get_experiment = shared_session, cached_experiment
        try:
            yield session
        finally:
            store.ManagedSessionMaker = make_session
            del store.get_experiment  # back to the class's method


def _write_sql(
    store: Any, infos: list[TraceInfo], by_experiment: dict[str, list[MlflowSpan]]
) -> None:
    from mlflow.store.tracking.dbmodels.models import SqlTraceInfo

    with _one_transaction(store) as session:
        ids = [info.trace_id for info in infos]
        # Already stored (shipped before a crash that kept them spooled): MLflow would merge
        # them after a rollback, which would undo the rest of this shared transaction.
        stored = (
            {
                row[0]
                for row in session.query(SqlTraceInfo.request_id).filter(
                    SqlTraceInfo.request_id.in_(ids)
                )
            }
            if ids
            else set()
        )
        for info in infos:
            if info.trace_id not in stored:
                store.start_trace(info)
        for location, batch in by_experiment.items():
            store.log_spans(location, batch)
