"""Chat templates: render a conversation with the checkpoint's own Jinja template, as ``transformers`` does.

A chat model was fine-tuned on conversations laid out in one exact format (SmolLM2 and Qwen3 use ChatML:
``<|im_start|>user\\nHi<|im_end|>\\n``), and it only answers well when prompted in that format. The format
ships with the model as a Jinja template (``tokenizer_config.json``'s ``chat_template``, a
``chat_template.jinja`` file, or GGUF's ``tokenizer.chat_template``). ``add_generation_prompt=True`` appends
the header of the assistant's turn (``<|im_start|>assistant\\n``) so the model's next tokens are its answer.

Templates from the Hub are untrusted code: they run in Jinja's immutable sandbox, with the helpers
``transformers`` gives them (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text).
Leaves out: tool schemas generated from Python functions, assistant-token masks, continuing a final message.
"""

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str):
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A compiled Jinja template, with the environment ``transformers`` uses (cached by source)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """The prompt text for ``messages`` (``[{"role": "user", "content": "Hi"}]``).

    ``variables`` reach the template too: ``bos_token``/``eos_token``, and options some templates read,
    such as Qwen3's ``enable_thinking=False``.
    """
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with a 'role' (and usually 'content'), got {message!r}")
    variables = {"tools": None, "documents": None, **variables}
    return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             **variables)
