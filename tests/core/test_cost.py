"""Cost on every span with token usage and a known model, and the trace total: streamed chat,
embeddings and LangChain-wrapped calls against MLflow's price catalog (the SQL store prices
them when it saves them); a user override wins; an unknown model gets no cost and no error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import openai
import pytest
from langchain_openai import ChatOpenAI
from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage

import tracewire
from tests.conftest import API_KEY, Traced
from tracewire.core import attributes as keys
from tracewire.core import cost
from tracewire.testing import OpenAIServer

USER = [{"role": "user", "content": "what does it cost?"}]
OVERRIDE = {"gpt-4o-mini": {"input": 1e-06, "output": 2e-06, "cache_read_input": 5e-07}}


def priced(trace: mlflow.entities.Trace) -> list[tuple[str, dict, dict]]:
    """(model, usage, cost) of every span that has usage; cost {} where none was set."""
    return [
        (
            s.get_attribute(keys.LLM_MODEL),
            s.get_attribute(keys.CHAT_USAGE),
            s.get_attribute(keys.LLM_COST) or {},
        )
        for s in trace.data.spans
        if s.get_attribute(keys.CHAT_USAGE)
    ]


def catalog(model: str, usage: dict) -> dict:
    return calculate_cost_by_model_and_token_usage(model, usage, "openai")


def trace_cost(trace: mlflow.entities.Trace) -> dict | None:
    value = trace.info.trace_metadata.get(keys.TRACE_COST)
    return json.loads(value) if value else None


def test_streamed_chat_is_priced_from_the_catalog(traced: Traced, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    ((model, usage, span_cost),) = priced(traced.trace())
    assert model == "gpt-4o-mini" and usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert span_cost == pytest.approx(catalog(model, usage), rel=1e-12)
    assert trace_cost(traced.trace()) == pytest.approx(span_cost, rel=1e-12)


def test_embeddings_are_priced(traced: Traced, client: openai.OpenAI) -> None:
    client.embeddings.create(model="text-embedding-3-small", input=["one", "two three"])
    ((model, usage, span_cost),) = priced(traced.trace())
    assert model == "text-embedding-3-small" and usage["input_tokens"] > 0
    assert span_cost == pytest.approx(catalog(model, usage), rel=1e-12)
    assert span_cost["total_cost"] > 0 and span_cost["output_cost"] == 0
    assert trace_cost(traced.trace()) == pytest.approx(span_cost, rel=1e-12)


def test_langchain_call_is_priced_once(traced: Traced, openai_server: OpenAIServer) -> None:
    model = ChatOpenAI(
        model="gpt-4o-mini", base_url=openai_server.base_url, api_key=API_KEY, max_retries=0
    )
    assert model.invoke("price me").content
    spans = priced(traced.trace())
    assert len(spans) == 2  # ChatOpenAI's span and the OpenAI client's span under it
    for name, usage, span_cost in spans:
        assert span_cost == pytest.approx(catalog(name, usage), rel=1e-12)
    # The trace counts the call once: the inner span's cost is under the outer one's.
    assert trace_cost(traced.trace()) == pytest.approx(spans[0][2], rel=1e-12)


@pytest.mark.parametrize("traced", [{"prices": OVERRIDE}], indirect=True)
def test_user_override_wins_over_the_catalog(traced: Traced, client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    client.embeddings.create(model="text-embedding-3-small", input="not overridden")
    chat, embedding = (priced(t)[0] for t in traced.traces(expected=2))
    usage = chat[1]
    expected_input = usage["input_tokens"] * 1e-06
    expected_output = usage["output_tokens"] * 2e-06
    assert chat[2] == pytest.approx(
        {
            "input_cost": expected_input,
            "output_cost": expected_output,
            "total_cost": expected_input + expected_output,
        },
        rel=1e-12,
    )
    assert chat[2] != pytest.approx(catalog("gpt-4o-mini", usage))
    assert trace_cost(traced.traces()[0]) == pytest.approx(chat[2], rel=1e-12)
    # Models the override does not name still get the catalog's price, from the store.
    assert embedding[2] == pytest.approx(catalog(embedding[0], embedding[1]), rel=1e-12)


def test_prices_file_prices_a_private_model_and_unknown_models_get_none(
    traced: Traced, client: openai.OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('["my-finetune"]\ninput = 4e-06\noutput = 8e-06\n')
    monkeypatch.setenv("TRACEWIRE_PRICES", str(prices))
    traced.enable()
    client.chat.completions.create(model="my-finetune", messages=USER)
    client.chat.completions.create(model="nobody-prices-this", messages=USER)
    finetune, unknown = (priced(t)[0] for t in traced.traces(expected=2))
    assert finetune[2]["total_cost"] == pytest.approx(
        finetune[1]["input_tokens"] * 4e-06 + finetune[1]["output_tokens"] * 8e-06, rel=1e-12
    )
    assert unknown[0] == "nobody-prices-this" and unknown[1]["total_tokens"] > 0
    assert unknown[2] == {} and trace_cost(traced.traces()[1]) is None


def test_store_that_does_not_price_gets_catalog_cost_from_us() -> None:
    usage = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "total_tokens": 1100,
        "cache_read_input_tokens": 400,
    }
    spans = [
        {"attributes": {keys.LLM_MODEL: json.dumps(model), keys.CHAT_USAGE: json.dumps(usage)}}
        for model in ("gpt-4o-mini", "my-finetune", "unknown")
    ]
    spans.append(
        {
            "attributes": {
                keys.LLM_MODEL: json.dumps("gpt-4o"),
                keys.CHAT_USAGE: json.dumps(usage),
                keys.LLM_COST: json.dumps({"total_cost": 9}),
            }
        }
    )
    prices = cost.load(
        {"my-finetune": {"input": 1e-06, "output": 2e-06, "cache_read_input": 1e-07}}
    )
    cost.price_span_dicts(spans, prices, catalog=True)
    costs = [json.loads(s["attributes"].get(keys.LLM_COST, "null")) for s in spans]
    assert costs[0] == pytest.approx(
        calculate_cost_by_model_and_token_usage("gpt-4o-mini", usage), rel=1e-12
    )
    assert costs[1]["input_cost"] == pytest.approx(600 * 1e-06 + 400 * 1e-07, rel=1e-12)
    assert math.isclose(costs[1]["total_cost"], costs[1]["input_cost"] + 100 * 2e-06)
    assert costs[2] is None and costs[3] == {"total_cost": 9}  # unknown; a set cost is kept
    assert cost.store_prices("sqlite:///mlflow.db") and cost.store_prices("http://mlflow:5000")
    assert not cost.store_prices("databricks")


@pytest.mark.parametrize(
    "value, message",
    [
        ('{"m": {"input": 1}}', "needs 'input' and 'output'"),
        ('{"m": {"input": -1, "output": 1}}', "must be a number >= 0"),
        ('["m"]', "must map model names"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_bad_prices_name_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    path = tmp_path / "prices.json"
    path.write_text(value)
    monkeypatch.setenv("TRACEWIRE_PRICES", str(path))
    with pytest.raises(tracewire.ConfigError, match=f"TRACEWIRE_PRICES.*{message}"):
        tracewire.config.resolve()
    with pytest.raises(tracewire.ConfigError, match="argument prices"):
        tracewire.config.resolve(prices={"m": 3})


def test_tracking_server_prices_what_we_ship(tmp_path: Path) -> None:
    """Shipped to a tracking server, spans are priced by the server's store as they are saved:
    nothing to compute on our side (cost.store_prices), and nothing counted twice."""
    from tests.support.mlflow_server import MlflowServer
    from tracewire.testing.traces import Synthetic, write

    with MlflowServer(tmp_path / "server") as server:
        client = mlflow.MlflowClient(tracking_uri=server.url)
        experiment = client.create_experiment("cost-on-server")
        shipped = Synthetic(
            otel_trace_id=7,
            request_time_ms=1_700_000_000_000,
            duration_ms=10,
            input_tokens=1000,
            output_tokens=100,
        )
        write([shipped], server.url, experiment)
        trace = client.get_trace(shipped.trace_id)
    ((model, usage, span_cost),) = priced(trace)
    assert span_cost == pytest.approx(catalog(model, usage), rel=1e-12)
    assert trace_cost(trace) == pytest.approx(span_cost, rel=1e-12)


def test_cost_keys_are_mlflows() -> None:
    from mlflow.tracing.constant import CostKey, SpanAttributeKey, TraceMetadataKey

    assert (keys.INPUT_COST, keys.OUTPUT_COST, keys.TOTAL_COST) == (
        CostKey.INPUT_COST,
        CostKey.OUTPUT_COST,
        CostKey.TOTAL_COST,
    )
    assert (keys.LLM_COST, keys.TRACE_COST) == (SpanAttributeKey.LLM_COST, TraceMetadataKey.COST)
