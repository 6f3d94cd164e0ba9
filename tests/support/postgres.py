"""A throwaway PostgreSQL cluster on loopback, for tests of the scale-out configuration.

    with PostgresCluster() as pg:
        uri = pg.create_database("mlflow")   # postgresql://tracewire@127.0.0.1:<port>/mlflow

The cluster lives in a fresh directory under the system temp dir: ``initdb`` makes it, the
``postgres`` server runs as a child of the test process on a free 127.0.0.1 port (its socket
in that directory too, so no system-wide PostgreSQL is touched), and ``stop()`` shuts it down
and removes the directory. The binaries are the Debian layout's, /usr/lib/postgresql/<v>/bin
(the newest version wins), else whatever ``initdb`` is on ``PATH``; without them
``find_binaries`` fails the test with the command that installs them, never skips it (a
skipped test would hide the missing configuration in CI).

PostgreSQL refuses to run as root: as root the cluster runs as the ``postgres`` system user
(the Debian package creates it), and its directory is handed to that user.

``PostgresMlflowServer`` is the test ``mlflow server`` (tests/support/mlflow_server.py) with
one of the cluster's databases as its backend store.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import pytest

from tests.support.mlflow_server import MlflowServer, _die_with_parent, _prctl, free_port

__all__ = ["PostgresCluster", "PostgresMlflowServer", "find_binaries"]

_LIVE: weakref.WeakSet[PostgresCluster] = weakref.WeakSet()

INSTALL_HINT = (
    "run `bash .ci/run` (it installs PostgreSQL as root when missing) or install "
    "it yourself: `apt-get install -y postgresql`"
)


def find_binaries() -> Path:
    """The directory holding ``initdb`` and ``postgres``; fails the test when there is none."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: _version(Path(p).parent.parent.name),
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(on_path)
    for initdb in candidates:
        bindir = Path(initdb).parent
        if (bindir / "postgres").exists():
            return bindir
    pytest.fail(
        "PostgreSQL server binaries (initdb, postgres) were not found under "
        f"/usr/lib/postgresql/*/bin or on PATH: {INSTALL_HINT}",
        pytrace=False,
    )


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


class PostgresCluster:
    """A PostgreSQL cluster of its own (trust auth, superuser ``tracewire``, no fsync)."""

    user = "tracewire"

    def __init__(self, startup_timeout: float = 60.0) -> None:
        self.bindir = find_binaries()
        self.startup_timeout = startup_timeout
        # The system temp dir, not pytest's tmp_path: pytest's base directory is private to the
        # user running the tests (mode 0700), and the server may run as another user.
        self.root = Path(tempfile.mkdtemp(prefix="tracewire-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = 0
        self._run_as = _server_user()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def uri(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def start(self) -> PostgresCluster:
        if self._run_as is not None:
            os.chown(self.root, self._run_as.pw_uid, self._run_as.pw_gid)
        # -N: no fsync of the new files; a throwaway cluster does not need to survive a crash.
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "-N",
            ]
        )
        attempts = 3  # the free port can be taken by someone else before the server binds it
        for attempt in range(attempts):
            self.port = free_port()
            try:
                self._spawn()
                self._wait_ready()
                _LIVE.add(self)
                return self
            except RuntimeError as error:
                self._terminate()
                if attempt + 1 < attempts and "already in use" in str(error):
                    continue
                raise
        raise AssertionError("unreachable")

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URI. ``postgresql://`` with no driver named is
        psycopg (3) for SQLAlchemy 2.1, which MLflow's store uses."""
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction.
        with psycopg.connect(self.uri("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then the directory goes.
        Idempotent."""
        _LIVE.discard(self)
        self._terminate()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _as_user(self) -> dict[str, object]:
        if self._run_as is None:
            return {}
        # Popen switches user in the child itself (no su/runuser in between), so the server
        # stays our direct child: its parent-death signal and our signals reach it.
        return {
            "user": self._run_as.pw_uid,
            "group": self._run_as.pw_gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": self._run_as.pw_dir, "USER": self._run_as.pw_name},
        }

    def _run(self, command: list[str]) -> None:
        done = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=120, **self._as_user()
        )  # type: ignore[call-overload]
        if done.returncode != 0:
            pytest.fail(
                f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}",
                pytrace=False,
            )

    def _spawn(self) -> None:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.root),  # not /var/run/postgresql
            # Durability is not under test here, and these make every commit cheap.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
        }
        command = [str(self.bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(  # type: ignore[call-overload]
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if _prctl is not None else None,
                **self._as_user(),
            )

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited before accepting connections:\n{self.log()}")
            try:
                psycopg.connect(self.uri("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as error:
                last_error = str(error).strip()
            time.sleep(0.1)
        raise RuntimeError(
            f"postgres did not accept connections on port {self.port} within "
            f"{self.startup_timeout:.0f} s ({last_error}):\n{self.log()}"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its backends are in its process group
            proc.wait(10)


class PostgresMlflowServer(MlflowServer):
    """``mlflow server`` with a PostgreSQL backend store, on a port fixed up front: its URL is
    known before it starts, so an app can be started against it meanwhile."""

    def __init__(self, root: str | os.PathLike[str], backend_store_uri: str) -> None:
        super().__init__(root, port=free_port())
        self._backend_store_uri = backend_store_uri

    @property
    def backend_store_uri(self) -> str:  # type: ignore[override]
        return self._backend_store_uri


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the cluster: ourselves, unless we are root (then the ``postgres`` user)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail(
            "running as root, PostgreSQL needs an unprivileged user to run as, and "
            f"there is no `postgres` user: {INSTALL_HINT}",
            pytrace=False,
        )


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()
