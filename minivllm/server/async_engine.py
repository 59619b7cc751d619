"""``AsyncLLMEngine``: the engine on a thread of its own, each HTTP request an asyncio stream of outputs.

``LLMEngine`` is not thread-safe, so exactly one thread, the engine thread, calls ``add_request``, ``step``
and ``abort``. The event loop talks to it through a thread-safe command queue; the engine thread answers
through ``loop.call_soon_threadsafe`` into each request's ``asyncio.Queue``::

    event loop (uvicorn)                      engine thread
    await front.add(prompts, params)  ──cmd──►  add_request(...)  ──future──► accepted / ValueError
    async for i, out in stream        ◄─put──   step() -> outputs, one per request that progressed
    stream.close()  (client gone)     ──cmd──►  abort(request_id): every KV block freed

With nothing to do the engine thread blocks on the command queue (it does not spin). Admission is bounded:
at most ``max_num_seqs + max_queued_requests`` sequences in flight (a request counts prompts x ``n``);
beyond that ``add`` raises :class:`QueueFullError` (HTTP 429) instead of letting the queue grow without limit.

Shutdown (:meth:`AsyncLLMEngine.begin_shutdown`, called as soon as the server starts to stop): new requests
are refused (503), running ones may finish for the grace period, then the rest are aborted, so every open
stream still gets its last chunk (``finish_reason: "abort"``) before the HTTP server closes connections.

If ``step`` raises, the suspects are the requests added since the last good step. One suspect is the
culprit: it fails (:class:`EngineRequestError`, HTTP 500). Several are aborted (none has produced a token
yet) and re-admitted one per step until the culprit shows itself; the others then run as usual. With no
suspect (a request that used to run fine) every request in flight fails. Either way the engine keeps
serving the rest: a failed step is safe to retry, since the scheduler advances sequences only in
``postprocess``, and every failure is logged with its traceback.

Left out: priorities, per-user fairness, several engines (data parallelism), restarting a dead engine.
"""

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator

from minivllm.engine import LLMEngine
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

logger = logging.getLogger("minivllm.server")


class QueueFullError(RuntimeError):
    """Too many requests in flight: try again later (HTTP 429)."""


class EngineStoppedError(RuntimeError):
    """The server is shutting down (HTTP 503)."""


class EngineRequestError(RuntimeError):
    """The engine failed while running this request (HTTP 500); other requests go on."""


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt): ``async for index, output in stream``."""

    def __init__(self, front: "AsyncLLMEngine", loop: asyncio.AbstractEventLoop, stream_id: str,
                 prompts: list[list[int]], n: int = 1):
        self.front, self.loop, self.id = front, loop, stream_id
        self.prompts = prompts
        self.request_ids = [f"{stream_id}-{i}" for i in range(len(prompts))]
        self.num_seqs = len(prompts) * n  # what it counts against the admission limit
        self.queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self.finished: set[int] = set()
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while len(self.finished) < len(self.request_ids):
            item = await self.queue.get()
            if isinstance(item, EngineStoppedError):
                raise item
            if isinstance(item, BaseException):
                # NOTE: the exception's text stays in the server log (logged with its traceback), not in the answer
                raise EngineRequestError("the engine failed on this request") from item
            index, out = item
            if out.finished:
                self.finished.add(index)
            yield index, out

    def close(self) -> None:
        """Abort whatever has not finished (a client that went away) and give back the admission slots."""
        if self._closed:
            return
        self._closed = True
        unfinished = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        if unfinished:
            self.front.abort(unfinished)
        self.front.num_in_flight -= self.num_seqs


class AsyncLLMEngine:
    """The event loop's handle on an :class:`LLMEngine` driven by a background thread."""

    def __init__(self, engine: LLMEngine, *, max_queued_requests: int = 256) -> None:
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.engine = engine
        self.max_in_flight = engine.config.max_num_seqs + max_queued_requests
        self.num_in_flight = 0  # NOTE: read and written only on the event loop's thread
        self.snapshot = engine.snapshot()  # NOTE: replaced (one assignment) by the engine thread after each step
        self.wakeups = 0  # times the idle engine thread woke up (tests: it must not spin)
        self.stopping = False
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # engine thread only
        self._suspects: dict[str, tuple[list[int], SamplingParams]] = {}  # added since the last good step
        self._probation: deque[tuple[str, list[int], SamplingParams]] = deque()  # re-admitted one per step
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="minivllm-engine", daemon=True)

    # ------------------------------------------------------------------ event loop side
    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    async def add(self, prompts: list[list[int]], params: SamplingParams) -> RequestStream:
        """Queue one engine request per prompt; returns once the engine accepted (or refused) all of them."""
        if self.stopping or not self._thread.is_alive():
            raise EngineStoppedError("the server is shutting down")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, loop, f"{next(self._ids)}", prompts, params.n)
        if self.num_in_flight + stream.num_seqs > self.max_in_flight:
            raise QueueFullError(f"{self.num_in_flight} sequences are in flight, this request adds {stream.num_seqs} "
                                 f"(at most {self.max_in_flight})")
        accepted = loop.create_future()
        self.num_in_flight += stream.num_seqs
        self._commands.put(("add", stream, prompts, params, accepted))
        try:
            await accepted
        except BaseException:  # refused, or the client left while we waited: nothing stays queued
            stream.finished.update(range(len(prompts)))
            stream.close()
            if not accepted.done() or accepted.cancelled():
                self.abort(stream.request_ids)
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Ask the engine thread to abort these requests (thread-safe, returns at once)."""
        self._commands.put(("abort", list(request_ids)))

    def begin_shutdown(self, grace_seconds: float = 5.0) -> None:
        """Refuse new requests; the engine thread lets running ones finish for up to ``grace_seconds``, then
        aborts the rest (their streams end with ``finish_reason: "abort"``) and stops. Returns at once."""
        if self.stopping:
            return
        self.stopping = True
        if self._thread.is_alive():
            self._commands.put(("stop", time.monotonic() + grace_seconds))

    async def shutdown(self, grace_seconds: float = 5.0) -> None:
        """:meth:`begin_shutdown` (if not begun yet), then wait for the engine thread to stop."""
        self.begin_shutdown(grace_seconds)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine, deadline = self.engine, None
        while True:
            busy = engine.has_unfinished_requests() or bool(self._probation)
            if not busy and deadline is not None:
                break
            commands = [] if busy else [self._wait()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command[0] == "stop":
                    deadline = command[1]
                else:
                    self._handle(command)
            if deadline is not None and time.monotonic() >= deadline:
                break
            if self._probation and not self._suspects:
                self._readmit()
            if engine.has_unfinished_requests():
                self._step()
            self._publish()
        self._probation.clear()
        for rid in list(self._streams):  # shutting down: whatever is left ends with finish_reason "abort"
            self._abort(rid)
        self._publish()

    def _wait(self) -> tuple:
        command = self._commands.get()  # blocks: an idle engine sleeps here
        self.wakeups += 1
        return command

    def _handle(self, command: tuple) -> None:
        if command[0] == "abort":
            for rid in command[1]:
                self._abort(rid)
            return
        _, stream, prompts, params, accepted = command
        added = []
        try:
            for index, (rid, ids) in enumerate(zip(stream.request_ids, prompts)):
                self.engine.add_request(ids, params, request_id=rid)
                added.append(rid)
                self._streams[rid] = (stream, index)
        except Exception as e:  # refused (bad input): nothing of this request stays queued
            for rid in added:
                self._streams.pop(rid, None)
                self.engine.abort(rid)
            self._call(stream, _settle, accepted, e)
            return
        for rid, ids in zip(added, prompts):
            if self._probation:  # after a failed step newcomers queue behind the suspects, one per step
                self.engine.abort(rid)
                self._probation.append((rid, ids, params))
            else:
                self._suspects[rid] = (ids, params)
        self._call(stream, _settle, accepted, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            suspects, self._suspects = self._suspects, {}
            if len(suspects) > 1:
                logger.warning("engine step failed with %d new requests: re-admitting them one per step (%r)",
                               len(suspects), e)
                for rid, (ids, params) in suspects.items():
                    self.engine.abort(rid)  # NOTE: none of them has produced output yet: nobody sees this
                    self._probation.append((rid, ids, params))
                return
            blamed = list(suspects) or list(self._streams)
            logger.exception("engine step failed; failing request(s) %s", blamed)
            for rid in blamed:
                self._fail(rid, e)
            return
        self._suspects = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            self._call(entry[0], entry[0].queue.put_nowait, (entry[1], out))

    def _readmit(self) -> None:
        rid, ids, params = self._probation.popleft()
        if rid not in self._streams:
            return  # aborted meanwhile
        try:
            self.engine.add_request(ids, params, request_id=rid)
        except Exception as e:
            self._fail(rid, e)
            return
        self._suspects[rid] = (ids, params)

    def _fail(self, rid: str, error: BaseException) -> None:
        entry = self._streams.pop(rid, None)
        self.engine.abort(rid)
        if entry is not None:
            self._call(entry[0], entry[0].queue.put_nowait, error)

    def _abort(self, rid: str) -> None:
        out = self.engine.abort(rid)
        entry = self._streams.pop(rid, None)
        if entry is not None:  # a request still on probation was never admitted: it has no output
            item = (entry[1], out) if out is not None else EngineStoppedError("aborted before it could start")
            self._call(entry[0], entry[0].queue.put_nowait, item)

    @staticmethod
    def _call(stream: RequestStream, fn, *args) -> None:
        try:
            stream.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _publish(self) -> None:
        self.snapshot = self.engine.snapshot()


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(None)
