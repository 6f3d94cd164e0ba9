"""A real ``mlflow server`` on loopback, for tests of the remote (REST) tracking path.

    with MlflowServer(tmp_path) as server:
        client = mlflow.MlflowClient(tracking_uri=server.url)
        ...
        server.stop()    # simulate an outage: nothing listens on the port any more
        server.start()   # back on the same port, same sqlite store and artifacts

The server runs as ``<python> -m mlflow server`` (the current interpreter by default, which must
have the full ``mlflow``) with one uvicorn worker, a sqlite backend store and a proxied artifact
store inside ``root``, and MLflow's background job runner turned off. Its stdout and stderr go to
``root / "mlflow-server.log"``; a server that does not come up fails with that log.

No process is left behind: the server gets its own process group and ``stop()`` terminates then
kills the whole group (the ``mlflow`` CLI spawns uvicorn as a child); ``__exit__``, the
``mlflow_server`` fixture and an ``atexit`` hook all call ``stop()``; and on Linux the CLI is
asked to receive SIGTERM (which it forwards to uvicorn) if the process that started it dies.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

__all__ = ["MlflowServer", "ServerStartError", "free_port", "mlflow_server"]

_LIVE: weakref.WeakSet[MlflowServer] = weakref.WeakSet()


class ServerStartError(RuntimeError):
    """The server did not answer in time (the message carries its log)."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _load_prctl():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:
        return None


_prctl = _load_prctl()  # resolved here: the forked child must not dlopen (other threads' locks)


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the *thread* that started it exits (Linux).

    The ``mlflow`` CLI forwards SIGTERM to uvicorn, so a killed test run leaves nothing behind.
    Start servers from a thread that outlives them (the main thread, as pytest fixtures do).
    """
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite store under ``root``; restartable."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        port: int | None = None,
        python: str = sys.executable,
        startup_timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        hosts: tuple[str, ...] = (),
    ) -> None:
        self.root = Path(root).resolve()
        self.hosts = hosts  # names besides loopback's that clients may reach it by
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "mlflow.db"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "mlflow-server.log"
        self.python = python
        self.startup_timeout = startup_timeout
        self._extra_env = dict(env or {})
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started = False

    # ------------------------------------------------------------------ public surface

    @property
    def url(self) -> str:
        """The tracking URI (``http://127.0.0.1:<port>``); the same across restarts."""
        return f"http://127.0.0.1:{self.port}"

    tracking_uri = url

    @property
    def backend_store_uri(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        """Start the server (no-op if running) and wait until its REST API answers."""
        if self.running:
            return self
        # A port picked by free_port() can be taken by someone else before the server binds it;
        # only then (first start, port not chosen by the caller) try another one.
        attempts = 1 if self._fixed_port or self._started else 3
        for attempt in range(attempts):
            try:
                self._spawn()
                self._wait_ready()
                self._started = True  # from now on the port is the server's identity
                return self
            except ServerStartError as error:
                self.stop()
                if attempt + 1 < attempts and "address already in use" in str(error).lower():
                    self.port = free_port()
                    continue
                raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server's process group, kill it if needed, and wait. Idempotent."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # uvicorn may outlive the CLI (or the CLI may ignore SIGTERM while busy): kill the group.
        self._signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._wait_port_free(timeout)

    def restart(self) -> MlflowServer:
        self.stop()
        return self.start()

    def log(self) -> str:
        """Everything the server wrote to stdout/stderr so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MlflowServer {self.url} {state} root={self.root}>"

    # ------------------------------------------------------------------ internals

    def _command(self) -> list[str]:
        return [
            self.python,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            str(self.artifacts),
            # The security middleware's defaults already allow loopback; be explicit so a
            # changed default cannot turn every request into a 403.
            "--allowed-hosts",
            ",".join(f"{host},{host}:*" for host in ("127.0.0.1", "localhost", *self.hosts)),
        ]

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACEWIRE_"))}
        env.update(
            {
                # No huey job runner processes: a test server needs only the REST API.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                # The server prices spans as it stores them, fetching MLflow's model catalog from
                # GitHub first: without network its first span write takes 7 s or more (past the
                # shippers' timeouts in some tests). Its bundled catalog prices the same models.
                "MLFLOW_MODEL_CATALOG_URI": "",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._extra_env)
        return env

    def _spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"==== {' '.join(self._command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.root,  # anything MLflow writes relative to the cwd stays in root
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if _prctl is not None else None,
            )
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error = "no answer yet"
        # /health is exempt from host validation, so also make one real REST call.
        probes = (
            "/health",
            "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
        )
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ServerStartError(
                    f"mlflow server exited with code {code} before answering on {self.url}\n"
                    f"---- log ({self.log_path}) ----\n{self._recent_log()}"
                )
            try:
                for path in probes:
                    with urllib.request.urlopen(self.url + path, timeout=5) as response:
                        if response.status != 200:
                            raise OSError(f"{path} answered {response.status}")
                return
            except (OSError, urllib.error.URLError) as error:
                last_error = f"{type(error).__name__}: {error}"
            time.sleep(0.2)
        raise ServerStartError(
            f"mlflow server did not answer on {self.url} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error})\n---- log ({self.log_path}) ----\n{self._recent_log()}"
        )

    def _recent_log(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")[-20_000:]
        except FileNotFoundError:
            return ""

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: the group id is the CLI's pid
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_port_free(self, timeout: float) -> None:
        """Return once nothing accepts connections on the port (so a restart can bind it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop(timeout=5)


@pytest.fixture
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A fresh, running server per test, stopped afterwards even if the test stopped it or failed.

    Use it by importing it into a test module (``from tests.support.mlflow_server import
    mlflow_server``). For a wider scope, wrap ``MlflowServer`` in your own fixture.
    """
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server
