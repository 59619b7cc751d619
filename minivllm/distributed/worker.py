"""A tensor-parallel worker: rank ``r >= 1`` in its own process, running every step rank 0 sends it.

The worker loads its shard of the model, allocates its shard of the KV cache (its KV heads, the same blocks as
every rank) and builds an ordinary :class:`~minivllm.runner.ModelRunner`. Then, for every step, it receives the
plan rank 0's scheduler made, rebuilds a :class:`~minivllm.batch.SchedulerOutput` from it and executes it: the
same forward pass as rank 0, meeting it at every all-reduce. Its logits are not used: rank 0 samples.

The pipe to rank 0 carries the protocol: rank 0 -> worker ``(EngineConfig, rank, store port)``; worker -> rank 0
``("loaded",)`` or ``("error", traceback)``; rank 0 -> worker ``("blocks", max_model_len)``, then one pickled plan
per step (:class:`PlanSender`), empty bytes to stop. When rank 0's process ends, the pipe closes and the worker exits.
"""

import os
import pickle
import traceback
from dataclasses import fields
from operator import attrgetter

import torch

from minivllm.batch import ScheduledSequence, SchedulerOutput


_ENTRY = attrgetter(*(f.name for f in fields(ScheduledSequence)[1:]))  # a ScheduledSequence's fields after .seq


class PlanSender:
    """Rank 0: a step's plan as a small picklable dict. Every field of the ``SchedulerOutput`` goes as it is, except
    the sequences (their ids) and the block tables: a table that grew in place since the last step goes as its new
    blocks only (``(start, blocks)``: "the blocks from ``start`` on"; ``start == 0``: a new table)."""

    def __init__(self) -> None:
        self.sent: dict[int, tuple[list[int], int]] = {}  # seq id -> (its live table, blocks sent)

    def message(self, out: SchedulerOutput) -> dict:
        message = {f.name: getattr(out, f.name) for f in fields(SchedulerOutput)}
        message["scheduled"] = [(e.seq.seq_id, *_ENTRY(e)) for e in out.scheduled]
        tables, sent, now = [], self.sent, {}
        for e, table in zip(out.scheduled, out.block_tables):
            seq_id = e.seq.seq_id
            known = sent.get(seq_id)
            # NOTE: a running sequence's table only grows in place (minivllm.batch), as the runner assumes too
            start = known[1] if known is not None and known[0] is table and known[1] <= len(table) else 0
            tables.append((start, table[start:]))
            now[seq_id] = (table, len(table))
        self.sent = now
        message["block_tables"] = tables
        return message


class PlanMirror:
    """A worker: rebuilds each ``SchedulerOutput`` from :class:`PlanSender`'s messages, with block tables that behave
    like rank 0's: one list per sequence that grows in place while it runs (what ``BlockTableRows`` relies on),
    a new list when rank 0's is new. ``ScheduledSequence.seq`` is the sequence's id here."""

    def __init__(self) -> None:
        self.tables: dict[int, list[int]] = {}

    def rebuild(self, message: dict) -> SchedulerOutput:
        scheduled = [ScheduledSequence(*row) for row in message["scheduled"]]
        tables, kept = [], {}
        for e, (start, blocks) in zip(scheduled, message["block_tables"]):
            if start:
                table = self.tables[e.seq]
                assert len(table) == start, "the worker's table fell out of step with rank 0's"
                table.extend(blocks)
            else:
                table = list(blocks)
            kept[e.seq] = table
            tables.append(table)
        self.tables = kept
        return SchedulerOutput(**{**message, "scheduled": scheduled, "block_tables": tables})


def share_cores(size: int) -> int:
    """Give this rank its share of the CPU cores, for torch and for numba's parallel kernels (the CPU paged
    attention): oversubscribed threads spin while they wait for each other, and every all-reduce waits for the
    slowest rank. Returns the previous (torch, numba) thread counts."""
    threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    threads = max(1, threads // size)
    return set_threads(threads, threads)


def set_threads(torch_threads: int, numba_threads: int) -> tuple[int, int]:
    """Set torch's and numba's CPU threads; returns the previous (torch, numba) counts."""
    import kernels  # noqa: F401  (first: it decides about numba's CUDA simulator before numba loads)
    import numba  # NOTE: its OpenMP threading layer sets OpenMP's thread count when it launches; so set it too

    before = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(max(1, min(numba_threads, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(torch_threads)
    return before


def main(fd: int) -> None:
    """The worker process's entry point: ``fd`` is its end of the socket pair to rank 0, which first sends
    (the engine's :class:`~minivllm.config.EngineConfig`, this worker's rank, the store's port)."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        config, rank, port = conn.recv()
    except EOFError:
        return
    try:
        _serve(config, rank, port, conn)
    except EOFError:  # rank 0 is gone: nothing left to do
        return
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None


def _serve(config, rank: int, port: int, conn) -> None:
    from minivllm.cache import PagedKVCache
    from minivllm.distributed.model import load_shard, shard_num_kv_blocks
    from minivllm.distributed.group import TensorParallelGroup
    from minivllm.runner import ModelRunner

    size = config.tensor_parallel_size
    device = torch.device("cuda", rank) if config.torch_device.type == "cuda" else torch.device("cpu")
    if device.type == "cuda":  # NOTE: untested on GPUs (no multi-GPU machine when this was written)
        torch.cuda.set_device(device)
        import kernels  # noqa: F401  (first: it decides about numba's simulator before numba loads)
        from numba import cuda as numba_cuda

        numba_cuda.select_device(rank)  # numba's kernels launch on torch's streams of this device
    else:
        share_cores(size)
    group = TensorParallelGroup(rank, size, device)
    model, _ = load_shard(config, group, tokenizer=False)
    conn.send(("loaded",))
    group.connect(TensorParallelGroup.connect_store(port, size))
    _, max_model_len = conn.recv()
    num_blocks = group.all_reduce_min(shard_num_kv_blocks(config, model, max_model_len))
    kv_cache = PagedKVCache.allocate(model.shard_config.kv_shape, num_blocks, block_size=config.block_size,
                                     device=device, dtype=config.torch_kv_cache_dtype)
    runner = ModelRunner(model, kv_cache, max_model_len=max_model_len, attention_backend=config.attention_backend,
                         use_cuda_graphs=False)
    mirror = PlanMirror()
    while (data := conn.recv_bytes()) != b"":
        runner.execute(mirror.rebuild(pickle.loads(data)))
    group.shutdown()
