"""Warp intrinsics for numba's CUDA simulator.

The simulator runs each CUDA thread of a block as a Python thread, but it has no ``shfl_*_sync``,
``syncwarp`` or ``activemask``. This module adds them to its fake ``cuda`` module, built on the block
barrier the simulator already has: every thread writes its value to a mailbox, waits at the barrier,
reads the value of its source lane, and waits again so the next exchange cannot overwrite a value
not yet read. That barrier is replaced too: numba's manager polls its threads in a loop that holds the GIL
against them; ours sleeps until the last thread arrives (``_event_driven_barrier``; 2-4x faster launches for the
kernels that shuffle).

Limit (documented in notebook 01): inside a simulated kernel, **every thread of the block** must make
the same warp calls in the same order, as in the full-warp reductions our kernels use. On a GPU,
only the threads of one warp take part; a kernel that relies on that difference would deadlock here.
"""

import threading

import numpy as np

_FULL_MASK = 0xFFFFFFFF


_MAILBOX: dict[int, object] = {}  # thread id in the block -> the value it published (blocks run one at a time)


def warp_values(value) -> list:
    """Publish ``value`` for this thread, then return every lane's value in its warp, lane by lane (None for a
    lane the block does not have). Called by every thread of the block, like the shuffles built on it."""
    me = threading.current_thread()
    base = me.thread_id - me.thread_id % 32
    threads = me._manager.block_state.size  # the block's thread count (its dimensions' product)
    _MAILBOX[me.thread_id] = value
    me.syncthreads()
    out = [_MAILBOX[base + lane] if base + lane < threads else None for lane in range(32)]
    me.syncthreads()  # nobody publishes again before everyone has read
    return out


def _exchange(module, value, source_lane) -> object:
    """Publish ``value`` for this thread, then return what lane ``source_lane(lane)`` published."""
    values = warp_values(value)
    src = source_lane(threading.current_thread().thread_id % 32)
    return values[src] if 0 <= src < 32 and values[src] is not None else value


def _shfl_sync(self, mask, value, src_lane):
    return _exchange(self, value, lambda lane: src_lane % 32)


def _shfl_up_sync(self, mask, value, delta):
    return _exchange(self, value, lambda lane: lane - delta)


def _shfl_down_sync(self, mask, value, delta):
    return _exchange(self, value, lambda lane: lane + delta)


def _shfl_xor_sync(self, mask, value, lane_mask):
    return _exchange(self, value, lambda lane: lane ^ lane_mask)


def _syncwarp(self, mask=_FULL_MASK):
    threading.current_thread().syncthreads()


def _activemask(self):
    return _FULL_MASK


def _lanemask_lt(self):
    return (1 << (threading.current_thread().thread_id % 32)) - 1


def _bitcast(value, src, dst):
    return np.array(value).astype(src).view(dst)[()]


def _install_libdevice_casts() -> None:
    """The simulator's ``libdevice`` functions are stubs: give the bit casts real bodies."""
    from numba.cuda import libdevice

    libdevice.int_as_float = lambda x: _bitcast(np.int64(x) & 0xFFFFFFFF, np.uint32, np.float32)
    libdevice.float_as_int = lambda x: _bitcast(x, np.float32, np.int32)
    libdevice.double_as_longlong = lambda x: _bitcast(x, np.float64, np.int64)
    libdevice.longlong_as_double = lambda x: _bitcast(x, np.int64, np.float64)


def _locked_shared_arrays() -> None:
    """The simulator allocates a block's shared array when the first thread reaches ``cuda.shared.array`` --
    a check-then-set without a lock, so two threads switched between the check and the set get two arrays and
    stop sharing (rare at Python's default 5 ms thread switch interval, common at short ones). Make it atomic."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    if getattr(FakeCUDAShared.array, "_locked", False):
        return
    import sys

    from numba import types
    from numba.np import numpy_support

    lock, dynamic = threading.Lock(), FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or the simulator's error
            return dynamic(self, shape, dtype, alignment)
        caller = sys._getframe(1)  # NOTE: one array per source line of the kernel, as the simulator keys them
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                res = self._allocations[key] = np.empty(shape, dt)
        return res

    array._locked = True
    FakeCUDAShared.array = array


def _event_driven_barrier() -> None:
    """Replace the simulator's block barrier, a polling loop, with one that wakes whoever waits.

    The simulator's ``BlockManager.run`` spins over its threads (``is_alive``, a flag per thread) until all of
    them wait at ``syncthreads``; the spinning thread competes for the GIL with the threads it waits for, and the
    shuffles above are two barriers each. Here the block's threads count themselves in under one condition
    variable: the last to arrive (or a thread that exits while the rest wait) releases the others, and the
    manager sleeps until every thread has exited or one has raised. Same semantics as numba's: exited threads
    are not waited for, and an exception in one thread aborts the block and is raised from the launch."""
    from numba.cuda.simulator import kernel as sim

    if getattr(sim.BlockManager.run, "_event_driven", False):
        return
    thread_run = sim.BlockThread.run

    def release(m) -> None:  # holding m.cv: everyone still running is at the barrier
        m.arrived = 0
        m.generation += 1
        m.cv.notify_all()

    def syncthreads(self) -> None:
        m = self._manager
        with m.cv:
            if m.failed is not None:
                raise RuntimeError("abort flag set on syncthreads call")
            generation = m.generation
            m.arrived += 1
            if m.arrived == m.live:
                release(m)
            while m.generation == generation and m.failed is None:
                m.cv.wait()
            if m.failed is not None:
                raise RuntimeError("abort flag set on syncthreads clear")

    def run_thread(self) -> None:
        try:
            thread_run(self)  # numba's: keeps an exception on self.exception
        finally:
            m = self._manager
            with m.cv:
                m.live -= 1
                if self.exception is not None and m.failed is None:
                    m.failed = self
                if m.live and m.arrived == m.live:
                    release(m)
                m.cv.notify_all()

    def run_block(self, grid_point, *args) -> None:
        self.cv = threading.Condition()
        self.arrived = self.generation = 0
        self.failed = None
        threads = []
        with self.cv:  # no thread counts itself in before all are created
            for block_point in np.ndindex(*self._block_dim):
                threads.append(sim.BlockThread(lambda: self._f(*args), self, grid_point, block_point, self._debug))
            self.live = len(threads)
            for t in threads:
                t.start()
            while self.live and self.failed is None:
                self.cv.wait()
        if self.failed is not None:  # the others were woken to raise; as numba does, do not join them
            raise self.failed.exception[0].with_traceback(self.failed.exception[1])

    run_block._event_driven = True
    run_block.polling = (sim.BlockManager.run, thread_run, sim.BlockThread.syncthreads)  # numba's, for the tests
    sim.BlockThread.syncthreads = syncthreads
    sim.BlockThread.run = run_thread
    sim.BlockManager.run = run_block


def install() -> None:
    """Add warp intrinsics and libdevice bit casts to the simulator, lock its shared-array allocation
    (idempotent)."""
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    _locked_shared_arrays()
    _event_driven_barrier()
    _install_libdevice_casts()
    for name, fn in {
        "shfl_sync": _shfl_sync,
        "shfl_up_sync": _shfl_up_sync,
        "shfl_down_sync": _shfl_down_sync,
        "shfl_xor_sync": _shfl_xor_sync,
        "syncwarp": _syncwarp,
        "activemask": _activemask,
        "lanemask_lt": _lanemask_lt,
    }.items():
        if not hasattr(FakeCUDAModule, name):
            setattr(FakeCUDAModule, name, fn)
