"""The HTTP guards in front of the routes (ASGI middleware), outermost first::

    CountRequests   every /v1 answer counted by endpoint and status, 500s from bugs included
    CheckHost       the Host header must be one of --allowed-hosts (400 invalid_host)
    CheckApiKey     /v1/* needs "Authorization: Bearer <--api-key>" (401 invalid_api_key)
    LimitBodySize   a body larger than --max-request-bytes is refused before it is read whole (413)

Each answers with OpenAI's error body. Why a Host check: a server on 127.0.0.1 is still reachable from a web
page through DNS rebinding (a hostile name that resolves to 127.0.0.1); the browser then sends that name as
Host, so refusing unknown Host values closes the hole. ``minivllm serve`` allows only loopback names when it
listens on a loopback address and any Host otherwise, unless ``--allowed-hosts`` says which (vLLM itself does
not check). ``/health`` and ``/metrics`` are open without a key (probes and scrapers), as in vLLM; the chat page
at ``/`` is open too and sends the key the user types in.

Left out: CORS, TLS, rate limits per key, several keys.
"""

import hmac
import json

from minivllm.server.errors import from_exception
from minivllm.server.metrics import ServerMetrics

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


async def _send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class CountRequests:
    """Count the API's answers by endpoint and status code (streams at their start). A request that raised
    before answering (a bug) is answered here: a 500 with no internals (the traceback is logged), counted as
    an internal error; answering here, not in Starlette's outer layer, keeps a keep-alive connection usable."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
                if message["status"] >= 500:
                    self.metrics.internal_errors.inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as exc:
            if started:
                raise
            await from_exception(exc).response()(scope, receive, counting_send)


class CheckHost:
    """Refuse a Host header not in ``allowed`` (names without the port; ``*`` allows any)."""

    def __init__(self, app, allowed: list[str]) -> None:
        self.app, self.allowed = app, {h.lower().strip("[]") for h in allowed}

    def ok(self, host: str | None) -> bool:
        if "*" in self.allowed:
            return True
        if not host:
            return False
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.endswith("]") or "]:" in host else host
        return name.lower().strip("[]") in self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.ok(_header(scope, b"host")):
            return await _send_error(send, 400, "invalid Host header: this server answers only to "
                                     f"{', '.join(sorted(self.allowed))} (see --allowed-hosts)", "invalid_host")
        await self.app(scope, receive, send)


class CheckApiKey:
    """``/v1/*`` needs ``Authorization: Bearer <key>`` (compared in constant time)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            given = (_header(scope, b"authorization") or "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                return await _send_error(send, 401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                         "<key>' with the key the server was started with", "invalid_api_key",
                                         [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class LimitBodySize:
    """Refuse a request body over ``max_bytes``: at once when Content-Length says so, else when the bytes
    received pass the limit (a chunked upload), so a huge body is never held in memory whole."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, message, "request_too_large")
        received, too_large, answered = 0, False, False

        async def counting_receive():
            nonlocal received, too_large
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge(message)
            return event

        async def guarded_send(event) -> None:  # NOTE: the app may turn _TooLarge into its own 400: replace it
            nonlocal answered
            if not too_large:
                answered = answered or event["type"] == "http.response.start"
                return await send(event)
            if not answered:
                answered = True
                await _send_error(send, 413, message, "request_too_large")

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            if not answered:
                await _send_error(send, 413, message, "request_too_large")


class _TooLarge(Exception):
    pass
