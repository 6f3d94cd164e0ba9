"""`tracewire spool status` reports pending and dropped traces, and whose spool it is."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.spool_cli import spool_command, spool_status
from tracewire.export.spool import Spool


def test_spool_status_counts_pending_and_dropped(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, budget_bytes=250, destination="sqlite:///x.db#")
    assert spool.put("tr-1", b"x" * 100)
    assert spool.put("tr-2", b"y" * 100)
    assert not spool.put("tr-3", b"z" * 100)  # over the 250-byte budget: dropped, counted

    (live,) = spool_status(tmp_path)["spools"]
    assert (live["pending"], live["dropped"], live["live"]) == (2, 1, True)

    spool.close()  # not empty: kept for the next process, now ownerless
    (left,) = spool_status(tmp_path)["spools"]
    assert (left["pending"], left["dropped"], left["live"]) == (2, 1, False)

    text = spool_command("status", tmp_path).stdout
    assert "2 pending" in text and "1 dropped (1 budget)" in text and "exited process" in text


def test_spool_status_says_which_store_each_spool_is_for(tmp_path: Path) -> None:
    one = Spool.create(
        tmp_path,
        1 << 20,
        json.dumps(
            {
                "tracking_uri": "http://alice:pw-9@mlflow.internal:5000",
                "experiment_id": None,
                "experiment_name": "checkout",
            },
            sort_keys=True,
        ),
    )
    one.put("tr-1", b"p")
    one.close()
    two = Spool.create(
        tmp_path,
        1 << 20,
        json.dumps(
            {
                "tracking_uri": "sqlite:////srv/app/mlflow.db",
                "experiment_id": None,
                "experiment_name": None,
            },
            sort_keys=True,
        ),
    )
    two.put("tr-2", b"p")
    text = spool_command("status", tmp_path).stdout
    assert "for http://alice:***@mlflow.internal:5000, experiment 'checkout'" in text
    assert "for sqlite:////srv/app/mlflow.db\n" in text
    assert "pw-9" not in text and "pw-9" not in json.dumps(spool_status(tmp_path))
    two.close()
