"""langchain-core's own fake chat model, made to carry what real providers return: token usage
(``usage_metadata``) and tool calls, in ``invoke`` and in streams, plus ``bind_tools``."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool


def reply(
    text: str = "",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    input_tokens: int = 10,
    output_tokens: int = 5,
) -> AIMessage:
    return AIMessage(
        content=text,
        tool_calls=tool_calls or [],
        usage_metadata={
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    )


class FakeChat(GenericFakeChatModel):
    """Replies with the scripted messages in turn (cycling), usage and tool calls included."""

    @classmethod
    def scripted(cls, *replies: AIMessage) -> FakeChat:
        return cls(messages=itertools.cycle(replies))

    def _stream(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> Iterator[ChatGenerationChunk]:
        message = self._generate(messages, stop, run_manager, **kwargs).generations[0].message
        for token in re.split(r"(\s)", message.content) if message.content else []:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=token, id=message.id))
            if run_manager:
                run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                id=message.id,
                usage_metadata=message.usage_metadata,
                chunk_position="last",
                tool_call_chunks=[
                    {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                    for i, c in enumerate(message.tool_calls)
                ],
            )
        )

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)


class ToolThenAnswer(FakeChat):
    """An agent's model: calls ``capital`` for France, then answers from the tool's result.
    Decided by the conversation, not a script, so concurrent runs cannot take each other's
    replies."""

    messages: Any = iter(())

    def _generate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        if messages[-1].type == "tool":
            message = reply(messages[-1].content, input_tokens=30, output_tokens=2)
        else:
            message = reply(
                tool_calls=[
                    {
                        "name": "capital",
                        "args": {"country": "France"},
                        "id": "call_1",
                        "type": "tool_call",
                    }
                ],
                input_tokens=12,
                output_tokens=7,
            )
        return ChatResult(generations=[ChatGeneration(message=message)])
