"""``ModelRunner``: one scheduled step in, the logits of the rows to sample out.

The scheduler plans a step as flat Python lists (``SchedulerOutput``); the runner turns them into
tensors on the model's device, builds the step's :class:`PagedAttentionMetadata` and runs the model.

Two ways to run a step:

* **eager** (every prefill or mixed step, and everything on a CPU): one forward pass, launched op by op;
* **CUDA graph** (decode-only steps on a GPU): at start-up the decode forward pass is captured once per
  batch-size bucket (1, 2, 4, 8, 16, 32, ...) into a ``torch.cuda.CUDAGraph`` over static input buffers;
  a step copies its inputs into the buffers of the smallest bucket that holds it (a padding row is a
  dummy one-token sequence in block 0: it stores nothing, slot -1, and its logits are dropped) and
  replays the graph. A decode step of a small model is
  hundreds of kernel launches of a few microseconds of work each; replayed, the CPU cost of launching
  them (~30 µs per numba launch, ~8 µs per torch op) disappears.

Left out: overlapping the next step's scheduling with this step's GPU work, piecewise graphs for
prefill, and multi-GPU.
"""

import numpy as np
import torch

from minivllm.batch import SchedulerOutput
from minivllm.cache.block_table import block_table_array
from minivllm.cache.kv_cache import PagedKVCache
from minivllm.model.paged_attention import PagedAttentionMetadata
from minivllm.model.qwen3 import Qwen3ForCausalLM
from minivllm.utils import cdiv


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a captured graph: 1, 2, 4, 8, then every multiple of 16 up to ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, kv_cache: PagedKVCache, *, max_model_len: int,
                 attention_backend: str = "auto", use_cuda_graphs: bool = True, cuda_graph_max_batch: int = 256):
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        self.max_blocks = cdiv(max_model_len, self.block_size)  # block-table width
        self.backend = attention_backend
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_batch = 0
        self.last_step_graph = False  # whether the latest execute() replayed a graph (the step log shows it)
        if use_cuda_graphs and self.device.type == "cuda":
            self.capture(cuda_graph_max_batch)

    # ------------------------------------------------------------------ eager
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Run one planned step; returns float logits (len(out.sample_indices), vocab), None for an empty step."""
        num_seqs, num_decodes = len(out.scheduled), out.num_decodes
        self.last_step_graph = num_decodes == num_seqs and 0 < num_seqs <= self.graph_batch
        if not num_seqs:
            return None
        if self.last_step_graph:
            return self._replay(out)
        dev = self.device
        input_ids = torch.tensor(out.input_ids, dtype=torch.long).to(dev, non_blocking=True)
        positions = torch.tensor(out.positions, dtype=torch.long).to(dev, non_blocking=True)
        meta = PagedAttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(out.slot_mapping, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=torch.from_numpy(block_table_array(out.block_tables)).to(dev, non_blocking=True),
            context_lens=torch.tensor(out.seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            num_decodes=num_decodes,
            max_context_len=max(out.seq_lens),
            query_lens=[e.num_new_tokens for e in out.scheduled[num_decodes:]],
            prefill_context_lens=out.seq_lens[num_decodes:],
            backend=self.backend,
        )
        hidden = self.model(input_ids, positions, meta)  # (tokens, hidden)
        rows = torch.tensor(out.sample_indices, dtype=torch.long).to(dev, non_blocking=True)
        return self.model.compute_logits(hidden[rows]).float()

    # ------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture(self, max_batch: int) -> None:
        """Capture the decode forward pass for every bucket up to ``max_batch`` (largest first, one memory pool)."""
        dev, n = self.device, max_batch
        self.static = {
            "input_ids": torch.zeros(n, dtype=torch.long, device=dev),
            "positions": torch.zeros(n, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((n,), -1, dtype=torch.long, device=dev),
            "block_tables": torch.from_numpy(self._padding_tables(n, self.max_blocks)).to(dev),
            "context_lens": torch.ones(n, dtype=torch.int32, device=dev),
        }
        self.static_logits: dict[int, torch.Tensor] = {}
        pool = None
        for b in reversed(graph_buckets(max_batch)):
            s = self.static
            meta = PagedAttentionMetadata(self.kv_cache, s["slot_mapping"][:b], s["block_tables"][:b],
                                          s["context_lens"][:b], num_decodes=b, max_context_len=self.max_model_len,
                                          query_lens=[], prefill_context_lens=[], backend=self.backend)

            def forward(b=b, meta=meta):
                hidden = self.model(s["input_ids"][:b], s["positions"][:b], meta)
                return self.model.compute_logits(hidden)

            forward()  # warm-up: compiles the kernels for these shapes, settles the allocator
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.static_logits[b] = forward()
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.graph_batch = max_batch

    def _replay(self, out: SchedulerOutput) -> torch.Tensor:
        n = len(out.scheduled)
        b = next(size for size in sorted(self.graphs) if size >= n)
        ids = np.zeros(b, dtype=np.int64)
        pos = np.zeros(b, dtype=np.int64)
        slots = np.full(b, -1, dtype=np.int64)
        lens = np.ones(b, dtype=np.int32)
        ids[:n], pos[:n], slots[:n], lens[:n] = out.input_ids, out.positions, out.slot_mapping, out.seq_lens
        s = self.static
        s["input_ids"][:b].copy_(torch.from_numpy(ids), non_blocking=True)
        s["positions"][:b].copy_(torch.from_numpy(pos), non_blocking=True)
        s["slot_mapping"][:b].copy_(torch.from_numpy(slots), non_blocking=True)
        s["context_lens"][:b].copy_(torch.from_numpy(lens), non_blocking=True)
        tables = self._padding_tables(b, max(map(len, out.block_tables)), out.block_tables)
        s["block_tables"][:b, : tables.shape[1]].copy_(torch.from_numpy(tables), non_blocking=True)
        self.graphs[b].replay()
        return self.static_logits[b][:n].float()

    @staticmethod
    def _padding_tables(rows: int, width: int, tables: list[list[int]] = ()) -> np.ndarray:
        """``tables`` padded to (rows, width); each padding row a dummy one-token sequence in block 0."""
        array = block_table_array(tables, rows=rows, width=width)
        array[len(tables):, 0] = 0  # NOTE: padding rows read one slot of block 0 (context 1), in bounds
        return array
