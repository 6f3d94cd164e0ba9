"""Sync traces from the tracking store into a Delta table (``pip install "tracewire[delta]"``).

One row per trace (export/trace_rows.py), partitioned by ``request_date``, merged on
``trace_id``: syncing twice writes nothing new, and a trace whose record changed (feedback
added, late spans) has its row rewritten, never duplicated.

Progress lives in the table itself: every page of rows is one Delta commit that also records,
as the application transaction of this sync (``app_id`` below), the newest request time it
covers. A sync that dies between commits loses nothing: the next one reads that mark back and
starts from it, minus the look-back window. The window (at least the spool's feedback
retention) is there because traces reach the store late with old timestamps after an outage,
and because feedback arrives after its trace was synced.

Reading is two-step: trace records without spans first (cheap), compared by revision with the
rows already in the window; spans are fetched only for new or changed traces.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tracewire.export import trace_rows

logger = logging.getLogger("tracewire")

# Traces merged per Delta commit: each commit has a fixed cost, so fewer, larger ones are faster.
COMMIT_SIZE = 1000
# The most traces a tracking server answers for one search.
SEARCH_PAGE = 500
_COMMIT_ATTEMPTS = 5  # per page, when other syncs keep committing to the same table
_DAY_MS = 86_400_000


@dataclass
class SyncReport:
    read: int = 0  # trace records looked at
    written: int = 0  # rows inserted or rewritten
    high_water_ms: int | None = None


def app_id(tracking_uri: str, experiment_ids: Sequence[str]) -> str:
    """The sync's name in the table's transaction log: one progress mark per store and
    experiment set, so two syncs into one table do not move each other's mark."""
    key = "\n".join([tracking_uri, *sorted(experiment_ids)])
    return "tracewire.sync." + hashlib.sha1(key.encode()).hexdigest()[:16]


def _open_table(path: str, storage_options: dict[str, str] | None) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(path, storage_options=storage_options)
    except TableNotFoundError:
        return DeltaTable.create(
            path,
            schema=trace_rows.schema(),
            partition_by=[trace_rows.PARTITION],
            storage_options=storage_options,
            name="tracewire_traces",
        )


def write(table: Any, rows: list[dict[str, Any]], app: str, high_water_ms: int) -> int:
    """Merge rows on trace_id and record ``high_water_ms`` as the sync's progress, in one
    commit; the write stage of a sync. Returns the rows inserted or rewritten."""
    from deltalake import CommitProperties, Transaction

    commit = CommitProperties(
        app_transactions=[Transaction(app_id=app, version=high_water_ms)],
        custom_metadata={"tracewire.high_water_ms": str(high_water_ms)},
    )
    metrics = (
        table.merge(
            trace_rows.table(rows),
            # request_date in the predicate prunes the merge to the rows' partitions.
            predicate="t.request_date = s.request_date AND t.trace_id = s.trace_id",
            source_alias="s",
            target_alias="t",
            commit_properties=commit,
        )
        .when_matched_update_all(predicate="t.revision <> s.revision")
        .when_not_matched_insert_all()
        .execute()
    )
    return int(metrics.get("num_target_rows_inserted", 0)) + int(
        metrics.get("num_target_rows_updated", 0)
    )


def _stored_revisions(table: Any, start_ms: int) -> dict[str, str]:
    """trace_id -> revision of the rows from ``start_ms``'s day on."""
    import datetime as dt

    import pyarrow.dataset as ds

    day = dt.datetime.fromtimestamp(start_ms / 1000, tz=dt.UTC).date()
    found = trace_rows.read(table, ["trace_id", "revision"], ds.field(trace_rows.PARTITION) >= day)
    return dict(zip(found.column("trace_id").to_pylist(), found.column("revision").to_pylist()))


def trace_records(
    client: Any, locations: list[str], start_ms: int, size: int
) -> Iterator[list[Any]]:
    """Trace records (no spans) from ``start_ms`` on, oldest first, ``size`` at a time.

    Keyset pages (``timestamp >= the last one seen``), not offsets: a trace that lands behind
    the cursor while we page cannot shift a page and make us skip another. A full page of one
    millisecond (a burst) is drained with MLflow's page token before moving on.
    """
    cursor, seen = start_ms, set[str]()
    while True:
        infos = client.search_traces(
            locations=locations,
            filter_string=f"trace.timestamp_ms >= {cursor}",
            order_by=["timestamp_ms ASC"],
            max_results=size,
            include_spans=False,
        )
        infos = [t.info for t in infos]
        if len(infos) == size and infos[-1].request_time == cursor:
            infos, token = [], None
            while True:
                page = client.search_traces(
                    locations=locations,
                    filter_string=f"trace.timestamp_ms = {cursor}",
                    max_results=size,
                    include_spans=False,
                    page_token=token,
                )
                infos.extend(t.info for t in page)
                if not (token := page.token):
                    break
            fresh = [i for i in infos if i.trace_id not in seen]
            if fresh:
                yield fresh
            cursor, seen = cursor + 1, set()
            continue
        fresh = [i for i in infos if i.trace_id not in seen]
        if fresh:
            yield fresh
        if len(infos) < size:
            return
        last = infos[-1].request_time
        seen = {i.trace_id for i in infos if i.request_time == last} | (
            seen if last == cursor else set()
        )
        cursor = last


def sync(
    path: str,
    *,
    tracking_uri: str,
    experiment_ids: Sequence[str],
    lookback_s: float,
    since_ms: int | None = None,
    page_size: int = COMMIT_SIZE,
    storage_options: dict[str, str] | None = None,
    progress: Callable[[SyncReport], None] | None = None,
    stop: threading.Event | None = None,
) -> SyncReport:
    """Bring the table at ``path`` up to date with the traces of ``experiment_ids``.

    Starts at ``since_ms`` if given, else at the recorded progress minus ``lookback_s``, else
    at the beginning. Commits page by page; ``stop`` ends it between pages.
    """
    from deltalake.exceptions import CommitFailedError
    from mlflow.tracing.client import TracingClient

    client = TracingClient(tracking_uri)
    table = _open_table(path, storage_options)
    app = app_id(tracking_uri, experiment_ids)
    mark = table.transaction_version(app)
    report = SyncReport(high_water_ms=mark)
    if since_ms is None:
        since_ms = max(0, mark - int(lookback_s * 1000)) if mark is not None else 0
    stored = _stored_revisions(table, since_ms)
    pages = trace_records(client, list(experiment_ids), since_ms, min(page_size, SEARCH_PAGE))
    for infos in _regrouped(pages, page_size):
        report.read += len(infos)
        wanted = [i.trace_id for i in infos if stored.get(i.trace_id) != trace_rows.revision(i)]
        high_water = max([i.request_time for i in infos] + [report.high_water_ms or 0])
        if wanted:
            traces = with_spans(client, wanted)
            rows = [trace_rows.row(t) for t in traces]
            for attempt in range(_COMMIT_ATTEMPTS):
                try:
                    report.written += write(table, rows, app, high_water)
                    break
                except CommitFailedError:
                    if attempt == _COMMIT_ATTEMPTS - 1:
                        raise
                    # Another sync (another app worker) committed first: merge again on top
                    # of its rows, keeping the later of the two progress marks.
                    table.update_incremental()
                    high_water = max(high_water, table.transaction_version(app) or 0)
            stored.update((r["trace_id"], r["revision"]) for r in rows)
        report.high_water_ms = high_water
        if progress is not None:
            progress(report)
        if stop is not None and stop.is_set():
            break
    return report


def _regrouped(pages: Iterator[list[Any]], size: int) -> Iterator[list[Any]]:
    """The same records, ``size`` at a time (the last batch may be smaller)."""
    batch: list[Any] = []
    for page in pages:
        batch.extend(page)
        while len(batch) >= size:
            yield batch[:size]
            batch = batch[size:]
    if batch:
        yield batch


def with_spans(client: Any, trace_ids: list[str]) -> list[Any]:
    from tracewire.export.store import is_sql

    if is_sql(client.store):
        # One query per table for the whole page; the client's batch_get_traces reads each
        # trace's tags, metadata and assessments with a query of its own (5x slower here).
        return client.store.batch_get_traces(trace_ids)
    return client.batch_get_traces(trace_ids)


def experiments(tracking_uri: str, wanted: Sequence[str] = ()) -> list[str]:
    """Experiment ids for names or ids (``wanted``); all active experiments if none given."""
    from mlflow.tracing.client import TracingClient

    store = TracingClient(tracking_uri).store
    if not wanted:
        from mlflow.entities import ViewType

        found = store.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=50_000)
        return [e.experiment_id for e in found]
    ids = []
    for item in wanted:
        if item.isdigit():
            ids.append(item)
            continue
        experiment = store.get_experiment_by_name(item)
        if experiment is None:
            raise LookupError(f"no experiment named {item!r} in {tracking_uri}")
        ids.append(experiment.experiment_id)
    return ids


# --------------------------------------------------------------------------- in the app


class BackgroundSync:
    """``autolog(delta_path=...)``: a daemon thread that syncs every ``interval`` seconds.

    It never blocks or breaks the app: a failed sync is logged (once per cause) and tried again
    at the next interval; it runs at lowered CPU priority; ``stop()`` ends it between pages
    within its timeout, and the thread is a daemon so exit never waits on it.
    """

    def __init__(
        self,
        path: str,
        interval: float,
        tracking_uri: str,
        experiment: Callable[[], str],
        lookback_s: float,
    ) -> None:
        self._path, self._interval, self._uri = path, interval, tracking_uri
        self._experiment, self._lookback_s = experiment, lookback_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tracewire-delta-sync", daemon=True)
        self.last: SyncReport | None = None
        self.last_error: str | None = None

    @property
    def path(self) -> str:
        return self._path

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:  # below the app's own threads when CPU is short (Linux: per-thread niceness)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(self._interval):
            try:
                self.last = sync(
                    self._path,
                    tracking_uri=self._uri,
                    experiment_ids=[self._experiment()],
                    lookback_s=self._lookback_s,
                    stop=self._stop,
                )
                self.last_error = None
            except Exception as exc:  # the store or the table is unreachable: next interval
                if repr(exc) != self.last_error:
                    logger.warning(
                        "tracewire: Delta sync to %s failed, retried in %.0f s: %r",
                        self._path,
                        self._interval,
                        exc,
                    )
                self.last_error = repr(exc)


_background: BackgroundSync | None = None
_lock = threading.Lock()


def start_background(settings: Any) -> None:
    """Start (or restart with new settings) the background sync of the experiment tracewire
    writes to; stop it if ``settings.delta_path`` is not set."""
    from tracewire.export import destination
    from tracewire.export import store as stores

    global _background
    with _lock:
        current = _background
        wanted = settings.delta_path
        if current is not None and (wanted is None or current.path != wanted):
            current.stop(settings.flush_timeout)
            current = _background = None
        if wanted is not None and current is None:
            store = stores.Store(settings)  # resolves the experiment as the shipper does
            _background = BackgroundSync(
                wanted,
                settings.delta_interval,
                destination.tracking_uri(settings),
                lambda: store.experiment()[1],
                settings.feedback_retention,
            )
            _background.start()


def stop_background(timeout: float) -> None:
    global _background
    with _lock:
        if _background is not None:
            _background.stop(timeout)
            _background = None


def terminal_progress(stream: Any = sys.stderr) -> Callable[[SyncReport], None] | None:
    """A one-line progress display on a terminal; None (quiet) otherwise."""
    if not stream.isatty():
        return None
    started = time.monotonic()

    def show(report: SyncReport) -> None:
        rate = report.read / max(time.monotonic() - started, 1e-6)
        stream.write(
            f"\rtracewire: {report.read:,} traces read, {report.written:,} rows "
            f"written ({rate:,.0f}/s)  "
        )
        stream.flush()

    return show
