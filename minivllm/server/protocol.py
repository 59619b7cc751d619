"""OpenAI's request and response bodies as pydantic models, and the map from a request to ``SamplingParams``.

Field names, defaults and ranges follow OpenAI's API reference (completions, chat completions, models);
vLLM's extra sampling fields (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ...) are accepted too. OpenAI's rules for what is not given: ``null`` means the default
for every field (``"n": null`` is ``n = 1``); a field nobody here knows (``store``, ``metadata``,
``service_tier``, ...) is ignored and named in a logged warning, as vLLM does. Every number is range-checked
(400 naming the field), NaN and infinities included. A field the engine cannot honour when it is set (tools,
``logit_bias``, ``suffix``, ``best_of`` > ``n``) is refused with a 400, not silently ignored.

Structured output: ``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs``
(``json``, ``regex``, ``choice``, ``grammar``; its older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar`` too) become one :class:`~minivllm.structured_output.StructuredOutputsParams`.
``json_schema.strict`` is accepted either way: the output always follows the schema.

A checkpoint's ``generation_config.json`` (Qwen3: temperature 0.6, top_k 20, top_p 0.95) fills the sampling
fields a request leaves unset, as vLLM does by default; a value the request gives wins. Chat requests take
vLLM's ``chat_template_kwargs`` (variables for the template, e.g. Qwen3's ``enable_thinking``); with a
reasoning template the answer's ``<think>`` block comes back apart as ``reasoning_content`` (a field only
present when there is reasoning; newer vLLM names it ``reasoning``).

Left out: tools and function calling, images and audio in messages, ``logit_bias``, ``suffix``, an assistant
message's ``reasoning_content`` sent back in ``messages`` (dropped, as Qwen3's template drops old reasoning).
"""

import logging
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from minivllm.generation_config import GenerationDefaults
from minivllm.sampling_params import SamplingParams
from minivllm.structured_output import StructuredOutputsParams

logger = logging.getLogger("minivllm.server")
MAX_INT = 2**31 - 1  # the largest top_k / min_tokens / token id a request may name
TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]


class _Request(BaseModel):
    """OpenAI's leniency: ``null`` = the default, unknown fields ignored (and logged), no NaN or infinity."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and fields[k].default is not None)}
        return data

    @model_validator(mode="after")
    def _warn_unknown(self) -> "_Request":
        if self.model_extra:
            logger.warning("%s: ignored unknown field(s) %s", type(self).__name__, sorted(self.model_extra))
        return self



class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(_Request):
    include_usage: bool = False  # a last chunk with empty choices and the request's usage
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _SamplingFields(_Request):
    """The sampling fields both endpoints share (OpenAI's ranges; vLLM's extras after ``user``)."""

    model: str
    n: int | None = Field(1, ge=1, le=16)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None  # one string of any length, or <= 16
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # only null or {} (unsupported)
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, le=MAX_INT)
    min_p: float | None = Field(None, ge=0, le=1)
    # NOTE: >= 0.01, not just > 0: the engine's sampler fails on tiny penalties (logits / 1e-40 overflow to inf)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(0, ge=0, le=MAX_INT)
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    # structured output (OpenAI's response_format; vLLM's structured_outputs and its older guided_* names)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def unsupported(self) -> str | None:
        """The name of a field set to something the engine cannot do, or None."""
        if self.logit_bias:
            return "logit_bias"
        return None

    def structured(self) -> tuple[str, StructuredOutputsParams] | tuple[None, None]:
        """(the field it came from, the grammar) of a request that constrains its output, or (None, None).
        Raises ValueError / TypeError (naming the field) for a bad or ambiguous one."""
        given = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ValueError("response_format: type json_schema needs a json_schema object with a schema")
            given.append(("response_format", {"json": rf.json_schema.schema_}))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            spec = {"json": so.json_, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
                    "json_object": bool(so.json_object)}
            given.append(("structured_outputs", {k: v for k, v in spec.items() if v not in (None, False)}))
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{name}") is not None:
                given.append((f"guided_{name}", {name: getattr(self, f"guided_{name}")}))
        if not given:
            return None, None
        if len(given) > 1:
            raise ValueError(f"{given[1][0]}: give one of response_format, structured_outputs, guided_*; "
                             f"got {', '.join(g[0] for g in given)}")
        field, spec = given[0]
        try:
            return field, StructuredOutputsParams(**spec)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{field}: {e}") from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutputsParams | None = None,
                        defaults: GenerationDefaults = GenerationDefaults()) -> SamplingParams:
        """The engine's ``SamplingParams`` (raises ValueError/TypeError naming the field, as SamplingParams does).

        A field the request leaves unset takes the checkpoint's value from ``defaults`` if it has one, else
        OpenAI's default."""
        checkpoint = defaults.as_kwargs()

        def given(name: str, value, default):
            return value if value is not None else checkpoint.get(name, default)

        return SamplingParams(
            n=self.n, temperature=given("temperature", self.temperature, 1.0),
            top_p=given("top_p", self.top_p, 1.0), top_k=given("top_k", self.top_k, 0),
            min_p=given("min_p", self.min_p, 0.0), repetition_penalty=given("repetition_penalty",
                                                                              self.repetition_penalty, 1.0),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs, structured_outputs=structured)


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: continue a prompt (text, token ids, or a batch of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; None: until the context is full
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, refusal, ...: not used by the templates here
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: answer a conversation, rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: until the context is full
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = True  # vLLM: end the prompt with the assistant's turn header
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: template variables ({"enable_thinking": false})

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools"
        if self.tool_choice not in (None, "none"):
            return "tool_choice"
        return super().unsupported()


# ---------------------------------------------------------------------- responses
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length"; "abort" when the server cut it (shutdown)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class _MaybeReasoning(BaseModel):
    """A message whose ``reasoning_content`` (the ``<think>`` block's text, reasoning templates only) is left out
    of the JSON when there is none: a non-reasoning model's answers look exactly as they would without it."""

    @model_serializer(mode="wrap")
    def _omit_no_reasoning(self, handler):
        data = handler(self)
        if data.get("reasoning_content") is None:
            data.pop("reasoning_content", None)
        return data


class AssistantMessage(_MaybeReasoning):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_MaybeReasoning):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minivllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
