"""`tracewire spool status`: what is waiting on disk to reach the tracking store, what the
store refused, what was dropped (and why) and which files cannot be shipped. `tracewire spool
ship`: ship what processes that have exited left behind, now, with progress. `tracewire spool
replay`: send the refused traces again, once their cause is fixed."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "spool", help="inspect the on-disk export spool"
    )
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    status = actions.add_parser("status", help="pending and dropped traces per spool file")
    status.add_argument("--json", action="store_true", help="print JSON")
    ship = actions.add_parser("ship", help="ship the traces exited processes left, now")
    replay = actions.add_parser("replay", help="queue the traces the store refused again")
    for action in (status, ship, replay):
        action.add_argument(
            "--dir",
            type=Path,
            default=None,
            help="spool directory (default: TRACEWIRE_SPOOL_DIR or the cache dir)",
        )
    return parser


def run(args: argparse.Namespace) -> int:
    from tracewire import config
    from tracewire.export import destination
    from tracewire.export import spool_directory as spool

    directory = args.dir or config.resolve().spool_dir
    if args.action == "ship":
        return _ship(directory)
    if args.action == "replay":
        moved = spool.replay(directory)
        print(
            f"{moved} refused trace(s) queued again in {directory}; a running app ships them "
            "now, a stopped one on its next start"
        )
        return 0
    found = spool.status(directory)
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(directory),
                    "spools": [
                        {
                            "path": str(s.path),
                            "pending": s.pending,
                            "bytes": s.bytes,
                            "dropped": s.dropped,
                            "drops": s.drops,
                            "rejected": s.rejected,
                            "incomplete": s.incomplete,
                            "oldest": s.oldest,
                            "live": s.live,
                            "feedback_pending": s.feedback_pending,
                            "feedback_bytes": s.feedback_bytes,
                            "feedback_drops": s.feedback_drops,
                            "destination": s.destination,
                            "problem": s.problem,
                        }
                        for s in found
                    ],
                }
            )
        )
        return 0
    print(f"spool directory: {directory}")
    if not found:
        print("no spool files: nothing is waiting to be shipped")
        return 0
    now = time.time()
    for s in found:
        if s.problem is not None:
            print(f"  {s.path.name}: cannot be shipped: {s.problem}")
            continue
        age = f", oldest {now - s.oldest:.0f} s ago" if s.oldest else ""
        owner = (
            "live process"
            if s.live
            else "left by an exited process: the next one ships it, or `tracewire spool ship`"
        )
        drops = ", ".join(f"{n} {reason}" for reason, n in sorted(s.drops.items()) if n)
        incomplete = (
            f", {s.incomplete} stored incomplete (open past TRACEWIRE_TRACE_TIMEOUT)"
            if s.incomplete
            else ""
        )
        print(
            f"  {s.path.name}: {s.pending} pending ({s.bytes / 1024:.1f} KiB{age}), "
            f"{s.rejected} refused by the store, {s.dropped} dropped"
            f"{f' ({drops})' if drops else ''}{incomplete}; {owner}"
        )
        print(f"    for {destination.describe(s.destination)}")
        if s.feedback_pending or s.feedback_dropped:
            print(
                "    "
                + spool.describe_feedback(s.feedback_pending, s.feedback_bytes, s.feedback_drops)
            )
    rejected = sum(s.rejected for s in found)
    print(
        f"total: {sum(s.pending for s in found)} pending, {rejected} refused, "
        f"{sum(s.dropped for s in found)} dropped"
    )
    feedback_pending = sum(s.feedback_pending for s in found)
    feedback_drops = sum((Counter(s.feedback_drops) for s in found), Counter())
    if feedback_pending or feedback_drops:
        print(
            "total: "
            + spool.describe_feedback(
                feedback_pending, sum(s.feedback_bytes for s in found), feedback_drops
            )
        )
    if rejected:
        print(
            "the store refused some traces (the app's log says why); once fixed, "
            "`tracewire spool replay` sends them again"
        )
    return 0


def _ship(directory: Path) -> int:
    """Ship every spool exited processes left, in the foreground, one destination after the
    other, printing progress; exit code 1 if a store stays unavailable (its traces stay
    spooled; the other destinations are shipped all the same)."""
    import logging

    from tracewire.cli import CLIError
    from tracewire.core import scrub
    from tracewire.export import destination, store_http
    from tracewire.export import spool_directory as spool

    # The shipper's retry warnings are for a log; here the outcome is said once, below.
    logging.getLogger("tracewire").setLevel(logging.ERROR)
    os.environ.update(destination.catalog_env())  # as in the shipper process
    store_http.install_http_budget()
    left: dict[str, bool] = {}  # destinations of what exited processes left, in file order
    for s in spool.status(directory):  # before we take the locks of the others
        if s.live and s.problem is None and s.pending:
            print(
                f"{s.path.name}: {s.pending} pending, owned by a running process that ships "
                "them itself"
            )
        elif not s.live and s.problem is None:
            left[scrub.text(s.destination)] = True
    shipped: list[int] = []  # per destination that had something to ship
    failures = []
    for where in left:
        try:
            if (stored := _ship_to(directory, where)) is not None:
                shipped.append(stored)
        except CLIError as failure:
            failures.append(str(failure))
    if failures:
        raise CLIError("; ".join(failures))
    print(f"done: {sum(shipped)} trace(s) stored" if shipped else f"nothing to ship in {directory}")
    return 0


def _ship_to(directory: Path, where: str) -> int | None:
    """Ship the spools exited processes left for one destination; how many traces were
    stored (None: nothing was waiting). CLIError if its store stays unavailable."""
    from tracewire import config
    from tracewire.cli import CLIError
    from tracewire.export import destination, shipper

    worker = shipper.Shipper(directory, config.resolve().spool_max_bytes, shipper.store_for)
    taken = worker.adopt_all(where)
    try:
        total = sum(source.pending() for source in taken)
        waiting = sum(source.pending("feedback") for source in taken)
        if not total and not waiting and not sum(source.pending("stamps") for source in taken):
            return None
        print(
            f"shipping {total} trace(s) from {len(taken)} spool file(s) in {directory} "
            f"to {destination.describe(where)}"
        )
        tries = 0
        while True:
            if worker.ship_one_batch():
                print(f"  {worker.shipped}/{total} shipped", flush=True)
                tries = 0
                continue
            if not worker.failing:
                break
            tries += 1
            if tries == 3:
                error = worker.last_error
                raise CLIError(
                    f"the tracking store {destination.describe(where)} is unavailable "
                    f"({type(error).__name__}: {error}); {total - worker.shipped} trace(s) "
                    f"stay spooled in {directory}"
                )
            time.sleep(2.0 * tries)
        while worker.stamp_one_batch():  # what a tracking server takes after the spans
            pass
        if unstamped := worker.stamps_pending():
            error = worker.last_error
            raise CLIError(
                f"{worker.shipped} trace(s) stored in {destination.describe(where)}, but the "
                f"records of {unstamped} (client request id, metadata) could not be written "
                f"({type(error).__name__}: {error}); they stay spooled in "
                f"{directory}: run this again"
            )
        if waiting:  # what waited for these traces can land now; the rest keeps waiting
            applied = worker.apply_feedback()
            print(f"  {applied}/{waiting} feedback applied", flush=True)
        return worker.shipped
    finally:
        worker.stop(0)
