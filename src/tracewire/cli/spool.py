"""`tracewire spool status`: what is waiting on disk to reach the tracking store, and what was
dropped past the spool's size budget."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("spool", help="inspect the on-disk export spool")
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    status = actions.add_parser("status", help="pending and dropped traces per spool file")
    status.add_argument("--dir", type=Path, default=None,
                        help="spool directory (default: TRACEWIRE_SPOOL_DIR or the cache dir)")
    status.add_argument("--json", action="store_true", help="print JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    from tracewire import config
    from tracewire.export import spool

    directory = args.dir or config.resolve().spool_dir
    found = spool.status(directory)
    if args.json:
        print(json.dumps({"directory": str(directory), "spools": [
            {"path": str(s.path), "pending": s.pending, "bytes": s.bytes, "dropped": s.dropped,
             "oldest": s.oldest, "live": s.live} for s in found]}))
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
              f"{s.dropped} dropped over budget; {owner}")
    total_dropped = sum(s.dropped for s in found)
    print(f"total: {sum(s.pending for s in found)} pending, {total_dropped} dropped")
    return 0
