"""Every failure as OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``, with its status.

==========================================  ======  =========================
what went wrong                             status  ``type`` / ``code``
==========================================  ======  =========================
malformed JSON, wrong type, missing field   400     invalid_request_error
out-of-range value (NaN, 2**70, ...)        400     invalid_request_error
a Host header not in ``--allowed-hosts``    400     ... / invalid_host
prompt longer than the context              400     ... / context_length_exceeded
no or wrong API key (``--api-key``)         401     ... / invalid_api_key
unknown model                               404     ... / model_not_found
unknown path / wrong method                 404/405 invalid_request_error
body larger than ``--max-request-bytes``    413     ... / request_too_large
too many sequences in flight                429     ... / rate_limit_exceeded (+ Retry-After)
the engine failed on this request           500     internal_error
a bug in the server                         500     internal_error
shutting down                               503     service_unavailable
==========================================  ======  =========================

A 500's message never carries the exception's text (it may hold internals): the traceback goes to the log.

Left out: per-organisation rate limits.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from minivllm.sampling_params import SamplingParams
from minivllm.server.async_engine import EngineRequestError, EngineStoppedError, QueueFullError

logger = logging.getLogger("minivllm.server")
RETRY_AFTER_SECONDS = 1


class OpenAIError(Exception):
    """An error to answer with; raised anywhere in a handler."""

    def __init__(self, message: str, status: int = 400, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if self.status == 429 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def from_validation(exc: RequestValidationError) -> OpenAIError:
    """Pydantic's first complaint, in words, with the field it is about."""
    errors = exc.errors()
    if not errors:
        return OpenAIError("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return OpenAIError(f"malformed JSON in the request body: {first.get('ctx', {}).get('error', '')}".strip(": "))
    if first.get("type") == "extra_forbidden":
        return OpenAIError(f"unrecognized request argument supplied: {'.'.join(loc)}", param=loc[0] if loc else None)
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return OpenAIError(f"{where}: {first.get('msg', 'invalid value')}{more}", param=loc[0] if loc else None)


def from_exception(exc: Exception) -> OpenAIError:
    """The error a front-end exception stands for."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, QueueFullError):
        return OpenAIError(f"the server is busy ({exc}); retry later", 429, type="rate_limit_error",
                           code="rate_limit_exceeded")
    if isinstance(exc, EngineStoppedError):
        return OpenAIError(str(exc), 503, type="service_unavailable", code="service_unavailable")
    if isinstance(exc, EngineRequestError):
        return OpenAIError(str(exc), 500, type="internal_error", code="internal_error")
    if isinstance(exc, ValueError | TypeError):  # the engine or SamplingParams refused the input
        first = (str(exc).split() or [""])[0]  # SamplingParams' messages start with the field's name
        return OpenAIError(str(exc), param=first if first in SamplingParams.__dataclass_fields__ else None)
    logger.error("unexpected error", exc_info=exc)
    return OpenAIError("internal server error (the server log has the details)", 500, type="internal_error",
                       code="internal_error")


def install(app: FastAPI) -> None:
    """Make every error of ``app`` an OpenAI error body."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return OpenAIError(str(exc.detail), exc.status_code, code=code).response()

    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    # NOTE: a handler for Exception itself would run in Starlette's outermost middleware, which re-raises
    # after answering (so uvicorn logs the traceback): right for bugs, wrong for the errors named here
    for cls in (OpenAIError, QueueFullError, EngineStoppedError, EngineRequestError, ValueError, TypeError,
                Exception):
        app.add_exception_handler(cls, _known)
