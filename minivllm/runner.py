"""``ModelRunner``: one scheduled step in, the logits of the rows to sample out.

The scheduler plans a step as flat Python lists (``SchedulerOutput``); the runner turns them into
tensors on the model's device, builds the step's :class:`PagedAttentionMetadata` and runs the model.

Three ways to run a step:

* **eager** (everything on a CPU, and steps larger than the graphs): one forward pass, launched op by op;
* **piecewise CUDA graphs** (prefill and mixed steps up to ``cuda_graph_max_tokens`` tokens on a GPU): the
  forward pass cut at every attention call, each piece captured per token-count bucket, attention run eagerly
  between them (:mod:`minivllm.piecewise`);
* **CUDA graph** (decode-only steps on a GPU): at start-up the decode forward pass is captured once per
  batch-size bucket (1, 2, 4, 8, 16, 32, ...) into a ``torch.cuda.CUDAGraph`` over static input buffers;
  a step copies its inputs into the buffers of the smallest bucket that holds it (a padding row is a
  dummy one-token sequence in block 0: it stores nothing, slot -1, and its logits are dropped) and
  replays the graph. A decode step of a small model is
  hundreds of kernel launches of a few microseconds of work each; replayed, the CPU cost of launching
  them (~30 µs per numba launch, ~8 µs per torch op) disappears.

Inputs are built with little per-step host work: the block tables live in one array with a row per running
sequence (:class:`BlockTableRows`: a step writes only the blocks a table gained), the flat lists become numpy
arrays in one C call each, and on a GPU they go through pinned buffers kept between steps (asynchronous copies).

A step is prepared (:meth:`ModelRunner.prepare`: inputs staged, copies queued) and then launched
(:meth:`ModelRunner.launch`); ``execute`` does both. The engine's overlapped loop (``async_scheduling=True``)
prepares step N+1 while step N runs, and launches it with input tokens that are still on the device (step N's
sampled tokens).

Left out: multi-GPU (the tensor-parallel runner wraps this one and runs eagerly).
"""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from minivllm.batch import SchedulerOutput
from minivllm.cache.block_table import PAD_BLOCK, block_table_array
from minivllm.cache.kv_cache import PagedKVCache
from minivllm.model.paged_attention import PagedAttentionMetadata
from minivllm.model.qwen3 import Qwen3ForCausalLM
from minivllm.piecewise import PiecewiseGraphs
from minivllm.sequence import Sequence
from minivllm.utils import cdiv


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a captured graph: 1, 2, 4, 8, then every multiple of 16 up to ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


@dataclass(slots=True)
class _Row:
    index: int  # the row of BlockTableRows.array
    table: list[int]  # the sequence's live block table that the row mirrors
    written: int  # how many of its blocks the row holds


class BlockTableRows:
    """The batch's block tables, kept between steps: one int32 row per running sequence, -1 padded.

    While a sequence runs, its table only grows (blocks are appended), so a step writes just the blocks each
    table gained since the previous step (a decode gains one every ``block_size`` steps) and gathers the
    batch's rows with one fancy index. A sequence whose table is another list (it was preempted and admitted
    again) has its row rewritten; one that left the batch gives its row back.
    """

    def __init__(self, width: int, rows: int = 64, block_size: int = 16) -> None:
        self.array = np.full((rows, width), PAD_BLOCK, dtype=np.int32)
        self.rows: dict[Sequence, _Row] = {}
        self.free = list(range(rows - 1, -1, -1))
        self.block_size = block_size
        self.batch: tuple[int, np.ndarray, int] | None = None  # (decode batch id, row index, width) of the last step

    def gather(self, out: SchedulerOutput) -> np.ndarray:
        """(sequences, longest table) int32: the step's tables in ``out.scheduled`` order."""
        if out.decode_batch is not None and self.batch is not None and self.batch[0] == out.decode_batch:
            return self._gather_steady(out)
        rows, index = self.rows, []
        for e, table in zip(out.scheduled, out.block_tables):
            row = rows.get(e.seq)
            if row is None or row.table is not table or row.written != len(table):
                row = self._update(e.seq, table, row)
            index.append(row.index)
        if len(rows) > len(index):  # someone left the batch (finished, preempted, or not scheduled)
            live = {e.seq for e in out.scheduled}
            for seq in [s for s in rows if s not in live]:
                self._release(seq)
        width = max(map(len, out.block_tables))
        index = np.asarray(index, dtype=np.intp)
        self.batch = (out.decode_batch, index, width) if out.decode_batch is not None else None
        return self.array[index, :width]

    def _gather_steady(self, out: SchedulerOutput) -> np.ndarray:
        """The same decode batch as the last step: only a sequence whose next position starts a block can have
        gained one (the scheduler's fast path grows no other table)."""
        _, index, width = self.batch
        for r in np.flatnonzero(out.positions % self.block_size == 0).tolist():
            seq, table = out.scheduled[r].seq, out.block_tables[r]
            row = self.rows[seq]
            if row.written != len(table):
                self._update(seq, table, row)
                width = max(width, len(table))
        self.batch = (out.decode_batch, index, width)
        return self.array[index, :width]

    def _update(self, seq: Sequence, table: list[int], row: _Row | None) -> _Row:
        """Write the blocks ``table`` gained since the row last saw it (all of them, for a new row)."""
        if row is None or row.table is not table or len(table) < row.written:
            if row is not None:
                self._release(seq)
            if not self.free:  # more sequences than rows: double the array
                old = self.array
                self.array = np.full((2 * old.shape[0], old.shape[1]), PAD_BLOCK, dtype=np.int32)
                self.array[: old.shape[0]] = old
                self.free = list(range(self.array.shape[0] - 1, old.shape[0] - 1, -1))
            row = self.rows[seq] = _Row(self.free.pop(), table, 0)
        # NOTE: tables only grow in place (BlockManager.grow appends), so the first row.written blocks are unchanged
        if len(table) == row.written + 1:  # a decode entered a new block (the common case): one element
            self.array[row.index, row.written] = table[-1]
        else:
            self.array[row.index, row.written: len(table)] = table[row.written:]
        row.written = len(table)
        return row

    def _release(self, seq: Sequence) -> None:
        row = self.rows.pop(seq)
        self.array[row.index, : row.written] = PAD_BLOCK
        self.free.append(row.index)


@dataclass(slots=True)
class PreparedStep:
    """A step whose inputs are on their way to the device (:meth:`ModelRunner.prepare`), to be launched."""

    out: SchedulerOutput
    bucket: int  # > 0: replays the graph of this batch size (its inputs are in the static buffers); 0: eager
    input_ids: torch.Tensor | None = None  # eager: the device tensors
    positions: torch.Tensor | None = None
    meta: PagedAttentionMetadata | None = None
    rows: torch.Tensor | None = None  # the hidden rows to sample (None: all of them, in order)
    pieces: bool = False  # replays the piecewise graphs (its inputs are in their static buffers)


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, kv_cache: PagedKVCache, *, max_model_len: int,
                 attention_backend: str = "auto", use_cuda_graphs: bool = True, cuda_graph_max_batch: int = 256,
                 cuda_graph_max_tokens: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks = cdiv(max_model_len, self.block_size)  # block-table width
        self.backend = attention_backend
        self.tables = BlockTableRows(self.max_blocks, block_size=self.block_size)
        self.pinned: dict[str, torch.Tensor] = {}  # GPU: host staging buffers (_stage)
        self.copied = torch.cuda.Event() if self.device.type == "cuda" else None  # the last step's copies are done
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batch = 0
        self.last_step_graph = False  # whether the latest execute() replayed a graph (the step log shows it)
        self.pieces: PiecewiseGraphs | None = None
        if use_cuda_graphs and self.device.type == "cuda":
            pool = torch.cuda.graph_pool_handle()  # NOTE: one pool; a step replays one bucket's graphs at a time
            if cuda_graph_max_tokens:
                self.pieces = PiecewiseGraphs(model, kv_cache, cuda_graph_max_tokens, backend=attention_backend,
                                              pool=pool)
            self.capture(cuda_graph_max_batch, pool)

    # ------------------------------------------------------------------ a step
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run one planned step; returns logits (len(out.sample_indices), vocab) in the model's dtype (the sampler
        widens them to float32 where it computes with them), None for an empty step.

        ``input_ids``: the step's tokens already on the device (a step planned ahead, ``out.pending_inputs``)."""
        return self.launch(self.prepare(out), input_ids)

    @torch.inference_mode()
    def prepare(self, out: SchedulerOutput) -> "PreparedStep | None":
        """The step's inputs on their way to the device (copies queued), everything but launching the model: the
        engine's overlapped loop prepares step N+1 before it queues step N's sampler. None for an empty step."""
        num_seqs, num_decodes = len(out.scheduled), out.num_decodes
        graph = num_decodes == num_seqs and 0 < num_seqs <= self.graph_batch
        self.last_step_graph = graph
        if not num_seqs:
            return None
        self._wait_for_copies()
        tables = self.tables.gather(out)
        staged_ids = out.pending_inputs is None
        if graph:
            bucket = self._bucket(num_seqs)
            self._fill_static(out, tables, staged_ids, bucket)
            return PreparedStep(out, bucket)
        dev = self.device
        tokens = len(out.input_ids)
        pieces = self.pieces is not None and tokens <= self.pieces.max_tokens
        if pieces:  # the inputs go to the pieces' static buffers, padded to the bucket
            split, b = self.pieces.split, self.pieces.bucket(tokens)
            self._copy_padded({"input_ids": split.input_ids, "positions": split.positions,
                               "slot_mapping": split.slot_mapping}, out, staged_ids, b)
            slots = split.slot_mapping[:tokens]
        else:
            slots = self._stage("slot_mapping", out.slot_mapping, np.int64).to(dev, non_blocking=True)
        meta = PagedAttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=slots,
            block_tables=self._stage("block_tables", tables, np.int32).to(dev, non_blocking=True),
            context_lens=self._stage("context_lens", out.seq_lens, np.int32).to(dev, non_blocking=True),
            num_decodes=num_decodes,
            max_context_len=int(np.max(out.seq_lens)),
            query_lens=[e.num_new_tokens for e in out.scheduled[num_decodes:]],
            prefill_context_lens=out.seq_lens[num_decodes:],
            backend=self.backend,
        )
        input_ids = positions = rows = None
        if not pieces:
            if staged_ids:
                input_ids = self._stage("input_ids", out.input_ids, np.int64).to(dev, non_blocking=True)
            positions = self._stage("positions", out.positions, np.int64).to(dev, non_blocking=True)
        if len(out.sample_indices) != tokens:  # NOTE: else every row is sampled, in order
            rows = self._stage("sample_indices", out.sample_indices, np.int64).to(dev, non_blocking=True)
        self._copies_queued()
        return PreparedStep(out, 0, input_ids, positions, meta, rows, pieces)

    @torch.inference_mode()
    def launch(self, step: "PreparedStep | None", input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Queue the prepared step's forward pass (a graph replay or eager ops); returns its logits, in the model's
        dtype. A graph step's are a view of the graph's output buffer, which the next replay of that graph rewrites:
        the engine queues the step's sampler before the next step's forward pass."""
        if step is None:
            return None
        if (input_ids is None) != (step.out.pending_inputs is None):
            raise ValueError("a step planned ahead needs its input_ids on the device, and only such a step takes them")
        if step.bucket:
            n = len(step.out.scheduled)
            if input_ids is not None:
                self.static["input_ids"][:n].copy_(input_ids)
            self.graphs[step.bucket].replay()
            return self.static_logits[step.bucket][:n]
        if step.pieces:
            tokens = len(step.out.input_ids)
            if input_ids is not None:
                self.pieces.split.input_ids[:tokens].copy_(input_ids)
            hidden = self.pieces.forward(tokens, step.meta)  # (tokens, hidden)
        else:
            input_ids = step.input_ids if input_ids is None else input_ids
            hidden = self.model(input_ids, step.positions, step.meta)  # (tokens, hidden)
        return self.model.compute_logits(hidden if step.rows is None else hidden[step.rows])

    def to_device(self, name: str, values, dtype) -> torch.Tensor:
        """A host array on the runner's device, copied asynchronously through the pinned buffer ``name``."""
        tensor = self._stage(name, values, dtype).to(self.device, non_blocking=True)
        self._copies_queued()
        return tensor

    def _stage(self, name: str, values, dtype) -> torch.Tensor:
        """``values`` (a list or an array) as a host tensor: on a CPU it is the input itself; on a GPU it is
        a pinned buffer kept between steps (one per ``name``), so copying it to the device is asynchronous."""
        array = np.asarray(values, dtype=dtype)
        if self.device.type != "cuda":
            return torch.from_numpy(array)
        buffer = self.pinned.get(name)
        if buffer is None or buffer.numel() < array.size:
            buffer = torch.empty(max(2 * array.size, 1024), dtype=torch.from_numpy(array).dtype, pin_memory=True)
            self.pinned[name] = buffer
        staged = buffer[: array.size].view(array.shape)
        staged.numpy()[...] = array
        return staged

    def _copies_queued(self) -> None:
        if self.device.type == "cuda":
            self.copied.record()

    def _wait_for_copies(self) -> None:
        """NOTE: the pinned buffers are rewritten only once the previous step's copies out of them are done
        (at once in the engine, whose step waits for its sampled tokens)."""
        if self.device.type == "cuda":
            self.copied.synchronize()

    # ------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture(self, max_batch: int, pool=None) -> None:
        """Capture the decode forward pass for every bucket up to ``max_batch`` (largest first, one memory pool)."""
        self.static = self.static_buffers(max_batch)
        self.static_logits: dict[int, torch.Tensor] = {}
        for b in reversed(graph_buckets(max_batch)):
            forward = functools.partial(self.static_forward, b)
            forward()  # warm-up: compiles the kernels for these shapes, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.static_logits[b] = forward()
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.graph_batch = max_batch

    def static_buffers(self, n: int) -> dict[str, torch.Tensor]:
        """The graphs' input buffers for up to ``n`` decodes (every row a padding row to start with)."""
        dev = self.device
        return {
            "input_ids": torch.zeros(n, dtype=torch.long, device=dev),
            "positions": torch.zeros(n, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((n,), -1, dtype=torch.long, device=dev),
            "block_tables": torch.from_numpy(self._padding_tables(n, self.max_blocks)).to(dev),
            "context_lens": torch.ones(n, dtype=torch.int32, device=dev),
        }

    def static_forward(self, b: int) -> torch.Tensor:
        """The decode forward pass of bucket ``b`` on the static buffers: what a graph captures. (b, vocab) logits."""
        s = self.static
        meta = PagedAttentionMetadata(self.kv_cache, s["slot_mapping"][:b], s["block_tables"][:b],
                                      s["context_lens"][:b], num_decodes=b, max_context_len=self.max_model_len,
                                      query_lens=[], prefill_context_lens=[], backend=self.backend)
        return self.model.compute_logits(self.model(s["input_ids"][:b], s["positions"][:b], meta))

    def _bucket(self, n: int) -> int:
        """The smallest captured batch size that holds ``n`` decodes."""
        return next(size for size in sorted(self.graphs) if size >= n)

    def _fill_static(self, out: SchedulerOutput, tables: np.ndarray, with_ids: bool, b: int) -> None:
        """Queue the copies of a decode step's inputs into the graphs' static buffers, padded to its bucket ``b``."""
        n = len(out.scheduled)
        padded = self._padding_tables(b, tables.shape[1])
        padded[:n] = tables
        s = self.static
        self._copy_padded(s, out, with_ids, b)
        s["block_tables"][:b, : tables.shape[1]].copy_(self._stage("block_tables", padded, np.int32), non_blocking=True)
        self._copies_queued()

    _PADDING = {"input_ids": 0, "positions": 0, "slot_mapping": -1, "context_lens": 1}  # a padding row: token 0
    #                                                      at position 0, nothing stored, context 1 (in block 0)

    def _copy_padded(self, static: dict[str, torch.Tensor], out: SchedulerOutput, with_ids: bool, b: int) -> None:
        """Queue the copies of the step's per-row inputs into ``static``'s buffers, padded to ``b`` rows.
        ``with_ids=False``: the ids are left to the launch (they are still on the device)."""
        rows = {"input_ids": out.input_ids if with_ids else (), "positions": out.positions,
                "slot_mapping": out.slot_mapping, "context_lens": out.seq_lens}
        for name, buffer in static.items():
            if name not in self._PADDING:
                continue
            values, dtype = rows[name], np.int32 if name == "context_lens" else np.int64
            padded = np.full(b, self._PADDING[name], dtype=dtype)
            padded[: len(values)] = values
            buffer[:b].copy_(self._stage(name, padded, dtype), non_blocking=True)

    @staticmethod
    def _padding_tables(rows: int, width: int, tables: list[list[int]] = ()) -> np.ndarray:
        """``tables`` padded to (rows, width); each padding row a dummy one-token sequence in block 0."""
        array = block_table_array(tables, rows=rows, width=width)
        array[len(tables):, 0] = 0  # NOTE: padding rows read one slot of block 0 (context 1), in bounds
        return array
