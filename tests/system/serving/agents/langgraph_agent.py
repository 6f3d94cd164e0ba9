"""A ResponsesAgent over a LangGraph graph (models-from-code): one node calls
``ChatOpenAI(base_url=<the local server>, streaming=True)``; the graph runs with a checkpointer
and ``{"configurable": {"thread_id": ...}}``, the thread being ``custom_inputs.thread_id``, else
the request's ``context.conversation_id``, else a fresh ``anonymous-<hex>``.
``update_current_trace`` tags the request's trace. The question ``fail`` makes ``predict`` raise.
"""

import os
import uuid

import mlflow
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from mlflow.pyfunc import ResponsesAgent
from mlflow.types.responses import ResponsesAgentRequest, ResponsesAgentResponse

mlflow.langchain.autolog()  # as in MLflow's guide
if os.environ.get("AGENT_TRACEWIRE_AUTOLOG") == "1":  # the test's switch for "autolog in code"
    import tracewire

    tracewire.autolog()

llm = ChatOpenAI(
    model="gpt-4o-mini", base_url=os.environ["OPENAI_BASE_URL"], streaming=True, max_retries=0
)


def call_model(state: MessagesState) -> dict:
    return {"messages": [llm.invoke(state["messages"])]}


graph = (
    StateGraph(MessagesState)
    .add_node("model", call_model)
    .add_edge(START, "model")
    .add_edge("model", END)
    .compile(checkpointer=InMemorySaver())
)


class GraphAgent(ResponsesAgent):
    def predict(self, request: ResponsesAgentRequest) -> ResponsesAgentResponse:
        question = request.input[-1].content
        if question == "fail":
            raise RuntimeError("the agent failed on purpose")
        mlflow.update_current_trace(
            tags={"agent": "langgraph", "asked": question}, metadata={"agent.question": question}
        )
        thread = (
            (request.custom_inputs or {}).get("thread_id")
            or (request.context.conversation_id if request.context else None)
            or f"anonymous-{uuid.uuid4().hex}"
        )
        state = graph.invoke(
            {"messages": [{"role": "user", "content": question}]},
            config={"configurable": {"thread_id": thread}},
        )
        return ResponsesAgentResponse(
            output=[self.create_text_output_item(state["messages"][-1].content, str(uuid.uuid4()))]
        )


mlflow.models.set_model(GraphAgent())
