"""``tracewire demo``: the example agent app under uvicorn, a few sessions of traffic, then the
``tracewire stats`` table of what was traced.

The app is examples/fastapi_agent (shipped as :mod:`tracewire.cli.demo_app`): a FastAPI app with
a LangGraph agent (a retriever, a ChatOpenAI model, a weather tool). It runs on uvicorn in a
thread of this process. Without ``--real`` its model is the bundled local OpenAI-compatible
server (:class:`tracewire.testing.OpenAIServer`), so no API key and no network are needed; with
``--real`` it is the OpenAI API (``OPENAI_API_KEY``). The demo drives a few multi-turn sessions
over HTTP (one streamed reply, one failing tool call, feedback through the app's ``/feedback``
route), waits until the traces are in the store (``./mlflow.db`` by default), syncs them into a
Delta table (``./tracewire-delta``) and prints the stats of exactly this run's traces, read back
from that table, with the ``mlflow ui`` command that shows them.

This module sets the run up (settings, the model server, the app on uvicorn) and runs it; the
traffic is :mod:`~tracewire.cli.demo_traffic`, reading the results back
:mod:`~tracewire.cli.demo_results`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from tracewire.cli import CLIError
from tracewire.cli.demo_results import RUN_TAG, cause, sync_and_read, write_summary
from tracewire.cli.demo_traffic import SCRIPT, STEPS, Progress, RequestFailed, drive
from tracewire.cli.shared import reading_store
from tracewire.core import scrub
from tracewire.export import destination

DEFAULT_EXPERIMENT = "tracewire-demo"
DEFAULT_STORE_FILE = "mlflow.db"
DEFAULT_DELTA_DIR = "tracewire-delta"
APP_MODULE = "tracewire.cli.demo_app"


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run the example agent app on a few sessions of traffic and show the stats",
        description=(
            "Run the example FastAPI + LangGraph agent app (examples/fastapi_agent) under "
            "uvicorn against the bundled local OpenAI-compatible server (or the OpenAI API with "
            "--real), drive a few sessions of traffic through it (multi-turn chats, a streamed "
            "reply, a failing tool call, feedback), then sync the traces into a Delta table "
            "and print the `tracewire stats` table of this run and the `mlflow ui` command "
            "that shows the traces."
        ),
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="use the OpenAI API (gpt-4o-mini; needs OPENAI_API_KEY) instead of the local server",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
        "the current directory)",
    )
    parser.add_argument(
        "--delta",
        metavar="PATH",
        default=DEFAULT_DELTA_DIR,
        help=f"the Delta table the traces are synced into (default: ./{DEFAULT_DELTA_DIR})",
    )
    return parser


# --------------------------------------------------------------------------- setup


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``: the printed `mlflow ui` command must
    open the same file from any directory."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path, sep, query = uri[len(prefix) :].partition("?")
    if not path or path.startswith(":memory:") or Path(path).is_absolute():
        return uri
    return prefix + str(Path.cwd() / path) + sep + query


def resolve_tracking_uri(arg: str | None, environ: Mapping[str, str]) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``; sqlite made absolute."""
    uri = (arg or "").strip() or environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return "sqlite:///" + str(Path.cwd() / DEFAULT_STORE_FILE)
    return _absolute_sqlite(uri)


@contextlib.contextmanager
def _environ(updates: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the demo, restored afterwards (main() may run in-process)."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _demo_environ(uri: str, run_id: str) -> dict[str, str]:
    """The settings the app's own ``tracewire.autolog()`` reads: the store, the experiment, and
    the run's tag on every trace (how the demo finds exactly this run's traces)."""
    env = {"MLFLOW_TRACKING_URI": uri}
    if (
        not os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip()
        and not os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    ):
        env["MLFLOW_EXPERIMENT_NAME"] = DEFAULT_EXPERIMENT
    tags = os.environ.get("TRACEWIRE_TAGS", "").strip()
    env["TRACEWIRE_TAGS"] = f"{tags},{RUN_TAG}={run_id}" if tags else f"{RUN_TAG}={run_id}"
    env.update(destination.catalog_env())
    return env


@contextlib.contextmanager
def _quiet_store_setup() -> Iterator[None]:
    """MLflow logs "Creating initial MLflow database tables..." at INFO when it creates ./mlflow.db;
    the demo says where the store is itself."""
    import logging

    store_logger = logging.getLogger("mlflow.store.db.utils")
    level = store_logger.level
    store_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        store_logger.setLevel(level)


def _load_app() -> ModuleType:
    """Import the app (its ``tracewire.autolog()`` runs with the demo's settings); imported
    afresh when main() runs again in one process, so it reads the new settings. What the demo
    itself needs is imported first: a missing package fails before any traffic."""
    try:
        for name in ("uvicorn", "httpx", "deltalake"):
            importlib.import_module(name)
        if APP_MODULE in sys.modules:
            return importlib.reload(sys.modules[APP_MODULE])
        return importlib.import_module(APP_MODULE)
    except ImportError as error:
        raise CLIError(
            f'the demo needs {error.name or error}: pip install "tracewire[all]"'
        ) from None


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """``app`` on uvicorn in a thread, on a free loopback port; stopped at the end."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # The failing tool call's traceback is expected: the demo reports every response itself,
    # and the error is in the trace.
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="critical", access_log=False, lifespan="off")
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="tracewire-demo-app", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise CLIError("the demo app did not start on uvicorn")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.real and not os.environ.get("OPENAI_API_KEY", "").strip():
        raise CLIError(
            "--real calls the OpenAI API and needs OPENAI_API_KEY to be set "
            "(run without --real to use the bundled local server, no key needed)"
        )
    from tracewire import config

    if not config.tracing_enabled():
        raise CLIError(
            "ENABLE_MLFLOW_TRACING is false, so nothing would be traced; unset it to run the demo"
        )
    uri = resolve_tracking_uri(args.tracking_uri, os.environ)
    if args.tracking_uri:  # the app reads it as MLFLOW_TRACKING_URI: an error there names that
        destination.check_destination(
            dataclasses.replace(config.defaults(), tracking_uri=uri),
            named=f"--tracking-uri is {scrub.text(uri)!r}",
        )
    run_id = uuid.uuid4().hex
    with _environ(_demo_environ(uri, run_id)), _quiet_store_setup():
        return _run(args, uri, run_id, out)


def _run(args: argparse.Namespace, uri: str, run_id: str, out: TextIO) -> int:
    import tracewire

    delta_path = str(Path(args.delta).absolute()) if "://" not in args.delta else args.delta
    experiment = (
        os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"id {os.environ.get('MLFLOW_EXPERIMENT_ID')}"
    )
    started_ms = int(time.time() * 1000)

    with contextlib.ExitStack() as stack:
        if args.real:
            base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            model_line = (
                f"the OpenAI API at {base_url} (billed to OPENAI_API_KEY, a fraction of a cent)"
            )
        else:
            from tracewire.testing import OpenAIServer

            server = stack.enter_context(OpenAIServer())
            stack.enter_context(
                _environ({"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "not-needed"})
            )
            model_line = (
                f"the bundled local OpenAI-compatible server at {server.base_url} "
                "(no API key, no network; pass --real for the OpenAI API)"
            )
        # The app's tracewire.autolog() runs here: invalid settings fail before anything else.
        app = _load_app()
        stack.callback(tracewire.disable)
        url = stack.enter_context(_serve(app.app))

        out.write(
            "tracewire demo\n"
            f"  model:      {model_line}\n"
            f"  app:        examples/fastapi_agent (FastAPI + a LangGraph agent: retriever, "
            f"ChatOpenAI, weather tool) on uvicorn at {url}\n"
            f"  store:      {uri}\n"
            f"  experiment: {experiment}\n"
            f"  Delta:      {delta_path}\n"
            f"  run tag:    {RUN_TAG} = {run_id}\n\n"
            f"Driving {len(SCRIPT)} chat turns in {len({t.session for t in SCRIPT})} "
            "sessions, with feedback:\n"
        )
        out.flush()

        import httpx

        http = stack.enter_context(httpx.Client(base_url=url, timeout=120))
        progress = Progress(out, STEPS)
        try:
            drive(http, progress, run_id)
        except RequestFailed as failure:
            # Its trace says why, if it reached the store (else MLflow's retries would wait).
            why = cause(uri, run_id, failure.reply.request_id) if tracewire.flush(10) else None
            raise CLIError(f"{failure}: {why}" if why else str(failure)) from None

        began = time.perf_counter()
        if not tracewire.flush(30):
            # What could not be stored is said above (the store's error, where it waits).
            raise CLIError(f"the demo's traces did not reach the tracking store {scrub.text(uri)}")
        out.write(
            f"Waited {time.perf_counter() - began:.1f} s for the traces and feedback to "
            "reach the store; syncing the Delta table...\n"
        )
        out.flush()

    with reading_store(uri):
        rows = sync_and_read(uri, delta_path, run_id, started_ms)
    write_summary(out, rows, uri, delta_path, experiment, run_id)
    if len(rows) != len(SCRIPT):
        raise CLIError(
            f"expected {len(SCRIPT)} traces of this run in the Delta table, found {len(rows)}"
        )
    return 0
