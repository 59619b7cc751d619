"""The input side: a user's prompt and ``SamplingParams`` checked and turned into what the engine runs.

Every mistake a user can make with a request is caught here, before anything is queued, with a
``ValueError`` or ``TypeError`` that says what to change. ``max_tokens=None`` becomes "until the context
is full", so every sequence the scheduler sees has a length limit. A request that gives no
``SamplingParams`` gets the checkpoint's ``generation_config.json`` defaults (as vLLM does by default).

Left out: images and other modalities, prompt embeddings, chat templates (``LLM.chat`` renders them).
"""

import dataclasses
from typing import NamedTuple

from minivllm.generation_config import GenerationDefaults
from minivllm.sampling_params import SamplingParams


class ProcessedInput(NamedTuple):
    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens always set


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int,
                 generation_defaults: GenerationDefaults | None = None) -> None:
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults or GenerationDefaults()
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def process(self, prompt: str | list[int], params: SamplingParams | None) -> ProcessedInput:
        """Tokenize and check one request. Raises ``ValueError`` / ``TypeError`` on bad input."""
        params = params if params is not None else self.generation_defaults.sampling_params()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        text = prompt if isinstance(prompt, str) else None
        ids = self._token_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} "
                             f"tokens, which must also hold at least one generated token")
        room = self.max_model_len - len(ids)
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds this model's "
                             f"context of {self.max_model_len} tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        return ProcessedInput(text, ids, params)

    def _token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer (a random-weight model): pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise TypeError("a prompt must be a string or a list of int token ids")
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        return ids
