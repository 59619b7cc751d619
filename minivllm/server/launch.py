"""Start the server: :func:`serve` blocks (the ``minivllm serve`` command), :class:`ServerThread` runs uvicorn
in a background thread of this process (tests, benchmarks, the notebook), on a free loopback port.

Ctrl-C / SIGTERM (``serve``) or :meth:`ServerThread.stop`: uvicorn stops accepting connections and, at the
same moment, the engine thread is told to let running requests finish for the app's grace period and abort
the rest, so every open stream ends with ``finish_reason: "abort"`` and ``[DONE]`` and a waiting
non-streaming request gets a JSON 503. Uvicorn waits for those answers (its own timeout is the grace plus
a margin for a long engine step), then the app's lifespan stops the engine thread.

Left out: several worker processes (one engine per process), TLS, Unix sockets.
"""

import ipaddress
import os
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from minivllm.config import EngineConfig
from minivllm.engine import LLMEngine
from minivllm.server.app import MAX_REQUEST_BYTES, build_app
from minivllm.server.guards import LOOPBACK_HOSTS

SHUTDOWN_MARGIN_SECONDS = 30.0  # uvicorn's wait beyond the grace: the engine aborts after its current step


class _Server(uvicorn.Server):
    """Uvicorn that starts the engine's drain the moment it starts to shut down (not after its own wait)."""

    async def shutdown(self, sockets=None) -> None:
        app = self.config.app
        app.state.front.begin_shutdown(app.state.shutdown_grace_seconds)
        await super().shutdown(sockets)


def default_allowed_hosts(host: str) -> list[str] | None:
    """Loopback names when listening on a loopback address (DNS-rebinding safe), else None (any Host)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return list(LOOPBACK_HOSTS) if loopback else None


def serve(model: Any = None, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_queued_requests: int = 256, timeout_graceful_shutdown: float = 10.0, log_level: str = "info",
          api_key: str | None = None, allowed_hosts: list[str] | None = None,
          max_request_bytes: int = MAX_REQUEST_BYTES, reasoning_parser: str = "auto", **engine_kwargs: Any) -> None:
    """Load the model, then answer HTTP requests until interrupted. ``api_key`` defaults to
    ``$MINIVLLM_API_KEY``; ``allowed_hosts`` to :func:`default_allowed_hosts` of ``host``; ``reasoning_parser``
    (auto, qwen3, none) as in :func:`~minivllm.server.app.build_app`."""
    api_key = api_key or os.environ.get("MINIVLLM_API_KEY") or None
    allowed_hosts = allowed_hosts if allowed_hosts is not None else default_allowed_hosts(host)
    engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
    app = build_app(engine, model_name=served_model_name, max_queued_requests=max_queued_requests,
                    shutdown_grace_seconds=timeout_graceful_shutdown, api_key=api_key, allowed_hosts=allowed_hosts,
                    max_request_bytes=max_request_bytes, reasoning_parser=reasoning_parser)
    serving = app.state.serving
    defaults = serving.generation_defaults.as_kwargs()
    print(f"minivllm: serving {app.state.model_name!r} on http://{host}:{port} (chat page at /, API at /v1, "
          f"{engine.num_kv_blocks} KV blocks, context {engine.max_model_len} tokens"
          f"{', API key required' if api_key else ''})"
          + (f"\n  sampling defaults from generation_config.json (a request's own values win): {defaults}"
             if defaults else "")
          + ("\n  reasoning: chat answers split <think> blocks into reasoning_content" if serving.reasoning else ""),
          flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=timeout_graceful_shutdown + SHUTDOWN_MARGIN_SECONDS)
    try:
        _Server(config).run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught once it has shut down
        pass


class ServerThread:
    """``with ServerThread(app) as server: requests to server.url``; stops (gracefully) on exit."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 timeout_graceful_shutdown: float | None = None, log_level: str = "warning") -> None:
        """``timeout_graceful_shutdown``: uvicorn's wait for open connections (default: the app's grace + 30 s)."""
        self.app = app
        if timeout_graceful_shutdown is None:
            timeout_graceful_shutdown = app.state.shutdown_grace_seconds + SHUTDOWN_MARGIN_SECONDS
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=timeout_graceful_shutdown)
        self.server = _Server(config)
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
