"""Cost of model calls, in MLflow's shape (``mlflow.llm.cost``: input/output/total USD).

Who prices a span, so that the two never disagree or count twice:

- MLflow's SQL store prices every span that has token usage and a model when it saves it
  (``translate_span_when_storing``, MLflow's built-in price catalog), and sums the trace's
  ``mlflow.trace.cost`` from the span costs. A tracking server saves through that same store.
  It keeps a cost a span already carries. So by default tracewire sets no cost at all.
- A user override (``TRACEWIRE_PRICES`` file or ``autolog(prices=...)``) for private or
  fine-tuned models: tracewire prices those spans itself, before they are spooled; the store
  then keeps that cost and sums it with the ones it computed.
- Stores that do not price when saving (Databricks, SageMaker: MLflow's
  ``should_compute_cost_client_side``): tracewire prices every span with MLflow's own
  cost function, and sets the trace total.

A model neither the override nor the catalog knows gets no cost, and no error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracewire.core import attributes as keys


@dataclass(frozen=True)
class Price:
    """USD per token."""

    input: float
    output: float
    cache_read_input: float | None = None  # cached prompt tokens, if billed differently


class PriceError(ValueError):
    """A price override cannot be used; config turns this into a ConfigError naming it."""


def _price(model: str, value: Any) -> Price:
    if isinstance(value, Price):
        return value
    if not isinstance(value, Mapping):
        raise PriceError(
            f"the price of {model!r} must be a table of USD per token "
            f"(input, output[, cache_read_input]), got {value!r}"
        )
    unknown = set(value) - {"input", "output", "cache_read_input"}
    if unknown or "input" not in value or "output" not in value:
        raise PriceError(
            f"the price of {model!r} needs 'input' and 'output' (USD per token) "
            f"and may have 'cache_read_input'; got keys {sorted(value)}"
        )
    numbers = {}
    for name, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise PriceError(
                f"{model!r} {name} must be a number >= 0 (USD per token), got {number!r}"
            )
        numbers[name] = float(number)
    return Price(**numbers)


def load(source: Mapping[str, Any] | str | Path) -> dict[str, Price]:
    """Prices by model name from a mapping, or a ``.json`` / ``.toml`` file of the same shape::

    {"my-finetune": {"input": 3e-06, "output": 1.2e-05, "cache_read_input": 1.5e-06}}
    """
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise PriceError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data: Any = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as exc:
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            raise PriceError(f"{str(path)!r} is not valid {kind}: {exc}") from None
    else:
        data = source
    if not isinstance(data, Mapping):
        raise PriceError(f"prices must map model names to prices, got {type(data).__name__}")
    return {str(model): _price(str(model), value) for model, value in data.items()}


def _override(price: Price, usage: Mapping[str, int]) -> dict[str, float]:
    prompt = usage.get(keys.INPUT_TOKENS, 0) or 0
    cached = usage.get(keys.CACHE_READ_INPUT_TOKENS, 0) or 0
    if price.cache_read_input is not None and cached:
        input_cost = (prompt - cached) * price.input + cached * price.cache_read_input
    else:
        input_cost = prompt * price.input
    output_cost = (usage.get(keys.OUTPUT_TOKENS, 0) or 0) * price.output
    return {
        keys.INPUT_COST: input_cost,
        keys.OUTPUT_COST: output_cost,
        keys.TOTAL_COST: input_cost + output_cost,
    }


def store_prices(tracking_uri: str) -> bool:
    """Whether the store at ``tracking_uri`` prices spans when it saves them."""
    from mlflow.utils.uri import is_databricks_uri, is_sagemaker_mlflow_tracking_uri

    return not (
        is_databricks_uri(tracking_uri)  # type: ignore[no-untyped-call]
        or is_sagemaker_mlflow_tracking_uri(tracking_uri)
    )


def span_cost(
    model: str,
    usage: Mapping[str, int],
    prices: Mapping[str, Price],
    catalog: bool,
    provider: str | None = None,
) -> dict[str, float] | None:
    """The cost of one call: the override's price for ``model`` if any, else (when ``catalog``)
    MLflow's built-in price; None for a model neither knows."""
    if (price := prices.get(model)) is not None:
        return _override(price, usage)
    if catalog:
        from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage

        return calculate_cost_by_model_and_token_usage(model, dict(usage), provider)
    return None


def price_span_dicts(
    span_dicts: list[dict[str, Any]], prices: Mapping[str, Price], catalog: bool
) -> None:
    """Set ``mlflow.llm.cost`` on spans (span dicts, attribute values as JSON text) that carry
    token usage and a model we are to price: overridden models, or every model when
    ``catalog`` (a store that does not price). A cost already set is kept."""
    if not prices and not catalog:
        return
    for data in span_dicts:
        attributes = data["attributes"]
        if (
            keys.LLM_COST in attributes
            or keys.CHAT_USAGE not in attributes
            or keys.LLM_MODEL not in attributes
        ):
            continue
        model = json.loads(attributes[keys.LLM_MODEL])
        if not isinstance(model, str) or not (catalog or model in prices):
            continue
        usage = json.loads(attributes[keys.CHAT_USAGE])
        provider = (
            json.loads(attributes[keys.LLM_PROVIDER]) if (keys.LLM_PROVIDER in attributes) else None
        )
        if isinstance(usage, dict) and (cost := span_cost(model, usage, prices, catalog, provider)):
            attributes[keys.LLM_COST] = json.dumps(cost)
