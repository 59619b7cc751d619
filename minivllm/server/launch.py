"""Start the server: :func:`serve` blocks (the ``minivllm serve`` command), :class:`ServerThread` runs uvicorn
in a background thread of this process (tests, benchmarks, the notebook), on a free loopback port.

Ctrl-C / SIGTERM (``serve``) or :meth:`ServerThread.stop`: uvicorn stops accepting connections, waits up to
``timeout_graceful_shutdown`` seconds for open requests, cancels the rest (their engine requests are
aborted), then the app's shutdown lets the engine thread finish or abort what is left and exit.

Left out: several worker processes (one engine per process), TLS, Unix sockets.
"""

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from minivllm.config import EngineConfig
from minivllm.engine import LLMEngine
from minivllm.server.app import build_app


def serve(model: Any = None, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_queued_requests: int = 256, timeout_graceful_shutdown: float = 10.0, log_level: str = "info",
          **engine_kwargs: Any) -> None:
    """Load the model, then answer HTTP requests until interrupted."""
    engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
    app = build_app(engine, model_name=served_model_name, max_queued_requests=max_queued_requests,
                    shutdown_grace_seconds=timeout_graceful_shutdown)
    print(f"minivllm: serving {app.state.model_name!r} on http://{host}:{port} (chat page at /, API at /v1, "
          f"{engine.num_kv_blocks} KV blocks, context {engine.max_model_len} tokens)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=timeout_graceful_shutdown)


class ServerThread:
    """``with ServerThread(app) as server: requests to server.url``; stops (gracefully) on exit."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 timeout_graceful_shutdown: float | None = 5.0, log_level: str = "warning") -> None:
        self.app = app
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="minivllm-uvicorn", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]  # port 0: the one the OS picked
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"the server did not stop within {timeout} s")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
