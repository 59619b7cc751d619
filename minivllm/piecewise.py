"""Piecewise CUDA graphs: a prefill or mixed step replayed as graphs, with attention run eagerly between them.

A decode step replays one CUDA graph of the whole forward pass (``ModelRunner.capture``). A step with prompt
tokens cannot: its attention depends on how the tokens split into sequences (``cu_seqlens``, the longest
query, which keys are cached), and that changes every step. Everything else in the forward pass -- the
embedding, norms, matmuls, QK-norm + RoPE + KV store, the MLP -- depends only on the number of tokens. So the
forward pass is cut at every attention call into ``num_layers + 1`` pieces, and each piece is captured once per
token-count bucket (16, 32, ..., 512, then every 256 up to the cap)::

    piece 0: embed, norm, qkv_proj, qkv_prep  ──►  q, k, v copied into static buffers
    attention of layer 0 (eager: one varlen flash call over the step's real rows)
    piece 1: o_proj, add + norm, MLP, add + norm, qkv_proj, qkv_prep  ──►  q, k, v
    attention of layer 1 ...
    piece L: o_proj, add + norm, MLP, final norm  ──►  the hidden states

A step of T tokens is padded to the smallest bucket B >= T (padding rows: token 0 at position 0, slot -1, so
nothing is stored) and replays B's pieces; attention sees only the T real rows. An eager step launches ~10
kernels per layer (~30 µs of host time per numba launch, ~8 µs per torch op); a replayed piece costs one
launch. vLLM does the same through ``torch.compile`` (its "piecewise" CUDA graphs, split at attention).

How the cut is made: the model runs unchanged; its attention metadata carries :class:`AttentionSplit`, and
``paged_attention`` hands q, k, v to it instead of attending (:meth:`AttentionSplit.attend`). While capturing,
that call copies them into the static buffers, ends the current graph and begins the next one. Without
capturing (a warm-up, or a test on a CPU), it runs the attention on the real rows right there: the same
buffers and padding, no graphs.

Left out: a graph for the LM head (the sampled rows differ per step; it runs eagerly, one matmul).
"""

from dataclasses import dataclass, replace

import torch

from minivllm.model.paged_attention import PagedAttentionMetadata, paged_attention


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts that get piecewise graphs: 16, 32, ..., 512, then every multiple of 256, up to ``max_tokens``."""
    sizes = [s for s in (16, 32, 64, 128, 256, 512) if s < max_tokens] + list(range(768, max_tokens, 256))
    return sorted(set(sizes + [max_tokens]))


@dataclass(slots=True)
class _Capture:
    graphs: list  # the pieces captured so far (torch.cuda.CUDAGraph)
    graph: "torch.cuda.CUDAGraph"  # the piece being captured
    pool: object


class AttentionSplit:
    """Where the forward pass is cut: ``paged_attention`` hands each layer's q, k, v here (see the module doc).

    Holds the static buffers every piece reads and writes (sized for ``max_tokens`` rows): the step's inputs
    (``input_ids``, ``positions``, ``slot_mapping``), each layer's q, k, v, and the attention output.
    """

    def __init__(self, model, kv_cache, max_tokens: int, backend: str = "auto"):
        c, dev, dtype = model.config, model.device, model.dtype
        self.max_tokens = max_tokens
        self.kv_cache, self.backend = kv_cache, backend
        # the stand-in prompt's block table (every entry block 0, in bounds) and context length
        self.stand_in_tables = torch.zeros(1, -(-max_tokens // kv_cache.block_size), dtype=torch.int32, device=dev)
        self.stand_in_lens = torch.zeros(1, dtype=torch.int32, device=dev)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.long, device=dev)
        heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.q = torch.zeros(max_tokens, heads, c.head_dim, dtype=dtype, device=dev)
        self.k = torch.zeros(max_tokens, kv_heads, c.head_dim, dtype=dtype, device=dev)
        self.v = torch.zeros(max_tokens, kv_heads, c.head_dim, dtype=dtype, device=dev)
        self.out = torch.zeros(max_tokens, heads * c.head_dim, dtype=dtype, device=dev)
        self.stored = True  # whether the pieces store K and V (the fused qkv_prep) or attention must
        self._capture: _Capture | None = None
        self._eager: tuple[int, PagedAttentionMetadata] | None = None  # (real rows, their metadata)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, stored: bool) -> torch.Tensor:
        """Called by ``paged_attention`` in place of attending: q (B, q_heads, d), k, v (B, kv_heads, d) ->
        the static output (B, q_heads * d), which the next piece reads."""
        b = q.shape[0]
        self.q[:b].copy_(q)
        self.k[:b].copy_(k)
        self.v[:b].copy_(v)
        self.stored = stored
        if self._capture is not None:  # end this piece, begin the next
            cap = self._capture
            cap.graph.capture_end()
            cap.graphs.append(cap.graph)
            cap.graph = torch.cuda.CUDAGraph()
            cap.graph.capture_begin(pool=cap.pool)
        elif self._eager is not None:
            self.run_attention(layer, *self._eager)
        return self.out[:b]

    def run_attention(self, layer: int, tokens: int, meta: PagedAttentionMetadata) -> None:
        """Layer ``layer``'s attention over the ``tokens`` real rows of the static q, k, v, into the static output."""
        n = tokens
        self.out[:n].copy_(paged_attention(self.q[:n], self.k[:n], self.v[:n], layer, meta, stored=self.stored))

    def metadata(self, b: int, meta: PagedAttentionMetadata | None = None) -> PagedAttentionMetadata:
        """The metadata the pieces of bucket ``b`` run with: the static slots of all b rows, and the cut.

        ``meta``: the step's (its real rows), else a stand-in for capture and warm-up: one prompt of b tokens,
        nothing cached, nothing stored (every slot -1)."""
        if meta is None:
            meta = PagedAttentionMetadata(self.kv_cache, self.slot_mapping[:b], self.stand_in_tables,
                                          self.stand_in_lens, num_decodes=0, max_context_len=b, query_lens=[b],
                                          prefill_context_lens=[b], backend=self.backend)
        return replace(meta, slot_mapping=self.slot_mapping[:b], split=self, varlen=None)


class PiecewiseGraphs:
    """The pieces of the forward pass captured per token bucket (on a GPU); see the module doc.

    ``capture=False`` builds everything but the graphs: :meth:`forward` then runs the same pieces eagerly
    (what a CPU test checks: padding, static buffers, the cut at attention)."""

    def __init__(self, model, kv_cache, max_tokens: int, *, backend: str = "auto", capture: bool = True,
                 pool=None):
        self.model = model
        self.buckets = token_buckets(max_tokens)
        self.split = AttentionSplit(model, kv_cache, max_tokens, backend)
        self.graphs: dict[int, list] = {}  # bucket -> its num_layers + 1 pieces
        self.hidden: dict[int, torch.Tensor] = {}  # bucket -> the last piece's output, (bucket, hidden)
        self.pool = pool if pool is not None or not capture else torch.cuda.graph_pool_handle()
        if capture:
            self._capture_all()

    @property
    def max_tokens(self) -> int:
        return self.split.max_tokens

    def bucket(self, tokens: int) -> int:
        """The smallest bucket that holds ``tokens`` rows (``tokens <= max_tokens``)."""
        return next(b for b in self.buckets if b >= tokens)

    def _forward(self, b: int, meta: PagedAttentionMetadata | None = None) -> torch.Tensor:
        s = self.split
        return self.model(s.input_ids[:b], s.positions[:b], s.metadata(b, meta))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        s = self.split
        stream = torch.cuda.Stream()
        for b in reversed(self.buckets):  # largest first: the pool's blocks fit every smaller bucket
            s.stand_in_lens.fill_(b)
            warm = s.metadata(b)  # warm-up: kernels compiled, cuBLAS settled for this shape
            warm.split = None
            s._eager = (b, warm)
            self._forward(b)
            s._eager = None
            torch.cuda.synchronize()
            with torch.cuda.stream(stream):
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=self.pool)
                s._capture = _Capture([], graph, self.pool)
                hidden = self._forward(b)
                s._capture.graph.capture_end()
                pieces = s._capture.graphs + [s._capture.graph]
                s._capture = None
            torch.cuda.synchronize()
            self.graphs[b], self.hidden[b] = pieces, hidden

    def forward(self, tokens: int, meta: PagedAttentionMetadata) -> torch.Tensor:
        """The hidden states (tokens, hidden) of a step whose inputs are in the static buffers (padded to its
        bucket: ids 0, positions 0, slots -1); ``meta`` describes the real rows (attention runs on those)."""
        b = self.bucket(tokens)
        s = self.split
        if b not in self.graphs:  # not captured (a CPU): the same pieces, run eagerly
            s._eager = (tokens, meta)
            try:
                return self._forward(b, meta)[:tokens]
            finally:
                s._eager = None
        pieces = self.graphs[b]
        for layer, piece in enumerate(pieces[:-1]):
            piece.replay()
            s.run_attention(layer, tokens, meta)
        pieces[-1].replay()
        return self.hidden[b][:tokens]

