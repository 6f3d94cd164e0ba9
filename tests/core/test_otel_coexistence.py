"""A user's own OpenTelemetry TracerProvider keeps working, unreplaced, beside tracewire."""

from __future__ import annotations

import openai
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tracewire
from tests.conftest import Traced


def test_users_tracer_provider_is_untouched(traced: Traced, client: openai.OpenAI) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: OpenTelemetry's own rule
    tracewire.autolog()

    assert trace.get_tracer_provider() is provider
    with trace.get_tracer("user-app").start_as_current_span("user-otel-span"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "otel"}]
        )
    assert [s.name for s in exporter.get_finished_spans()] == ["user-otel-span"]
    assert traced.trace().data.spans[0].name == "chat gpt-4o-mini"
