"""A ResponsesAgent over the OpenAI client, as MLflow's guide writes one (models-from-code).

Each request: one plain chat call and one streamed one (``stream=True``, no ``stream_options``:
what most apps send), the answer read from the stream the naive way (``chunk.choices[0]`` on
every chunk: a usage chunk the caller did not ask for would break it). ``update_current_trace``
tags the request's trace. The question ``fail`` makes ``predict`` raise.
"""

import os
import uuid

import mlflow
import openai
from mlflow.pyfunc import ResponsesAgent
from mlflow.types.responses import ResponsesAgentRequest, ResponsesAgentResponse

mlflow.openai.autolog()  # as in MLflow's guide
if os.environ.get("AGENT_TRACEWIRE_AUTOLOG") == "1":  # the test's switch for "autolog in code"
    import tracewire

    tracewire.autolog()


class OpenAIAgent(ResponsesAgent):
    def __init__(self) -> None:
        self.client = openai.OpenAI(max_retries=0)  # OPENAI_BASE_URL, OPENAI_API_KEY

    def predict(self, request: ResponsesAgentRequest) -> ResponsesAgentResponse:
        question = request.input[-1].content
        if question == "fail":
            raise RuntimeError("the agent failed on purpose")
        mlflow.update_current_trace(
            tags={"agent": "openai", "asked": question}, metadata={"agent.question": question}
        )
        messages = [{"role": "user", "content": question}]
        self.client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = self.client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        )
        answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        return ResponsesAgentResponse(
            output=[self.create_text_output_item(answer, str(uuid.uuid4()))]
        )


mlflow.models.set_model(OpenAIAgent())
