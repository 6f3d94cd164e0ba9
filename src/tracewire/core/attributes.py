"""Every span attribute and trace metadata/tag key tracewire writes, defined once.

MLflow's own keys come first so the MLflow UI renders chats, token usage and cost natively; the
OpenTelemetry GenAI semantic-convention keys are added where they say something MLflow's do not.
"""

from __future__ import annotations

# --- MLflow span attributes (mlflow/tracing/constant.py: SpanAttributeKey) ---
TRACE_REQUEST_ID = "mlflow.traceRequestId"
SPAN_TYPE = "mlflow.spanType"
SPAN_INPUTS = "mlflow.spanInputs"
SPAN_OUTPUTS = "mlflow.spanOutputs"
SPAN_LOG_LEVEL = "mlflow.spanLogLevel"
CHAT_TOOLS = "mlflow.chat.tools"
CHAT_USAGE = "mlflow.chat.tokenUsage"
LLM_COST = "mlflow.llm.cost"
LLM_MODEL = "mlflow.llm.model"
LLM_PROVIDER = "mlflow.llm.provider"
MESSAGE_FORMAT = "mlflow.message.format"

# Keys inside CHAT_USAGE (mlflow/tracing/constant.py: TokenUsageKey).
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
TOTAL_TOKENS = "total_tokens"
CACHE_READ_INPUT_TOKENS = "cache_read_input_tokens"
CACHE_CREATION_INPUT_TOKENS = "cache_creation_input_tokens"

# Keys inside LLM_COST and TRACE_COST, in USD (mlflow/tracing/constant.py: CostKey).
INPUT_COST = "input_cost"
OUTPUT_COST = "output_cost"
TOTAL_COST = "total_cost"


# --- MLflow span types (mlflow.entities.SpanType) ---
class SpanType:
    LLM = "LLM"
    CHAT_MODEL = "CHAT_MODEL"
    EMBEDDING = "EMBEDDING"
    CHAIN = "CHAIN"
    AGENT = "AGENT"
    TOOL = "TOOL"
    RETRIEVER = "RETRIEVER"
    PARSER = "PARSER"
    UNKNOWN = "UNKNOWN"


# --- MLflow trace metadata (mlflow/tracing/constant.py: TraceMetadataKey) ---
TRACE_SESSION = "mlflow.trace.session"
TRACE_USER = "mlflow.trace.user"
TRACE_TOKEN_USAGE = "mlflow.trace.tokenUsage"
TRACE_COST = "mlflow.trace.cost"
TRACE_SCHEMA_VERSION = "mlflow.trace_schema.version"
TRACE_INPUTS = "mlflow.traceInputs"
TRACE_OUTPUTS = "mlflow.traceOutputs"
MODEL_ID = "mlflow.modelId"  # the logged model a trace ran in: search_traces(model_id=)
SOURCE_RUN = "mlflow.sourceRun"

# --- MLflow trace tags ---
TRACE_NAME = "mlflow.traceName"
EVAL_REQUEST_ID = "mlflow.eval.requestId"  # links a trace to its row of an MLflow evaluation
# The request id, as a tag: a tracking server makes a trace from its spans alone, and no span
# attribute sets its client_request_id, which is stamped on later (export/store.py).
REQUEST_ID_TAG = "tracewire.request_id"
# Who may give feedback on a web request's trace through the feedback route (core/feedback.py).
FEEDBACK_FROM_TAG = "tracewire.feedback_from"

# --- OpenTelemetry's user id: a tracking server reads it as the trace's user when a trace
# arrives as spans only (export/decode.py; MLflow has no constant for it) ---
USER_ID = "user.id"

# --- tracewire trace tags: the deployment, named after OpenTelemetry resource conventions ---
DEPLOYMENT_ENVIRONMENT = "deployment.environment"
SERVICE_VERSION = "service.version"
CLOUD_REGION = "cloud.region"
TRACEWIRE_VERSION = "tracewire.version"
# A span ended by tracewire because its work was abandoned: a stream closed mid-call, or its
# trace still open past TRACEWIRE_TRACE_TIMEOUT.
ABANDONED = "tracewire.abandoned"
# On the root of a trace exported at TRACEWIRE_TRACE_TIMEOUT: how many spans were cut.
INCOMPLETE = "tracewire.incomplete"

# --- OpenTelemetry GenAI semantic conventions (span attributes) ---
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"

# --- LangGraph structure (span attributes), from the callback metadata LangGraph sets ---
LANGGRAPH_NODE = "langgraph.node"
LANGGRAPH_STEP = "langgraph.step"
LANGGRAPH_TRIGGERS = "langgraph.triggers"
LANGGRAPH_CHECKPOINT_NS = "langgraph.checkpoint_ns"
# Set on a span that LangGraph paused (interrupt()) or redirected (Command to the parent graph):
# control flow, not an error. The value is the signal's class name.
LANGGRAPH_CONTROL = "langgraph.control"
# On a graph run's span: why it paused (status, checkpoint, interrupt values), and the
# checkpoint it resumed from (LangGraph's interrupt/resume lifecycle callbacks).
LANGGRAPH_INTERRUPT = "langgraph.interrupt"
LANGGRAPH_RESUMED_FROM = "langgraph.resumed_from"

# --- HTTP server spans (OpenTelemetry HTTP semantic conventions) ---
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_STATUS_CODE = "http.response.status_code"
URL_PATH = "url.path"
# Milliseconds from the request's arrival to the response's first and last body byte.
HTTP_TIME_TO_FIRST_BYTE = "tracewire.http.time_to_first_byte_ms"
HTTP_TIME_TO_LAST_BYTE = "tracewire.http.time_to_last_byte_ms"
