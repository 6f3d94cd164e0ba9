"""The spool holds the app's prompts (they stay in its ``-wal`` after shipping): it is private
to its user whatever the umask, a directory of another user is refused, and a link named like
a spool file is never followed, by the app, the shipper's adoption, `spool status` or `replay`.

The suite runs as root (here and in CI): "another user's" directory is made with os.chown."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from tests.support.processes import run_command
from tests.support.spool_cli import spool_command
from tracewire.export import spool_directory as spools
from tracewire.export.spool import Spool
from tracewire.export.spool_format import SpoolError

PROMPT = b"spool-prompt-marmalade-7731"
DESTINATION = json.dumps(
    {"tracking_uri": "sqlite:///unused.db", "experiment_id": None, "experiment_name": None},
    sort_keys=True,
)
OTHER_UID = 54321
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files needs root")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_spool_directory_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    old = os.umask(0)  # the loosest umask: only what tracewire asks for
    try:
        app = Spool.create(directory, 1 << 20, DESTINATION)
        assert app.put("tr-1", b'{"messages": "' + PROMPT + b'"}')
        shipper = Spool(app.path, None, 1 << 20)  # the shipper process's connection
        assert shipper.take(10)
    finally:
        os.umask(old)
    try:
        files = sorted(p.name for p in directory.iterdir())
        stem = app.path.stem
        assert files == [f"{stem}.db", f"{stem}.db-shm", f"{stem}.db-wal", f"{stem}.lock"]
        assert PROMPT in Path(f"{app.path}-wal").read_bytes()  # where prompts rest
        assert _mode(directory) == 0o700
        assert {name: _mode(directory / name) for name in files} == dict.fromkeys(files, 0o600)
    finally:
        shipper.close()
        app.close(remove_if_empty=False)


def test_a_spool_directory_of_ours_open_to_others_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # what earlier versions made under the usual umask
    with caplog.at_level(logging.WARNING, logger="tracewire"):
        Spool.create(directory, 1 << 20, DESTINATION).close()
    assert _mode(directory) == 0o700
    assert "was open to other users (mode 755); made it 0700" in caplog.text


@as_root
def test_a_spool_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir()
    os.chmod(directory, 0o777)
    os.chown(directory, OTHER_UID, OTHER_UID)
    with pytest.raises(SpoolError, match=f"{directory} belongs to another user .uid {OTHER_UID}"):
        Spool.create(directory, 1 << 20, DESTINATION)
    assert list(directory.iterdir()) == []
    # ...and a link to it, made by that user
    link = tmp_path / "link"
    link.symlink_to(directory)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(SpoolError, match="symbolic link of another user"):
        Spool.create(link, 1 << 20, DESTINATION)


@as_root
def test_the_temp_dir_fallback_refuses_a_directory_another_user_made_first(tmp_path: Path) -> None:
    """Home not writable (a read-only container): the spool goes to the temp dir, where another
    user can make the directory first, with a mode that lets them read what is put in it."""
    planted = tmp_path / f"tracewire-{os.geteuid()}"
    planted.mkdir()
    os.chmod(planted, 0o777)
    os.chown(planted, OTHER_UID, OTHER_UID)
    env = {k: v for k, v in os.environ.items() if k != "TRACEWIRE_SPOOL_DIR"}
    env.update(XDG_CACHE_HOME="/proc/tracewire-no-such-dir/cache", TMPDIR=str(tmp_path))
    result = run_command([sys.executable, "-c", "import tracewire; tracewire.autolog()"], env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tracewire.config.ConfigError: TRACEWIRE_SPOOL_DIR"), result.stderr
    assert f"{planted} belongs to another user (uid {OTHER_UID}" in last
    assert list(planted.rglob("*")) == []  # nothing of ours went in


def _left_spool(directory: Path) -> Path:
    """A spool left by an exited process, with one trace to ship."""
    spool = Spool.create(directory, 1 << 20, DESTINATION)
    assert spool.put("tr-left", b"{}")
    spool.close()
    return spool.path


def _victim(path: Path) -> str:
    """An sqlite file elsewhere, that looks enough like a spool to be rewritten by one who
    opens it as a spool."""
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('format_version', '1'), ('destination', '');"
        "CREATE TABLE precious (x); INSERT INTO precious VALUES ('keep me');"
    )
    db.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_links_named_like_spool_files_are_never_followed(tmp_path: Path) -> None:
    outside, directory = tmp_path / "outside", tmp_path / "spool"
    outside.mkdir()
    victim = outside / "precious.db"
    victim_hash = _victim(victim)
    notes = outside / "notes.txt"
    notes.write_bytes(b"not a wal")
    planted = outside / "planted-by-the-shipper"
    directory.mkdir(mode=0o700)

    # 1: the database a symbolic link to another sqlite file, beside a lock of its own
    (directory / "spool-1-aaaaaaaa.db").symlink_to(victim)
    os.close(os.open(directory / "spool-1-aaaaaaaa.lock", os.O_CREAT | os.O_WRONLY, 0o600))
    # 2: a left spool whose lock is a link to a path that does not exist (yet)
    second = _left_spool(directory)
    second.with_suffix(".lock").unlink()
    second.with_suffix(".lock").symlink_to(planted)
    # 3: a left spool whose -wal is a link to a file elsewhere
    third = _left_spool(directory)
    Path(f"{third}-wal").symlink_to(notes)
    # 4: a hard link to the other sqlite file
    os.link(victim, directory / "spool-4-dddddddd.db")
    os.close(os.open(directory / "spool-4-dddddddd.lock", os.O_CREAT | os.O_WRONLY, 0o600))
    # and one left spool with nothing wrong: adopted as ever
    good = _left_spool(directory)

    from tracewire.export.shipper import Shipper, store_for

    taken = Shipper(directory, 1 << 20, store_for).adopt_all()  # the real shipper's adoption
    adopted = [(s.path, s.pending()) for s in taken]
    for s in taken:
        s.close(remove_if_empty=False)
    spools.replay(directory)

    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim_hash
    assert notes.read_bytes() == b"not a wal"
    assert not os.path.lexists(planted)
    assert adopted == [(good, 1)]

    result = spool_command("status", directory, "--json")
    problems = {Path(s["path"]).name: s["problem"] for s in json.loads(result.stdout)["spools"]}
    assert problems == {
        "spool-1-aaaaaaaa.db": "spool-1-aaaaaaaa.db is a symbolic link: tracewire never opens "
        "it; remove it",
        second.name: f"{second.stem}.lock is a symbolic link: tracewire never opens it; remove it",
        third.name: f"{third.name}-wal is a symbolic link: tracewire never opens it; remove it",
        "spool-4-dddddddd.db": "spool-4-dddddddd.db has another name too (a hard link): "
        "tracewire never opens it; remove it",
        good.name: None,
    }
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == victim_hash
    assert not os.path.lexists(planted)
