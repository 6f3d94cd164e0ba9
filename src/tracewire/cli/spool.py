"""`tracewire spool status`: what is waiting on disk to reach the tracking store, what the
store refused and what was dropped past the spool's size budget. `tracewire spool replay`:
send the refused traces again, once their cause is fixed."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("spool", help="inspect the on-disk export spool")
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    status = actions.add_parser("status", help="pending and dropped traces per spool file")
    status.add_argument("--json", action="store_true", help="print JSON")
    replay = actions.add_parser("replay", help="queue the traces the store refused again")
    for action in (status, replay):
        action.add_argument("--dir", type=Path, default=None,
                            help="spool directory (default: TRACEWIRE_SPOOL_DIR or the cache dir)")
    return parser


def run(args: argparse.Namespace) -> int:
    from tracewire import config
    from tracewire.export import spool

    directory = args.dir or config.resolve().spool_dir
    if args.action == "replay":
        moved = spool.replay(directory)
        print(f"{moved} refused trace(s) queued again in {directory}; a running app ships them "
              "now, a stopped one on its next start")
        return 0
    found = spool.status(directory)
    if args.json:
        print(json.dumps({"directory": str(directory), "spools": [
            {"path": str(s.path), "pending": s.pending, "bytes": s.bytes, "dropped": s.dropped,
             "rejected": s.rejected, "oldest": s.oldest, "live": s.live} for s in found]}))
        return 0
    print(f"spool directory: {directory}")
    if not found:
        print("no spool files: nothing is waiting to be shipped")
        return 0
    now = time.time()
    for s in found:
        age = f", oldest {now - s.oldest:.0f} s ago" if s.oldest else ""
        owner = "live process" if s.live else "left by a dead process, shipped by the next one"
        print(f"  {s.path.name}: {s.pending} pending ({s.bytes / 1024:.1f} KiB{age}), "
              f"{s.rejected} refused by the store, {s.dropped} dropped over budget; {owner}")
    rejected = sum(s.rejected for s in found)
    print(f"total: {sum(s.pending for s in found)} pending, {rejected} refused, "
          f"{sum(s.dropped for s in found)} dropped")
    if rejected:
        print("the store refused some traces (the app's log says why); once fixed, "
              "`tracewire spool replay` sends them again")
    return 0
