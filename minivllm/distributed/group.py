"""The tensor-parallel process group: ``tp`` ranks, one per process, and the two collectives the model needs.

A :class:`TensorParallelGroup` is built directly on a ``TCPStore`` (rank 0 hosts it on a free port of this
machine) rather than through ``torch.distributed.init_process_group``: it is not a process-wide default group,
so several engines (a TP=1 and a TP=2 one, in a test) live in one process. On a CPU the collectives go through
gloo; on GPUs through NCCL, rank ``r`` on ``cuda:r`` (written for GPUs, not yet run on more than one).

Every collective has a timeout (``COLLECTIVE_TIMEOUT``): a rank that dies mid-step makes gloo fail at once
("connection closed by peer"); one that hangs makes the others fail after the timeout, never wait forever.

Left out: several hosts (the store is on 127.0.0.1), custom all-reduce kernels (vLLM's one-shot NVLink
all-reduce beats NCCL for decode's small tensors), overlapping communication with compute.
"""

import datetime

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


class TensorParallelGroup:
    """Rank ``rank`` of ``size``: ``all_reduce`` (sum, in place) and ``gather`` (to rank 0) over ``device`` tensors."""

    def __init__(self, rank: int, size: int, device: torch.device | str) -> None:
        self.rank, self.size, self.device = rank, size, torch.device(device)
        self.pg = None  # connect() makes it; a rank may build and load its shard before (the sizes are known)

    def connect(self, store: dist.Store, timeout: datetime.timedelta | None = None) -> None:
        """Join the other ranks (blocks until all of them have called it); collectives time out after ``timeout``
        (default ``COLLECTIVE_TIMEOUT``)."""
        timeout = timeout or COLLECTIVE_TIMEOUT
        store = dist.PrefixStore("minivllm-tp", store)
        if self.device.type == "cuda":  # NOTE: untested on GPUs (no multi-GPU machine when this was written)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, self.rank, self.size, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, self.rank, self.size, timeout)

    @staticmethod
    def host_store(size: int, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> dist.TCPStore:
        """Rank 0's store on a free port of this machine (``store.port``); the workers connect to it."""
        return dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)

    @staticmethod
    def connect_store(port: int, size: int, timeout: datetime.timedelta = COLLECTIVE_TIMEOUT) -> dist.TCPStore:
        return dist.TCPStore("127.0.0.1", port, size, False, timeout=timeout)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; every rank gets the sum."""
        self.pg.allreduce([x]).wait()
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the ranks' ``x`` (rows, n) side by side, (rows, size * n). Other ranks: None."""
        x = x.contiguous()
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank != 0:
            self.pg.gather([], [x], options).wait()
            return None
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.gather([parts], [x], options).wait()
        return torch.cat(parts, dim=-1)

    def all_reduce_min(self, value: int) -> int:
        """The smallest of the ranks' ``value`` (e.g. how many KV blocks fit), known to every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], options).wait()
        return int(t.item())

    def shutdown(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None and hasattr(pg, "shutdown"):
            pg.shutdown()
