"""The one boundary between exceptions and HTTP answers (as datasette's handle_exception).

Handlers and the layers below raise domain exceptions (`ApiError`, `store.NotFound`,
`store.Conflict`, `store.StorageUnavailable`) or let aiohttp raise its own; `error_middleware`
renders each in the contract's `{"error", "detail", "fields"?}` shape. Nothing else writes an
error body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .api import ApiError, json_response
from .store import Conflict, NotFound, StorageUnavailable

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024  # bytes of a request body (the app's client_max_size)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Codes for aiohttp's own HTTP errors. Beyond the contract's list, three are kept because
# clients and the OpenAPI document already rely on them: `invalid_request` (400: no websocket
# handshake on a websocket route, a malformed HTTP request or body), `method_not_allowed`
# (405) and `internal` (500, a bug: never caused by request content).
_STATUS_CODES = {
    400: "invalid_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
    502: "upstream_error",
    503: "unavailable",
}

# Status recorded (access log, /metrics) for a request whose client went away before it could
# be answered; nginx's "client closed request".
CLIENT_CLOSED = 499


def error_response(
    status: int, code: str, detail: str, fields: dict | None = None, headers: dict | None = None
) -> web.Response:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if fields is not None:
        body["fields"] = fields
    response = json_response(body, status=status, headers=headers)
    if status == 408:  # the body is incomplete: the connection cannot carry another request
        response.force_close()
    return response


class Unanswered(web.StreamResponse):
    """Stands for a request that gets no HTTP answer: its client is gone, or its response was
    already started (an upgraded websocket above all, where HTTP bytes would corrupt the
    stream). aiohttp writes nothing for it and closes the connection; its status is only
    what the access log and /metrics record."""

    def __init__(self, status: int) -> None:
        super().__init__(status=status)
        self.force_close()

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error, ours or aiohttp's, in the contract's JSON shape, unless nothing may
    be written any more (see `Unanswered`)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error: Exception = exc
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        error = exc
    gone = request.transport is None or request.transport.is_closing()
    if gone or request.writer.output_size > 0:
        if isinstance(error, (ConnectionError, RequestPayloadError, ApiError, web.HTTPException)):
            log.debug("%s %s ended without an answer: %r", request.method, request.path, error)
        else:
            log.error(
                "error in %s %s after its response was started",
                request.method,
                request.path,
                exc_info=error,
            )
        return Unanswered(CLIENT_CLOSED if gone else getattr(error, "status", 500))
    return render_error(request, error)


def render_error(request: web.Request, error: Exception) -> web.Response:
    """The contract's error answer for an exception raised by a handler."""
    if isinstance(error, ApiError):
        return error_response(error.status, error.code, error.detail, error.fields, error.headers)
    if isinstance(error, NotFound):
        return error_response(404, "not_found", str(error).capitalize() + ".")
    if isinstance(error, Conflict):
        return error_response(409, "conflict", str(error).capitalize() + ".")
    if isinstance(error, StorageUnavailable):  # logged by the store, once a minute at most
        return error_response(
            503,
            "unavailable",
            StorageUnavailable.detail,
            headers={"Retry-After": str(error.retry_after)},
        )
    if isinstance(error, web.HTTPException):
        headers = {k: v for k, v in error.headers.items() if k.lower() != "content-type"}
        if error.status == 413:
            detail = f"Request body is larger than {MAX_BODY // 1024} KiB."
        else:
            detail = error.reason + "."
        return error_response(
            error.status, _STATUS_CODES.get(error.status, "error"), detail, headers=headers
        )
    if isinstance(error, RequestPayloadError):  # a body aiohttp cannot decode (bad gzip)
        return error_response(400, "invalid_request", "Malformed request body.")
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=error)
    return error_response(500, "internal", "Internal server error.")
