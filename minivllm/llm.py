"""``LLM``: the offline front of the engine, as in vLLM.

>>> llm = LLM()                                              # the embedded SmolLM2-135M-Instruct
>>> out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8))
>>> out[0].outputs[0].text
>>> llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text
>>> for piece in llm.stream("Once upon a time"): print(piece, end="")

``generate`` queues every prompt, steps the engine until all are done (a tqdm bar counts finished
requests and shows tokens/s), and returns the outputs in the prompts' order. Without ``sampling_params``, a
checkpoint's ``generation_config.json`` defaults apply (Qwen3: temperature 0.6, top_k 20, top_p 0.95), as in
vLLM; ``llm.generation_defaults`` shows them. ``chat(..., chat_template_kwargs={"enable_thinking": False})``
passes options to the chat template.

``LLM(..., tensor_parallel_size=2)`` splits the model over two ranks (worker processes: ``minivllm.distributed``);
``llm.close()`` or ``with LLM(...) as llm:`` stops them (interpreter exit does too).
"""

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm.auto import tqdm

from minivllm.config import EngineConfig
from minivllm.engine import LLMEngine
from minivllm.generation_config import apply_generation_defaults
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

Prompt = str | list[int]


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


class LLM:
    def __init__(self, model: Any = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self.generation_defaults = self.engine.inputs.generation_defaults  # generation_config.json's

    def close(self) -> None:
        """Stop the engine's worker processes (``tensor_parallel_size > 1``); a no-op otherwise."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); one ``RequestOutput`` per prompt, in order."""
        prompts = _as_list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [apply_generation_defaults(sampling_params, self.generation_defaults)] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p, final_only=True))  # NOTE: no per-step outputs to build
        except Exception:
            for rid in ids:  # queue all or nothing
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit=" req", disable=not use_tqdm, leave=False)
        first = engine.stats["generation_tokens"]
        try:
            while len(results) < len(ids):
                for out in engine.step():  # final_only: outputs of finished requests
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    tokens = engine.stats["generation_tokens"] - first
                    bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.0f} tok/s", refresh=False)
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             use_tqdm: bool = True, chat_template_kwargs: dict[str, Any] | None = None,
             **template_vars: Any) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to several.

        ``chat_template_kwargs`` (vLLM's name) and ``template_vars`` reach the template (``enable_thinking``)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template_vars = {**(chat_template_kwargs or {}), **template_vars}
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, **template_vars)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one prompt's first sample as it becomes safe to show."""
        engine = self.engine
        rid = engine.add_request(prompt, apply_generation_defaults(sampling_params, self.generation_defaults))
        done = False
        try:
            while not done:
                for out in engine.step():
                    if out.request_id == rid:
                        if out.outputs[0].delta_text:
                            yield out.outputs[0].delta_text
                        done = out.finished
        finally:
            if not done:
                engine.abort(rid)
