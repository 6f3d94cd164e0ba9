"""OpenAI client plugin: chat completions (create, parse), Responses API (create, parse),
embeddings and legacy completions, sync and async (Azure clients share these classes).

Each call is one span. The wrapper runs five guarded steps (start, activate, call the original
exactly once, record, end); only the original's own exception reaches the caller, unchanged.
This module holds the request side and the wrappers; replies are recorded by
:mod:`~tracewire.plugins.openai_call` (kept by reference, serialized by the export worker),
and streams are proxied by :mod:`~tracewire.plugins.openai_streams` so the span lives until the
stream is exhausted, closed, broken out of or garbage collected.

Streamed token usage: for chat-completion streams the plugin asks every host (or those
``TRACEWIRE_STREAM_USAGE_HOSTS`` lists) for ``stream_options.include_usage`` when the caller did
not set ``stream_options`` itself, and hides the one extra usage-only chunk, so the caller sees the
chunks it would have seen untraced. The one visible difference: the server then also sends
``"usage": null`` on every chunk, so ``chunk.to_json()`` shows that field. A server that rejects
the argument (HTTP 400 or 422 whose body names ``stream_options``) gets the caller's own request
once more, exactly as the caller made it, within the same span; its host and port are remembered
for the process (never asked again) with one log line. The caller sees only the second answer.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import wrapt

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import guard, scrub, span_context
from tracewire.core.attributes import SpanType
from tracewire.plugins.base import WrappingPlugin
from tracewire.plugins.openai_call import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    Call,
    end_with_raw_reply,
    end_with_reply,
)
from tracewire.plugins.openai_streams import TracedAsyncStream, TracedStream

if TYPE_CHECKING:
    from openai import APIStatusError

_SPAN_TYPES = {
    CHAT: SpanType.CHAT_MODEL,
    RESPONSES: SpanType.CHAT_MODEL,
    EMBEDDINGS: SpanType.EMBEDDING,
    COMPLETIONS: SpanType.LLM,
}

# (module, classes, methods, kind); a method the installed client lacks is skipped.
_TARGETS = (
    (
        "openai.resources.chat.completions",
        ("Completions", "AsyncCompletions"),
        ("create", "parse"),
        CHAT,
    ),
    ("openai.resources.responses", ("Responses", "AsyncResponses"), ("create", "parse"), RESPONSES),
    ("openai.resources.embeddings", ("Embeddings", "AsyncEmbeddings"), ("create",), EMBEDDINGS),
    ("openai.resources.completions", ("Completions", "AsyncCompletions"), ("create",), COMPLETIONS),
)

# Never recorded: headers can carry API keys or bearer tokens.
_SECRET_ARGS = frozenset({"extra_headers"})
# Prompt and completion text, dropped entirely with capture_content=False.
_CONTENT_ARGS = frozenset(
    {
        "messages",
        "input",
        "prompt",
        "instructions",
        "tools",
        "functions",
        "extra_body",
        "prediction",
        "suffix",
        "response_format",
        "text",
    }
)


logger = logging.getLogger("tracewire")

# (host, port) of servers that rejected `stream_options`: never asked again in this process.
_refusing: set[tuple[str | None, int | None]] = set()
_refusing_lock = threading.Lock()
# The header `.with_streaming_response` sets: the caller reads the raw body itself.
_RAW_HEADER = "X-Stainless-Raw-Response"


# --------------------------------------------------------------------------- request side


def _provider(instance: Any) -> tuple[str, str | None, int | None]:
    """Provider name, host and port. Never the full base URL: it can carry credentials."""
    client = getattr(instance, "_client", None)
    name = "azure" if type(client).__name__.startswith("Azure") else "openai"
    url = getattr(client, "base_url", None)
    return name, getattr(url, "host", None) or None, getattr(url, "port", None)


def _host_matches(host: str, entry: str) -> bool:
    # An entry starting with "." matches every subdomain (".openai.azure.com").
    return entry == "*" or host == entry or (entry.startswith(".") and host.endswith(entry))


def _usage_host_allowed(host: str | None, entries: tuple[str, ...]) -> bool:
    """Whether chat streams to ``host`` are asked for usage (config.Settings.stream_usage_hosts:
    ``!host`` entries win)."""
    if not host:
        return False
    if entries == ("*",):
        return True
    allowed = False
    for entry in entries:
        if entry[0] == "!":
            if _host_matches(host, entry[1:]):
                return False
        elif not allowed:
            allowed = _host_matches(host, entry)
    return allowed


def _caller_sets_stream_options(kwargs: dict[str, Any]) -> bool:
    """The caller chose its stream options (an argument, or in ``extra_body``, which wins in the
    body the client sends) or reads the raw body itself (``.with_streaming_response``): then
    the request is sent as it is. ``omit``/``NOT_GIVEN`` (falsy sentinels, what ``.stream()``
    passes) and ``None`` count as not set."""
    options = kwargs.get("stream_options")
    if options is not None and (options or isinstance(options, dict)):
        return True
    extra_body = kwargs.get("extra_body")
    if isinstance(extra_body, dict) and "stream_options" in extra_body:
        return True
    headers = kwargs.get("extra_headers")
    return isinstance(headers, dict) and headers.get(_RAW_HEADER) == "stream"


def _inputs(kwargs: dict[str, Any], capture: bool) -> dict[str, Any]:
    drop = _SECRET_ARGS if capture else _SECRET_ARGS | _CONTENT_ARGS
    inputs = {k: v for k, v in kwargs.items() if k not in drop}
    if "extra_query" in inputs:  # a query string can carry an API key (`?api-key=`, `?sig=`)
        inputs["extra_query"] = scrub.params(inputs["extra_query"])
    # Callers often append the reply to their message list afterwards: keep the list as sent.
    for name in ("messages", "input"):
        if isinstance(inputs.get(name), list):
            inputs[name] = list(inputs[name])
    return inputs


def _start(kind: str, instance: Any, kwargs: dict[str, Any]) -> Call:
    settings = config.active()
    capture = settings.capture_content
    model = kwargs.get("model")
    provider, host, port = _provider(instance)
    attributes: dict[str, Any] = {
        keys.LLM_PROVIDER: provider,
        keys.GEN_AI_OPERATION: kind,
        keys.MESSAGE_FORMAT: "openai",
    }
    if isinstance(model, str):
        attributes[keys.LLM_MODEL] = model
        attributes[keys.GEN_AI_REQUEST_MODEL] = model
    if host:
        attributes[keys.SERVER_ADDRESS] = host
    if port:
        attributes[keys.SERVER_PORT] = port
    tools = kwargs.get("tools")
    if capture and isinstance(tools, list) and tools:
        attributes[keys.CHAT_TOOLS] = list(tools)
    name = f"{kind} {model}" if isinstance(model, str) else kind
    span = span_context.start_span(name, _SPAN_TYPES[kind], _inputs(kwargs, capture), attributes)

    stream = kwargs.get("stream") is True
    if (
        stream
        and kind == CHAT
        and settings.stream_usage
        and (host, port) not in _refusing
        and _usage_host_allowed(host, settings.stream_usage_hosts)
        and not _caller_sets_stream_options(kwargs)
    ):
        kwargs = {**kwargs, "stream_options": {"include_usage": True}}
        return Call(span, kwargs, kind, stream, True, capture, (host, port))
    return Call(span, kwargs, kind, stream, False, capture)


# --------------------------------------------------------------------------- delivery


@functools.cache
def _result_types() -> tuple[type, type, type]:
    from openai import AsyncStream, Stream
    from openai._legacy_response import LegacyAPIResponse

    return LegacyAPIResponse, Stream, AsyncStream


def _deliver(call: Call, result: Any) -> Any:
    """What the caller gets: the result itself, or a proxy for a stream (the span then ends
    with the stream). Not a guarded step on purpose: it only checks types and builds proxies, so
    that no failure of ours can hand the caller a stream that shows our injected usage chunk."""
    LegacyAPIResponse, Stream, AsyncStream = _result_types()
    if isinstance(result, LegacyAPIResponse):  # `.with_raw_response.create(...)`
        if call.stream:
            return _RawResponse(result, call)
        guard.call(end_with_raw_reply, call, result)
    elif isinstance(result, Stream):
        return TracedStream(result, call)
    elif isinstance(result, AsyncStream):
        return TracedAsyncStream(result, call)
    else:  # a parsed reply, or `.with_streaming_response` whose body is the caller's to read
        guard.call(end_with_reply, call, result)
    return result


@functools.cache
def _status_error() -> type[APIStatusError]:
    from openai import APIStatusError

    return APIStatusError


def _usage_refused(call: Call, error: Exception, request: dict[str, Any]) -> bool:
    """Whether ``error`` is the server rejecting the ``stream_options`` we added: then the caller's
    own ``request`` is to be sent instead, once (it becomes ``call.kwargs``). Guarded: a failure
    here reads as "no", and the caller gets its own error unchanged."""
    if (
        not call.hide_usage
        or not isinstance(error, _status_error())
        or error.status_code not in (400, 422)
    ):
        return False
    body = error.body
    if "stream_options" not in error.message and "stream_options" not in (
        body if isinstance(body, str) else repr(body)
    ):
        return False
    call.hide_usage = False  # the retry is the caller's request: nothing of ours to hide
    call.kwargs = request
    guard.call(_remember_refusal, call)
    return True


def _remember_refusal(call: Call) -> None:
    """Never ask this server again in this process; say so once. No error text: it can echo
    request content."""
    with _refusing_lock:
        if call.server in _refusing:
            return
        _refusing.add(call.server)
    host, port = call.server
    logger.warning(
        "tracewire: %s rejected stream_options.include_usage; streamed chat calls to it are sent "
        "without it for the rest of this process, so they record no token usage (set "
        "TRACEWIRE_STREAM_USAGE_HOSTS=!%s to skip the first try)",
        f"{host}:{port}" if port else host,
        host,
    )


class _RawResponse(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """`.with_raw_response.create(stream=True)`: the stream appears at `.parse()`."""

    def __init__(self, raw: Any, call: Call) -> None:
        super().__init__(raw)
        self._self_call = call
        self._self_stream: Any = None

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        if self._self_stream is None:
            self._self_stream = _deliver(self._self_call, self.__wrapped__.parse(*args, **kwargs))
        return self._self_stream

    def __del__(self) -> None:
        if self._self_stream is None:  # never parsed: the stream was never read
            guard.call(self._self_call.span.end)


# --------------------------------------------------------------------------- wrappers


def _sync_wrapper(kind: str) -> Callable[..., Any]:
    def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = guard.call(_start, kind, instance, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        with call:
            while True:  # twice at most: see _usage_refused
                try:
                    result = wrapped(*args, **call.kwargs)
                    break
                except Exception as exc:
                    if not guard.call(_usage_refused, call, exc, kwargs):
                        raise
        return _deliver(call, result)

    return wrapper


def _async_wrapper(kind: str) -> Callable[..., Any]:
    async def wrapper(
        wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        call = guard.call(_start, kind, instance, kwargs)
        if call is None:
            return await wrapped(*args, **kwargs)
        with call:
            while True:  # twice at most: see _usage_refused
                try:
                    result = await wrapped(*args, **call.kwargs)
                    break
                except Exception as exc:
                    if not guard.call(_usage_refused, call, exc, kwargs):
                        raise
        return _deliver(call, result)

    return wrapper


class OpenAIPlugin(WrappingPlugin):
    name = "openai"
    module = "openai"
    distribution = "openai"
    extra = "openai"
    supported = ("1.40", "4")
    mlflow_flavor = "openai"

    def targets(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        found = []
        for module_name, classes, methods, kind in _TARGETS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for class_name in classes:
                owner = getattr(module, class_name, None)
                make = _async_wrapper if class_name.startswith("Async") else _sync_wrapper
                for method in methods:
                    if owner is not None and method in vars(owner):
                        found.append((owner, method, make(kind)))
        return found
