"""export/spool.py: the on-disk write-ahead queue between the app and the shipper."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tracewire.export import spool_directory as spools
from tracewire.export.spool import Spool
from tracewire.export.spool_files import UNREADABLE_SUFFIX
from tracewire.export.spool_format import FORMAT_VERSION, SpoolError

DEST = "sqlite:///x.db#0"


def test_put_take_ack_in_order_and_an_emptied_spool_goes_away(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, 1 << 20, DEST)
    for i in range(5):
        assert spool.put(f"tr-{i}", b"payload %d" % i)
    entries = spool.take(3)
    assert [e.trace_id for e in entries] == ["tr-0", "tr-1", "tr-2"]
    spool.ack(entries)
    assert [e.trace_id for e in spool.take(10)] == ["tr-3", "tr-4"]
    spool.ack(spool.take(10))
    assert spool.outstanding() == 0
    spool.close()
    assert list(tmp_path.iterdir()) == []


def test_past_the_budget_traces_are_dropped_counted_and_the_file_kept(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, 1000, DEST)
    assert spool.put("tr-1", b"x" * 600)
    assert not spool.put("tr-2", b"x" * 600)
    spool.count_drops("queue", 2)
    assert spool.drops == {"budget": 1, "queue": 2}
    (status,) = spools.status(tmp_path)
    assert (status.pending, status.dropped, status.live) == (1, 3, True)
    spool.ack(spool.take(1))
    spool.close()
    (status,) = spools.status(tmp_path)  # empty, but it still says what was dropped
    assert (status.pending, status.drops, status.live) == (0, {"budget": 1, "queue": 2}, False)


def test_an_exited_processs_spool_is_adopted_by_the_same_destination_only(tmp_path: Path) -> None:
    left = Spool.create(tmp_path, 1 << 20, DEST)
    left.put("tr-left", b"p")
    left.close()
    assert list(spools.adopt(tmp_path, 1 << 20, "sqlite:///other.db#0")) == []
    adopted = list(spools.adopt(tmp_path, 1 << 20, DEST))
    assert [[e.trace_id for e in s.take(10)] for s in adopted] == [["tr-left"]]
    for spool in adopted:
        spool.close(remove_if_empty=False)


def test_a_live_spool_is_never_adopted(tmp_path: Path) -> None:
    live = Spool.create(tmp_path, 1 << 20, DEST)
    live.put("tr-live", b"p")
    assert list(spools.adopt(tmp_path, 1 << 20, DEST)) == []
    live.close()


def test_a_newer_format_is_left_alone_and_garbage_is_set_aside(tmp_path: Path) -> None:
    newer = Spool.create(tmp_path, 1 << 20, DEST)
    newer.put("tr-1", b"p")
    newer.close()
    (path,) = tmp_path.glob("spool-*.db")
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(SpoolError, match="upgrade tracewire"):
        Spool(path, None, 1 << 20)
    assert list(spools.adopt(tmp_path, 1 << 20, DEST)) == []
    assert path.exists()

    garbage = tmp_path / "spool-1-deadbeef.db"
    garbage.write_bytes(b"not a database at all" * 100)
    (tmp_path / "spool-1-deadbeef.lock").write_bytes(b"")
    assert list(spools.adopt(tmp_path, 1 << 20, DEST)) == []
    assert not garbage.exists()
    problems = {s.path.name: s.problem for s in spools.status(tmp_path) if s.problem}
    assert "set aside" in problems["spool-1-deadbeef.db" + UNREADABLE_SUFFIX]


def test_refused_traces_are_kept_and_replayed_once_fixed(tmp_path: Path) -> None:
    spool = Spool.create(tmp_path, 1 << 20, DEST)
    spool.put("tr-bad", b"p")
    spool.reject(spool.take(1)[0], "400: invalid")
    assert spool.pending() == 0
    (status,) = spools.status(tmp_path)
    assert status.rejected == 1
    assert spools.replay(tmp_path) == 1
    assert [e.trace_id for e in spool.take(10)] == ["tr-bad"]
    spool.close(remove_if_empty=False)


def test_a_spool_recorded_with_credentials_by_an_older_tracewire_is_adopted(tmp_path: Path) -> None:
    """Destinations are recorded without credentials now; an older spool still ships."""
    raw = (
        '{"experiment_id": null, "experiment_name": null, '
        '"tracking_uri": "http://alice:pw-1@mlflow.internal:5000/?token=t-2"}'
    )
    old = Spool.create(tmp_path, 1 << 20, raw)
    old.put("tr-old", b"p")
    old.close()
    masked = raw.replace("alice:pw-1@", "alice:***@").replace("token=t-2", "token=***")
    adopted = list(spools.adopt(tmp_path, 1 << 20, masked))
    assert [[e.trace_id for e in s.take(10)] for s in adopted] == [["tr-old"]]
    for spool in adopted:
        spool.close(remove_if_empty=False)
