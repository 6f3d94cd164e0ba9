"""An agent served by MLflow, end to end: a ResponsesAgent over the OpenAI client and one over a
LangGraph graph, logged from code with ``mlflow.pyfunc.log_model``, served by ``mlflow models
serve --env-manager local`` three ways, each with ``ENABLE_MLFLOW_TRACING=true`` and
``MLFLOW_EXPERIMENT_ID``:

- ``plain``: MLflow alone (the reference: MLflow's own ResponsesAgent and autolog tracing);
- ``run``: under ``python -m tracewire.cli run --``;
- ``autolog``: ``tracewire.autolog()`` in the model's code (tests/system/serving/agents/).

Every server gets the same requests, in one concurrent burst: ResponsesAgent bodies, most with
``context.conversation_id``/``user_id``, some with ``X-Session-ID``/``X-User-ID`` headers, some
with a LangGraph ``thread_id`` only, one without ``X-Request-ID``, and one the agent fails on
(the scoring server answers 400). The traces are read back with MLflow's API, and each thing
docs/serving.md says such a trace holds is one test (point1 to point6), run for each tracewire
mode and agent, so a failure names what is missing. The last test compares every trace field by
field with plain MLflow's trace of the same request; run with -s to see the table (all of it is also written to /tmp/serving-comparison-table.md).

One module-scoped deployment (6 servers started at once, one burst each) keeps this to about a
minute.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow.entities import Trace

from tests.conftest import API_KEY
from tests.support.model_serving import ModelServer, log_models
from tests.support.processes import TRACEWIRE_RUN, clean_env
from tracewire.testing import OpenAIServer, count_prompt_tokens, count_tokens

pytestmark = pytest.mark.timeout(480)  # a hang guard: the module takes about a minute

AGENTS = {
    "openai": Path(__file__).parent / "agents" / "openai_agent.py",
    "langgraph": Path(__file__).parent / "agents" / "langgraph_agent.py",
}
MODES = ("plain", "run", "autolog")
TRACEWIRE_MODES = [
    pytest.param(mode, agent, id=f"{mode}-{agent}")
    for mode in ("run", "autolog")
    for agent in AGENTS
]
REPORT = Path("/tmp/serving-comparison-table.md")  # rewritten by every run
BURST = 20  # successful requests, sent at once with the failing one
PREVIEW_MAX = 1000  # MLflow's request/response preview length in open source
ANONYMOUS = "anonymous-*"  # the LangGraph agent's own thread id when a request names none

# What a tracewire trace may lack or hold differently from plain MLflow's, and why. Anything
# else plain MLflow records on a served agent's trace, tracewire must record too.
ALLOWED = {
    "root span": "tracewire's root is the web request (POST /invocations, CHAIN) with MLflow's "
    "`predict` span under it; so the tag mlflow.traceName names the request",
    "tag mlflow.traceName": "the root span's name (see root span)",
    "tag mlflow.artifactLocation": "a path under each experiment: differs by experiment",
    "metadata values": "sizes (mlflow.trace.sizeBytes, sizeStats) and the root span's JSON "
    "(mlflow.traceInputs, traceOutputs) differ with the extra root span; their "
    "keys must be there",
    "model call span names": "tracewire names the OpenAI client's call `chat <model>` "
    "(OpenTelemetry GenAI convention), MLflow `Completions`; under "
    "LangChain both layers are kept (ChatOpenAI and the client call)",
    "LangGraph span type": "tracewire types the graph run AGENT, MLflow's LangChain autolog CHAIN",
    "span events": "MLflow records one event per streamed chunk; tracewire records none (the "
    "hot path does no work per chunk)",
    "non-mlflow span attributes": "autolog's raw framework dumps (model, stream, "
    "invocation_params, metadata, options, batch_size): only "
    "MLflow's own mlflow.* span attributes are compared",
}


# ---------------------------------------------------------------------------------- the requests


@dataclass
class Sent:
    """One request and what came back."""

    key: str
    question: str
    kind: str  # context | headers | thread | bare | no-id | fail
    request_id: str | None  # the X-Request-ID sent (None: none sent)
    body: dict[str, Any]
    headers: dict[str, str]
    status: int = 0
    answer: str | None = None
    response_headers: dict[str, str] = field(default_factory=dict)

    def expected_identity(self, agent: str) -> tuple[str | None, str | None]:
        """(session, user) the trace should carry. What the app establishes wins over what the
        client claims: the LangGraph run's thread_id (the LangGraph agent runs one for every
        request that gets that far: ``custom_inputs.thread_id``, else the conversation id,
        else one it makes up, ANONYMOUS); then the request's context; never its headers (no
        header is trusted by default)."""
        context = self.body.get("context") or {}
        thread = None
        if agent == "langgraph" and self.kind != "fail":
            thread = (
                (self.body.get("custom_inputs") or {}).get("thread_id")
                or context.get("conversation_id")
                or ANONYMOUS
            )
        session = thread or context.get("conversation_id")
        user = context.get("user_id")
        return session, user

    def expected_usage(self, agent: str) -> dict[str, int] | None:
        """Exact token usage of the trace (the local server's counting rules): the OpenAI agent
        makes two calls (plain and streamed), the LangGraph agent one (seen by two layers,
        counted once)."""
        if self.kind == "fail":
            return None
        calls = 2 if agent == "openai" else 1
        prompt = count_prompt_tokens([{"role": "user", "content": self.question}])
        completion = count_tokens(f"Echo: {self.question}")
        return {
            "input_tokens": calls * prompt,
            "output_tokens": calls * completion,
            "total_tokens": calls * (prompt + completion),
        }


def _plan(agent: str) -> list[Sent]:
    sent = []
    for i in range(BURST):
        key = f"{i:02d}"
        question = f"what is {i} plus {i}"
        body: dict[str, Any] = {"input": [{"role": "user", "content": question}]}
        headers: dict[str, str] = {}
        if i < 12 or i == 19:
            kind = "context" if i < 12 else "no-id"
            body["context"] = {"conversation_id": f"conv-{key}", "user_id": f"user-{i % 3}"}
        elif i < 15:
            kind = "headers"
            headers = {"X-Session-ID": f"hdr-session-{key}", "X-User-ID": f"hdr-user-{key}"}
        elif i < 18:
            kind = "thread"
            body["custom_inputs"] = {"thread_id": f"thread-{key}"}
        else:
            kind = "bare"
        request_id = None if kind == "no-id" else f"req-{agent}-{key}"
        sent.append(Sent(key, question, kind, request_id, body, headers))
    sent.append(
        Sent(
            "fail",
            "fail",
            "fail",
            f"req-{agent}-fail",
            {
                "input": [{"role": "user", "content": "fail"}],
                "context": {"conversation_id": "conv-fail", "user_id": "user-fail"},
            },
            {},
        )
    )
    for s in sent:
        if s.request_id is not None:
            s.headers = {"X-Request-ID": s.request_id, **s.headers}
    return sent


def _send(client: httpx.Client, url: str, s: Sent) -> None:
    response = client.post(f"{url}/invocations", json=s.body, headers=s.headers)
    s.status = response.status_code
    s.response_headers = {k.lower(): v for k, v in response.headers.items()}
    if response.status_code == 200:
        s.answer = response.json()["output"][0]["content"][0]["text"]


# ------------------------------------------------------------------------------ the deployment


@dataclass
class Served:
    mode: str
    agent: str
    model_id: str
    experiment_id: str
    server: ModelServer
    sent: list[Sent]
    error: str | None = None
    ready_s: float = 0.0
    burst_s: float = 0.0
    burst_end: float = 0.0
    stored_s: float | None = None
    exit_code: int | None = None
    stop_s: float = 0.0
    traces: list[Trace] = field(default_factory=list)
    by_model: list[Trace] = field(default_factory=list)

    def check(self) -> None:
        if self.error is not None:
            pytest.fail(f"{self.mode}/{self.agent}: {self.error}")

    def trace_of(self, s: Sent) -> Trace:
        """The one trace of a request (found by the question its `predict` span got)."""
        found = [t for t in self.traces if _question(t) == s.question]
        assert len(found) == 1, (
            f"{self.mode}/{self.agent}: {len(found)} traces for request "
            f"{s.key} ({s.question!r}); {len(self.traces)} traces in all"
        )
        return found[0]


@dataclass
class Deployment:
    tracking_uri: str
    served: dict[tuple[str, str], Served]
    log_s: float
    total_s: float = 0.0

    def __getitem__(self, key: tuple[str, str]) -> Served:
        served = self.served[key]
        served.check()
        return served


def _question(trace: Trace) -> str | None:
    for span in trace.data.spans:
        if span.name == "predict" and isinstance(span.inputs, dict):
            try:
                return span.inputs["request"]["input"][-1]["content"]
            except (KeyError, IndexError, TypeError):
                return None
    return None


def _search(uri: str, experiment_id: str, **kwargs: Any) -> list[Trace]:
    return mlflow.MlflowClient(uri).search_traces(
        locations=[experiment_id], max_results=500, **kwargs
    )


def _search_by_model(uri: str, experiment_id: str, model_id: str) -> list[Trace]:
    """``mlflow.search_traces(model_id=...)``, the fluent API, on this module's store; the
    process's tracking URI (MLflow's global and the variable it sets) restored after."""
    from mlflow.tracking._tracking_service import utils as tracking

    saved_uri, saved_env = tracking._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_traces(
            model_id=model_id, locations=[experiment_id], return_type="list", max_results=500
        )
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _stop(served: Served) -> None:
    started = time.monotonic()
    served.exit_code = served.server.stop()
    served.stop_s = time.monotonic() - started


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, openai_server: OpenAIServer
) -> Iterator[Deployment]:
    began = time.monotonic()
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_MODEL_CATALOG_URI": "",
        "OPENAI_BASE_URL": openai_server.base_url,
        "OPENAI_API_KEY": API_KEY,
    }
    # Both models logged by one process, which also creates the store (once, before any server).
    model_ids = log_models(
        clean_env(**common),
        root,
        AGENTS,
        experiment="served-models",
        pip_requirements=["mlflow", "openai", "langchain-openai", "langgraph"],
    )
    log_s = time.monotonic() - began
    client = mlflow.MlflowClient(uri)
    served: dict[tuple[str, str], Served] = {}
    for mode in MODES:
        for agent in AGENTS:
            name = f"{mode}-{agent}"  # its trace artifacts in the temporary folder too
            experiment_id = client.create_experiment(
                name, artifact_location=(root / "artifacts" / name).as_uri()
            )
            env = clean_env(
                **common,
                ENABLE_MLFLOW_TRACING="true",
                MLFLOW_EXPERIMENT_ID=experiment_id,
                TRACEWIRE_TESTING="1",  # internal errors raise, as in the whole suite
                TRACEWIRE_SPOOL_DIR=str(root / f"spool-{mode}-{agent}"),
            )
            if mode == "autolog":
                env["AGENT_TRACEWIRE_AUTOLOG"] = "1"
            server = ModelServer(
                model_ids[agent],
                env,
                root,
                log_name=f"{mode}-{agent}.log",
                wrapper=TRACEWIRE_RUN if mode == "run" else (),
            )
            served[mode, agent] = Served(
                mode, agent, model_ids[agent], experiment_id, server, _plan(agent)
            )
    deployment = Deployment(uri, served, log_s)
    try:
        started = time.monotonic()
        for s in served.values():  # all at once: the model loads overlap
            s.server.start()
        for s in served.values():
            try:
                s.server.wait_ready(timeout=120)
                s.ready_s = time.monotonic() - started
            except AssertionError as error:
                s.error = f"the server did not start: {error}"
        with httpx.Client(timeout=60) as http, ThreadPoolExecutor(BURST + 1) as pool:
            for s in served.values():
                if s.error is None:
                    started = time.monotonic()
                    list(pool.map(lambda one, url=s.server.url: _send(http, url, one), s.sent))
                    s.burst_end = time.monotonic()
                    s.burst_s = s.burst_end - started
        # A trace reaches the store shortly after its request (MLflow's own export is
        # asynchronous, span by span): wait for all, complete, while serving.
        sent_at = time.monotonic()
        waiting = {key for key, s in served.items() if s.error is None}
        while waiting and time.monotonic() - sent_at < 60:
            for key in sorted(waiting):
                s = served[key]
                found = _search(uri, s.experiment_id, include_spans=False)
                if len(found) >= len(s.sent) and not any(
                    t.info.state.value == "IN_PROGRESS" for t in found
                ):
                    s.stored_s = time.monotonic() - s.burst_end
                    waiting.discard(key)
            time.sleep(0.3)
    finally:
        with ThreadPoolExecutor(len(served)) as pool:  # each group: SIGTERM, then SIGKILL
            list(pool.map(_stop, served.values()))
    for s in served.values():  # read after the servers' exits: late or duplicate writes show
        if s.error is None:
            s.traces = _search(uri, s.experiment_id)
            s.by_model = _search_by_model(uri, s.experiment_id, s.model_id)
    deployment.total_s = time.monotonic() - began
    _write_report(deployment)
    yield deployment


# ------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("agent", list(AGENTS))
def test_plain_mlflow_is_the_reference(deployment: Deployment, agent: str) -> None:
    """What MLflow alone records on this path (what the comparison below holds tracewire to)."""
    served = deployment["plain", agent]
    assert len(served.traces) == len(served.sent)
    for s in served.sent:
        trace = served.trace_of(s)
        assert trace.data.spans[0].name == "predict"
        assert trace.info.trace_metadata["mlflow.modelId"] == served.model_id
        assert trace.info.request_preview == s.question
        if s.kind == "fail":
            assert s.status == 400 and trace.info.state.value == "ERROR"
        else:
            assert s.status == 200 and s.answer == f"Echo: {s.question}"
            assert trace.info.state.value == "OK"
            assert trace.info.response_preview == s.answer
            assert trace.info.tags["asked"] == s.question
    assert len(served.by_model) == len(served.sent)


# ----------------------------------------------------------------- tracewire, point by point


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_answers_are_unchanged(deployment: Deployment, mode: str, agent: str) -> None:
    """The clients get what they get from plain MLflow: statuses and answers (a usage chunk the
    agent did not ask for would break its naive stream loop: a 400)."""
    plain, served = deployment["plain", agent], deployment[mode, agent]
    assert [(s.key, s.status, s.answer) for s in served.sent] == [
        (s.key, s.status, s.answer) for s in plain.sent
    ]


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_one_trace_per_request_with_its_ids_and_model_calls(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """One trace per request, never mixed: X-Request-ID is its client_request_id and is echoed
    (a generated one when the client sent none), X-Trace-ID names it, and the model calls of that
    request (and no other) are spans in it."""
    served = deployment[mode, agent]
    assert len(served.traces) == len(served.sent), served.server.output()[-3000:]
    by_id = {t.info.trace_id: t for t in served.traces}
    for s in served.sent:
        trace = served.trace_of(s)
        echoed = s.response_headers.get("x-request-id")
        if s.request_id is not None:
            assert echoed == s.request_id, s.key
        else:
            assert echoed, "no X-Request-ID generated for a request that sent none"
        assert trace.info.client_request_id == echoed, s.key
        assert s.response_headers.get("x-trace-id") == trace.info.trace_id, s.key
        assert by_id[trace.info.trace_id] is trace
        calls = [span for span in trace.data.spans if span.span_type == "CHAT_MODEL"]
        for span in calls:  # every model call in the trace is this request's
            assert json.dumps(s.question) in json.dumps(span.inputs), (s.key, span.name)
        client_calls = [span for span in calls if span.name == "chat gpt-4o-mini"]
        expected = 0 if s.kind == "fail" else 2 if agent == "openai" else 1
        assert len(client_calls) == expected, (s.key, [span.name for span in trace.data.spans])
        if agent == "langgraph" and s.kind != "fail":
            assert [span.name for span in calls].count("ChatOpenAI") == 1


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_point1_update_current_trace_lands_on_the_request_trace(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """The agent's ``mlflow.update_current_trace(tags=..., metadata=...)``
    inside ``predict`` lands on its request's trace."""
    served = deployment[mode, agent]
    seen = []
    for s in served.sent:
        if s.kind == "fail":
            continue
        trace = served.trace_of(s)
        seen.append(
            (
                s.key,
                trace.info.tags.get("agent"),
                trace.info.tags.get("asked"),
                trace.info.trace_metadata.get("agent.question"),
            )
        )
    assert seen == [(s.key, agent, s.question, s.question) for s in served.sent if s.kind != "fail"]


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_point2_a_failed_agent_request_is_an_error_trace(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """The scoring server's 400 for a failed agent is an ERROR trace (root span
    included); the successful requests' traces are OK."""
    served = deployment[mode, agent]
    states = {
        s.key: (
            s.status,
            served.trace_of(s).info.state.value,
            served.trace_of(s).data.spans[0].status.status_code.value,
        )
        for s in served.sent
    }
    assert states == {
        s.key: (400, "ERROR", "ERROR") if s.kind == "fail" else (200, "OK", "OK")
        for s in served.sent
    }


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_point3_previews_are_the_question_and_the_answer(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """request_preview holds the user's question, response_preview the answer,
    within MLflow's preview size."""
    served = deployment[mode, agent]
    wrong = {}
    for s in served.sent:
        info = served.trace_of(s).info
        request, response = info.request_preview, info.response_preview
        if not (request and s.question in request and len(request) <= PREVIEW_MAX) or (
            s.answer is not None
            and not (response and s.answer in response and len(response) <= PREVIEW_MAX)
        ):
            wrong[s.key] = (request, response)
    assert wrong == {}


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_point4_traces_are_linked_to_the_served_model(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """``mlflow.modelId`` is the served model's id on every trace, and
    ``mlflow.search_traces(model_id=...)`` finds every one."""
    served = deployment[mode, agent]
    linked = {
        s.key: served.trace_of(s).info.trace_metadata.get("mlflow.modelId") for s in served.sent
    }
    assert linked == {s.key: served.model_id for s in served.sent}
    assert sorted(t.info.trace_id for t in served.by_model) == sorted(
        t.info.trace_id for t in served.traces
    )


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_point5_session_and_user_from_the_agent_request(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """context.conversation_id / context.user_id are the trace's session and
    user (the X-Session-ID / X-User-ID headers name nobody by default); a LangGraph run's
    thread_id (established by the app) is the session over both; nothing made up otherwise."""
    served = deployment[mode, agent]
    seen, expected = {}, {}
    for s in served.sent:
        metadata = served.trace_of(s).info.trace_metadata
        seen[s.key] = (s.kind, _session(metadata), metadata.get("mlflow.trace.user"))
        expected[s.key] = (s.kind, *s.expected_identity(agent))
    assert seen == expected


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_point6_exact_token_usage_on_every_trace(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """Every trace of a request that called the model carries its exact token
    usage (mlflow.trace.tokenUsage), streamed calls to a custom OpenAI-compatible server
    included (nothing in the environment asks for it: no TRACEWIRE_STREAM_USAGE_HOSTS); every
    client call span has mlflow.chat.tokenUsage."""
    served = deployment[mode, agent]
    seen, expected, calls_without = {}, {}, []
    for s in served.sent:
        trace = served.trace_of(s)
        usage = json.loads(trace.info.trace_metadata.get("mlflow.trace.tokenUsage") or "null")
        seen[s.key] = usage and {
            k: usage.get(k) for k in ("input_tokens", "output_tokens", "total_tokens")
        }
        expected[s.key] = s.expected_usage(agent)
        calls_without += [
            (s.key, span.name)
            for span in trace.data.spans
            if span.name == "chat gpt-4o-mini" and not span.attributes.get("mlflow.chat.tokenUsage")
        ]
    assert seen == expected
    assert calls_without == []


# ------------------------------------------------------------- field by field against MLflow


def _session(metadata: dict[str, str]) -> str | None:
    session = metadata.get("mlflow.trace.session")
    return ANONYMOUS if session and session.startswith("anonymous-") else session


def _mlflow_attribute_keys(trace: Trace, span_type: str) -> set[str]:
    return {
        key
        for span in trace.data.spans
        if span.span_type == span_type
        for key in span.attributes
        if key.startswith("mlflow.")
    } - {"mlflow.traceRequestId"}


def _span_shape(trace: Trace) -> list[str]:
    return [f"{span.name}:{span.span_type}" for span in trace.data.spans]


def _differences(plain: Served, served: Served) -> list[str]:
    """What plain MLflow's trace of each request holds and tracewire's does not (ALLOWED
    differences aside), one line per kind of difference, with the requests it concerns."""
    found: dict[str, list[str]] = {}

    def note(what: str, key: str) -> None:
        found.setdefault(what, []).append(key)

    for p_sent, s in zip(plain.sent, served.sent):
        mine, theirs = served.trace_of(s), plain.trace_of(p_sent)
        m_meta, t_meta = mine.info.trace_metadata, theirs.info.trace_metadata
        for key in sorted(set(t_meta) - set(m_meta)):
            note(f"metadata {key} missing", s.key)
        for key in (
            "mlflow.modelId",
            "mlflow.trace.user",
            "agent.question",
            "mlflow.source.type",
            "mlflow.source.name",
            "mlflow.user",
            "mlflow.trace_schema.version",
        ):
            if key in t_meta and key in m_meta and t_meta[key] != m_meta[key]:
                note(f"metadata {key} differs", s.key)
        if _session(t_meta) and _session(m_meta) != _session(t_meta):
            note("metadata mlflow.trace.session differs", s.key)
        t_usage = json.loads(t_meta.get("mlflow.trace.tokenUsage") or "{}")
        m_usage = json.loads(m_meta.get("mlflow.trace.tokenUsage") or "{}")
        for key, value in t_usage.items():
            if key not in m_usage:
                note(f"tokenUsage key {key} missing", s.key)
            elif m_usage[key] < value:
                note(f"tokenUsage {key} lower than MLflow's", s.key)
        t_cost = json.loads(t_meta.get("mlflow.trace.cost") or "{}")
        m_cost = json.loads(m_meta.get("mlflow.trace.cost") or "{}")
        if t_cost.get("total_cost") and not (
            m_cost.get("total_cost", 0) >= t_cost["total_cost"] * 0.999
        ):
            note("cost lower than MLflow's", s.key)
        for key in sorted(set(theirs.info.tags) - set(mine.info.tags)):
            note(f"tag {key} missing", s.key)
        for key, value in theirs.info.tags.items():
            if (
                key not in ("mlflow.traceName", "mlflow.artifactLocation")
                and key in mine.info.tags
                and mine.info.tags[key] != value
            ):
                note(f"tag {key} differs", s.key)
        if mine.info.state != theirs.info.state:
            note(
                f"state {mine.info.state.value} where MLflow's is {theirs.info.state.value}", s.key
            )
        for what, t_preview, m_preview in (
            ("request_preview", theirs.info.request_preview, mine.info.request_preview),
            ("response_preview", theirs.info.response_preview, mine.info.response_preview),
        ):
            if t_preview and not (m_preview and t_preview in m_preview):
                note(f"{what} empty" if not m_preview else f"{what} lacks MLflow's text", s.key)
        # Spans: MLflow's, up to the allowed names and types, each present in tracewire's.
        mine_shape = _span_shape(mine)
        for shape in _span_shape(theirs):
            name, kind = shape.rsplit(":", 1)
            if kind == "CHAT_MODEL" and name in ("Completions", "ChatOpenAI"):
                continue  # counted below
            if name == "LangGraph":
                shape = f"{name}:AGENT"
            if shape not in mine_shape:
                note(f"span {shape} missing", s.key)
        t_calls = sum(span.span_type == "CHAT_MODEL" for span in theirs.data.spans)
        m_calls = sum(span.span_type == "CHAT_MODEL" for span in mine.data.spans)
        if m_calls < t_calls:
            note("fewer model call spans", s.key)
        for kind in ("AGENT", "CHAT_MODEL", "CHAIN"):
            for key in sorted(
                _mlflow_attribute_keys(theirs, kind) - _mlflow_attribute_keys(mine, kind)
            ):
                note(f"span attribute {key} missing on {kind} spans", s.key)
    return [f"{what}: {_keys(keys)}" for what, keys in found.items()]


def _keys(keys: list[str]) -> str:
    return "every request" if len(keys) == BURST + 1 else ", ".join(keys)


def _cell(value: Any, width: int = 70) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _rows(d: Deployment, agent: str, width: int) -> list[tuple[str, dict[str, str]]]:
    """The comparison table of one agent: field -> value per mode."""
    rows: list[tuple[str, dict[str, str]]] = []
    sample = {"context": "00", "headers": "12", "thread": "15", "bare": "18", "fail": "fail"}

    def row(name: str, fn: Any) -> None:
        values = {}
        for mode in MODES:
            served = d.served[mode, agent]
            if served.error is not None:
                values[mode] = "server did not start"
                continue
            try:
                values[mode] = _cell(fn(served), width)
            except AssertionError as error:
                values[mode] = _cell(f"({str(error).splitlines()[0]})", width)
        rows.append((name, values))

    def of(served: Served, key: str) -> Trace:
        return served.trace_of(next(s for s in served.sent if s.key == key))

    def over_all(served: Served, test: Any, failed_too: bool = True) -> str:
        found = [test(served.trace_of(s), s) for s in served.sent if failed_too or s.kind != "fail"]
        return f"{sum(found)}/{len(found)}"

    row("traces stored / requests", lambda s: f"{len(s.traces)}/{len(s.sent)}")
    row("burst of 21 (s)", lambda s: f"{s.burst_s:.2f}")
    row(
        "all stored, s after the burst (polled after every burst)",
        lambda s: "not within 60 s" if s.stored_s is None else f"{s.stored_s:.1f}",
    )
    row("exit status, s after SIGTERM to the group", lambda s: f"{s.exit_code}, {s.stop_s:.1f}")
    row(
        "server log lines naming tracewire",
        lambda s: str(sum("tracewire" in line.lower() for line in s.server.output().splitlines())),
    )
    row(
        "answers as plain MLflow's",
        lambda s: over_all(
            s,
            lambda t, x: any(
                p.key == x.key and p.answer == x.answer and p.status == x.status
                for p in d.served["plain", agent].sent
            ),
        ),
    )
    row("client_request_id (req 00)", lambda s: of(s, "00").info.client_request_id)
    row(
        "X-Request-ID echoed",
        lambda s: over_all(
            s,
            lambda t, x: (
                bool(x.response_headers.get("x-request-id"))
                and x.response_headers.get("x-request-id")
                == (x.request_id or t.info.client_request_id)
            ),
        ),
    )
    row(
        "X-Trace-ID = the trace",
        lambda s: over_all(s, lambda t, x: x.response_headers.get("x-trace-id") == t.info.trace_id),
    )
    row(
        "state (req 00 / fail)",
        lambda s: f"{of(s, '00').info.state.value} / {of(s, 'fail').info.state.value}",
    )
    row("root span (req 00)", lambda s: _span_shape(of(s, "00"))[0])
    row("spans (req 00)", lambda s: ", ".join(_span_shape(of(s, "00"))))
    row("request_preview (req 00)", lambda s: of(s, "00").info.request_preview)
    row("response_preview (req 00)", lambda s: of(s, "00").info.response_preview)
    row("request_preview (fail)", lambda s: of(s, "fail").info.request_preview)
    row(
        "mlflow.modelId",
        lambda s: over_all(
            s, lambda t, x: t.info.trace_metadata.get("mlflow.modelId") == s.model_id
        ),
    )
    row("search_traces(model_id=)", lambda s: f"{len(s.by_model)}/{len(s.sent)}")
    for kind, key in sample.items():
        row(
            f"session / user ({kind}, req {key})",
            lambda s, key=key: " / ".join(
                str(v)
                for v in (
                    _session(of(s, key).info.trace_metadata),
                    of(s, key).info.trace_metadata.get("mlflow.trace.user"),
                )
            ),
        )
    row(
        "update_current_trace tags+metadata (successful requests)",
        lambda s: over_all(
            s,
            lambda t, x: (
                t.info.tags.get("asked") == x.question
                and t.info.trace_metadata.get("agent.question") == x.question
            ),
            failed_too=False,
        ),
    )
    row(
        "tokenUsage (req 00)",
        lambda s: of(s, "00").info.trace_metadata.get("mlflow.trace.tokenUsage"),
    )
    row(
        "traces with exact usage (successful requests)",
        lambda s: over_all(
            s,
            lambda t, x: (
                json.loads(t.info.trace_metadata.get("mlflow.trace.tokenUsage") or "{}").get(
                    "total_tokens"
                )
                == (x.expected_usage(agent) or {}).get("total_tokens")
            ),
            failed_too=False,
        ),
    )
    row("cost (req 00)", lambda s: of(s, "00").info.trace_metadata.get("mlflow.trace.cost"))
    for span_type in ("AGENT", "CHAIN", "CHAT_MODEL"):
        row(
            f"{span_type} span attributes (mlflow.*, req 00)",
            lambda s, t=span_type: ", ".join(sorted(_mlflow_attribute_keys(of(s, "00"), t))),
        )
    row(
        "span events (req 00)",
        lambda s: str(sum(len(span.events) for span in of(s, "00").data.spans)),
    )
    # Every metadata key and tag any mode recorded, with its value in each mode.
    for key in ("00", "fail"):
        for what, get in (
            ("metadata", lambda t: t.info.trace_metadata),
            ("tag", lambda t: t.info.tags),
        ):
            names: set[str] = set()
            for mode in MODES:
                try:
                    names |= set(get(of(d.served[mode, agent], key)))
                except (AssertionError, StopIteration):
                    pass
            for name in sorted(names):
                row(
                    f"{what} {name} (req {key})",
                    lambda s, key=key, get=get, name=name: get(of(s, key)).get(name, "—"),
                )
    return rows


def _table(d: Deployment, agent: str, modes: tuple[str, ...] = MODES, width: int = 70) -> str:
    lines = [f"| {agent} agent | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for name, values in _rows(d, agent, width):
        lines.append(f"| {name} | " + " | ".join(values[m] for m in modes) + " |")
    return "\n".join(lines)


def _write_report(d: Deployment) -> None:
    parts = [
        "# A served ResponsesAgent's traces: plain MLflow vs tracewire",
        "",
        "Written by tests/system/serving/test_mlflow_served.py. Modes: `plain` = `mlflow models "
        "serve` alone; `run` = under `tracewire run --`; `autolog` = `tracewire.autolog()` "
        "in the model's code. All with ENABLE_MLFLOW_TRACING=true and MLFLOW_EXPERIMENT_ID. "
        f"Module: {d.total_s:.0f} s in all (logging both models {d.log_s:.1f} s; servers "
        "ready, all started at once, after "
        + ", ".join(f"{m}/{a} {s.ready_s:.1f} s" for (m, a), s in d.served.items())
        + ").",
        "",
    ]
    for agent in AGENTS:
        parts += [_table(d, agent, width=400), ""]
        for mode in ("run", "autolog"):
            plain, served = d.served["plain", agent], d.served[mode, agent]
            if plain.error or served.error:
                continue
            try:
                missing = _differences(plain, served)
            except AssertionError as error:
                missing = [f"(not comparable: {str(error).splitlines()[0]})"]
            parts.append(
                f"**{agent}, {mode}: what plain MLflow records and tracewire does "
                "not**" + ("" if missing else ": nothing")
            )
            parts += [f"- {line}" for line in missing] + [""]
    parts += ["Allowed differences (not counted above):", ""]
    parts += [f"- {what}: {why}" for what, why in ALLOWED.items()]
    REPORT.write_text("\n".join(parts) + "\n")


@pytest.mark.parametrize(("mode", "agent"), TRACEWIRE_MODES)
def test_tracewire_holds_at_least_what_mlflow_holds(
    deployment: Deployment, mode: str, agent: str
) -> None:
    """Field by field against plain MLflow on the same requests: trace metadata keys and values,
    tags, previews, state, span names and types, MLflow's span attributes, token usage and cost.
    Prints the table (-s)."""
    plain, served = deployment["plain", agent], deployment[mode, agent]
    print(f"\n{_table(deployment, agent, ('plain', mode))}\n")
    missing = _differences(plain, served)
    print(f"what plain MLflow records and tracewire ({mode}) does not:")
    print("\n".join(f"  - {line}" for line in missing) or "  nothing")
    print(f"(full report: {REPORT})")
    assert missing == []
