"""``tracewire demo``: a short scripted OpenAI session, traced into MLflow, then read back.

Without ``--real`` the calls go to the bundled local OpenAI-compatible server
(:class:`tracewire.testing.OpenAIServer`), so no API key and no network are needed; with
``--real`` they go to the OpenAI API (``OPENAI_API_KEY``). The traces go to ``./mlflow.db``
(or ``MLFLOW_TRACKING_URI`` / ``--tracking-uri``); the demo then reads back exactly the traces of
this run through MLflow's API, prints per-call tokens and cost, and the ``mlflow ui`` command that
shows them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TextIO, TypeVar

from tracewire.cli import CLIError

DEFAULT_EXPERIMENT = "tracewire-demo"
DEFAULT_STORE_FILE = "mlflow.db"
CHAT_MODEL = "gpt-4o-mini"
EMBEDDING_MODEL = "text-embedding-3-small"
OPENAI_BASE_URL = "https://api.openai.com/v1"
RUN_TAG = "demo.run"
CALLS = 7  # the number of model calls _run_script makes
# Small caps keep a --real run to a fraction of a cent.
MAX_TOKENS = 120

T = TypeVar("T")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="run a short traced OpenAI session and show its tokens and cost",
        description=(
            "Run a short scripted OpenAI session (chat, streaming, a tool call, embeddings, the "
            "Responses API) against the bundled local OpenAI-compatible server, or against the "
            "OpenAI API with --real. Traces are written to ./mlflow.db (or MLFLOW_TRACKING_URI); "
            "per-call tokens and cost are read back from the store and printed, with the "
            "`mlflow ui` command that shows them."
        ),
    )
    parser.add_argument(
        "--real", action="store_true",
        help=f"call the OpenAI API ({CHAT_MODEL}; needs OPENAI_API_KEY) instead of the local server",
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in "
             "the current directory)",
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


def _demo_environ(uri: str, local: bool) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": uri}
    if not os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() and \
            not os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip():
        env["MLFLOW_EXPERIMENT_NAME"] = DEFAULT_EXPERIMENT
    if "MLFLOW_MODEL_CATALOG_URI" not in os.environ:
        # Otherwise MLflow downloads a model price catalog for models it does not know,
        # which stalls offline; its built-in table prices the demo's models.
        env["MLFLOW_MODEL_CATALOG_URI"] = ""
    if local:
        # The local server accepts stream_options.include_usage like OpenAI does, so streamed
        # calls get exact usage there too.
        hosts = os.environ.get("TRACEWIRE_STREAM_USAGE_HOSTS", "").strip()
        if "127.0.0.1" not in hosts.split(","):
            env["TRACEWIRE_STREAM_USAGE_HOSTS"] = f"{hosts},127.0.0.1" if hosts else "127.0.0.1"
    return env


# --------------------------------------------------------------------------- progress


class Progress:
    """One line per call: rewritten in place with \\r on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = total
        self._tty = _isatty(out)
        self.index = 0

    def call(self, label: str, session: str, fn: Callable[[], T],
             preview: Callable[[T], str]) -> T:
        self.index += 1
        head = f"  [{self.index}/{self._total}] {label:<24} {session:<22}"
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
        line = f"{head} {ms:6.0f} ms  {_shorten(preview(result), 40)}"
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


# --------------------------------------------------------------------------- the session


def _weather(city: str) -> dict[str, Any]:
    """The demo's tool: a canned forecast."""
    return {"city": city, "forecast": "sunny", "temperature_c": 21}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city name"}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class Step:
    label: str
    session: str


def _reply(completion: Any) -> str:
    message = completion.choices[0].message
    if message.tool_calls:
        return "tool call " + ", ".join(
            f"{c.function.name}({c.function.arguments})" for c in message.tool_calls)
    return message.content or ""


def _run_script(client: Any, progress: Progress, sessions: tuple[str, str],
                users: tuple[str, str]) -> list[Step]:
    """The scripted session: CALLS model calls in two sessions. Returns the steps, in order."""
    import tracewire

    steps: list[Step] = []

    def call(label: str, session: str, fn: Callable[[], T], preview: Callable[[T], str]) -> T:
        steps.append(Step(label, session))
        return progress.call(label, session, fn, preview)

    chat, agent = sessions
    with tracewire.context(session_id=chat, user_id=users[0]):
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
            {"role": "user", "content": "What does MLflow Tracing record for an LLM call?"},
        ]
        first = call("chat, turn 1", chat, lambda: client.chat.completions.create(
            model=CHAT_MODEL, messages=list(messages), max_tokens=MAX_TOKENS), _reply)
        messages.append({"role": "assistant", "content": first.choices[0].message.content or ""})
        messages.append({"role": "user", "content": "Why do exact token counts matter?"})
        call("chat, turn 2", chat, lambda: client.chat.completions.create(
            model=CHAT_MODEL, messages=list(messages), max_tokens=MAX_TOKENS), _reply)

        def streamed() -> str:
            stream = client.chat.completions.create(
                model=CHAT_MODEL, stream=True, max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Write a haiku about tracing."}])
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        call("chat, streamed", chat, streamed, lambda text: text)

    with tracewire.context(session_id=agent, user_id=users[1]):
        messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        asked = call("tool call", agent, lambda: client.chat.completions.create(
            model=CHAT_MODEL, messages=list(messages), tools=[WEATHER_TOOL], max_tokens=MAX_TOKENS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}), _reply)
        tool_calls = asked.choices[0].message.tool_calls or []
        if not tool_calls:
            raise CLIError("the model did not call the get_weather tool")
        messages.append({"role": "assistant", "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in tool_calls]})
        for tool_call in tool_calls:
            try:
                arguments = json.loads(tool_call.function.arguments or "{}")
            except ValueError:
                arguments = {}
            city = arguments.get("city") if isinstance(arguments, dict) else None
            messages.append({"role": "tool", "tool_call_id": tool_call.id,
                             "content": json.dumps(_weather(str(city or "Paris")))})
        call("tool result -> answer", agent, lambda: client.chat.completions.create(
            model=CHAT_MODEL, messages=list(messages), tools=[WEATHER_TOOL],
            max_tokens=MAX_TOKENS), _reply)

        call("embeddings", agent, lambda: client.embeddings.create(
            model=EMBEDDING_MODEL,
            input=["tracewire traces OpenAI calls into MLflow", "with exact tokens and cost"]),
            lambda result: f"{len(result.data)} vectors of {len(result.data[0].embedding)} floats")

        call("responses API", agent, lambda: client.responses.create(
            model=CHAT_MODEL, input="Write a one-line release note for a tracing library.",
            max_output_tokens=MAX_TOKENS), lambda response: response.output_text)
    assert len(steps) == CALLS, len(steps)
    return steps


# --------------------------------------------------------------------------- read back


@dataclass(frozen=True)
class Row:
    step: str
    name: str
    session: str
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost: float | None
    ms: int | None


def _cost(trace: Any) -> float | None:
    """Total USD cost the store priced for the trace, or None when it did not price it."""
    cost = None
    with contextlib.suppress(Exception):
        cost = trace.info.cost
    if not cost:
        raw = trace.info.trace_metadata.get("mlflow.trace.cost")
        with contextlib.suppress(Exception):
            cost = json.loads(raw) if raw else None
    if isinstance(cost, dict) and cost.get("total_cost") is not None:
        return float(cost["total_cost"])
    total = None
    for span in trace.data.spans:  # fall back to the spans' own prices
        span_cost = span.attributes.get("mlflow.llm.cost")
        if isinstance(span_cost, str):
            with contextlib.suppress(ValueError):
                span_cost = json.loads(span_cost)
        if isinstance(span_cost, dict) and span_cost.get("total_cost") is not None:
            total = (total or 0.0) + float(span_cost["total_cost"])
    return total


def _root(trace: Any) -> Any:
    return next((s for s in trace.data.spans if s.parent_id is None), None)


def _start_ns(trace: Any) -> int:
    root = _root(trace)
    return root.start_time_ns if root is not None else trace.info.request_time * 1_000_000


def _row(trace: Any, step: str) -> Row:
    usage = trace.info.token_usage or {}
    root = _root(trace)
    name = trace.info.tags.get("mlflow.traceName") or (root.name if root is not None else "?")
    return Row(
        step=step,
        name=name,
        session=trace.info.trace_metadata.get("mlflow.trace.session", "-"),
        input_tokens=int(usage.get("input_tokens", 0)),
        output_tokens=int(usage.get("output_tokens", 0)),
        total_tokens=int(usage.get("total_tokens", 0)),
        cost=_cost(trace),
        ms=trace.info.execution_duration,
    )


def read_back(uri: str, experiment_id: str, run_id: str) -> list[Any]:
    """The traces this run wrote: in the experiment, tagged with the run's id; oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    traces: list[Any] = []
    page_token = None
    while True:
        page = client.search_traces(
            locations=[experiment_id], filter_string=f"tag.`{RUN_TAG}` = '{run_id}'",
            max_results=100, page_token=page_token)
        traces.extend(page)
        page_token = page.token
        if not page_token:
            break
    return sorted(traces, key=_start_ns)


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.8f}"


def format_table(rows: list[Row]) -> str:
    header = ("#", "step", "call", "session", "in", "out", "total", "cost USD", "ms")
    right = {0, 4, 5, 6, 7, 8}
    body = [(str(i), r.step, r.name, r.session, str(r.input_tokens), str(r.output_tokens),
             str(r.total_tokens), _money(r.cost), "-" if r.ms is None else str(r.ms))
            for i, r in enumerate(rows, 1)]
    priced = [r.cost for r in rows if r.cost is not None]
    total = ("", "total", f"{len(rows)} calls", "",
             str(sum(r.input_tokens for r in rows)), str(sum(r.output_tokens for r in rows)),
             str(sum(r.total_tokens for r in rows)), _money(sum(priced) if priced else None),
             str(sum(r.ms or 0 for r in rows)))
    widths = [max(len(line[i]) for line in (header, total, *body)) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(line, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, fmt(total)])


# --------------------------------------------------------------------------- run


def _openai_client(real: bool, base_url: str) -> Any:
    try:
        import openai
    except ImportError:
        raise CLIError('the demo needs the openai package: pip install "tracewire[openai]"') from None
    if real:
        return openai.OpenAI(api_key=os.environ["OPENAI_API_KEY"], base_url=base_url, timeout=60)
    return openai.OpenAI(api_key="not-needed", base_url=base_url, max_retries=0, timeout=30)


def _experiment_id(uri: str) -> tuple[str, str]:
    """(id, name) of the experiment the traces went to."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    if experiment_id:
        experiment = client.get_experiment(experiment_id)
    else:
        name = os.environ["MLFLOW_EXPERIMENT_NAME"].strip()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise CLIError(f"no experiment named {name!r} in {uri}: no trace reached the store")
    return experiment.experiment_id, experiment.name


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
    with _environ(_demo_environ(uri, local=not args.real)), _quiet_store_setup():
        return _run(args, uri, out)


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


def _run(args: argparse.Namespace, uri: str, out: TextIO) -> int:
    import tracewire

    run_id = uuid.uuid4().hex
    short = run_id[:8]
    sessions = (f"demo-chat-{short}", f"demo-agent-{short}")
    users = ("ada", "grace")
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or \
        f"id {os.environ.get('MLFLOW_EXPERIMENT_ID')}"

    with contextlib.ExitStack() as stack:
        # Invalid settings fail here, before anything starts.
        tracewire.autolog(include=["openai"], tags={RUN_TAG: run_id})
        stack.callback(tracewire.disable)
        if args.real:
            base_url = OPENAI_BASE_URL
            model_line = (f"OpenAI API at {base_url} ({CHAT_MODEL}, {EMBEDDING_MODEL}; "
                          "billed to OPENAI_API_KEY, a fraction of a cent)")
        else:
            from tracewire.testing import OpenAIServer

            server = stack.enter_context(OpenAIServer())
            base_url = server.base_url
            model_line = (f"bundled local OpenAI-compatible server at http://127.0.0.1:{server.port} "
                          "(no API key needed; pass --real to use the OpenAI API)")
        client = _openai_client(args.real, base_url)
        stack.callback(client.close)

        out.write("tracewire demo\n"
                  f"  model:      {model_line}\n"
                  f"  store:      {uri}\n"
                  f"  experiment: {experiment}\n"
                  f"  run tag:    {RUN_TAG} = {run_id}\n\n")
        out.flush()

        import openai

        out.write(f"Running {CALLS} calls in 2 sessions:\n")
        progress = Progress(out, CALLS)
        try:
            steps = _run_script(client, progress, sessions, users)
        except openai.APIError as error:
            raise CLIError(f"call {progress.index} of the demo failed: "
                           f"{type(error).__name__}: {error}") from None
        if not tracewire.flush(30):
            print("tracewire: warning: not every trace was exported within 30 s",
                  file=sys.stderr)

    experiment_id, experiment_name = _experiment_id(uri)
    traces = read_back(uri, experiment_id, run_id)
    labels = [s.label for s in steps] if len(traces) == len(steps) else [""] * len(traces)
    rows = [_row(trace, label) for trace, label in zip(traces, labels)]

    out.write(f"\nTraces of this run, read back from the store ({len(traces)} of {len(steps)}):\n")
    out.write(format_table(rows) + "\n")
    if any(r.cost is None for r in rows):
        out.write("(cost '-': the store has no price for that model)\n")
    out.write("\nSee them in the MLflow UI:\n"
              f"  {ui_hint(uri)}\n")
    if ui_hint(uri).startswith("mlflow ui"):
        out.write("  then open http://127.0.0.1:5000\n")
    out.write(f"  experiment {experiment_name!r} -> Traces (search: tag.`{RUN_TAG}` = '{run_id}'),\n"
              f"  sessions {sessions[0]} and {sessions[1]}\n")
    out.flush()
    if len(traces) != len(steps):
        raise CLIError(f"expected {len(steps)} traces of this run in the store, found {len(traces)}")
    return 0
