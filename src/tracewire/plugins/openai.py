"""OpenAI client plugin: chat completions (create, parse), Responses API (create, parse),
embeddings and legacy completions, sync and async (Azure clients share these classes).

Each call is one span. The wrapper runs five guarded steps (start, activate, call the original
exactly once, record, end); only the original's own exception reaches the caller, unchanged.
Responses are kept by reference and serialized by the export worker; streams are proxied so the
span lives until the stream is exhausted, closed, broken out of or garbage collected, and their
reply is assembled from the chunks on the worker.

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
from typing import Any, Callable

import wrapt

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import guard, scrub, spans, usage
from tracewire.core.attributes import SpanType
from tracewire.plugins.base import WrappingPlugin

CHAT, RESPONSES, EMBEDDINGS, COMPLETIONS = "chat", "responses", "embeddings", "text_completion"

_SPAN_TYPES = {CHAT: SpanType.CHAT_MODEL, RESPONSES: SpanType.CHAT_MODEL,
               EMBEDDINGS: SpanType.EMBEDDING, COMPLETIONS: SpanType.LLM}

# (module, classes, methods, kind); a method the installed client lacks is skipped.
_TARGETS = (
    ("openai.resources.chat.completions", ("Completions", "AsyncCompletions"), ("create", "parse"), CHAT),
    ("openai.resources.responses", ("Responses", "AsyncResponses"), ("create", "parse"), RESPONSES),
    ("openai.resources.embeddings", ("Embeddings", "AsyncEmbeddings"), ("create",), EMBEDDINGS),
    ("openai.resources.completions", ("Completions", "AsyncCompletions"), ("create",), COMPLETIONS),
)

# Never recorded: headers can carry API keys or bearer tokens.
_SECRET_ARGS = frozenset({"extra_headers"})
# Prompt and completion text, dropped entirely with capture_content=False.
_CONTENT_ARGS = frozenset({"messages", "input", "prompt", "instructions", "tools", "functions",
                           "extra_body", "prediction", "suffix", "response_format", "text"})


logger = logging.getLogger("tracewire")

# (host, port) of servers that rejected `stream_options`: never asked again in this process.
_refusing: set[tuple[str | None, int | None]] = set()
_refusing_lock = threading.Lock()
# The header `.with_streaming_response` sets: the caller reads the raw body itself.
_RAW_HEADER = "X-Stainless-Raw-Response"


class _Call:
    """What one traced call carries from its start to its end."""

    __slots__ = ("span", "kwargs", "kind", "stream", "hide_usage", "capture", "server")

    def __init__(self, span: spans.Span, kwargs: dict[str, Any], kind: str, stream: bool,
                 hide_usage: bool, capture: bool,
                 server: tuple[str | None, int | None] = (None, None)) -> None:
        self.span = span
        # What is sent: the caller's arguments, or a copy with stream_options added.
        self.kwargs = kwargs
        self.kind = kind
        self.stream = stream
        self.hide_usage = hide_usage
        self.capture = capture
        self.server = server


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


def _start(kind: str, instance: Any, kwargs: dict[str, Any]) -> _Call:
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
    span = spans.start_span(name, _SPAN_TYPES[kind], _inputs(kwargs, capture), attributes)

    stream = kwargs.get("stream") is True
    if stream and kind == CHAT and settings.stream_usage and (host, port) not in _refusing \
            and _usage_host_allowed(host, settings.stream_usage_hosts) \
            and not _caller_sets_stream_options(kwargs):
        kwargs = {**kwargs, "stream_options": {"include_usage": True}}
        return _Call(span, kwargs, kind, stream, True, capture, (host, port))
    return _Call(span, kwargs, kind, stream, False, capture)


# --------------------------------------------------------------------------- response side


def _summary(response: Any) -> dict[str, Any]:
    """A reply without any content: what capture_content=False records."""
    out: dict[str, Any] = {}
    for name in ("id", "model", "status"):
        value = getattr(response, name, None)
        if value is not None:
            out[name] = value
    choices = getattr(response, "choices", None)
    if choices:
        out["finish_reasons"] = [getattr(c, "finish_reason", None) for c in choices]
    return out


def _embedding_summary(response: Any) -> dict[str, Any]:
    # Vectors are never recorded: they are large and say nothing a trace reader needs.
    data = getattr(response, "data", None) or []
    first = getattr(data[0], "embedding", None) if data else None
    return {"model": getattr(response, "model", None), "count": len(data),
            "dimensions": len(first) if isinstance(first, list) else None}


def _record(call: _Call, response: Any, response_usage: Any) -> None:
    span = call.span
    if (token_usage := usage.from_openai(response_usage)) is not None:
        span.attributes[keys.CHAT_USAGE] = token_usage
    model = getattr(response, "model", None)
    if isinstance(model, str):
        span.attributes[keys.GEN_AI_RESPONSE_MODEL] = model
    if call.kind == EMBEDDINGS:
        span.outputs = spans.Deferred(_embedding_summary, response)
    elif call.capture:
        span.outputs = response
    else:
        span.outputs = spans.Deferred(_summary, response)
    status = getattr(response, "status", None)
    if call.kind == RESPONSES and status == "failed":
        error = getattr(response, "error", None)
        span.record_error(RuntimeError(f"response failed: {getattr(error, 'message', error)}"))


def _end(call: _Call, response: Any) -> None:
    if hasattr(response, "model_dump"):
        _record(call, response, getattr(response, "usage", None))
    call.span.end()


def _end_raw(call: _Call, raw: Any) -> None:
    _end(call, raw.parse())  # cached: the caller's own .parse() returns this same object


@functools.cache
def _result_types() -> tuple[type, type, type]:
    from openai import AsyncStream, Stream
    from openai._legacy_response import LegacyAPIResponse

    return LegacyAPIResponse, Stream, AsyncStream


def _deliver(call: _Call, result: Any) -> Any:
    """What the caller gets: the result itself, or a proxy for a stream (the span then ends
    with the stream). Not a guarded step on purpose: it only checks types and builds proxies, so
    that no failure of ours can hand the caller a stream that shows our injected usage chunk."""
    LegacyAPIResponse, Stream, AsyncStream = _result_types()
    if isinstance(result, LegacyAPIResponse):  # `.with_raw_response.create(...)`
        if call.stream:
            return _RawResponse(result, call)
        guard.call(_end_raw, call, result)
    elif isinstance(result, Stream):
        return _SyncStream(result, call)
    elif isinstance(result, AsyncStream):
        return _AsyncStream(result, call)
    else:  # a parsed reply, or `.with_streaming_response` whose body is the caller's to read
        guard.call(_end, call, result)
    return result


def _fail(call: _Call, error: BaseException) -> None:
    call.span.record_error(error)
    call.span.end()


@functools.cache
def _status_error() -> type:
    from openai import APIStatusError

    return APIStatusError  # type: ignore[no-any-return]


def _usage_refused(call: _Call, error: Exception) -> bool:
    """Whether ``error`` is the server rejecting the ``stream_options`` we added: then the caller's
    own request is sent instead. Guarded: a failure here reads as "no", and the caller gets its
    own error unchanged."""
    if not call.hide_usage or not isinstance(error, _status_error()) \
            or error.status_code not in (400, 422):
        return False
    body = error.body
    if "stream_options" not in error.message and "stream_options" not in (
            body if isinstance(body, str) else repr(body)):
        return False
    call.hide_usage = False  # the retry is the caller's request: nothing of ours to hide
    return True


def _remember_refusal(call: _Call) -> None:
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
        f"{host}:{port}" if port else host, host)


# --------------------------------------------------------------------------- streams


def _is_usage_chunk(chunk: Any) -> bool:
    return not getattr(chunk, "choices", True) and getattr(chunk, "usage", None) is not None


def _assemble_chat(chunks: list[Any]) -> dict[str, Any]:
    """A streamed chat reply in ChatCompletion shape, built from its chunks (worker side)."""
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {"object": "chat.completion"}
    for chunk in chunks:
        for name in ("id", "model", "created", "system_fingerprint"):
            if getattr(chunk, name, None) is not None:
                head[name] = getattr(chunk, name)
        for choice in getattr(chunk, "choices", None) or []:
            out = choices.setdefault(choice.index, {"index": choice.index, "message": {
                "role": "assistant", "content": None}, "finish_reason": None})
            delta = choice.delta
            message = out["message"]
            if delta is not None and delta.content:
                message["content"] = (message["content"] or "") + delta.content
            for tool in (getattr(delta, "tool_calls", None) or []):
                calls = message.setdefault("tool_calls", {})
                entry = calls.setdefault(tool.index, {"id": None, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                if tool.id:
                    entry["id"] = tool.id
                if tool.function is not None:
                    entry["function"]["name"] += tool.function.name or ""
                    entry["function"]["arguments"] += tool.function.arguments or ""
            if choice.finish_reason:
                out["finish_reason"] = choice.finish_reason
    for out in choices.values():
        if "tool_calls" in out["message"]:
            out["message"]["tool_calls"] = [v for _, v in sorted(out["message"]["tool_calls"].items())]
    head["choices"] = [choices[i] for i in sorted(choices)]
    return head


def _assemble_text(chunks: list[Any]) -> dict[str, Any]:
    texts: dict[int, str] = {}
    finish: dict[int, Any] = {}
    head: dict[str, Any] = {"object": "text_completion"}
    for chunk in chunks:
        for name in ("id", "model"):
            if getattr(chunk, name, None) is not None:
                head[name] = getattr(chunk, name)
        for choice in getattr(chunk, "choices", None) or []:
            texts[choice.index] = texts.get(choice.index, "") + (choice.text or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    head["choices"] = [{"index": i, "text": texts[i], "finish_reason": finish.get(i)}
                       for i in sorted(texts)]
    return head


def _assemble_responses(events: list[Any]) -> Any:
    for event in reversed(events):
        response = getattr(event, "response", None)
        if response is not None:
            return response
    return {"output_text": "".join(getattr(e, "delta", "") or "" for e in events
                                   if getattr(e, "type", None) == "response.output_text.delta")}


class _StreamState:
    """Chunks seen so far and the span to end once; shared by the sync and async proxies."""

    __slots__ = ("call", "items", "usage", "done")

    def hidden(self, item: Any) -> bool:
        """The usage-only chunk we asked for on the caller's behalf: recorded, never yielded.
        Decided outside the guarded steps, so a failure in ours can never show it."""
        if self.call.hide_usage and _is_usage_chunk(item):
            self.usage = item.usage
            return True
        return False

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.items: list[Any] = []
        self.usage: Any = None
        self.done = False

    def keep(self, item: Any) -> None:
        """Record one chunk or event."""
        call = self.call
        if call.kind == RESPONSES:
            kind = getattr(item, "type", None)
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.usage = getattr(getattr(item, "response", None), "usage", None)
                if kind == "response.failed":
                    call.span.record_error(RuntimeError("response.failed event"))
            elif kind == "error":
                call.span.record_error(RuntimeError(f"error event: {getattr(item, 'message', '')}"))
        elif getattr(item, "usage", None) is not None:
            self.usage = item.usage
        if call.capture or call.kind == RESPONSES:
            self.items.append(item)

    def finish(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        call = self.call
        span = call.span
        if error is not None:
            span.record_error(error)
        if (token_usage := usage.from_openai(self.usage)) is not None:
            span.attributes[keys.CHAT_USAGE] = token_usage
        if call.capture:
            assemble: Callable[[list[Any]], Any] = {
                CHAT: _assemble_chat, COMPLETIONS: _assemble_text,
                RESPONSES: _assemble_responses}[call.kind]
            span.outputs = spans.Deferred(assemble, self.items)
        elif call.kind == RESPONSES:
            span.outputs = spans.Deferred(lambda items: _summary(_assemble_responses(items)),
                                          self.items)
        span.end()


class _SyncStream(wrapt.ObjectProxy):  # type: ignore[misc]
    def __init__(self, stream: Any, call: _Call) -> None:
        super().__init__(stream)
        self._self_state = _StreamState(call)

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        state = self._self_state
        while True:
            try:
                item = self.__wrapped__.__next__()
            except StopIteration:
                guard.call(state.finish, None)
                raise
            except BaseException as exc:
                guard.call(state.finish, exc)
                raise
            if not state.hidden(item):
                guard.call(state.keep, item)
                return item

    def __enter__(self) -> Any:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        try:
            return self.__wrapped__.__exit__(*exc_info)
        finally:
            guard.call(self._self_state.finish, None)

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            guard.call(self._self_state.finish, None)

    def __del__(self) -> None:
        guard.call(self._self_state.finish, None)


class _AsyncStream(wrapt.ObjectProxy):  # type: ignore[misc]
    def __init__(self, stream: Any, call: _Call) -> None:
        super().__init__(stream)
        self._self_state = _StreamState(call)

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        state = self._self_state
        while True:
            try:
                item = await self.__wrapped__.__anext__()
            except StopAsyncIteration:
                guard.call(state.finish, None)
                raise
            except BaseException as exc:
                guard.call(state.finish, exc)
                raise
            if not state.hidden(item):
                guard.call(state.keep, item)
                return item

    async def __aenter__(self) -> Any:
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        try:
            return await self.__wrapped__.__aexit__(*exc_info)
        finally:
            guard.call(self._self_state.finish, None)

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            guard.call(self._self_state.finish, None)

    def __del__(self) -> None:
        guard.call(self._self_state.finish, None)


class _RawResponse(wrapt.ObjectProxy):  # type: ignore[misc]
    """`.with_raw_response.create(stream=True)`: the stream appears at `.parse()`."""

    def __init__(self, raw: Any, call: _Call) -> None:
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

# Stands for "the server rejected our stream_options; send the caller's request".
_REFUSED = object()


def _sync_wrapper(kind: str) -> Callable[..., Any]:
    def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        call = guard.call(_start, kind, instance, kwargs)
        if call is None:
            return wrapped(*args, **kwargs)
        tokens = guard.call(spans.activate, call.span)
        try:
            try:
                result = wrapped(*args, **call.kwargs)
            except Exception as exc:
                if not guard.call(_usage_refused, call, exc):
                    raise
                guard.call(_remember_refusal, call)
                result = _REFUSED
            if result is _REFUSED:  # outside the except: the rejection is no __context__
                result = wrapped(*args, **kwargs)
        except BaseException as exc:
            guard.call(_fail, call, exc)
            raise
        finally:
            if tokens is not None:
                guard.call(spans.deactivate, tokens)
        return _deliver(call, result)

    return wrapper


def _async_wrapper(kind: str) -> Callable[..., Any]:
    async def wrapper(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
        call = guard.call(_start, kind, instance, kwargs)
        if call is None:
            return await wrapped(*args, **kwargs)
        tokens = guard.call(spans.activate, call.span)
        try:
            try:
                result = await wrapped(*args, **call.kwargs)
            except Exception as exc:
                if not guard.call(_usage_refused, call, exc):
                    raise
                guard.call(_remember_refusal, call)
                result = _REFUSED
            if result is _REFUSED:  # outside the except: the rejection is no __context__
                result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            guard.call(_fail, call, exc)
            raise
        finally:
            if tokens is not None:
                guard.call(spans.deactivate, tokens)
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

