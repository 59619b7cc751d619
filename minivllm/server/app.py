"""``build_app(engine)``: the FastAPI application of ``minivllm serve``.

==============================  ==================================================================
``POST /v1/completions``        continue a prompt (OpenAI's completions API; SSE with ``stream``)
``POST /v1/chat/completions``   answer a conversation (chat template applied; SSE with ``stream``)
``GET /v1/models``              the one model this server runs
``GET /health``                 200 while the engine thread runs, 503 once it stops
``GET /metrics``                Prometheus text (:mod:`minivllm.server.metrics`)
``GET /``                       a one-page chat (``static/chat.html``: plain HTML + JS, no build step)
==============================  ==================================================================

The app starts the engine thread when uvicorn starts it (the lifespan) and, on shutdown, lets running
requests finish for ``shutdown_grace_seconds`` before aborting the rest (:mod:`minivllm.server.launch` starts
that as soon as the server begins to stop, so aborted streams still end cleanly). In front of the routes,
:mod:`minivllm.server.guards` checks the body size, the API key and the Host header. The OpenAPI schema is
at ``/openapi.json`` (docs at ``/docs``).

Left out: CORS, the embeddings, responses and audio APIs, several models.
"""

from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import minivllm
from minivllm.engine import LLMEngine
from minivllm.model.config import ModelConfig
from minivllm.server import errors, guards
from minivllm.server import protocol as p
from minivllm.server.async_engine import AsyncLLMEngine
from minivllm.server.metrics import ServerMetrics
from minivllm.server.serving import OpenAIServing

ERROR_RESPONSES = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
MAX_REQUEST_BYTES = 8 * 2**20  # 8 MiB: 64 prompts of ~30k tokens as text, or ~1M token ids as JSON


def served_model_name(model) -> str:
    """The name clients pass as ``model``: the checkpoint directory's or GGUF file's name."""
    if isinstance(model, ModelConfig):
        return "random-weights"
    from minivllm.model import resolve_model_path

    path = resolve_model_path(model)
    return path.name if path.is_dir() else Path(path).stem


def chat_page() -> str:
    return resources.files("minivllm.server").joinpath("static/chat.html").read_text(encoding="utf-8")


def build_app(engine: LLMEngine, *, model_name: str | None = None, max_queued_requests: int = 256,
              shutdown_grace_seconds: float = 5.0, api_key: str | None = None,
              allowed_hosts: list[str] | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
              reasoning_parser: str = "auto") -> FastAPI:
    """The server's app around ``engine``; from here on only the app's engine thread may touch ``engine``.

    ``api_key``: required on ``/v1/*`` (None: open). ``allowed_hosts``: the Host names it answers to (None:
    any). ``max_request_bytes``: the largest request body (413 beyond). ``reasoning_parser``: ``auto`` splits
    chat answers into ``reasoning_content`` and ``content`` when the chat template writes ``<think>`` blocks
    (Qwen3's), ``qwen3`` always, ``none`` never (:func:`minivllm.reasoning.uses_reasoning`)."""
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    front = AsyncLLMEngine(engine, max_queued_requests=max_queued_requests)
    metrics = ServerMetrics(lambda: front.snapshot)
    name = model_name or served_model_name(engine.config.model)
    serving = OpenAIServing(front, name, metrics, reasoning_parser=reasoning_parser)
    page = chat_page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        front.start()
        yield
        await front.shutdown(shutdown_grace_seconds)

    app = FastAPI(title="minivllm", version=minivllm.__version__, lifespan=lifespan,
                  description="An OpenAI-compatible server for the minivllm engine.")
    app.state.front, app.state.engine, app.state.metrics, app.state.model_name = front, engine, metrics, name
    app.state.serving, app.state.shutdown_grace_seconds = serving, shutdown_grace_seconds
    errors.install(app)
    # NOTE: the last added is the outermost: count, then host, then key, then size
    app.add_middleware(guards.LimitBodySize, max_bytes=max_request_bytes)
    if api_key:
        app.add_middleware(guards.CheckApiKey, api_key=api_key)
    if allowed_hosts is not None:
        app.add_middleware(guards.CheckHost, allowed=allowed_hosts)
    app.add_middleware(guards.CountRequests, metrics=metrics)

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses=ERROR_RESPONSES)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=name, max_model_len=engine.max_model_len)])

    @app.get("/health", responses={503: {"model": p.ErrorResponse}})
    async def health() -> Response:
        if front.is_running and not front.stopping:
            body = {"status": "ok"}
            if engine.learner_report:  # minivllm serve --learner: which component is whose
                body["components"] = [{"name": n, "whose": w, "why": why} for n, w, why in engine.learner_report]
            return JSONResponse(body)
        return errors.OpenAIError("the engine is not running", 503, type="service_unavailable").response()

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
