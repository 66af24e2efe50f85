"""Wire schemas, one per direction (requests in, responses out). Pydantic only: no torch, no engine imports.

One module per resource; import from `server.api.schemas`:
    common.py       limits, the strict base of native bodies, the error shape, response_format, logit_bias, penalties
    tasks.py        task uploads and task resources
    generate.py     the native generate and classify routes
    openai.py       the OpenAI-compatible completions, chat completions and models routes
    files.py        OpenAI's /v1/files
    batches.py      OpenAI's /v1/batches
    fine_tuning.py  OpenAI's /v1/fine_tuning/jobs
    ops.py          health and readiness
"""

from .batches import (
    Batch,
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchList,
    BatchRequestCounts,
)
from .common import (
    MAX_BATCH_INPUTS,
    MAX_CHOICES,
    MAX_INPUT_CHARS,
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_PATTERN_CHARS,
    MAX_STOP,
    MAX_STOP_CHARS,
    ErrorBody,
    ErrorResponse,
    Input,
    JsonSchemaFormat,
    LogitBias,
    Penalty,
    ResponseFormat,
    StopStr,
    Strict,
)
from .files import (
    FileDeleted,
    FileList,
    FileObject,
)
from .fine_tuning import (
    Checkpoint,
    CheckpointList,
    Job,
    JobCreate,
    JobError,
    JobEvent,
    JobEventList,
    JobList,
)
from .generate import (
    ClassifyRequest,
    ClassifyResult,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
    TokenEvent,
    Usage,
)
from .openai import (
    BASE_MODEL_ID,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    FinishReason,
    ModelCard,
    ModelList,
    OpenAIBase,
    StreamOptions,
    TextPart,
    TokenId,
    TokenIds,
    TopLogprob,
)
from .ops import (
    Health,
    Readiness,
)
from .tasks import (
    GenerationDefaults,
    HardTaskCreate,
    LabelPublic,
    Labels,
    TaskList,
    TaskMetadata,
    TaskPublic,
    TaskType,
    Visibility,
)

__all__ = [
    "AssistantMessage", "BASE_MODEL_ID", "Batch", "BatchCreate", "BatchError", "BatchErrors", "BatchList",
    "BatchRequestCounts",
    "ChatChoice", "ChatChunkChoice", "ChatCompletionChunk", "ChatCompletionRequest",
    "ChatCompletionResponse", "ChatDelta", "ChatLogprobs", "ChatMessage", "ChatTokenLogprob", "Checkpoint",
    "CheckpointList", "ClassifyRequest", "ClassifyResult", "CompletionChoice", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "CompletionUsage", "ErrorBody", "ErrorResponse", "FileDeleted",
    "FileList", "FileObject", "FinishReason", "GenerateRequest", "GenerateResponse", "GenerationDefaults",
    "HardTaskCreate", "Health", "Input", "Job", "JobCreate", "JobError", "JobEvent", "JobEventList", "JobList",
    "JsonSchemaFormat", "LabelPublic", "Labels", "LogitBias", "MAX_BATCH_INPUTS", "MAX_CHOICES", "MAX_INPUT_CHARS",
    "MAX_LOGIT_BIAS", "MAX_N", "MAX_PATTERN_CHARS", "MAX_STOP", "MAX_STOP_CHARS", "ModelCard", "ModelList",
    "OpenAIBase", "Penalty", "Readiness", "ResponseFormat", "SamplingFields", "StopStr", "StreamOptions", "Strict",
    "TaskList", "TaskMetadata", "TaskPublic", "TaskType", "TextPart", "TokenEvent", "TokenId", "TokenIds",
    "TopLogprob", "Usage", "Visibility",
]
