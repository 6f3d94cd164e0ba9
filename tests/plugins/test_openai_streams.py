"""How a streamed OpenAI reply is assembled from its chunks, on the openai package's own chunk and
event types, built as the client builds a stream's items (``model_construct``: no validation, so
``finish_reason`` may be None), without a server."""

from __future__ import annotations

from typing import Any

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseTextDeltaEvent,
)

from tracewire.plugins.openai_streams import (
    assemble_chat,
    assemble_responses,
    assemble_text,
)

HEAD = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1_735_689_600,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_1",
}


def chat_chunk(*choices: dict[str, Any], **fields: Any) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_construct(**{**HEAD, "choices": list(choices), **fields})


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish_reason}


def tool(
    index: int, arguments: str, name: str | None = None, call_id: str | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id,
        "type": "function" if call_id else None,
        "function": {"name": name, "arguments": arguments},
    }


def test_chat_content_finish_reason_and_usage_chunk() -> None:
    chunks = [
        chat_chunk(delta(role="assistant", content="")),
        chat_chunk(delta(content="Paris is ")),
        chat_chunk(delta(content="the capital.")),
        chat_chunk(delta(finish_reason="stop")),
        # The usage-only chunk `stream_options.include_usage` asks for: no choice, no text.
        chat_chunk(usage={"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}),
    ]
    reply = assemble_chat(chunks)
    assert reply == {
        "object": "chat.completion",
        "id": "chatcmpl-1",
        "created": 1_735_689_600,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital."},
                "finish_reason": "stop",
            }
        ],
    }
    ChatCompletion.model_validate(reply)  # the shape MLflow's chat view reads


def test_chat_tool_calls_split_across_chunks() -> None:
    chunks = [
        chat_chunk(
            delta(role="assistant", tool_calls=[tool(0, "", name="lookup", call_id="call_a")])
        ),
        chat_chunk(delta(tool_calls=[tool(0, '{"city": ')])),
        # A second call starts before the first one's arguments are complete.
        chat_chunk(
            delta(tool_calls=[tool(1, '{"city": "Lyon"}', name="lookup", call_id="call_b")])
        ),
        chat_chunk(delta(tool_calls=[tool(0, '"Paris"}')])),
        chat_chunk(delta(finish_reason="tool_calls")),
    ]
    reply = assemble_chat(chunks)
    assert reply["choices"] == [
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"city": "Lyon"}'},
                    },
                ],
            },
        }
    ]
    ChatCompletion.model_validate(reply)


def test_chat_choices_in_index_order() -> None:
    chunks = [
        chat_chunk(delta(1, content="B")),
        chat_chunk(delta(0, content="A")),
        chat_chunk(delta(1, "length", content="b"), delta(0, "stop", content="a")),
    ]
    choices = assemble_chat(chunks)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "Aa", "stop"),
        (1, "Bb", "length"),
    ]


def test_legacy_text_completion() -> None:
    def chunk(*choices: tuple[int, str, str | None], **fields: Any) -> Completion:
        return Completion.model_construct(
            **{
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1_735_689_600,
                "model": "gpt-3.5-turbo-instruct",
                "choices": [
                    {"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                    for i, text, reason in choices
                ],
                **fields,
            }
        )

    chunks = [
        chunk((0, "Once upon", None)),
        chunk((1, "In a", None)),
        chunk((0, " a time", "stop"), (1, " land", "length")),
        chunk(usage={"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}),
    ]
    assert assemble_text(chunks) == {
        "object": "text_completion",
        "id": "cmpl-1",
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {"index": 0, "text": "Once upon a time", "finish_reason": "stop"},
            {"index": 1, "text": "In a land", "finish_reason": "length"},
        ],
    }


def response(status: str, text: str | None) -> dict[str, Any]:
    output = (
        []
        if text is None
        else [
            {
                "type": "message",
                "id": "msg_1",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ]
    )
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_735_689_600,
        "model": "gpt-4o-mini",
        "status": status,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
    }


def text_delta(sequence: int, text: str) -> ResponseTextDeltaEvent:
    return ResponseTextDeltaEvent.model_construct(
        type="response.output_text.delta",
        delta=text,
        item_id="msg_1",
        output_index=0,
        content_index=0,
        logprobs=[],
        sequence_number=sequence,
    )


def test_responses_events_give_the_completed_response() -> None:
    completed = ResponseCompletedEvent.model_construct(
        type="response.completed", sequence_number=3, response=response("completed", "Paris.")
    )
    events = [
        ResponseCreatedEvent.model_construct(
            type="response.created", sequence_number=0, response=response("in_progress", None)
        ),
        text_delta(1, "Par"),
        text_delta(2, "is."),
        completed,
    ]
    reply = assemble_responses(events)
    assert reply is completed.response
    assert reply.output_text == "Paris."


def test_responses_deltas_alone_give_their_text() -> None:
    assert assemble_responses([text_delta(0, "Par"), text_delta(1, "is.")]) == {
        "output_text": "Paris."
    }
