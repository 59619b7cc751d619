"""``SamplingBatch``: one step's sampling inputs as tensors, one row per sequence.

The scheduler hands the sampler a list of requests, each with its own :class:`SamplingParams`, tokens so
far and (if seeded) generator. :meth:`SamplingBatch.from_requests` turns them into one tensor per knob, so
the sampler treats the whole batch with a few tensor ops. A knob no row uses is ``None``: a batch of plain
temperature requests pays for no sort, no penalty and no mask. Greedy rows get neutral values.

While the same sequences decode, the output processor hands the sampler the same batch again
(``OutputProcessor.sampling_batch``); when some of them finish, :meth:`SamplingBatch.select` keeps the others' rows
with a few tensor indexings instead of rebuilding them in Python. Left out: adding rows to a batch in place
(vLLM's ``InputBatch`` does); a batch that gains a sequence is rebuilt, O(batch) Python, not O(vocabulary).
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from minivllm.sampling_params import SamplingParams


def make_generator(seed: int | None) -> torch.Generator | None:
    """A request's own random stream: a CPU generator (None without a seed). Make it once per request and
    pass the same one at every step. It draws one number per step, on the CPU, whatever the model's device."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def _padded(rows: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """(B, longest) int64, short rows padded with -1."""
    out = torch.full((len(rows), max(map(len, rows), default=0)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out.to(device)


@dataclass(slots=True)
class PenaltyBatch:
    """Repetition, frequency and presence penalties: one value per row, and the token histories they count."""

    presence: torch.Tensor  # (B,) float32, 0 = off
    frequency: torch.Tensor  # (B,) float32, 0 = off
    repetition: torch.Tensor  # (B,) float32, 1 = off
    prompt_token_ids: torch.Tensor  # (B, P) int64, -1 padded; empty for rows without a repetition penalty
    output_token_ids: torch.Tensor  # (B, O) int64, -1 padded; empty for rows without penalties


@dataclass(slots=True)
class SamplingBatch:
    """What the sampler needs for one step. Build it with :meth:`from_requests`."""

    temperature: torch.Tensor  # (B,) float32; 1.0 on greedy rows, so nothing is divided by 0
    greedy: torch.Tensor  # (B,) bool
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None  # (B,) int64, 0 = off; None: no row uses it
    max_top_k: int  # the largest top_k (0: none), known here so the sampler needs no device sync
    top_p: torch.Tensor | None  # (B,) float32, 1.0 = off
    min_p: torch.Tensor | None  # (B,) float32, 0.0 = off
    generators: dict[int, torch.Generator]  # row -> its request's own generator (seeded rows that sample)
    penalties: PenaltyBatch | None  # None: no row has a penalty
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf: min_tokens not reached
    max_num_logprobs: int | None  # the most logprobs a row asks for; None: no row asks

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def select(self, rows: Sequence[int]) -> "SamplingBatch":
        """The batch of these rows only, in this order (sequences that left: the others finished). Only for a
        batch without penalties or ``min_tokens`` bans (those count each row's tokens: rebuild it instead).
        ``max_top_k`` and ``max_num_logprobs`` stay the old batch's, bounds that still hold for the rows kept."""
        if self.penalties is not None or self.banned is not None:
            raise ValueError("a batch with penalties or min_tokens bans is rebuilt, not selected from")
        index = torch.tensor(rows, dtype=torch.long, device=self.temperature.device)
        where = {old: new for new, old in enumerate(rows)}
        greedy = self.greedy[index]
        return SamplingBatch(
            temperature=self.temperature[index], greedy=greedy,
            all_greedy=self.all_greedy, all_random=self.all_random,  # NOTE: true of every subset (else both False)
            top_k=None if self.top_k is None else self.top_k[index], max_top_k=self.max_top_k,
            top_p=None if self.top_p is None else self.top_p[index],
            min_p=None if self.min_p is None else self.min_p[index],
            generators={where[old]: g for old, g in self.generators.items() if old in where},
            penalties=None, banned=None, max_num_logprobs=self.max_num_logprobs)

    @classmethod
    def from_requests(cls, params: Sequence[SamplingParams], *,
                      output_token_ids: Sequence[Sequence[int]] | None = None,
                      prompt_token_ids: Sequence[Sequence[int]] | None = None,
                      generators: Sequence[torch.Generator | None] | None = None,
                      eos_token_ids: Collection[int] = (), device: torch.device | str = "cpu") -> "SamplingBatch":
        """Row ``i`` is ``params[i]`` with its generated tokens so far (``output_token_ids[i]``: penalties and
        ``min_tokens``), its prompt (``prompt_token_ids[i]``: repetition penalty) and its generator from
        :func:`make_generator` (required when it has a seed). ``eos_token_ids``: the model's, for ``min_tokens``."""
        n = len(params)
        outputs = output_token_ids if output_token_ids is not None else [()] * n
        prompts = prompt_token_ids if prompt_token_ids is not None else [()] * n
        gens = generators if generators is not None else [None] * n
        if not len(outputs) == len(prompts) == len(gens) == n:
            raise ValueError(f"{n} params need {n} output histories, prompts and generators; got "
                             f"{len(outputs)}, {len(prompts)} and {len(gens)}")
        greedy = [p.greedy for p in params]
        own = {}
        for i, (p, g) in enumerate(zip(params, gens)):
            if p.seed is not None and not p.greedy:
                if g is None:
                    raise ValueError(f"row {i} has seed={p.seed} but no generator: make one per request with "
                                     "make_generator(seed) and pass that same one at every step")
                own[i] = g

        def column(values: list, neutral, dtype: torch.dtype) -> torch.Tensor | None:
            """One knob per row (neutral on greedy rows); None when every row is neutral."""
            values = [neutral if g else v for v, g in zip(values, greedy)]
            return None if all(v == neutral for v in values) else torch.tensor(values, dtype=dtype, device=device)

        top_k = column([max(p.top_k, 0) for p in params], 0, torch.long)
        penalties = None
        rep = [p.repetition_penalty != 1 for p in params]
        penalized = [r or p.presence_penalty != 0 or p.frequency_penalty != 0 for r, p in zip(rep, params)]
        if any(penalized):
            penalties = PenaltyBatch(
                presence=torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device),
                frequency=torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device),
                repetition=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device),
                prompt_token_ids=_padded([pr if r else () for pr, r in zip(prompts, rep)], device),
                output_token_ids=_padded([o if pen else () for o, pen in zip(outputs, penalized)], device),
            )
        banned_rows, banned_ids = [], []
        for i, p in enumerate(params):
            if len(outputs[i]) < p.min_tokens:  # EOS and stop tokens may not end it yet
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                banned_rows += [i] * len(ids)
                banned_ids += sorted(ids)
        wants = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                     dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=all(greedy), all_random=not any(greedy),
            top_k=top_k, max_top_k=0 if top_k is None else max(p.top_k for p, g in zip(params, greedy) if not g),
            top_p=column([p.top_p for p in params], 1.0, torch.float32),
            min_p=column([p.min_p for p in params], 0.0, torch.float32),
            generators=own, penalties=penalties,
            banned=(torch.tensor(banned_rows, dtype=torch.long, device=device),
                    torch.tensor(banned_ids, dtype=torch.long, device=device)) if banned_rows else None,
            max_num_logprobs=max(wants) if wants else None,
        )
