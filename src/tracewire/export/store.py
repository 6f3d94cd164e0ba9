"""The tracking store, as the shipper process writes it (runs only in the shipper, and in the
CLI commands that ship or read).

Spool bytes -> MLflow's trace records and spans (export/decode.py), written in batches
(:class:`Store`): one transaction per batch into a database store, spans only (many traces per
request) or ``start_trace`` + ``log_spans`` into a tracking server. MLflow's HTTP calls made while
shipping get our retry budget (export/store_http.py), and what the server last answered says
how long to wait before the next try (``failed_status``, ``retry_after``).

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): ``SqlAlchemyStore``
(``ManagedSessionMaker``, ``get_experiment``, ``_start_trace_once`` and its
``session.flush()``, ``_log_spans_once``), ``SqlTraceInfo.request_id``, ``rollups_enabled``.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from mlflow.entities import Span as MlflowSpan
from mlflow.entities import TraceInfo

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import cost, feedback, scrub
from tracewire.export import destination, sqlite_store, store_http
from tracewire.export.decode import decode
from tracewire.export.store_http import StoreAnswerError

_STAMPS_IN_FLIGHT = 4


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
        store_http.shipping.timeout = self._settings.ship_timeout
        store_http.shipping.status = store_http.shipping.retry_after = None
        try:
            yield
        except Exception:
            self.failed_status, self.retry_after = (
                store_http.shipping.status,
                store_http.shipping.retry_after,
            )
            raise
        finally:
            store_http.shipping.timeout = None

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
                store_http.shipping.timeout = self._settings.ship_timeout
                try:
                    for info in part:
                        _start_trace(store, info)
                except Exception as exc:
                    failures.append(exc)
                    status.append((store_http.shipping.status, store_http.shipping.retry_after))

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
                store_http.shipping.status, store_http.shipping.retry_after = status[0]
                raise failures[0]


def _log_spans(store: Any, location: str, batch: list[MlflowSpan]) -> None:
    try:
        store.log_spans(location, batch)
    except NotImplementedError:
        raise StoreAnswerError(_why_no_version(store)) from None


def _why_no_version(store: Any) -> str:
    """MLflow's words for a server whose version it could not read ("log_spans is not
    supported: could not identify MLflow server version") hide the usual cause, a server that
    is down: ask it once more, and say what it answered."""
    from mlflow.utils.rest_utils import http_request

    creds = store.get_host_creds()
    host = scrub.text(creds.host)
    try:
        answer = http_request(creds, "/version", "GET", timeout=3, max_retries=0)
    except Exception as exc:
        errno = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
        reason = errno[0] if errno else f"{type(exc).__name__}: {str(exc)[:200]}"
        return f"the tracking server {host} did not answer ({reason})"
    if answer.status_code != 200:
        return (
            f"the tracking server {host} answered {answer.status_code} for its version: an "
            "MLflow older than 3.4, or not an MLflow server"
        )
    return (
        f"the tracking server {host} is MLflow {answer.text[:40]!r}; tracewire needs 3.4 or later"
    )


def _start_trace(store: Any, info: TraceInfo) -> None:
    stored = store.start_trace(info)
    if stored.trace_id != info.trace_id:  # an empty answer read as a success (cut off)
        raise StoreAnswerError(
            f"the store answered start_trace for {info.trace_id} with "
            f"{stored.trace_id or 'no trace'}"
        )


def is_sql(store: Any) -> bool:
    """Whether ``store`` is MLflow's SQL store, without importing it: that import takes about
    4 s here, and a shipper writing to a tracking server paid it at its first batch (long
    enough for an exit to give up on a store that was answering)."""
    module = sys.modules.get("mlflow.store.tracking.sqlalchemy_store")
    return module is not None and isinstance(store, module.SqlAlchemyStore)


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


@contextlib.contextmanager
def _one_flush(session: Any) -> Iterator[None]:
    """The session's rows written once for the block, not once per trace.

    MLflow's ``start_trace`` flushes the session for each trace, to catch one that is stored
    already (ours are looked up first: see _write_sql). Flushed once for a batch, SQLAlchemy
    writes each table's rows in one statement: 2000 traces shipped from a spool took 5.5 s of
    CPU instead of 6.0 (opening the store included). Not while MLflow's opt-in trace rollups
    are on: their bookkeeping reads back, in savepoints, what each trace flushed.
    """
    if _rollups_on():
        yield
        return
    session.flush = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del session.flush
    session.flush()


def _rollups_on() -> bool:
    try:
        from mlflow.store.tracking.utils.sql_trace_rollups import rollups_enabled
    except ImportError:  # an MLflow without them
        return False
    return bool(rollups_enabled())


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
        with _one_flush(session):
            for info in infos:
                if info.trace_id not in stored:
                    store.start_trace(info)
        for location, batch in by_experiment.items():
            store.log_spans(location, batch)
