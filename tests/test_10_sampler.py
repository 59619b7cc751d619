"""Phase 10: SamplingParams, the Sampler and stop conditions, each against an independent answer key.

The sampled distributions are checked with a chi-square goodness-of-fit test against the exact filtered
distribution, computed here by brute force in Python floats over sorted lists. Penalties, logprobs and
stop strings are checked against plain-Python versions of vLLM's definitions. Seeds are fixed, so every
statistical test is deterministic.
"""

import math
import random

import numpy as np
import pytest
import torch

from minivllm.sampler import Sampler, SamplingBatch, SamplingParams, greedy_tokens, make_generator
from minivllm.sampling import apply_penalties, apply_top_k, apply_top_p, random_sample
from minivllm.stop import Finish, StopChecker, check_stop, partial_stop_length, scan_stop_strings

V = 16
LOGITS = [1.9, -0.4, 0.8, 2.6, -1.7, 0.1, 1.2, -2.5, 0.45, 2.2, -0.9, 1.55, -3.2, 0.6, -0.15, 1.05]
N = 40_000  # samples per distribution


# ------------------------------------------------------------------------------- the answer key
def softmax(z: list[float]) -> list[float]:
    finite = [x for x in z if x != -math.inf]
    m = max(finite)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in z]
    s = sum(e)
    return [x / s for x in e]


def exact_distribution(logits: list[float], temperature=1.0, top_k=0, top_p=1.0,
                       min_p=0.0) -> tuple[list[float], float]:
    """vLLM's filters in vLLM's order, by brute force; also the smallest distance of any token to a boundary."""
    z = [x / temperature for x in logits]
    margin = math.inf
    if min_p > 0:
        p = softmax(z)
        bound = min_p * max(p)
        margin = min(margin, *(abs(q - bound) for q in p))
        z = [x if q >= bound else -math.inf for x, q in zip(z, p)]
    if top_k > 0:
        ranked = sorted(z, reverse=True)
        kth = ranked[min(top_k, len(z)) - 1]
        if top_k < len(z) and ranked[top_k] != -math.inf:
            margin = min(margin, kth - ranked[top_k])
        z = [x if x >= kth else -math.inf for x in z]
    if top_p < 1:
        p = softmax(z)
        keep = []
        for i, q in enumerate(p):
            above = sum(r for r in p if r > q)  # the mass of the tokens more likely than this one
            keep.append(above < top_p)
            if q > 0:
                margin = min(margin, abs(above - top_p))
        z = [x if k else -math.inf for x, k in zip(z, keep)]
    return softmax(z), margin


def chi_square_pvalue(counts: np.ndarray, probs: list[float]) -> float:
    """P(chi-square >= observed) for counts against probs: the regularized upper incomplete gamma function."""
    expected = np.array(probs) * counts.sum()
    on = expected > 0
    stat = float((((counts - expected) ** 2)[on] / expected[on]).sum())
    df = int(on.sum()) - 1
    return gammaincc(df / 2, stat / 2)


def gammaincc(a: float, x: float) -> float:
    return float(torch.special.gammaincc(torch.tensor(a, dtype=torch.float64), torch.tensor(x, dtype=torch.float64)))


def draw(params: SamplingParams, n: int = N, seed: int = 0) -> np.ndarray:
    """Counts per token of n draws, the logits row repeated n times in one batch."""
    batch = SamplingBatch.from_requests([params] * n)
    tokens = Sampler(torch.Generator().manual_seed(seed))(torch.tensor([LOGITS]).repeat(n, 1), batch).token_ids
    return np.bincount(tokens.numpy(), minlength=V)


FILTERS = {
    "temperature 1": dict(),
    "temperature 0.5": dict(temperature=0.5),
    "temperature 2": dict(temperature=2.0),
    "top_k 5": dict(top_k=5),
    "top_p 0.8": dict(top_p=0.8),
    "min_p 0.1": dict(min_p=0.1),
    "all four": dict(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05),
    "top_k 12 + min_p 0.2": dict(temperature=1.3, top_k=12, min_p=0.2),
}
KEPT = {"temperature 1": V, "temperature 0.5": V, "temperature 2": V, "top_k 5": 5, "top_p 0.8": 6, "min_p 0.1": 9,
        "all four": 5, "top_k 12 + min_p 0.2": 8}  # tokens left: each filter does cut (checkable by hand)


def test_chi_square_pvalue_matches_known_values_and_catches_a_wrong_distribution():
    # df = 1: P(X >= 3.841) = 0.05; df = 10: P(X >= 18.307) = 0.05 (textbook tables)
    assert chi_square_pvalue(np.array([50, 50]), [0.5, 0.5]) == pytest.approx(1.0)
    assert chi_square_pvalue(np.array([60, 40]), [0.5, 0.5]) == pytest.approx(0.0455, abs=1e-4)  # X = 4
    assert gammaincc(1 / 2, 3.841 / 2) == pytest.approx(0.05, abs=1e-4)
    assert gammaincc(10 / 2, 18.307 / 2) == pytest.approx(0.05, abs=1e-4)
    # the test has the power to see a small error: temperature 1 drawn, temperature 0.9 expected
    assert chi_square_pvalue(draw(SamplingParams()), exact_distribution(LOGITS, temperature=0.9)[0]) < 1e-6


@pytest.mark.parametrize("name", FILTERS)
def test_each_filter_samples_the_exact_filtered_distribution(name):
    knobs = FILTERS[name]
    probs, margin = exact_distribution(LOGITS, **knobs)
    assert margin > 1e-3, "the test's logits sit too close to a filter boundary for float32"
    counts = draw(SamplingParams(**knobs))
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0), f"a filtered-out token was drawn: {counts}"
    p = chi_square_pvalue(counts, probs)
    print(f"chi-square p-value {p:.3f}: {name}")  # pytest -s shows them
    assert p > 1e-3, f"{name}: chi-square p-value {p:.2e}; counts {counts}, expected {np.round(np.array(probs) * N)}"
    assert sum(p > 0 for p in probs) == KEPT[name]  # the filters do filter


def test_rows_with_different_params_in_one_batch_each_get_their_own_distribution():
    groups = [SamplingParams(temperature=0.5), SamplingParams(top_k=3), SamplingParams(top_p=0.7, temperature=1.5),
              SamplingParams(min_p=0.3), SamplingParams(temperature=0)]
    params = [groups[i % len(groups)] for i in range(5 * 10_000)]  # interleaved
    batch = SamplingBatch.from_requests(params)
    tokens = Sampler(torch.Generator().manual_seed(1))(torch.tensor([LOGITS]).repeat(len(params), 1), batch).token_ids
    for g, p in enumerate(groups):
        counts = np.bincount(tokens[g :: len(groups)].numpy(), minlength=V)
        if p.greedy:
            assert counts[int(np.argmax(LOGITS))] == 10_000
            continue
        probs, _ = exact_distribution(LOGITS, p.temperature, p.top_k, p.top_p, p.min_p)
        assert all(c == 0 for c, q in zip(counts, probs) if q == 0)
        pv = chi_square_pvalue(counts, probs)
        print(f"chi-square p-value {pv:.3f}: mixed batch, {p.temperature=} {p.top_k=} {p.top_p=} {p.min_p=}")
        assert pv > 1e-3, (p, counts)


def test_seeded_rows_sample_the_exact_distribution_too():
    # one draw per seed: the distribution over 20,000 seeds is the filtered distribution
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in range(20_000)]
    batch = SamplingBatch.from_requests(params, generators=[make_generator(p.seed) for p in params])
    tokens = Sampler()(torch.tensor([LOGITS]).repeat(len(params), 1), batch).token_ids
    probs, margin = exact_distribution(LOGITS, temperature=0.8, top_p=0.9)
    counts = np.bincount(tokens.numpy(), minlength=V)
    assert margin > 1e-3 and all(c == 0 for c, q in zip(counts, probs) if q == 0)
    pv = chi_square_pvalue(counts, probs)
    print(f"chi-square p-value {pv:.3f}: 20,000 seeded rows, temperature 0.8, top_p 0.9")
    assert pv > 1e-3


# ------------------------------------------------------------------------------- greedy and seeds
def test_greedy_tokens_are_torch_argmax_with_ties_nan_and_infinities():
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (64, 50), generator=g).float()  # few values: many ties in each row
    logits[5, 7] = logits[5, 30] = float("nan")  # NaN counts as the largest; the first of two
    logits[9, 40] = float("nan")  # after the row's largest value
    logits[11] = float("-inf")  # every token banned: index 0
    logits[12, 3] = logits[12, 44] = float("inf")
    got = greedy_tokens(logits)
    assert got.dtype == torch.int64 and got.shape == (64,)
    assert torch.equal(got, logits.argmax(-1))
    assert got[5] == 7 and got[9] == 40 and got[11] == 0 and got[12] == 3
    strided = torch.randn(50, 64, generator=g).t()  # a non-contiguous view
    assert torch.equal(greedy_tokens(strided), strided.argmax(-1))
    for dtype in (torch.bfloat16, torch.float16):  # bf16 has no numpy dtype: torch's argmax
        assert torch.equal(greedy_tokens(logits.to(dtype)), logits.to(dtype).argmax(-1))


def test_greedy_rows_are_exactly_the_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 5000, generator=g) * 4
    logits[5, [10, 20]] = 100.0  # a tie: the first index wins, as numpy's argmax says
    params = [SamplingParams(temperature=0 if i % 2 == 0 else 1.5, top_k=50 if i % 3 == 0 else 0) for i in range(64)]
    params[5] = SamplingParams(temperature=0)
    out = Sampler()(logits, SamplingBatch.from_requests(params)).token_ids.numpy()
    want = logits.numpy().argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            assert out[i] == want[i], i
    assert out[5] == 10
    all_greedy = Sampler()(logits, SamplingBatch.from_requests([SamplingParams(temperature=0)] * 64)).token_ids
    assert np.array_equal(all_greedy.numpy(), want)
    half = logits.to(torch.bfloat16)  # an all-greedy batch takes the argmax of the logits' own dtype: the same tokens
    half[7, [3, 4000]] = half[7].max() + 1  # a tie the bf16 rounding must not break differently
    greedy = SamplingBatch.from_requests([SamplingParams(temperature=0)] * 64)
    assert torch.equal(Sampler()(half, greedy).token_ids, half.float().argmax(-1))
    assert Sampler()(half, greedy).token_ids[7] == 3


def _decode(rows: list[SamplingParams], steps: int, watch: int, logits_seed: int) -> list[int]:
    """Run `steps` steps of a batch; row `watch` sees the same logits every time, the others random ones."""
    gens = [make_generator(p.seed) for p in rows]
    sampler = Sampler(torch.Generator().manual_seed(logits_seed + 99))
    g = torch.Generator().manual_seed(logits_seed)
    mine = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        logits = torch.randn(len(rows), 300, generator=g) * 3
        logits[watch] = torch.randn(300, generator=mine) * 3  # the watched request's own logits stream
        batch = SamplingBatch.from_requests(rows, generators=gens)
        out.append(int(sampler(logits, batch).token_ids[watch]))
    return out


def test_same_seed_same_tokens_whatever_else_is_in_the_batch():
    me = SamplingParams(temperature=1.2, top_p=0.95, min_p=0.01, seed=1234)
    alone = _decode([me], 30, 0, logits_seed=0)
    others = [SamplingParams(temperature=0.9, seed=5), SamplingParams(), SamplingParams(temperature=0),
              SamplingParams(top_k=3, seed=6), SamplingParams(temperature=2.0, top_p=0.5)]
    compositions = [(others[:3] + [me] + others[3:], 3, 1), ([me] + others, 0, 2), (others[::-1] + [me], 5, 3)]
    for batch, watch, seed in compositions:
        assert _decode(batch, 30, watch, logits_seed=seed) == alone
    other_seed = _decode([SamplingParams(temperature=1.2, top_p=0.95, min_p=0.01, seed=4321)], 30, 0, logits_seed=0)
    assert other_seed != alone


def test_unseeded_rows_follow_the_samplers_generator():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(3))
    batch = SamplingBatch.from_requests([SamplingParams(top_k=20)] * 8)
    a = Sampler(torch.Generator().manual_seed(11))(logits, batch).token_ids
    b = Sampler(torch.Generator().manual_seed(11))(logits, batch).token_ids
    assert torch.equal(a, b)


def test_a_seed_without_its_generator_is_an_error():
    with pytest.raises(ValueError, match="row 1 has seed=3 but no generator"):
        SamplingBatch.from_requests([SamplingParams(), SamplingParams(seed=3)])
    SamplingBatch.from_requests([SamplingParams(temperature=0, seed=3)])  # greedy: a seed changes nothing


def test_for_child_gives_each_of_n_completions_its_own_seed():
    p = SamplingParams(n=3, seed=10)
    assert [c.seed for c in (p.for_child(i) for i in range(3))] == [10, 11, 12] and p.for_child(2).n == 1
    assert SamplingParams(n=2).for_child(1).seed is None


# ------------------------------------------------------------------------------- the filters directly
def test_top_p_falls_back_to_a_full_sort_when_the_nucleus_is_wider_than_the_candidates():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 3000, generator=g) * 0.5  # flat: top-p 0.9 keeps ~2,500 tokens
    top_p = torch.tensor([0.9, 0.5, 1.0])
    got = apply_top_p(logits, top_p) > -math.inf  # TOP_P_CANDIDATES = 1024 < 2,500
    small = apply_top_p(logits, top_p, candidates=7) > -math.inf
    for row in range(3):
        probs, _ = exact_distribution(logits[row].tolist(), top_p=float(top_p[row]))
        want = torch.tensor([p > 0 for p in probs])
        assert torch.equal(got[row], want) and torch.equal(small[row], want)
    assert 1024 < int(got[0].sum()) < 3000 and bool(got[2].all())


def test_ties_at_the_boundary_are_all_kept():
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    assert (apply_top_k(logits, torch.tensor([2])) > -math.inf).tolist() == [[True, True, True, True, False, False]]
    p1 = math.exp(3) / (math.exp(3) + 3 * math.e + 1 + math.exp(-1))  # 0.77: the top token alone falls short of 0.8
    assert p1 < 0.8
    kept = apply_top_p(logits, torch.tensor([0.8])) > -math.inf
    assert kept.tolist() == [[True, True, True, True, False, False]]


def test_random_sample_never_draws_a_zero_weight_token():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 5.0, 0.0, 0.0]])
    for u in (0.0, 0.5, 2 / 3, 1 - 2**-53):
        tokens = random_sample(weights, torch.tensor([u, u], dtype=torch.float64)).tolist()
        assert tokens == [1 if u < 2 / 3 else 3, 2]


@pytest.mark.parametrize("vocab", [49_152, 3_001])
def test_random_sample_is_the_inverse_cdf_of_float64_sums(vocab):
    g = torch.Generator().manual_seed(vocab)
    weights = (torch.randn(8, vocab, generator=g) * 3).exp()
    weights[:, ::3] = 0
    cdf = np.cumsum(weights.double().numpy(), -1)
    for _ in range(50):
        u = torch.rand(8, dtype=torch.float64, generator=g)
        want = [int(np.searchsorted(cdf[i], u[i].item() * cdf[i, -1], side="right")) for i in range(8)]
        assert random_sample(weights, u).tolist() == want


def brute_force_penalties(logits, prompt, output, presence, frequency, repetition):
    out = []
    for t, x in enumerate(logits):
        if t in prompt or t in output:
            x = x / repetition if x > 0 else x * repetition
        x -= frequency * output.count(t) + presence * (t in output)
        out.append(x)
    return out


def test_penalties_match_a_brute_force_version_of_vllms_definition():
    rng = random.Random(5)
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(5)) * 3
    params = [SamplingParams(temperature=0, repetition_penalty=1.3),
              SamplingParams(temperature=0, presence_penalty=1.5),
              SamplingParams(temperature=0, frequency_penalty=-0.7, presence_penalty=0.4, repetition_penalty=0.8),
              SamplingParams(temperature=0)]
    prompts = [[rng.randrange(30) for _ in range(rng.randrange(1, 12))] for _ in params]
    outputs = [[rng.randrange(30) for _ in range(rng.randrange(0, 15))] for _ in params]
    batch = SamplingBatch.from_requests(params, prompt_token_ids=prompts, output_token_ids=outputs)
    p = batch.penalties
    got = apply_penalties(logits.clone(), p.prompt_token_ids, p.output_token_ids, p.presence, p.frequency, p.repetition)
    for i, sp in enumerate(params):
        want = brute_force_penalties(logits[i].tolist(), prompts[i], outputs[i], sp.presence_penalty,
                                     sp.frequency_penalty, sp.repetition_penalty)
        assert got[i].tolist() == pytest.approx(want, abs=1e-5)
        assert int(Sampler()(logits, batch).token_ids[i]) == int(np.argmax(want))  # greedy sees the penalties


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(4, 10)
    logits[:, 0] = 10.0  # EOS (id 0) is by far the most likely
    logits[:, 5] = 9.0  # a stop token
    logits[:, 7] = 8.0
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5]),
              SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5]),
              SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0)]
    outputs = [[1, 2], [1, 2, 3], [1], [1]]
    batch = SamplingBatch.from_requests(params, output_token_ids=outputs, eos_token_ids={0})
    assert Sampler()(logits, batch).token_ids.tolist() == [7, 0, 0, 0]


def test_logprobs_are_the_raw_models_top_k_and_the_sampled_tokens():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(6)) * 2
    params = [SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=4),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(top_p=0.5)]
    batch = SamplingBatch.from_requests(params, output_token_ids=[[1, 2], [], []], prompt_token_ids=[[3], [], []])
    out = Sampler(torch.Generator().manual_seed(0))(logits, batch)
    raw = logits.double().numpy()
    raw = raw - raw.max(-1, keepdims=True)
    raw = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
    lp = out.logprobs
    assert lp.token_ids.shape == (3, 5) and lp.token_ids[:, 0].tolist() == out.token_ids.tolist()
    for i in range(3):
        order = np.argsort(-raw[i])
        assert lp.token_ids[i, 1:].tolist() == order[:4].tolist()
        t = int(out.token_ids[i])
        assert lp.logprobs[i].tolist() == pytest.approx([raw[i, t], *raw[i, order[:4]]], abs=1e-5)
        assert int(lp.ranks[i]) == int(np.where(order == t)[0][0]) + 1
    assert Sampler()(logits, SamplingBatch.from_requests(params[2:] * 3)).logprobs is None


# ------------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("field, value, message", [
    ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("temperature", -0.1, r"temperature must be in \[0, inf\), got -0.1"),
    ("temperature", math.inf, r"temperature must be in \[0, inf\), got inf"),
    ("temperature", math.nan, r"temperature must be in \[0, inf\), got nan"),
    ("top_k", -2, r"top_k must be -1 or 0 \(disabled\) or >= 1, got -2"),
    ("min_p", 1.1, r"min_p must be in \[0, 1\], got 1.1"),
    ("presence_penalty", 2.5, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    ("frequency_penalty", -3, r"frequency_penalty must be in \[-2, 2\], got -3"),
    ("repetition_penalty", 0, r"repetition_penalty must be in \(0, inf\), got 0"),
    ("n", 0, r"n must be >= 1, got 0"),
    ("max_tokens", 0, r"max_tokens must be >= 1, got 0"),
    ("min_tokens", -1, r"min_tokens must be >= 0, got -1"),
    ("logprobs", -1, r"logprobs must be >= 0, got -1"),
    ("stop", ["ok", ""], r"stop must hold non-empty strings, got ''"),
    ("stop_token_ids", [3, -1], r"stop_token_ids must be token ids >= 0, got -1"),
])
def test_invalid_values_name_the_field_and_the_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_wrong_types_and_inconsistent_lengths_are_errors():
    with pytest.raises(TypeError, match="top_k must be an int, got 1.5"):
        SamplingParams(top_k=1.5)
    with pytest.raises(TypeError, match="temperature must be a number, got '1'"):
        SamplingParams(temperature="1")
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)
    p = SamplingParams(stop="###", stop_token_ids=[7], max_tokens=None, top_k=-1)
    assert p.stop == ("###",) and p.stop_token_ids == (7,) and not p.greedy and SamplingParams(temperature=0).greedy
    with pytest.raises(Exception):
        p.temperature = 0.5  # frozen


# ------------------------------------------------------------------------------- stop conditions
def test_check_stop_follows_vllms_order():
    eos = {0}
    p = SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[9])
    assert check_stop(p, [0], eos) is None  # EOS before min_tokens does not count
    assert check_stop(p, [4, 0], eos) == Finish("stop", None)
    assert check_stop(p, [4, 9], eos) == Finish("stop", 9)
    assert check_stop(p, [4, 4, 4, 4, 0], eos) == Finish("stop", None)  # EOS is checked before length
    assert check_stop(p, [4, 4, 4, 4, 9], eos) == Finish("stop", 9)
    assert check_stop(p, [4, 4, 4, 4, 4], eos) == Finish("length")
    assert check_stop(SamplingParams(ignore_eos=True), [0], eos) is None
    assert check_stop(SamplingParams(), [3], eos, max_model_len_reached=True) == Finish("length")


def expected_stop(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """Character by character: stop where a stop string first ends (the longest one if several end there)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return text[: end if include else end - len(s)], s
    return text, None


def test_stop_strings_across_token_boundaries_are_found_trimmed_and_held_back():
    checker = StopChecker(["\n\nUser:", "<END>"])
    sent = [checker.push(piece) for piece in ["Paris", " is", " nice", ".\n", "\nUs", "er", ": hi"]]
    assert sent == ["Paris", " is", " nice", ".", "", "", ""]  # "\n", "\n\nUs", "\n\nUser" held back
    assert checker.stopped and checker.stop_str == "\n\nUser:" and checker.text == "Paris is nice."
    with pytest.raises(RuntimeError, match="already stopped"):
        checker.push("x")
    false_alarm = StopChecker(["<END>"])  # "<END" then "!": not a stop string after all, so it is released
    assert [false_alarm.push(p) for p in ["a<", "EN", "D!", "<E"]] == ["a", "", "<END!", ""]
    assert false_alarm.flush() == "<E" and not false_alarm.stopped
    assert scan_stop_strings("a<", "EN", ["<END>"]) == ("a<EN", None, 3)
    assert scan_stop_strings("a<EN", "X", ["<END>"]) == ("a<ENX", None, 0)
    assert scan_stop_strings("ab", "c!", ["bc"], include_stop_str=True) == ("abc", "bc", 0)
    assert partial_stop_length("xx<EN", ["<END>", "N"]) == 3


def test_stop_checker_streams_exactly_the_brute_force_text_for_any_token_split():
    rng = random.Random(8)
    for case in range(600):
        text = "".join(rng.choice("ab c\n") for _ in range(rng.randrange(0, 30)))
        stop = ["".join(rng.choice("ab c\n") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        include = rng.random() < 0.3
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 8))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        checker, streamed = StopChecker(stop, include), ""
        for piece in pieces:
            streamed += checker.push(piece)
            assert checker.text.startswith(streamed)  # nothing sent is ever taken back
            if checker.stopped:
                break
            # everything is sent except the longest end that could still grow into a stop string
            assert len(checker.text) - len(streamed) == max(
                [k for s in stop for k in range(1, len(s)) if checker.text.endswith(s[:k])], default=0)
        if not checker.stopped:
            streamed += checker.flush()
        want_text, want_stop = expected_stop(text, stop, include)
        assert (streamed, checker.stop_str) == (want_text, want_stop), (case, text, stop, pieces)


def test_stop_strings_are_not_matched_before_min_tokens():
    checker = StopChecker(["END"])
    assert checker.push("xEN", check=False) == "x"  # a possible beginning is still held back
    assert checker.push("D", check=False) == "END"  # no match looked for: released once it can't grow
    assert checker.push(" END") == " " and checker.stopped and checker.text == "xEND "


def test_extreme_repetition_penalty_stays_finite_and_samples_a_seen_token():
    """repetition_penalty=1e-40 divides positive logits of seen tokens by 1e-40: +inf before the clamp, NaN
    probabilities after it (found by the server's schemathesis run). The seen token must win, finitely."""
    from minivllm.sampler import Sampler, SamplingBatch, make_generator
    from minivllm.sampling_params import SamplingParams

    logits = torch.tensor([[0.5, 2.0, 1.0, -1.0]])
    params = [SamplingParams(repetition_penalty=1e-40, seed=0)]
    batch = SamplingBatch.from_requests(params, output_token_ids=[[0]], prompt_token_ids=[[0]],
                                        generators=[make_generator(0)])
    assert Sampler()(logits, batch).token_ids.tolist() == [0]
