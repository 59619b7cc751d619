"""``minivllm.server``: an OpenAI-compatible HTTP server around the engine (FastAPI + uvicorn).

    minivllm serve                                   # the embedded default model on http://127.0.0.1:8000

    from minivllm.server import ServerThread, build_app
    with ServerThread(build_app(LLMEngine())) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="none").chat.completions.create(...)

``protocol`` (OpenAI's bodies), ``async_engine`` (the engine thread and its asyncio streams), ``serving``
(requests to responses, SSE), ``errors``, ``metrics``, ``app`` (routes), ``launch`` (uvicorn).
"""

from minivllm.server.app import build_app, served_model_name
from minivllm.server.async_engine import AsyncLLMEngine
from minivllm.server.launch import ServerThread, serve

__all__ = ["AsyncLLMEngine", "ServerThread", "build_app", "serve", "served_model_name"]
