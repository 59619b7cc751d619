"""A checkpoint's own sampling defaults (``generation_config.json``), used when a request gives none.

Qwen3-0.6B ships ``{"temperature": 0.6, "top_k": 20, "top_p": 0.95, ...}``: the settings its authors
recommend. Like vLLM's default ``generation_config="auto"``, the engine reads them once and fills them in
for a request that does not say: :meth:`GenerationDefaults.sampling_params` when a request names some
fields (the server: every field it left ``None`` comes from the checkpoint, then from ``SamplingParams``'
own defaults), :func:`apply_generation_defaults` when a request gave no ``SamplingParams`` at all
(``LLM.generate(prompts)``).

Read: ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` and ``max_new_tokens`` (as
``max_tokens``), the fields vLLM reads. Left out, as in vLLM: ``do_sample`` (a checkpoint saying
``do_sample: false`` next to a temperature is still sampled), beam search settings, and GGUF files'
``general.sampling.*`` keys (the default model's file has none).
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minivllm.sampling_params import SamplingParams

# generation_config.json key -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(slots=True, frozen=True)
class GenerationDefaults:
    """The sampling fields a checkpoint sets; None where it sets nothing."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "GenerationDefaults":
        """From the contents of a ``generation_config.json`` (unknown keys ignored; values checked at use)."""
        return cls(**{ours: config[theirs] for theirs, ours in FIELDS.items() if config.get(theirs) is not None})

    def as_kwargs(self) -> dict[str, Any]:
        """The fields the checkpoint sets, as ``SamplingParams`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def sampling_params(self, **given: Any) -> SamplingParams:
        """``SamplingParams`` from a request's fields: a field given as None (not set by the request) takes the
        checkpoint's default if it has one, else ``SamplingParams``' own.

        ``GenerationDefaults(temperature=0.6, top_k=20).sampling_params(temperature=None, top_k=5)`` has
        temperature 0.6 (the checkpoint's) and top_k 5 (the request's).
        """
        kwargs = self.as_kwargs()
        kwargs.update({name: value for name, value in given.items() if value is not None})
        return SamplingParams(**kwargs)


def load_generation_defaults(model: str | os.PathLike | Any = None) -> GenerationDefaults:
    """The defaults of a model as ``LLM``/``EngineConfig`` name it: a checkpoint directory's
    ``generation_config.json``; nothing for a GGUF file, the embedded default (None) or a ``ModelConfig``."""
    if not isinstance(model, (str, os.PathLike)):
        return GenerationDefaults()
    path = Path(model).expanduser() / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return GenerationDefaults.from_dict(config)


def apply_generation_defaults(params: SamplingParams | None, defaults: GenerationDefaults) -> SamplingParams:
    """The request's own ``params`` if it gave them (they are used as they are); otherwise the checkpoint's
    defaults on top of ``SamplingParams()``."""
    return params if params is not None else defaults.sampling_params()
