"""export/encode.py: a span's values are written as MLflow's own encoder writes them, whatever
they hold, and reading them never consumes or changes what the app passed.

The fast path (orjson, with MLflow's encoder for what it has no form of) must agree with
``mlflow.tracing.utils.dump_span_attribute_value`` value for value, but for one: an ``Enum`` is
written as its value (MLflow writes ``str()``: ``"Colour.RED"``). What it cannot take (an int past
64 bits, a lone surrogate, a circular value) goes the slow way, and the trace is kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import uuid
from typing import Any

import openai
import pydantic
import pytest
from mlflow.tracing.utils import dump_span_attribute_value

from tracewire import config
from tracewire.core import span_context, spans
from tracewire.export import encode, hooks


@dataclasses.dataclass
class Order:
    item: str
    placed: datetime.datetime


class Reply(pydantic.BaseModel):
    text: str
    order: Order | None = None
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)


class Colour(enum.Enum):
    RED = "red"


class Opaque:
    def __str__(self) -> str:
        return "opaque thing"


WHEN = datetime.datetime(2026, 12, 5, 8, 30, tzinfo=datetime.UTC)
VALUES: dict[str, Any] = {
    "plain": {"messages": [{"role": "user", "content": "héllo"}], "n": 2, "t": 0.1},
    "pydantic": Reply(text="hi", order=Order("book", WHEN)),
    "openai reply": openai.types.CreateEmbeddingResponse.model_validate(
        {
            "object": "list",
            "data": [],
            "model": "m",
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    ),
    "dataclass": Order("book", WHEN),
    "datetime": WHEN,
    "uuid": uuid.UUID(int=7),
    "object": Opaque(),
    "int keys": {1: "a", None: "b"},
    "big int": 2**70,
    "set": {"only"},
    "tuple": ("a", 1),
    "bytes": b"raw",
}


def _spooled(inputs: Any) -> Any:
    span = span_context.start_span("work", "CHAIN", inputs=inputs)
    span.end()
    _, payload = encode.encode(hooks.Item(ours=span.trace), config.resolve())
    return json.loads(payload)["groups"][0][2][0]["inputs"]


def _spooled_inputs(value: Any) -> Any:
    return _spooled({"value": value})["value"]


@pytest.mark.parametrize("name", list(VALUES))
def test_values_are_written_as_mlflow_writes_them(name: str) -> None:
    value = VALUES[name]
    assert _spooled_inputs(value) == json.loads(dump_span_attribute_value(value))


def test_an_enum_is_written_as_its_value() -> None:
    assert _spooled_inputs(Colour.RED) == "red"


def test_an_iterator_is_never_consumed() -> None:
    taken: list[int] = []

    def numbers() -> Any:
        for n in range(3):
            taken.append(n)
            yield n

    generator = numbers()
    recorded = _spooled_inputs(generator)
    assert taken == [] and list(generator) == [0, 1, 2]
    assert recorded.startswith("<generator object")


def test_a_circular_value_is_kept_in_mlflow_s_fallback() -> None:
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = loop
    inputs = {"value": loop}
    assert _spooled(inputs) == json.loads(dump_span_attribute_value(inputs))


def test_a_model_pydantic_would_warn_about_is_written_without_a_warning(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # What `client.chat.completions.parse` returns: a field typed one way holding another.
    odd = Reply.model_construct(text=Order("book", WHEN))
    assert _spooled_inputs(odd)["text"]["item"] == "book"
    assert not [w for w in recwarn if "serializer" in str(w.message)]


def test_a_value_written_on_the_caller_s_thread_is_spooled_as_that_json() -> None:
    written = spans.Serialized('{"reply": "héllo", "n": [1, 2]}'.encode())
    assert _spooled_inputs(written) == {"reply": "héllo", "n": [1, 2]}
    loop: dict[str, Any] = {}
    loop["self"] = loop  # the inputs send the whole trace the slow way
    span = span_context.start_span("chat", "CHAT_MODEL", inputs=loop)
    span.outputs = written
    span.end()
    _, payload = encode.encode(hooks.Item(ours=span.trace), config.resolve())
    assert json.loads(payload)["groups"][0][2][0]["outputs"] == {"reply": "héllo", "n": [1, 2]}
