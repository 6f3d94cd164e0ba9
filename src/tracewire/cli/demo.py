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
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, TextIO, TypeVar

from tracewire.cli import CLIError

DEFAULT_EXPERIMENT = "tracewire-demo"
DEFAULT_STORE_FILE = "mlflow.db"
DEFAULT_DELTA_DIR = "tracewire-delta"
RUN_TAG = "demo.run"
APP_MODULE = "tracewire.cli.demo_app"

T = TypeVar("T")


@dataclass(frozen=True)
class Turn:
    """One chat turn the demo sends to the app."""

    session: str  # the run's id is appended: each run has conversations of its own
    user: str
    message: str
    stream: bool = False
    # Thumbs up (True) or down (False) on this turn's reply, through the /feedback route.
    feedback: bool | None = None
    rationale: str | None = None
    # The weather tool has no data for it: with the bundled model the request fails (HTTP 500);
    # a real model may answer without calling the tool.
    fails: bool = False


# The bundled model calls the weather tool on every turn, with the whole question as the city:
# each question names a city the tool knows, except the one meant to fail.
SCRIPT = (
    Turn("paris", "ada", "What is the weather in Paris today?", feedback=True),
    Turn("paris", "ada", "Is the Louvre in Paris open on Tuesdays?"),
    Turn("paris", "ada", "Plan a rainy afternoon in London for me.", stream=True),
    Turn("london", "grace", "Do I need an umbrella in London?"),
    Turn("london", "grace", "And in Tokyo next week?", feedback=False,
         rationale="asked about next week, got today's weather"),
    Turn("atlantis", "linus", "What is the weather in Atlantis?", fails=True),
)
STEPS = len(SCRIPT) + sum(t.feedback is not None for t in SCRIPT)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
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
        "--real", action="store_true",
        help="use the OpenAI API (gpt-4o-mini; needs OPENAI_API_KEY) instead of the local server",
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
             "the current directory)",
    )
    parser.add_argument(
        "--delta", metavar="PATH", default=DEFAULT_DELTA_DIR,
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
    path, sep, query = uri[len(prefix):].partition("?")
    if not path or path.startswith(":memory:") or Path(path).is_absolute():
        return uri
    return prefix + str(Path.cwd() / path) + sep + query


def resolve_tracking_uri(arg: str | None, environ: Mapping[str, str]) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``; sqlite made absolute."""
    uri = (arg or "").strip() or environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return "sqlite:///" + str(Path.cwd() / DEFAULT_STORE_FILE)
    return _absolute_sqlite(uri)


def ui_hint(uri: str) -> str:
    """How to look at the traces in ``uri``."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("http", "https"):
        return f"open {uri} in a browser"
    if scheme == "databricks":
        return "open the experiment in your Databricks workspace"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


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
    if not os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() and \
            not os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip():
        env["MLFLOW_EXPERIMENT_NAME"] = DEFAULT_EXPERIMENT
    tags = os.environ.get("TRACEWIRE_TAGS", "").strip()
    env["TRACEWIRE_TAGS"] = f"{tags},{RUN_TAG}={run_id}" if tags else f"{RUN_TAG}={run_id}"
    if "MLFLOW_MODEL_CATALOG_URI" not in os.environ:
        # Otherwise MLflow downloads a model price catalog for models it does not know,
        # which stalls offline; its built-in table prices the demo's model.
        env["MLFLOW_MODEL_CATALOG_URI"] = ""
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
        raise CLIError(f"the demo needs {error.name or error}: "
                       'pip install "tracewire[all]"') from None


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
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", access_log=False,
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="tracewire-demo-app", daemon=True)
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


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per step: rewritten in place with \\r on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = total
        self._tty = _isatty(out)
        self.index = 0

    def step(self, label: str, session: str, fn: Callable[[], T],
             outcome: Callable[[T], str]) -> T:
        self.index += 1
        head = f"  [{self.index}/{self._total}] {label:<11} {session:<18}"
        if self._tty:
            self._out.write(f"\r\033[K{head} ...")
            self._out.flush()
        started = time.perf_counter()
        try:
            result = fn()
        except BaseException:
            if self._tty:
                self._out.write("\n")
                self._out.flush()
            raise
        ms = (time.perf_counter() - started) * 1000
        line = f"{head} {ms:6.0f} ms  {_shorten(outcome(result), 52)}"
        self._out.write(("\r\033[K" if self._tty else "") + line + "\n")
        self._out.flush()
        return result


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except Exception:
        return False


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


# --------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Reply:
    status: int
    request_id: str
    text: str


class RequestFailed(Exception):
    """A turn got an answer the script does not expect."""

    def __init__(self, index: int, reply: Reply) -> None:
        super().__init__(f"request {index} of the demo failed: HTTP {reply.status} "
                         f"{_shorten(reply.text, 200)}")
        self.reply = reply


def _send(http: Any, turn: Turn, session: str) -> Reply:
    # Our own request id: a 500 sent for an unhandled exception does not echo the app's.
    request_id = uuid.uuid4().hex
    headers = {"X-Session-ID": session, "X-User-ID": turn.user, "X-Request-ID": request_id}
    body = {"message": turn.message}
    if turn.stream:
        with http.stream("POST", "/chat/stream", json=body, headers=headers) as response:
            tokens = [json.loads(line[len("data: "):])["token"] for line in response.iter_lines()
                      if line.startswith("data: {")]
        text = "".join(tokens)
    else:
        response = http.post("/chat", json=body, headers=headers)
        text = response.json()["reply"] if response.status_code == 200 else response.text
    return Reply(response.status_code, request_id, text)


def _outcome(turn: Turn, reply: Reply) -> str:
    if turn.fails and reply.status == 500:
        return "HTTP 500 the weather tool failed, as planned"
    return f"HTTP {reply.status} {reply.text}"


def drive(http: Any, progress: Progress, run_id: str) -> None:
    """Send the SCRIPT's turns and feedback; an unexpected answer stops the demo."""
    for turn in SCRIPT:
        session = f"{turn.session}-{run_id[:8]}"
        reply = progress.step("stream" if turn.stream else "chat", session,
                              lambda: _send(http, turn, session),
                              lambda r: _outcome(turn, r))
        if not (reply.status == 200 or (turn.fails and reply.status == 500)):
            raise RequestFailed(progress.index, reply)
        if turn.feedback is None:
            continue
        feedback = {"request_id": reply.request_id, "name": "thumbs", "value": turn.feedback,
                    "rationale": turn.rationale}
        answer = progress.step(
            "thumbs " + ("up" if turn.feedback else "down"), session,
            lambda: http.post("/feedback", json=feedback, headers={"X-User-ID": turn.user}),
            lambda r: f"HTTP {r.status_code} on request {reply.request_id}")
        if answer.status_code != 202:
            raise CLIError(f"the feedback route answered HTTP {answer.status_code}: "
                           f"{_shorten(answer.text, 200)}")


# --------------------------------------------------------------------------- read back


def cause(uri: str, run_id: str, request_id: str) -> str | None:
    """Why a request failed, from its trace: the error of the failed span that started last
    (the innermost: the tool, the model call), if the trace is in the store."""
    from mlflow import MlflowClient

    with contextlib.suppress(CLIError):
        traces = MlflowClient(tracking_uri=uri).search_traces(
            locations=[_experiment_id(uri)], filter_string=f"tag.`{RUN_TAG}` = '{run_id}'",
            max_results=100)
        for trace in traces:
            if trace.info.client_request_id != request_id:
                continue
            failed = [s for s in trace.data.spans if s.status.status_code == "ERROR"]
            if failed:
                return max(failed, key=lambda s: s.start_time_ns).status.description or None
    return None


def _experiment_id(uri: str) -> str:
    """The id of the experiment the traces went to."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    if experiment_id:
        return experiment_id
    name = os.environ["MLFLOW_EXPERIMENT_NAME"].strip()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise CLIError(f"no experiment named {name!r} in {uri}: no trace reached the store")
    return str(experiment.experiment_id)


def sync_and_read(uri: str, delta_path: str, run_id: str, since_ms: int) -> list[dict[str, Any]]:
    """Sync the experiment into the Delta table (what `tracewire export delta` does), then
    read back this run's rows from it (what `tracewire stats --delta` reads)."""
    from tracewire import config
    from tracewire.export import delta
    from tracewire.report import sources

    delta.sync(delta_path, tracking_uri=uri, experiment_ids=[_experiment_id(uri)],
               lookback_s=config.resolve().feedback_retention)
    return [row for row in sources.from_delta(delta_path, since_ms)
            if json.loads(row["tags"] or "{}").get(RUN_TAG) == run_id]


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.real and not os.environ.get("OPENAI_API_KEY", "").strip():
        raise CLIError("--real calls the OpenAI API and needs OPENAI_API_KEY to be set "
                       "(run without --real to use the bundled local server, no key needed)")
    from tracewire import config

    if not config.tracing_enabled():
        raise CLIError("ENABLE_MLFLOW_TRACING is false, so nothing would be traced; "
                       "unset it to run the demo")
    uri = resolve_tracking_uri(args.tracking_uri, os.environ)
    run_id = uuid.uuid4().hex
    with _environ(_demo_environ(uri, run_id)), _quiet_store_setup():
        return _run(args, uri, run_id, out)


def _run(args: argparse.Namespace, uri: str, run_id: str, out: TextIO) -> int:
    import tracewire

    delta_path = str(Path(args.delta).absolute()) if "://" not in args.delta else args.delta
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or \
        f"id {os.environ.get('MLFLOW_EXPERIMENT_ID')}"
    started_ms = int(time.time() * 1000)

    with contextlib.ExitStack() as stack:
        if args.real:
            base_url = os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
            model_line = (f"the OpenAI API at {base_url} (billed to OPENAI_API_KEY, a fraction "
                          "of a cent)")
        else:
            from tracewire.testing import OpenAIServer

            server = stack.enter_context(OpenAIServer())
            stack.enter_context(_environ({"OPENAI_BASE_URL": server.base_url,
                                          "OPENAI_API_KEY": "not-needed"}))
            model_line = (f"the bundled local OpenAI-compatible server at {server.base_url} "
                          "(no API key, no network; pass --real for the OpenAI API)")
        # The app's tracewire.autolog() runs here: invalid settings fail before anything else.
        app = _load_app()
        stack.callback(tracewire.disable)
        url = stack.enter_context(_serve(app.app))

        out.write("tracewire demo\n"
                  f"  model:      {model_line}\n"
                  f"  app:        examples/fastapi_agent (FastAPI + a LangGraph agent: retriever, "
                  f"ChatOpenAI, weather tool) on uvicorn at {url}\n"
                  f"  store:      {uri}\n"
                  f"  experiment: {experiment}\n"
                  f"  Delta:      {delta_path}\n"
                  f"  run tag:    {RUN_TAG} = {run_id}\n\n"
                  f"Driving {len(SCRIPT)} chat turns in {len({t.session for t in SCRIPT})} "
                  "sessions, with feedback:\n")
        out.flush()

        import httpx

        http = stack.enter_context(httpx.Client(base_url=url, timeout=120))
        progress = Progress(out, STEPS)
        try:
            drive(http, progress, run_id)
        except RequestFailed as failure:
            tracewire.flush(10)
            why = cause(uri, run_id, failure.reply.request_id)
            raise CLIError(f"{failure}: {why}" if why else str(failure)) from None

        began = time.perf_counter()
        if not tracewire.flush(30):
            print("tracewire: warning: not every trace was stored within 30 s", file=sys.stderr)
        out.write(f"Waited {time.perf_counter() - began:.1f} s for the traces and feedback to "
                  "reach the store; syncing the Delta table...\n")
        out.flush()

    rows = sync_and_read(uri, delta_path, run_id, started_ms)
    from tracewire.report import aggregate, render

    out.write(f"\n`tracewire stats` of this run ({len(rows)} traces, read from the Delta table):"
              "\n\n")
    for by in ("route", "session"):
        out.write(render.table(aggregate.aggregate(rows, by), by) + "\n\n")
    out.write(f"Delta table (one row per trace): {delta_path}\n"
              f"  tracewire stats --delta {shlex.quote(delta_path)} --by user\n\n"
              "See the traces in the MLflow UI:\n"
              f"  {ui_hint(uri)}\n")
    if ui_hint(uri).startswith("mlflow ui"):
        out.write("  then open http://127.0.0.1:5000\n")
    out.write(f"  experiment {experiment!r} -> Traces (search: tag.`{RUN_TAG}` = '{run_id}')\n")
    out.flush()
    if len(rows) != len(SCRIPT):
        raise CLIError(f"expected {len(SCRIPT)} traces of this run in the Delta table, "
                       f"found {len(rows)}")
    return 0
