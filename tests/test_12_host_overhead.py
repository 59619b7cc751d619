"""The engine's host work per step, made cheaper (issue 17): each shortcut against the plain definition it replaces.

* the runner's block tables, kept between steps in one array (``BlockTableRows``), against the padded tables
  built from scratch (``block_table_array``), through growth, preemption, departures and more rows than it had;
* ``Sequence.tokens(start, end)`` against ``token_ids[start:end]``;
* the output processor's per-token text cache against ``Tokenizer.decode`` of the whole output (split
  characters, special tokens kept or skipped, ids the vocabulary lacks), streamed deltas included;
* the sampling batch reused while the batch is unchanged, and rebuilt when it must be;
* a stop checker without stop strings against the scan it skips;
* ``bench.host_overhead`` end to end (a dry run), and on a GPU the pinned, asynchronously copied inputs.
"""

import json
import random

import numpy as np
import pytest
import tiktoken
import torch

from bench import host_overhead
from bench.models import TINY
from minivllm.batch import ScheduledSequence, SchedulerOutput
from minivllm.cache.block_table import block_table_array
from minivllm.engine import LLMEngine
from minivllm.runner import BlockTableRows
from minivllm.sampling_params import SamplingParams
from minivllm.sequence import Sequence
from minivllm.stop import StopChecker, scan_stop_strings
from minivllm.tokenizer import Tokenizer


def _plan(seqs: list[Sequence]) -> SchedulerOutput:
    out = SchedulerOutput(step=0, scheduled=[ScheduledSequence(s, 1, 0, False, True) for s in seqs])
    out.block_tables = [s.block_table for s in seqs]
    return out


def test_block_table_rows_equal_the_tables_padded_from_scratch():
    rng = random.Random(0)
    rows = BlockTableRows(width=40, rows=4)  # few rows: it must grow
    pool: list[Sequence] = []
    next_block = iter(range(10**6))
    for step in range(300):
        if len(pool) < 12 or rng.random() < 0.1:  # a new sequence joins with a few blocks
            seq = Sequence(step, [1])
            seq.block_table = [next(next_block) for _ in range(rng.randint(1, 5))]
            pool.append(seq)
        for seq in pool:
            r = rng.random()
            if r < 0.2 and len(seq.block_table) < 40:
                seq.block_table += [next(next_block)]  # grows in place, as BlockManager.grow does
            elif r < 0.23:  # preempted and admitted again: another list, maybe shorter
                seq.block_table = [next(next_block) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.1:
            pool.pop(rng.randrange(len(pool)))  # finished
        batch = rng.sample(pool, rng.randint(1, len(pool)))  # some sit a step out; any order
        out = _plan(batch)
        got = rows.gather(out)
        want = block_table_array(out.block_tables)
        assert got.dtype == np.int32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want, err_msg=f"step {step}")
        assert len(rows.rows) == len(batch)  # those not in the step gave their rows back
    assert rows.array.shape[0] > 4


def test_sequence_tokens_equal_slices_of_token_ids():
    seq = Sequence(0, [5, 6, 7, 8])
    seq.output_token_ids += [9, 10, 11]
    full = seq.token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert seq.tokens(start, end) == full[start:end], (start, end)


def _byte_tokenizer() -> Tokenizer:
    """Ids 0..255 the single bytes (so a character can split across tokens), a few multi-byte tokens, and 64
    special tokens; a model vocabulary of 512 also samples ids this tokenizer lacks (they have no text)."""
    ranks = {bytes([i]): i for i in range(256)}
    for text in ["é", "👋", "€", "ab", " the", "ü"]:
        ranks[text.encode()] = len(ranks)
    special = {f"<|s{i}|>": len(ranks) + i for i in range(64)}
    return Tokenizer(tiktoken.Encoding("bytes", pat_str=r".", mergeable_ranks=ranks, special_tokens=special))


def test_streamed_text_equals_decoding_the_whole_output():
    engine = LLMEngine(model=TINY, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8)
    tok = engine.tokenizer = engine.processor.tokenizer = _byte_tokenizer()
    specials = sorted(tok.special_ids)
    skips = {}
    for i in range(6):
        params = SamplingParams(temperature=1.5, seed=i, max_tokens=40, ignore_eos=True, n=1 + i % 2,
                                skip_special_tokens=i % 3 != 0)
        skips[engine.add_request([specials[i % 2], 200, 201, i], params)] = params.skip_special_tokens
    deltas: dict[tuple[str, int], str] = {}
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for o in out.outputs:
                deltas[out.request_id, o.index] = deltas.get((out.request_id, o.index), "") + o.delta_text
            if out.finished:
                finals[out.request_id] = out
    seen = set()
    for rid, out in finals.items():
        for o in out.outputs:
            seen |= set(o.token_ids)
            want = tok.decode(o.token_ids, skip_special_tokens=skips[rid])
            assert o.text == want, (rid, o.index, o.token_ids)
            assert deltas[rid, o.index] == want
    # the outputs hold what makes streaming hard: split characters, special tokens, ids without text (each is
    # over an eighth of a near-uniform draw from 512 ids: 360 draws miss one with probability < 1e-20)
    assert seen & set(range(0xC0, 0x100)) and seen & set(specials) and max(seen) >= tok.encoding.n_vocab
    assert engine.processor._texts, "tokens whose text stands alone are remembered"


def test_a_final_only_request_reports_once_with_what_a_streamed_one_reports_at_the_end():
    """LLM.generate's mode: no RequestOutput per step, and the final one equal to a per-step request's last."""
    engine = LLMEngine(model=TINY, device="cpu", dtype="float32", max_model_len=256, max_num_seqs=8)
    engine.tokenizer = engine.processor.tokenizer = engine.inputs.tokenizer = _byte_tokenizer()
    kinds = {}
    for i in range(6):  # the same three prompts and seeds, each once per mode, in one batch
        params = SamplingParams(temperature=1.0, seed=i % 3, max_tokens=10 + 7 * (i % 3), ignore_eos=True,
                                stop=["\x85"])
        kinds[engine.add_request([200 + i % 3, 201, 7], params, final_only=i >= 3)] = (i % 3, i >= 3)
    reports, finals = {rid: 0 for rid in kinds}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            reports[out.request_id] += 1
            if out.finished:
                finals[kinds[out.request_id]] = out
    for rid, (prompt, final_only) in kinds.items():
        assert reports[rid] == 1 if final_only else reports[rid] > 1, (rid, reports[rid])
    for prompt in range(3):
        streamed, final = finals[prompt, False].outputs[0], finals[prompt, True].outputs[0]
        assert (final.token_ids, final.text, final.finish_reason) == (streamed.token_ids, streamed.text,
                                                                      streamed.finish_reason)
        assert final.delta_token_ids == final.token_ids and final.delta_text == final.text  # all of it, at once
    engine.check_no_leaks()


def test_the_sampling_batch_is_reused_only_while_nothing_it_depends_on_changes():
    engine = LLMEngine(model=TINY, device="cpu", dtype="float32", max_model_len=128, max_num_seqs=8)
    proc = engine.processor
    seqs = (proc.add_request("a", None, [1, 2], SamplingParams(temperature=0.8, seed=1), [0])
            + proc.add_request("b", None, [1, 2], SamplingParams(temperature=0), [1]))
    first = proc.sampling_batch(seqs, torch.device("cpu"))
    assert proc.sampling_batch(list(seqs), torch.device("cpu")) is first  # the same sequences, a new list
    assert proc.sampling_batch(seqs[::-1], torch.device("cpu")) is not first  # another order: other rows
    assert proc.sampling_batch(seqs[:1], torch.device("cpu")).batch_size == 1
    penalized = proc.add_request("p", None, [1, 2], SamplingParams(presence_penalty=1.0), [10])
    batch = proc.sampling_batch(penalized, torch.device("cpu"))
    assert proc.sampling_batch(penalized, torch.device("cpu")) is not batch  # penalties count tokens: rebuilt
    [short] = proc.add_request("m", None, [1, 2], SamplingParams(min_tokens=2, stop_token_ids=[7]), [11])
    assert proc.sampling_batch([short], torch.device("cpu")).banned is not None
    short.output_token_ids += [3, 4]
    assert proc.sampling_batch([short], torch.device("cpu")).banned is None  # the ban lifted: rebuilt


def test_a_stop_checker_without_stop_strings_returns_what_the_scan_would():
    pieces = ["Hel", "", "lo", " wor", "ld", "\n"]
    checker = StopChecker(())
    text = ""
    for i, piece in enumerate(pieces):
        want = scan_stop_strings(text, piece, ())
        assert want.stop_str is None and want.held == 0
        assert checker.push(piece, check=i % 2 == 0) == piece
        text = want.text
        assert checker.text == text and checker.sent == len(text) and not checker.stopped
    assert checker.flush() == ""


def test_host_overhead_bench_dry_run(tmp_path):
    import numba

    args = ["--batch", "6", "--context", "40", "--steps", "3", "--warmup", "1", "--out", str(tmp_path)]
    threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        assert host_overhead.main(args + ["--label", "one"]) == 0
        assert host_overhead.main(args + ["--label", "two", "--tokenizer", "none"]) == 0
        assert host_overhead.main(args + ["--label", "three", "--forward", "replay"]) == 0
    finally:  # the bench holds torch and numba to one thread; the tests after it get theirs back
        torch.set_num_threads(threads[0])
        numba.set_num_threads(threads[1])
    data = json.loads((tmp_path / "17_host_overhead_cpu.json").read_text())
    assert {"date", "command", "host", "versions"} <= set(data["meta"])
    assert set(data["runs"]) == {"one", "two", "three"}
    assert [data["runs"][k]["workload"]["forward"] for k in ("one", "three")] == ["cpu", "replay"]
    run = data["runs"]["one"]
    assert run["workload"]["batch"] == 6 and 38 <= run["workload"]["context_min"] and run["load_avg_1min"]
    cpu = run["cpu_ms_per_step"]
    assert set(cpu) == {*host_overhead.PHASES, "step", "host", "host_without_sampler"}
    assert cpu["forward"]["median"] > 0 and cpu["process"]["median"] > 0
    assert 0 < cpu["host"]["median"] <= cpu["step"]["median"]  # host = step - forward, step by step


def test_replayed_model_runs_each_shape_once_and_returns_its_first_outputs():
    calls = []

    class Model:
        hidden_size = 8

        def __call__(self, input_ids, positions, meta):
            calls.append(("forward", tuple(input_ids.shape)))
            return torch.full((input_ids.shape[0], 8), float(len(calls)))

        def compute_logits(self, hidden):
            calls.append(("logits", tuple(hidden.shape)))
            return hidden * 2

    model = host_overhead.ReplayedModel(Model())
    first = model(torch.zeros(3, dtype=torch.long), None, None)
    assert model(torch.ones(3, dtype=torch.long), None, None) is first  # same shape: replayed, not recomputed
    other = model(torch.zeros(5, dtype=torch.long), None, None)
    assert other.shape == (5, 8) and other is not first
    assert model.compute_logits(first) is model.compute_logits(first + 1)
    assert calls == [("forward", (3,)), ("forward", (5,)), ("logits", (3, 8))]
    assert model.hidden_size == 8  # everything else is the model's


@pytest.mark.gpu
def test_gpu_inputs_reach_the_model_as_planned_in_eager_and_graph_steps():
    """The pinned buffers, copied asynchronously, hold each step's plan when the model reads them: a workload
    with arrivals, departures and preemption, prefill steps eager and decode steps replayed."""
    engine = LLMEngine(model=TINY, device="cuda", dtype="float32", max_model_len=256, max_num_seqs=8,
                       max_num_batched_tokens=64, num_kv_blocks=12, cuda_graph_max_batch=8,  # 8 x ~48 > 192 slots
                       cuda_graph_max_tokens=0,  # prefill eager (test_17_piecewise checks the piecewise replay's inputs)
                       async_scheduling=False)  # the plain loop, whose runner.execute is spied on (test_17_overlap
    #                                             checks the overlapped loop's tokens against it)
    runner, seen = engine.runner, {"eager": 0, "graph": 0}
    execute = runner.execute

    def checked(out):
        logits = execute(out)
        torch.cuda.synchronize()
        n, tables = len(out.scheduled), block_table_array(out.block_tables)
        if runner.last_step_graph:
            s = runner.static
            got = [s[k][:n].tolist() for k in ("input_ids", "positions", "slot_mapping", "context_lens")]
            got_tables = s["block_tables"][:n, : tables.shape[1]].cpu().numpy()
            seen["graph"] += 1
        else:
            got, got_tables = captured["lists"], captured["tables"]
            seen["eager"] += 1
        planned = [np.asarray(x).tolist() for x in (out.input_ids, out.positions, out.slot_mapping, out.seq_lens)]
        assert got == planned, f"step {out.step}"  # lists from plan(), numpy arrays from the steady-decode path
        np.testing.assert_array_equal(got_tables, tables)
        return logits

    captured = {}
    model = runner.model

    class Spy:
        def __call__(self, input_ids, positions, meta):
            captured["lists"] = [input_ids.tolist(), positions.tolist(), meta.slot_mapping.tolist(),
                                 meta.context_lens.tolist()]
            captured["tables"] = meta.block_tables.cpu().numpy()
            return model(input_ids, positions, meta)

        def __getattr__(self, name):
            return getattr(model, name)

    runner.model, runner.execute = Spy(), checked
    rng = random.Random(0)
    for i in range(14):
        engine.add_request([rng.randrange(TINY.vocab_size) for _ in range(rng.randint(3, 60))],
                           SamplingParams(temperature=0, max_tokens=rng.randint(4, 30), ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert seen["eager"] and seen["graph"] and engine.scheduler.num_preemptions
    engine.check_no_leaks()
