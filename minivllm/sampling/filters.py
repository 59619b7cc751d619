"""The sampler's tensor ops: penalties, min-p, top-k, top-p, and drawing one token per row.

Every function takes a whole batch of logits ``(B, V)`` and one value per row, and never loops over the
vocabulary in Python. A filter returns new logits with the dropped tokens at ``-inf``.

**No full sort on the common path.** Top-k needs each row's k-th largest logit: ``topk`` finds it. Top-p
needs the probability of the token where the running mass, most likely first, reaches ``p``; in a language
model's distribution that token is nearly always among the first few hundred, so a ``topk`` of
:data:`TOP_P_CANDIDATES` finds it, and a full sort runs only for rows whose candidates hold less than ``p``.
(On a CPU core, a sort of 32 x 49,152 logits costs about 8x the ``topk`` of 1,024.) Both keep every token
tied with the last one kept, so the result does not depend on how a sort orders equal values.

**Sampling by inverse CDF.** :func:`random_sample` takes one uniform number per row and returns the first
token whose cumulative probability passes it. One number per row, not one per token, is what lets each
request draw from its own ``torch.Generator`` on the CPU (:func:`draw_uniforms`), whatever the device
and whatever else is in the batch. vLLM uses the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``
per token, instead: notebook 10 shows both draw the same distribution.
"""

import torch
from minivllm.utils import cdiv

TOP_P_CANDIDATES = 1024  # tokens per row that top-p looks at before it falls back to a full sort
SAMPLE_BLOCK = 256  # random_sample sums weights in float32 inside blocks of this many tokens, float64 across


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, L) ids, -1 padded -> (B, V) float32: how often each token occurs in each row."""
    index = torch.where(token_ids < 0, vocab_size, token_ids)  # padding counts into a spare column
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    return counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_token_ids: torch.Tensor, output_token_ids: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """vLLM's penalties, one value of each per row. A token seen in the prompt or the output has a positive
    logit divided by ``repetition``, a negative one multiplied by it; then ``frequency * count`` and
    ``presence * [count > 0]`` are subtracted, counting the output only. Token ids: (B, L), -1 padded."""
    vocab = logits.shape[1]
    output_counts = _token_counts(output_token_ids, vocab)  # (B, V)
    in_output = output_counts > 0
    seen = in_output | (_token_counts(prompt_token_ids, vocab) > 0)
    rep = torch.where(seen, repetition.unsqueeze(1), 1.0)
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency.unsqueeze(1) * output_counts - presence.unsqueeze(1) * in_output
    # NOTE: a tiny repetition penalty overflows to +-inf, and inf - inf is NaN in the softmax: stay finite
    big = torch.finfo(logits.dtype).max
    return logits.clamp(min=-big, max=big)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with ``prob < min_p * max prob``, i.e. ``logit < max logit + log(min_p)``: no softmax
    needed. ``min_p`` 0 keeps everything (log 0 = -inf)."""
    threshold = logits.amax(-1, keepdim=True) + min_p.log().unsqueeze(1)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int | None = None) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits, and any tied with the k-th; ``top_k`` <= 0 keeps all.
    ``max_top_k`` (the largest ``top_k``, known on the host) saves a device sync."""
    vocab = logits.shape[1]
    k_max = min(int(top_k.max()) if max_top_k is None else max_top_k, vocab)
    if k_max <= 0:
        return logits
    largest = logits.topk(k_max, dim=-1).values  # (B, k_max), descending
    kth = largest.gather(1, (top_k.clamp(1, k_max) - 1).unsqueeze(1))  # (B, 1)
    kth = kth.masked_fill((top_k <= 0).unsqueeze(1), float("-inf"))  # rows without top-k keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


def _nucleus_floor(descending: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(R, C) weights, largest first, and (R,) mass to reach -> (R, 1) the weight of the token reaching it."""
    cumulative = descending.cumsum(-1)
    reach = torch.searchsorted(cumulative, target.unsqueeze(1))  # first index with cumulative >= target
    return descending.gather(1, reach.clamp(max=descending.shape[1] - 1))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, candidates: int = TOP_P_CANDIDATES) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches ``top_p`` (the nucleus): a token stays
    if the tokens *more* likely than it hold less than ``top_p``. ``top_p`` 1 keeps everything."""
    vocab = logits.shape[1]
    weights = (logits - logits.amax(-1, keepdim=True)).exp()  # (B, V) probabilities up to a factor
    target = top_p * weights.sum(-1)  # (B,)
    on = top_p < 1
    top = weights.topk(min(candidates, vocab), dim=-1).values  # (B, C), descending
    floor = _nucleus_floor(top, target)  # (B, 1)
    short = on & (top.sum(-1) < target)  # these rows' nucleus is wider than the candidates
    if top.shape[1] < vocab and bool(short.any()):  # NOTE: a device sync, only on the top-p path
        rows = short.nonzero().squeeze(1)
        floor[rows] = _nucleus_floor(weights[rows].sort(-1, descending=True).values, target[rows])
    floor = floor.masked_fill(~on.unsqueeze(1), 0.0)
    return logits.masked_fill(weights < floor, float("-inf"))


def draw_uniforms(batch_size: int, generators: dict[int, torch.Generator],
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B,) float64 uniforms in [0, 1), drawn on the CPU: row ``i`` from ``generators[i]`` if it has one
    (a seeded request), the others from ``generator`` (None: torch's global CPU generator)."""
    u = torch.rand(batch_size, dtype=torch.float64, generator=generator)
    for row, g in generators.items():  # NOTE: the one loop over the batch; one number per seeded request
        u[row] = torch.rand((), dtype=torch.float64, generator=g)
    return u.to(device, non_blocking=True)


def _first_above(cdf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(R, n) non-decreasing, (R, 1) -> (R, 1): the first index with ``cdf > x``. An index whose weight is 0
    never qualifies; where none does (``x`` rounded up to the total), the last index of weight > 0."""
    first = torch.searchsorted(cdf, x, right=True)
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())  # the first index that reaches the total
    return torch.minimum(first, last)


def random_sample(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``weights`` (B, V), probabilities up to a factor per row, by inverse CDF: the first
    token whose cumulative weight exceeds ``u * total``. A token of weight 0 is never drawn.

    A float32 running sum over 49,152 tokens drifts by ~1e-5 of the total: enough to misplace the tail's tiny
    tokens. A float64 one is exact enough but ~9x slower on a CPU. So: float32 sums inside blocks of
    :data:`SAMPLE_BLOCK` tokens, float64 across the blocks; find the block, then the token inside it.
    """
    rows, vocab = weights.shape
    blocks = cdiv(vocab, SAMPLE_BLOCK)
    if blocks * SAMPLE_BLOCK != vocab:
        weights = torch.nn.functional.pad(weights, (0, blocks * SAMPLE_BLOCK - vocab))  # zeros: never drawn
    inner = weights.view(rows, blocks, SAMPLE_BLOCK).cumsum(-1)  # (B, blocks, SAMPLE_BLOCK) float32
    outer = inner[..., -1].double().cumsum(-1)  # (B, blocks) float64
    x = u.unsqueeze(1) * outer[:, -1:]  # (B, 1)
    block = _first_above(outer, x)  # (B, 1)
    before = outer.gather(1, (block - 1).clamp(min=0)).masked_fill(block == 0, 0.0)  # the weight of earlier blocks
    within = _first_above(inner[torch.arange(rows, device=weights.device), block[:, 0]].double(), x - before)
    return (block * SAMPLE_BLOCK + within).squeeze(1)
