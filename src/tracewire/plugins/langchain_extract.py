"""What a span records of a LangChain run, taken from the arguments LangChain's callbacks pass:
its name, attributes, inputs, outputs and token usage. Functions named "worker side" run on the
export worker (:class:`tracewire.core.spans.Deferred`), not on the caller's thread.
"""

from __future__ import annotations

from typing import Any

from tracewire.core import attributes as keys
from tracewire.core import usage

# Request parameters recorded from `invocation_params` (never the whole dict: providers put
# credentials and clients there).
_PARAMS = (
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "stop",
    "stream",
    "n",
    "seed",
    "tool_choice",
    "reasoning_effort",
)


def shallow_copy(value: Any) -> Any:
    """A shallow copy of a top-level dict or list, so a caller appending to its state after the
    run does not change what the span recorded (cheap: references only)."""
    if type(value) is dict:
        return dict(value)
    if type(value) is list:
        return list(value)
    return value


def run_name(serialized: Any, kwargs: dict[str, Any], default: str) -> str:
    """The run's own name, else its serialized class's name, else ``default``."""
    name = kwargs.get("name")
    if isinstance(name, str) and name:
        return name
    if isinstance(serialized, dict):
        name = serialized.get("name")
        if isinstance(name, str) and name:
            return name
        ids = serialized.get("id")
        if isinstance(ids, list) and ids:
            return str(ids[-1])
    return default


# --------------------------------------------------------------------------- model runs


def model_attributes(
    kind: str, metadata: dict[str, Any] | None, kwargs: dict[str, Any], capture: bool
) -> dict[str, Any]:
    """A model run's span attributes: operation, model, provider, tools (never credentials)."""
    params = kwargs.get("invocation_params")
    params = params if isinstance(params, dict) else {}
    metadata = metadata or {}
    attributes: dict[str, Any] = {keys.GEN_AI_OPERATION: kind, keys.MESSAGE_FORMAT: "langchain"}
    model = metadata.get("ls_model_name") or params.get("model") or params.get("model_name")
    if isinstance(model, str):
        attributes[keys.LLM_MODEL] = model
        attributes[keys.GEN_AI_REQUEST_MODEL] = model
    provider = metadata.get("ls_provider")
    if isinstance(provider, str):
        attributes[keys.LLM_PROVIDER] = provider
    tools = params.get("tools")
    if capture and isinstance(tools, list) and tools:
        attributes[keys.CHAT_TOOLS] = list(tools)
    return attributes


def chat_inputs(messages: list[list[Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Messages in OpenAI's shape, which MLflow's chat view reads (worker side)."""
    from langchain_core.messages import convert_to_openai_messages

    converted = [convert_to_openai_messages(batch) for batch in messages]
    inputs: dict[str, Any] = {"messages": converted[0] if len(converted) == 1 else converted}
    inputs.update(params)
    return inputs


def request_params(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The request parameters worth recording (the _PARAMS that are set)."""
    params = kwargs.get("invocation_params")
    if not isinstance(params, dict):
        return {}
    return {k: params[k] for k in _PARAMS if params.get(k) is not None}


def response_usage(response: Any) -> dict[str, int] | None:
    """One usage per prompt (a generation's choices share their message's usage), from the
    message's ``usage_metadata``, else the provider's ``llm_output`` token usage."""
    total = None
    for choices in getattr(response, "generations", None) or []:
        message = getattr(choices[0], "message", None) if choices else None
        total = usage.add(total, usage.from_langchain(getattr(message, "usage_metadata", None)))
    if total is None:
        llm_output = getattr(response, "llm_output", None)
        if isinstance(llm_output, dict):
            total = usage.from_openai(llm_output.get("token_usage") or llm_output.get("usage"))
    return total


def response_model(response: Any) -> str | None:
    """The model that answered, as the provider names it."""
    for choices in getattr(response, "generations", None) or []:
        message = getattr(choices[0], "message", None) if choices else None
        metadata = getattr(message, "response_metadata", None)
        name = metadata.get("model_name") if isinstance(metadata, dict) else None
        if isinstance(name, str):
            return name
    llm_output = getattr(response, "llm_output", None)
    name = llm_output.get("model_name") if isinstance(llm_output, dict) else None
    return name if isinstance(name, str) else None


def response_outputs(response: Any) -> Any:
    """The LLMResult as a dict, each message dumped as its own class (worker side): pydantic
    dumps ``generations[..].message`` as the base message type, which drops tool calls and
    usage."""
    data = response.model_dump()
    for i, choices in enumerate(response.generations):
        for j, choice in enumerate(choices):
            message = getattr(choice, "message", None)
            if message is not None:
                data["generations"][i][j]["message"] = message.model_dump()
    return data


def response_summary(response: Any) -> dict[str, Any]:
    """A reply without content: what capture_content=False records (worker side)."""
    reasons = []
    for choices in getattr(response, "generations", None) or []:
        for choice in choices:
            info = getattr(choice, "generation_info", None) or {}
            message = getattr(choice, "message", None)
            meta = getattr(message, "response_metadata", None) or {}
            reasons.append(info.get("finish_reason") or meta.get("finish_reason"))
    return {"finish_reasons": reasons}


# --------------------------------------------------------------------------- other runs


def retrieved_documents(documents: Any) -> list[dict[str, Any]]:
    """Retrieved documents in MLflow's document format (worker side)."""
    return [
        {
            "page_content": getattr(d, "page_content", None),
            "metadata": getattr(d, "metadata", None) or {},
            "id": getattr(d, "id", None),
        }
        for d in documents or []
    ]


def graph_attributes(
    metadata: dict[str, Any] | None, name: str, tags: list[str] | None
) -> dict[str, Any] | None:
    """LangGraph node structure, for the run that *is* the node: metadata is inherited by every
    run inside a node, but only the node's own run carries the ``graph:step:N`` tag."""
    if not metadata or metadata.get("langgraph_node") != name:
        return None
    step = metadata.get("langgraph_step")
    if not tags or f"graph:step:{step}" not in tags:
        return None
    attributes = {keys.LANGGRAPH_NODE: name, keys.LANGGRAPH_STEP: step}
    triggers = metadata.get("langgraph_triggers")
    if triggers:
        attributes[keys.LANGGRAPH_TRIGGERS] = list(triggers)
    namespace = metadata.get("langgraph_checkpoint_ns")
    if namespace:
        attributes[keys.LANGGRAPH_CHECKPOINT_NS] = namespace
    return attributes
