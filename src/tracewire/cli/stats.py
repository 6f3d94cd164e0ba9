"""`tracewire stats`: count, error rate, latency percentiles, time to first byte, tokens, cost
and feedback per route / session / user / model / environment over a window, from the tracking
store or from a Delta table written by `tracewire export delta`."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

from tracewire.report.aggregate import BY, PERCENTILE_METHOD


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "stats",
        help="latency, errors, tokens, cost and feedback per route/session/user/...",
        description="Summarise the traces of a window per group: traces, error rate (share "
        "of traces in state ERROR), latency p50/p95/p99 of the trace duration, time to first "
        "byte of web requests where the middleware recorded it, tokens, cost in USD, and "
        f"feedback (positive/count). Percentiles: {PERCENTILE_METHOD}. The first row, "
        "(all), is the whole window; with --by model a trace that called two models counts "
        "in both groups.",
    )
    parser.add_argument(
        "--since",
        default="24h",
        metavar="WHEN",
        help="start of the window: 24h (default), 7d, or an ISO date/time (UTC)",
    )
    parser.add_argument("--by", choices=BY, default="route", help="group by (default: route)")
    parser.add_argument(
        "--delta", metavar="PATH", help="read the Delta table at PATH instead of the tracking store"
    )
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME_OR_ID",
        help="experiment to read from the store (repeatable; default: "
        "MLFLOW_EXPERIMENT_ID/_NAME if set, else every active experiment)",
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")
    parser.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="also write a self-contained page with charts to FILE",
    )
    return parser


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def _iso(ms: int) -> str:
    return _utc(ms).isoformat(timespec="seconds")


def run(args: argparse.Namespace) -> int:
    from tracewire import config
    from tracewire.cli import CLIError
    from tracewire.cli.shared import reading_store, require_deltalake, since_ms
    from tracewire.core import scrub
    from tracewire.report import aggregate, render, sources

    try:
        since = since_ms(args.since)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    until = int(time.time() * 1000)
    if args.delta:
        require_deltalake("stats --delta")
        from deltalake.exceptions import TableNotFoundError

        try:
            rows = sources.from_delta(args.delta, since)
        except TableNotFoundError:
            raise CLIError(f"no Delta table at {args.delta}") from None
        source = f"Delta table {args.delta}"
    else:
        from tracewire.export import delta, destination

        settings = config.resolve()
        uri = destination.check_readable(settings)
        wanted = args.experiment or [
            e for e in (settings.experiment_id, settings.experiment_name) if e
        ]
        with reading_store(uri):
            try:
                experiment_ids = delta.experiments(uri, wanted)
            except LookupError as exc:
                raise CLIError(str(exc)) from None
            rows = sources.from_store(uri, experiment_ids, since) if experiment_ids else []
        source = f"tracking store {scrub.text(uri)}"

    groups = aggregate.aggregate(rows, args.by)
    window = {"since": _iso(since), "until": _iso(until), "source": source}
    if args.html:
        from tracewire.report import html

        durations = [
            float(r["execution_duration_ms"])
            for r in rows
            if r.get("execution_duration_ms") is not None
        ]
        buckets = aggregate.over_time(rows, _utc(since), _utc(until))
        path = args.html.resolve()
        try:
            path.write_text(html.page(groups, args.by, durations, buckets, window))
        except OSError as exc:
            raise CLIError(f"cannot write the HTML report to {path}: {exc.strerror}") from None
        # A status line, not data: stdout stays the table, JSON or CSV.
        print(f"tracewire: wrote the HTML report to {path}", file=sys.stderr)
    if args.json:
        print(render.as_json(groups, args.by, window))
    elif args.csv:
        sys.stdout.write(render.as_csv(groups))
    elif not groups:
        print(f"no traces since {window['since']} in the {source}")
    else:
        print(render.table(groups, args.by))
    return 0
