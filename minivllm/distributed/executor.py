"""Rank 0's side of tensor parallelism: start the workers, load rank 0's shard, send each step's plan to them.

:meth:`TensorParallelExecutor.start` (called by ``LLMEngine`` when ``tensor_parallel_size > 1``)::

    check the sizes ──► start ranks 1..N-1 (processes) ──► every rank loads its shard ──► all loaded
    ──► process group up ──► every rank: how many KV blocks fit ──► the smallest, on every rank

Then each step, :class:`TensorParallelRunner` sends the scheduler's plan down every worker's pipe (a pickled dict
of flat lists and the blocks each table gained: ~0.35 ms and 7.6 kB at batch 256 on the 2-core CI machine) and
runs rank 0's forward pass; the ranks meet at each all-reduce, and rank 0 gets the gathered logits and samples.
Only rank 0 schedules, caches prefixes and samples: a worker just executes plans.

Failure is never a hang: while starting, rank 0 waits on the workers' pipes *and* their process handles, so a
worker that raises (its traceback comes back through the pipe) or dies ends the start with a
:class:`TensorParallelError`; during a step, a dead worker makes the next collective fail at once (gloo: connection
closed), a hung one after ``COLLECTIVE_TIMEOUT``, and rank 0 raises a ``TensorParallelError`` naming the rank and its
exit code. ``close()`` (``LLM.close``, ``with LLM(...)``, or interpreter exit) stops the workers.

Left out: CUDA graphs with tensor parallelism (the decode graph would have to capture NCCL calls: the engine
runs eager when tensor_parallel_size > 1), workers on other hosts.
"""

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait

import torch

from minivllm.batch import SchedulerOutput
from minivllm.config import EngineConfig
from minivllm.distributed.group import TensorParallelGroup
from minivllm.distributed.model import load_shard, shard_num_kv_blocks
from minivllm.distributed.sharding import check_tensor_parallel_size
from minivllm.distributed.worker import PlanSender, set_threads, share_cores

STARTUP_TIMEOUT_S = 600.0  # a rank loading a large checkpoint from a slow disk
POLL_S = 0.2  # while starting, how often rank 0 checks that the workers are alive


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed or died: the engine cannot go on (build a new one)."""


def _model_config(config: EngineConfig):
    from minivllm.model import ModelConfig
    from minivllm.model.loader import load_config

    return config.model if isinstance(config.model, ModelConfig) else load_config(config.model)


class TensorParallelExecutor:
    """Rank 0: the group, its own shard (``model``, ``tokenizer``) and the worker processes of ranks 1..N-1."""

    def __init__(self, config: EngineConfig) -> None:
        self.config, self.size = config, config.tensor_parallel_size
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.error: TensorParallelError | None = None
        self._threads_before: tuple[int, int] | None = None  # this process's (torch, numba) threads, given back
        self.plans = PlanSender()
        self.worker_errors: dict[int, str] = {}  # rank -> the traceback it sent
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)

    @classmethod
    def start(cls, config: EngineConfig) -> "TensorParallelExecutor":
        """Check the sizes (before any process starts), start the workers, and load rank 0's shard."""
        check_tensor_parallel_size(_model_config(config), config.tensor_parallel_size)
        self = cls(config)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        config, size = self.config, self.size
        device = torch.device("cuda", 0) if config.torch_device.type == "cuda" else torch.device("cpu")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
        if device.type == "cpu":  # NOTE: this process's threads too: the ranks share the cores (until close())
            self._threads_before = share_cores(size)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # waiting OpenMP threads sleep (bench._harness says why)
        store = TensorParallelGroup.host_store(size)
        for rank in range(1, size):
            # a fresh interpreter (not multiprocessing's spawn, which re-runs an unguarded __main__ script),
            # talking to us over one end of a socket pair
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen([sys.executable, "-c", f"from minivllm.distributed.worker import main; "
                                     f"main({theirs.fileno()})"], pass_fds=[theirs.fileno()], env=env)
            theirs.close()
            self.procs.append(proc)
            self.conns.append(Connection(ours.detach()))
            try:
                self.conns[-1].send((config, rank, store.port))
            except OSError:  # it is already gone
                raise self._failure(f"while starting (rank {rank}'s pipe closed)") from None
        self.group, self.store = TensorParallelGroup(0, size, device), store
        self.model, self.tokenizer = load_shard(config, self.group, tokenizer=True)  # while the workers load theirs
        self._wait_for("loaded")
        try:
            self.group.connect(store)
        except RuntimeError as e:  # a worker died between "loaded" and joining, or hung past the timeout
            raise self._failure(f"while connecting ({str(e).splitlines()[0][:200]})") from e

    def agree_num_kv_blocks(self, max_model_len: int) -> int:
        """The KV blocks every rank can hold (the smallest of the ranks' budgets); the workers allocate theirs."""
        self._send(pickle.dumps(("blocks", max_model_len)))
        try:
            return self.group.all_reduce_min(shard_num_kv_blocks(self.config, self.model, max_model_len))
        except RuntimeError as e:  # a collective of the profiling pass (GPU) or of the agreement failed
            raise self._failure(f"while sizing the KV cache ({str(e).splitlines()[0][:200]})") from e

    def wrap(self, runner) -> "TensorParallelRunner":
        return TensorParallelRunner(runner, self)

    # ------------------------------------------------------------------ talking to the workers
    def _wait_for(self, kind: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until every worker has sent ``(kind, ...)``; a worker's error or death raises at once."""
        pending = dict(enumerate(self.conns, start=1))
        deadline = time.monotonic() + timeout
        while pending:
            for conn in wait(list(pending.values()), timeout=POLL_S):
                rank = next(r for r, c in pending.items() if c is conn)
                message = self._recv(rank, conn)
                if message[0] != kind:
                    raise self._failure(f"rank {rank} sent {message[0]!r}, expected {kind!r}")
                del pending[rank]
            if any(self.procs[rank - 1].poll() is not None for rank in pending):
                raise self._failure(f"while waiting for {kind!r}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {kind!r} from ranks {sorted(pending)} within {timeout:.0f} s")

    def _recv(self, rank: int, conn) -> tuple:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            raise self._failure(f"while starting (rank {rank}'s pipe closed)") from None
        if message[0] == "error":
            self.worker_errors[rank] = message[1]
            raise self._failure("while starting")
        return message

    def _send(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if any(proc.poll() is not None for proc in self.procs):
            raise self._failure("before a step")
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as e:
            raise self._failure(f"sending a step ({e})") from None

    def send_plan(self, out: SchedulerOutput) -> None:
        self._send(pickle.dumps(self.plans.message(out), pickle.HIGHEST_PROTOCOL))

    def _failure(self, context: str) -> TensorParallelError:
        """The error to raise once something went wrong: which workers died and how; then stop the rest."""
        if self.error is not None:
            return self.error
        lines = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            try:
                code = proc.wait(timeout=1.0)  # a worker whose death broke the collective may still be exiting
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                lines.append(f"worker rank {rank} (pid {proc.pid}) died ({how})")
            try:
                while conn.poll():
                    message = conn.recv()
                    if message[0] == "error":
                        self.worker_errors[rank] = message[1]
            except (EOFError, OSError):
                pass
            if rank in self.worker_errors:
                lines.append(f"worker rank {rank} raised:\n{self.worker_errors[rank].rstrip()}")
        detail = "; ".join(lines) if lines else "no worker died; a collective failed or timed out"
        self.error = TensorParallelError(f"tensor parallelism (tp={self.size}) failed {context}: {detail}. "
                                         f"The engine cannot continue; build a new one.")
        self.close()
        return self.error

    def close(self) -> None:
        """Stop the workers (politely, then by force), release the group, give this process its threads back.
        Safe to call twice."""
        self._finalizer()
        if self._threads_before is not None:
            set_threads(*self._threads_before)
            self._threads_before = None
        group = getattr(self, "group", None)
        if group is not None:
            try:
                group.shutdown()
            except RuntimeError:
                pass


def _stop(procs: list[subprocess.Popen], conns: list[Connection]) -> None:
    for conn in conns:
        try:
            conn.send_bytes(b"")
        except OSError:
            pass
    for proc in procs:
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
    for conn in conns:
        conn.close()


class TensorParallelRunner:
    """Rank 0's runner: sends the plan to the workers, then runs rank 0's part of the step (``ModelRunner``)."""

    def __init__(self, runner, executor: TensorParallelExecutor) -> None:
        self.runner, self.executor = runner, executor

    def execute(self, out: SchedulerOutput) -> torch.Tensor | None:
        if out.scheduled:  # NOTE: an empty step runs no forward pass on any rank
            self.executor.send_plan(out)
        try:
            return self.runner.execute(out)
        except TensorParallelError:
            raise
        except Exception as e:  # a collective failed (a worker died, or hung past the timeout), or rank 0 did
            raise self.executor._failure(f"during a step ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        except BaseException:  # Ctrl-C mid-step: the workers are stuck in this step's collectives
            self.executor._failure("during a step (interrupted)")
            raise

    def __getattr__(self, name: str):
        return getattr(self.runner, name)
