"""Structured output: a grammar (JSON schema, regex, a list of choices, Lark) becomes a token mask at each step.

The model proposes logits over its whole vocabulary; a grammar says which *texts* are allowed. Before each
sample, a matcher that has followed the sequence's output so far marks the tokens whose bytes keep the text
inside the grammar; every other token gets ``-inf``, so whatever the sampler does (greedy, top-p, a seed),
the text stays a prefix of a valid answer::

    grammar  = compiler.compile(StructuredOutputsParams(json=schema))   # per request (validated: ValueError)
    matcher  = compiler.matcher(grammar)                                # per sequence (one per sample of n)
    bitmask  = fill_bitmask([matcher, ...])                             # (rows, ceil(V / 32)) int32, bit t = allowed
    logits   = apply_bitmask(logits, bitmask, rows)                     # masked rows -> -inf, before the sampler
    matcher.accept(token)                                               # after the token is appended
    matcher.is_finished                                                 # nothing may follow: end the sequence

EOS is in the mask only where the grammar may end (an accepting state), so an answer never stops half-way;
once nothing but EOS may follow, the engine ends the sequence itself (``finish_reason`` ``"stop"``).

The grammar machinery is `llguidance <https://github.com/guidance-ai/llguidance>`_ (a lazy Earley parser over
a lexer, in Rust): compile in ~2 ms, a mask in ~50 µs per token on the default model's 49k-token vocabulary
(bench/grammar_libraries.py compares it with xgrammar and outlines-core). Where the forward pass runs on a
GPU, the engine fills the masks after ``runner.execute`` has queued the step's kernels and before the sampler
waits for the logits, so the CPU work hides behind the GPU's. On the CPU, inside the engine
(bench/structured_output.py, 2 shared cores): filling a row's mask ~0.3-0.4 ms, applying the batch's masks
(unpack, ``-inf``) ~1.2 ms at batch 1 and ~9 ms at batch 8, together 3-5% of a decode step.

Left out: jump-forward decoding (emitting forced tokens without a forward pass), speculative draft tokens,
structural tags (tool calls), and filling masks on a second thread during a CPU forward pass (measured: the
fill is under 1% of a CPU decode step, less than the step times vary on a shared machine).
"""

import json
import re
from dataclasses import dataclass
from importlib import metadata

import torch

JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps' layout


def _regex_escape(text: str) -> str:
    """``text`` as a regex matching exactly it (llguidance reads Rust's regex syntax: escape only metacharacters)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$#&\-~])", r"\\\1", text)


@dataclass(slots=True, frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's names): exactly one of the fields.

    ``json``: a JSON schema (a dict, or its JSON text); ``regex``: a regular expression the whole output must
    match; ``choice``: one of these strings exactly; ``grammar``: a Lark grammar (llguidance's dialect);
    ``json_object``: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
    """

    json: str | dict | None = None  # stored as JSON text (so the record stays hashable)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             f"got {given or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise TypeError(f"structured_outputs.json must be a JSON schema (an object), got {type(schema).__name__}")
            object.__setattr__(self, "json", json.dumps(schema))  # NOTE: key order kept: properties come in order
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string, got {value!r}")
        if self.choice is not None:
            choice = (self.choice,) if isinstance(self.choice, str) else tuple(self.choice)
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise ValueError(f"structured_outputs.choice must be a list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", choice)
        if not isinstance(self.json_object, bool):
            raise TypeError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return "json_object" if self.json_object else next(n for n in ("json", "regex", "choice", "grammar")
                                                            if getattr(self, n) is not None)


class GrammarMatcher:
    """One sequence's place in its grammar: ``fill(bitmask, row)``, ``accept(token)``, ``is_finished``."""

    def __init__(self, matcher, vocab_size: int) -> None:
        self._m = matcher  # an llguidance.LLMatcher
        self.vocab_size = vocab_size  # the tokenizer's: the bitmask's width in bits (rounded up to 32)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits of the next token into ``bitmask[row]`` (a CPU int32 tensor)."""
        view = bitmask[row]
        self._m.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the matcher is then stuck)."""
        return bool(self._m.consume_token(token_id))

    @property
    def is_finished(self) -> bool:
        """The text is complete: nothing but EOS may follow (or the matcher failed)."""
        return self._m.is_stopped() or self._m.is_error()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


MIN_LLGUIDANCE = (1, 7)  # 1.6 takes a single EOS id where we hand LLTokenizer every one (pyproject.toml pins it too)


def check_llguidance_version() -> None:
    """``RuntimeError`` saying what to install when the installed llguidance is older than ``MIN_LLGUIDANCE``."""
    try:
        have = metadata.version("llguidance")
    except metadata.PackageNotFoundError:  # importable without its metadata (a vendored copy): nothing to compare
        return
    numbers = tuple(int(part) for part in re.findall(r"\d+", have)[:2])
    if numbers < MIN_LLGUIDANCE:
        need = ".".join(map(str, MIN_LLGUIDANCE))
        raise RuntimeError(f"structured output needs llguidance>={need}, this environment has {have}: "
                           f"pip install -U 'llguidance>={need}'")


class GrammarCompiler:
    """Grammars for one tokenizer: ``compile(params)`` per request, ``matcher(grammar)`` per sequence.

    The library's view of the vocabulary (every token's bytes) is built on the first compile (~0.2 s).
    """

    def __init__(self, tokenizer, eos_token_ids: frozenset[int] | set[int]) -> None:
        if tokenizer is None:
            raise ValueError("structured output needs a tokenizer; this engine has none (a random-weight model)")
        self.tokenizer, self.eos_token_ids = tokenizer, sorted(eos_token_ids)
        self.vocab_size = tokenizer.vocab_size
        self._lltokenizer = None

    @property
    def lltokenizer(self):
        if self._lltokenizer is None:
            import llguidance

            check_llguidance_version()
            tok = self.tokenizer
            tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]  # b"": an id the vocabulary leaves unused

            class _Vocabulary:  # what llguidance.TokenizerWrapper reads
                eos_token_id, bos_token_id = (self.eos_token_ids or [None])[0], tok.bos_token_id
                special_token_ids = sorted(tok.special_ids)

                def __call__(self, text: str) -> list[int]:
                    return tok.encode(text)

            _Vocabulary.tokens = tokens
            self._lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary()),
                                                       eos_token=self.eos_token_ids or None)
        return self._lltokenizer

    def compile(self, params: StructuredOutputsParams) -> str:
        """The grammar of ``params`` (llguidance's serialized form); ``ValueError`` saying what is wrong."""
        from llguidance import LLMatcher

        if params.json is not None or params.json_object:
            schema = params.json if params.json is not None else '{"type": "object"}'
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        elif params.regex is not None:
            grammar = LLMatcher.grammar_from_regex(params.regex)
        elif params.choice is not None:
            grammar = LLMatcher.grammar_from_regex("|".join(f"({_regex_escape(c)})" for c in params.choice))
        else:
            grammar = LLMatcher.grammar_from_lark(params.grammar)
        error = LLMatcher.validate_grammar(grammar, self.lltokenizer)
        if error:
            raise ValueError(f"structured_outputs.{params.kind} is not a grammar this server can follow: "
                             f"{error.strip().splitlines()[0]}")
        return grammar

    def matcher(self, grammar: str) -> GrammarMatcher:
        from llguidance import LLMatcher

        return GrammarMatcher(LLMatcher(self.lltokenizer, grammar, log_level=0), self.vocab_size)


def fill_bitmask(matchers: list[GrammarMatcher]) -> torch.Tensor:
    """(len(matchers), ceil(V / 32)) int32: bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed next."""
    bitmask = torch.empty((len(matchers), (matchers[0].vocab_size + 31) // 32), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask, row)
    return bitmask


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bitmask unpacked: (rows, vocab_size) bool."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab_size]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``logits`` (B, V) with every token not allowed in ``bitmask[i]`` set to -inf in row ``rows[i]`` (a copy).

    Token ids past the grammar's vocabulary (a model's padded embedding rows) are never allowed.
    """
    out = logits.clone()
    vocab = out.shape[1]
    allowed = torch.zeros((len(rows), vocab), dtype=torch.bool, device=out.device)
    width = min(vocab, bitmask.shape[1] * 32)
    allowed[:, :width] = allowed_tokens(bitmask.to(out.device, non_blocking=True), width)
    index = torch.tensor(rows, device=out.device)
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out
