"""``OpenAIServing``: OpenAI requests in, engine requests through the async front, OpenAI responses out.

For each request: check the model name and unsupported fields, turn the prompt (text, token ids, a batch,
or chat messages through the chat template) into token ids, check them against the context, build
``SamplingParams``, and queue one engine request per prompt. Then either collect the final outputs into
one JSON body, or stream Server-Sent Events as the engine produces text::

    data: {"id": "chatcmpl-...", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "Par"}}]}
    data: {"id": "chatcmpl-...", "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {"id": "chatcmpl-...", "choices": [], "usage": {...}}          (with stream_options.include_usage)
    data: [DONE]

A client that goes away (mid-stream, or while waiting for a non-streaming answer) aborts its requests,
which frees their KV blocks. When the server shuts down, a stream still running ends with a last chunk of
``finish_reason: "abort"`` and ``[DONE]``; a non-streaming request gets a JSON 503. Choice ``index`` = prompt
number * ``n`` + sample number, as in OpenAI.

Tokenizing (and rendering the chat template) runs on a worker thread, not on the event loop, so a huge
prompt does not stall ``/health`` or other streams; the request-size limit (:mod:`minivllm.server.app`) bounds it.

A real Qwen3 checkpoint: its ``generation_config.json`` fills the sampling fields a request leaves unset;
``chat_template_kwargs`` reach the chat template (``{"enable_thinking": false}``); with a reasoning template
(:func:`minivllm.reasoning.uses_reasoning`) a chat answer's ``<think>`` block comes back as ``reasoning_content``
and the rest as ``content``, whole or delta by delta (:mod:`minivllm.reasoning`). A token id past the
tokenizer's vocabulary (one of Qwen3's padding rows) has no text: ``""`` and no bytes in logprobs.

Left out: tool calls, ``echo`` with logprobs of the prompt, ``best_of`` > ``n``, and holding a grammar back
until the reasoning ends (vLLM does: here ``response_format`` constrains the whole answer, so no thinking).
"""

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from minivllm.outputs import CompletionOutput, RequestOutput
from minivllm.reasoning import ReasoningSplit, ReasoningStreamParser, extract_reasoning, prompt_opens_reasoning, \
    uses_reasoning
from minivllm.sampling_params import SamplingParams
from minivllm.server import protocol as p
from minivllm.server.async_engine import AsyncLLMEngine, EngineRequestError, EngineStoppedError, RequestStream
from minivllm.server.errors import OpenAIError, from_exception
from minivllm.server.metrics import ServerMetrics, TokenTimer
from minivllm.structured_output import GrammarCompiler, StructuredOutputsParams

MAX_PROMPTS = 64  # prompts in one completions batch
RESERVED_TEMPLATE_NAMES = ("messages", "add_generation_prompt", "tokenize")  # set by the request, not the kwargs
T = TypeVar("T")


class OpenAIServing:
    def __init__(self, front: AsyncLLMEngine, model_name: str, metrics: ServerMetrics, *,
                 reasoning_parser: str = "auto") -> None:
        self.front, self.engine = front, front.engine
        self.tokenizer = front.engine.tokenizer
        self.vocab_size = front.engine.inputs.vocab_size
        self.generation_defaults = front.engine.inputs.generation_defaults  # generation_config.json's
        self.reasoning = uses_reasoning(reasoning_parser, getattr(self.tokenizer, "chat_template", None))
        self.model_name, self.metrics = model_name, metrics
        self._grammars: GrammarCompiler | None = None  # checks a request's grammar before it is queued

    # ------------------------------------------------------------------ the two endpoints
    async def completions(self, req: p.CompletionRequest, raw: Request) -> Response:
        self._check(req)
        prompts, texts = await asyncio.to_thread(self._completion_prompts, req.prompt)
        for ids in prompts:
            self._check_length(ids, req.max_tokens, "prompt")
        params = await self._params(req, req.max_tokens, req.logprobs)
        echo = None
        if req.echo:
            echo = await asyncio.to_thread(lambda: [t if t is not None else self._decode(ids)
                                                    for t, ids in zip(texts, prompts)])
        return await self._run(raw, req, prompts, params, chat=False, echo=echo)

    async def chat(self, req: p.ChatCompletionRequest, raw: Request) -> Response:
        self._check(req)
        tok = self.tokenizer
        if tok is None or not tok.chat_template:
            raise OpenAIError("this model has no chat template: use /v1/completions", param="messages")
        messages = [m.as_dict() for m in req.messages]
        variables = req.chat_template_kwargs or {}
        reserved = [name for name in RESERVED_TEMPLATE_NAMES if name in variables]
        if reserved:
            raise OpenAIError(f"chat_template_kwargs: {reserved[0]!r} is set by the server, not by a template "
                              f"variable (use the request's own fields)", param="chat_template_kwargs")
        try:
            text = await asyncio.to_thread(tok.apply_chat_template, messages,
                                           add_generation_prompt=req.add_generation_prompt, **variables)
        except Exception as e:  # the template's raise_exception(...), or a jinja error
            raise OpenAIError(f"the chat template refused these messages: {e}", param="messages") from None
        ids = await asyncio.to_thread(tok.encode, text)
        max_tokens = req.max_completion_tokens or req.max_tokens
        self._check_length(ids, max_tokens, "messages")
        if max_tokens is None and self.generation_defaults.max_tokens is not None:  # vLLM: never past the context
            max_tokens = min(self.generation_defaults.max_tokens, self.engine.max_model_len - len(ids))
        params = await self._params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        thinking = prompt_opens_reasoning(text) if self.reasoning else None
        return await self._run(raw, req, [ids], params, chat=True, echo=None, thinking=thinking)

    # ------------------------------------------------------------------ input
    def _check(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        if req.model != self.model_name:
            raise OpenAIError(f"the model {req.model!r} does not exist; this server has {self.model_name!r}", 404,
                              param="model", code="model_not_found")
        field = req.unsupported()
        if field is not None:
            raise OpenAIError(f"{field} is not supported by this server", param=field, code="unsupported_field")
        if isinstance(req, p.ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true (it says how many alternatives each token's "
                              "logprobs list)", param="top_logprobs")
        for t in req.stop_token_ids or ():
            if t >= self.vocab_size:
                raise OpenAIError(f"stop_token_ids: {t} is not a token id of this model (0..{self.vocab_size - 1})",
                                  param="stop_token_ids")

    def _completion_prompts(self, prompt) -> tuple[list[list[int]], list[str | None]]:
        """Token ids of each prompt, and its text (None for token ids)."""
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise OpenAIError("prompt is empty", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise OpenAIError(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
        prompts, texts = [], []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise OpenAIError("prompt is empty", param="prompt")
                if self.tokenizer is None:
                    raise OpenAIError("this model has no tokenizer: give the prompt as token ids", param="prompt")
                prompts.append(self.tokenizer.encode(item, add_special_tokens=True))
                texts.append(item)
            else:
                if not item:
                    raise OpenAIError("prompt is empty", param="prompt")
                bad = next((t for t in item if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise OpenAIError(f"prompt: {bad} is not a token id of this model (0..{self.vocab_size - 1})",
                                      param="prompt")
                prompts.append(list(item))
                texts.append(None)
        return prompts, texts

    def _check_length(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise OpenAIError(f"this model's maximum context length is {limit} tokens, and the prompt has "
                              f"{len(ids)} (at least one generated token must fit too)", param=param,
                              code="context_length_exceeded")
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise OpenAIError(f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                              f"and max_tokens is {max_tokens}", param="max_tokens", code="context_length_exceeded")

    async def _params(self, req: p._SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            field, structured = req.structured()
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), param=str(e).split(":")[0]) from None
        if structured is not None:
            await asyncio.to_thread(self._check_grammar, field, structured)
        try:
            return req.sampling_params(max_tokens, logprobs, structured, self.generation_defaults)
        except (ValueError, TypeError) as e:
            raise from_exception(e) from None

    def _check_grammar(self, field: str, structured: StructuredOutputsParams) -> None:
        """Compile the grammar once here (a worker thread), so a bad one is a 400 before anything is queued."""
        try:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.engine.eos_token_ids)
            self._grammars.compile(structured)
        except ValueError as e:
            raise OpenAIError(f"{field}: {e}", param=field) from None

    # ------------------------------------------------------------------ running
    async def _run(self, raw: Request, req, prompts: list[list[int]], params: SamplingParams, *, chat: bool,
                   echo: list[str] | None, thinking: bool | None = None) -> Response:
        """Queue the prompts, answer in one body or as a stream. ``thinking``: None without a reasoning parser,
        else whether the prompt already opened the ``<think>`` block (the answer starts as reasoning)."""
        timer = TokenTimer(self.metrics, time.monotonic())
        if len(prompts) * params.n > self.front.max_in_flight:
            raise OpenAIError(f"{len(prompts)} prompt(s) x n={params.n} is {len(prompts) * params.n} sequences; this "
                              f"server holds at most {self.front.max_in_flight} at once", param="n")
        stream = await self.front.add(prompts, params)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            events = self._events(stream, rid, req, params.n, chat, echo, timer, thinking)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finals = await _unless_disconnected(raw, _collect(stream, timer))
        finally:
            stream.close()
        if finals is None:
            return Response(status_code=499)  # the client left; nobody reads this
        outs = [finals[i] for i in range(len(prompts))]
        if self.front.stopping and any(o.finish_reason == "abort" for out in outs for o in out.outputs):
            raise EngineStoppedError("the server is shutting down: this request was cut short; retry elsewhere")
        usage = _usage(outs)
        if chat:
            choices = [p.ChatChoice(index=o.index, message=_message(o.text, thinking),
                                    logprobs=self._chat_logprobs(o, 0, req) if req.logprobs else None,
                                    finish_reason=o.finish_reason)
                       for o in outs[0].outputs]
            body: BaseModel = p.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage)
        else:
            choices = [p.CompletionChoice(index=i * params.n + o.index, text=(echo[i] if echo else "") + o.text,
                                          logprobs=self._completion_logprobs(o, 0, req.logprobs,
                                                                             len(echo[i]) if echo else 0)[0],
                                          finish_reason=o.finish_reason)
                       for i, out in enumerate(outs) for o in out.outputs]
            body = p.CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    async def _events(self, stream: RequestStream, rid: str, req, n: int, chat: bool, echo: list[str] | None,
                      timer: TokenTimer, thinking: bool | None = None) -> AsyncIterator[str]:
        """The SSE body of a streaming request."""
        options = req.stream_options
        include_usage = options is not None and options.include_usage
        every_chunk = include_usage and options.continuous_usage_stats  # vLLM: usage in every chunk
        num_choices = len(stream.request_ids) * n
        offsets = [len(echo[i // n]) if echo else 0 for i in range(num_choices)]  # text_offset, per choice
        generated = [0] * num_choices
        prompt_tokens = sum(len(ids) for ids in stream.prompts)
        finished: set[int] = set()
        parsers = [ReasoningStreamParser(starts_in_reasoning=thinking) for _ in range(num_choices)] \
            if chat and thinking is not None else None

        def usage() -> p.Usage:
            return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(generated),
                           total_tokens=prompt_tokens + sum(generated))

        def event(choices: list, final_usage: p.Usage | None = None) -> str:
            u = final_usage or (usage() if every_chunk else None)
            if chat:
                return self._chat_chunk(rid, choices, u)
            return _sse(p.CompletionResponse(id=rid, model=self.model_name, choices=choices, usage=u))

        try:
            for i in range(num_choices):  # OpenAI's first chat chunk carries the role
                if chat:
                    yield event([p.ChatChunkChoice(index=i, delta=p.DeltaMessage(role="assistant", content=""))])
                elif echo:
                    yield event([p.CompletionChoice(index=i, text=echo[i // n])])
            async for index, out in stream:
                timer.tokens(sum(len(o.delta_token_ids) for o in out.outputs), time.monotonic())
                if out.finished:
                    timer.finished(out)
                for o in out.outputs:
                    i = index * n + o.index
                    first = o.num_tokens - len(o.delta_token_ids)
                    generated[i] = o.num_tokens
                    want_logprobs = (req.logprobs if chat else req.logprobs is not None) and o.delta_token_ids
                    if chat:
                        delta = _delta(parsers[i] if parsers else None, o.delta_text, bool(o.finish_reason))
                        has_text = bool(delta.content or delta.reasoning_content)
                    else:
                        has_text = bool(o.delta_text)
                    if not (has_text or o.finish_reason or want_logprobs):
                        continue
                    if o.finish_reason:
                        finished.add(i)
                    if chat:
                        choice = p.ChatChunkChoice(index=i, delta=delta, finish_reason=o.finish_reason,
                                                   logprobs=self._chat_logprobs(o, first, req) if want_logprobs
                                                   else None)
                    else:
                        logprobs, offsets[i] = self._completion_logprobs(o, first, req.logprobs, offsets[i])
                        choice = p.CompletionChoice(index=i, text=o.delta_text, finish_reason=o.finish_reason,
                                                    logprobs=logprobs)
                    yield event([choice])
        except EngineStoppedError:  # shutting down before these could run: end them as aborted
            for i in range(num_choices):
                if i not in finished:
                    yield event([p.ChatChunkChoice(index=i, delta=p.DeltaMessage(), finish_reason="abort") if chat
                                 else p.CompletionChoice(index=i, text="", finish_reason="abort")])
        except EngineRequestError as e:
            self.metrics.internal_errors.inc()
            yield "data: " + from_exception(e).response().body.decode() + "\n\n"
        finally:
            stream.close()
        if include_usage:
            yield event([], usage())
        yield "data: [DONE]\n\n"

    def _chat_chunk(self, rid: str, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> str:
        return _sse(p.ChatCompletionChunk(id=rid, model=self.model_name, choices=choices, usage=usage))

    # ------------------------------------------------------------------ logprobs
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _token(self, token_id: int) -> tuple[str, list[int] | None]:
        if self.tokenizer is None:
            return f"token_id:{token_id}", None
        raw = self.tokenizer.token_bytes(token_id)  # b"" for an id past the vocabulary (a padding row)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _entries(self, o: CompletionOutput, first: int, k: int):
        """(token id, its logprob, the top-k (id, logprob)) of o's tokens from ``first`` on."""
        for t, entry in zip(*o.since(first)):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            yield t, _finite(entry.get(t, -math.inf)), [(i, _finite(v)) for i, v in top]

    def _completion_logprobs(self, o: CompletionOutput, first: int, k: int | None,
                             offset: int = 0) -> tuple[p.CompletionLogprobs | None, int]:
        """Logprobs of o's tokens from ``first`` on, their ``text_offset`` counted on from ``offset`` (the
        characters of the choice's text before them); returns them and the offset after them."""
        if k is None:
            return None, offset
        out = p.CompletionLogprobs()
        for t, logprob, top in self._entries(o, first, k):
            text = self._token(t)[0]
            out.tokens.append(text)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({self._token(i)[0]: v for i, v in top})
            out.text_offset.append(offset)
            offset += len(text)
        return out, offset

    def _chat_logprobs(self, o: CompletionOutput, first: int, req: p.ChatCompletionRequest) -> p.ChatLogprobs:
        content = []
        for t, logprob, top in self._entries(o, first, req.top_logprobs or 0):
            text, raw = self._token(t)
            tops = [p.TopLogprob(token=s, logprob=v, bytes=b) for (s, b), v in ((self._token(i), v) for i, v in top)]
            content.append(p.TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=tops))
        return p.ChatLogprobs(content=content)


def _message(text: str, thinking: bool | None) -> p.AssistantMessage:
    """A whole chat answer; split into reasoning and content when ``thinking`` is not None."""
    if thinking is None:
        return p.AssistantMessage(content=text)
    split = extract_reasoning(text, starts_in_reasoning=thinking)
    if split.reasoning_content is None and split.content is None:  # an empty answer: "" as without a parser
        return p.AssistantMessage(content=text)
    return p.AssistantMessage(content=split.content, reasoning_content=split.reasoning_content)


def _delta(parser: ReasoningStreamParser | None, text: str, last: bool) -> p.DeltaMessage:
    """One streamed piece of a chat answer; through the reasoning parser when there is one (``last``: the
    choice's final piece, which releases what the parser held back)."""
    if parser is None:
        return p.DeltaMessage(content=text or None)
    split = parser.push(text or "")
    if last:
        tail = parser.flush()
        split = ReasoningSplit(_join(split.reasoning_content, tail.reasoning_content),
                               _join(split.content, tail.content))
    return p.DeltaMessage(content=split.content, reasoning_content=split.reasoning_content)


def _join(a: str | None, b: str | None) -> str | None:
    return (a or "") + (b or "") or None


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf; OpenAI reports -9999.0 for "impossible"


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _usage(outs: list[RequestOutput]) -> p.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(o.num_generated_tokens for o in outs)
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _collect(stream: RequestStream, timer: TokenTimer) -> dict[int, RequestOutput]:
    finals = {}
    async for index, out in stream:
        timer.tokens(sum(len(o.delta_token_ids) for o in out.outputs), time.monotonic())
        if out.finished:
            timer.finished(out)
            finals[index] = out
    return finals


async def _unless_disconnected(raw: Request, work: Awaitable[T]) -> T | None:
    """``await work``, unless the client disconnects first (then None; ``work`` is cancelled)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task in done else None
    finally:
        task.cancel()
        watcher.cancel()
