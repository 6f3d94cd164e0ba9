"""`tracewire export delta PATH`: sync the tracking store's traces into a Delta table
(export/delta.py). Incremental: run it again (or from cron) and it picks up where it left off."""

from __future__ import annotations

import argparse
import sys


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export", help="copy traces into an analytics table"
    )
    targets = parser.add_subparsers(dest="target", metavar="<target>", required=True)
    delta = targets.add_parser(
        "delta",
        help="sync traces into a Delta table (merged on trace_id, partitioned by day)",
        description="Sync traces from the tracking store (MLFLOW_TRACKING_URI) into the Delta "
        "table at PATH: one row per trace, merged on trace_id, partitioned by request_date. "
        "Each run continues from the progress recorded in the table, looking back "
        "TRACEWIRE_FEEDBACK_RETENTION seconds (default a day) for late traces and feedback.",
    )
    delta.add_argument("path", help="a folder, or an object-store URI deltalake supports")
    delta.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME_OR_ID",
        help="experiment to sync (repeatable; default: MLFLOW_EXPERIMENT_ID/"
        "_NAME if set, else every active experiment)",
    )
    delta.add_argument(
        "--since",
        metavar="WHEN",
        help="start here instead of at the recorded progress: 24h, 7d, or an ISO date/time (UTC)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from tracewire import config
    from tracewire.cli import CLIError
    from tracewire.cli.shared import reading_store, require_deltalake, since_ms
    from tracewire.core import scrub
    from tracewire.export import delta, destination

    require_deltalake("export delta")
    settings = config.resolve()
    try:
        since = since_ms(args.since) if args.since else None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    uri = destination.check_readable(settings)
    wanted = args.experiment or [e for e in (settings.experiment_id, settings.experiment_name) if e]
    with reading_store(uri):
        try:
            experiment_ids = delta.experiments(uri, wanted)
        except LookupError as exc:
            raise CLIError(str(exc)) from None
    if not experiment_ids:
        raise CLIError(f"no experiments in {scrub.text(uri)}")
    from deltalake.exceptions import CommitFailedError

    progress = delta.terminal_progress(sys.stderr)
    try:
        with reading_store(uri):
            report = delta.sync(
                args.path,
                tracking_uri=uri,
                experiment_ids=experiment_ids,
                lookback_s=settings.feedback_retention,
                since_ms=since,
                progress=progress,
            )
    except CommitFailedError:
        raise CLIError(
            f"other writers kept committing to {args.path}; what was synced is "
            "kept, run again to continue"
        ) from None
    if progress is not None:
        sys.stderr.write("\n")
    print(f"{report.read} trace(s) read, {report.written} row(s) written to {args.path}")
    return 0
