"""Streamed OpenAI replies: the proxies the caller iterates instead of the client's ``Stream`` /
``AsyncStream``, and the reply assembled from the chunks.

A proxy yields the chunks the caller would have seen untraced (less the usage-only chunk we
asked for on its behalf) and keeps them by reference; the span ends once, when the stream is
exhausted, closed, broken out of or garbage collected. The reply is assembled from the chunks on
the export worker (:class:`tracewire.core.spans.Deferred`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import wrapt

from tracewire.core import attributes as keys
from tracewire.core import guard, spans, usage
from tracewire.plugins.openai_call import CHAT, COMPLETIONS, RESPONSES, Call, summary

# --------------------------------------------------------------------------- assembly


def assemble_chat(chunks: list[Any]) -> dict[str, Any]:
    """A streamed chat reply in ChatCompletion shape, built from its chunks."""
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] = {"object": "chat.completion"}
    for chunk in chunks:
        for name in ("id", "model", "created", "system_fingerprint"):
            if getattr(chunk, name, None) is not None:
                head[name] = getattr(chunk, name)
        for choice in getattr(chunk, "choices", None) or []:
            out = choices.setdefault(
                choice.index,
                {
                    "index": choice.index,
                    "message": {"role": "assistant", "content": None},
                    "finish_reason": None,
                },
            )
            delta = choice.delta
            message = out["message"]
            if delta is not None and delta.content:
                message["content"] = (message["content"] or "") + delta.content
            for tool in getattr(delta, "tool_calls", None) or []:
                calls = message.setdefault("tool_calls", {})
                entry = calls.setdefault(
                    tool.index,
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if tool.id:
                    entry["id"] = tool.id
                if tool.function is not None:
                    entry["function"]["name"] += tool.function.name or ""
                    entry["function"]["arguments"] += tool.function.arguments or ""
            if choice.finish_reason:
                out["finish_reason"] = choice.finish_reason
    for out in choices.values():
        if "tool_calls" in out["message"]:
            out["message"]["tool_calls"] = [
                v for _, v in sorted(out["message"]["tool_calls"].items())
            ]
    head["choices"] = [choices[i] for i in sorted(choices)]
    return head


def assemble_text(chunks: list[Any]) -> dict[str, Any]:
    """A streamed legacy completion in Completion shape, built from its chunks."""
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
    head["choices"] = [
        {"index": i, "text": texts[i], "finish_reason": finish.get(i)} for i in sorted(texts)
    ]
    return head


def assemble_responses(events: list[Any]) -> Any:
    """A streamed Responses API reply: the response the last event carrying one holds, else
    the text of the output deltas."""
    for event in reversed(events):
        response = getattr(event, "response", None)
        if response is not None:
            return response
    return {
        "output_text": "".join(
            getattr(e, "delta", "") or ""
            for e in events
            if getattr(e, "type", None) == "response.output_text.delta"
        )
    }


def _responses_summary(events: list[Any]) -> dict[str, Any]:
    return summary(assemble_responses(events))


_ASSEMBLERS: dict[str, Callable[[list[Any]], Any]] = {
    CHAT: assemble_chat,
    COMPLETIONS: assemble_text,
    RESPONSES: assemble_responses,
}


# --------------------------------------------------------------------------- proxies


def _is_usage_chunk(chunk: Any) -> bool:
    return not getattr(chunk, "choices", True) and getattr(chunk, "usage", None) is not None


class _StreamState:
    """Chunks seen so far and the span to end once; shared by the sync and async proxies."""

    __slots__ = ("call", "done", "items", "model", "usage")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.items: list[Any] = []
        self.usage: Any = None
        self.model: Any = None  # the model that answered, as the first chunk or event says
        self.done = False

    def passes(self, item: Any) -> bool:
        """Whether the caller sees ``item``, which is recorded either way. The usage-only chunk
        we asked for on the caller's behalf is never shown: decided outside the guarded step,
        so a failure in ours can never show it."""
        if self.call.hide_usage and _is_usage_chunk(item):
            self.usage = item.usage
            return False
        guard.call(self.keep, item)
        return True

    def keep(self, item: Any) -> None:
        """Record one chunk or event."""
        call = self.call
        if self.model is None:  # a chunk has it; a Responses event has it on its response
            self.model = getattr(item, "model", None) or getattr(
                getattr(item, "response", None), "model", None
            )
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

    def end(self, error: BaseException | None = None) -> None:
        """The stream is over: ``error`` is what ended it (running out of chunks is none)."""
        if isinstance(error, (StopIteration, StopAsyncIteration)):
            error = None
        guard.call(self.finish, error)

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
        if isinstance(self.model, str):
            span.attributes[keys.GEN_AI_RESPONSE_MODEL] = self.model
        if call.capture:
            span.outputs = spans.Deferred(_ASSEMBLERS[call.kind], self.items)
        elif call.kind == RESPONSES:
            span.outputs = spans.Deferred(_responses_summary, self.items)
        span.end()


class _StreamProxy(wrapt.ObjectProxy):  # type: ignore[type-arg]
    """What both proxies share: the state, and the end of a stream the caller drops unread."""

    def __init__(self, stream: Any, call: Call) -> None:
        super().__init__(stream)
        self._self_state = _StreamState(call)

    def __del__(self) -> None:
        self._self_state.end()


class TracedStream(_StreamProxy):
    """Stands in for an ``openai.Stream``."""

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        state = self._self_state
        while True:
            try:
                item = self.__wrapped__.__next__()
            except BaseException as exc:  # StopIteration too: the stream ran out
                state.end(exc)
                raise
            if state.passes(item):
                return item

    def __enter__(self) -> Any:
        self.__wrapped__.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> Any:
        try:
            return self.__wrapped__.__exit__(*exc_info)
        finally:
            self._self_state.end()

    def close(self) -> None:
        try:
            self.__wrapped__.close()
        finally:
            self._self_state.end()


class TracedAsyncStream(_StreamProxy):
    """Stands in for an ``openai.AsyncStream``."""

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> Any:
        state = self._self_state
        while True:
            try:
                item = await self.__wrapped__.__anext__()
            except BaseException as exc:  # StopAsyncIteration too: the stream ran out
                state.end(exc)
                raise
            if state.passes(item):
                return item

    async def __aenter__(self) -> Any:
        await self.__wrapped__.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> Any:
        try:
            return await self.__wrapped__.__aexit__(*exc_info)
        finally:
            self._self_state.end()

    async def close(self) -> None:
        try:
            await self.__wrapped__.close()
        finally:
            self._self_state.end()
