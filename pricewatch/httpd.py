"""The HTTP connection edge: how long a client may take, and what a malformed request gets.

aiohttp's per-connection protocol (`web.RequestHandler`) is used with three changes, for
`python -m pricewatch` and the tests alike (both build their runner with `make_runner`):

- A client that has not sent a complete request head within `HEAD_TIMEOUT` seconds of
  connecting is disconnected. aiohttp has no head timeout of its own; its keep-alive timer
  (`keepalive_timeout`, set to the same value) covers the time after each response, so a
  connection is never idle, or half-way through a head, for longer than that. An upgraded
  websocket is not subject to either: its head is complete.
- The body deadline (30 s) is enforced where bodies are read, `api.read_json`.
- A client that does not read its answers (the socket's buffer stays full, say with
  pipelined requests piling up behind an unread answer) is cut off after `HEAD_TIMEOUT`
  seconds too. Websockets are left to the hub's own slow-client policy.
- An upgraded websocket's input goes through a `ws_gate.FrameGate` before aiohttp parses
  it (every frame counted, floods and oversized messages refused unparsed), and its
  transport's close() lingers so that the client reads the close frame instead of a reset
  (ws_gate.py says why and how; `set_parser` below is the seam).
- An HTTP parser error (garbage, a bad method, a request line or header over 8190 bytes, too
  many headers) is answered in the contract's JSON error shape, `invalid_request` with 400 or
  431, and never echoes the request bytes back (aiohttp's own answer is text/plain with them).
  It is logged at DEBUG: the internet sends such bytes all day. So is a body aiohttp cannot
  decode (the app answers it 400 `invalid_request`, see server.error_middleware).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestPayloadError

from .api import ApiError, json_response
from .limits import WS_BURST, WS_MAX_MESSAGE, WS_RATE, TokenBucket
from .ws_gate import FrameGate, LingeringTransport

log = logging.getLogger(__name__)

# Seconds a client has for a complete request head, after connecting or after its last
# response. Read when a runner is made, so tests may lower it.
HEAD_TIMEOUT = 10.0


class EdgeProtocol(web.RequestHandler):
    """One HTTP connection: aiohttp's protocol plus the head timer and JSON parser errors."""

    def __init__(self, manager: web.Server, *, head_timeout: float, **kwargs: Any) -> None:
        # Lingering (reading what is left of a body nobody read, so that the client sees the
        # answer instead of a reset) is bounded by the same time as an idle connection.
        super().__init__(
            manager, keepalive_timeout=head_timeout, lingering_time=head_timeout, **kwargs
        )
        self.head_timeout = head_timeout
        self.head_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        self.ws_gate: FrameGate | None = None  # set when the connection became a websocket

    def set_parser(self, parser: Any, *args: Any, **kwargs: Any) -> None:
        """aiohttp's `WebSocketResponse.prepare` hands its frame parser to the connection
        here, once: a FrameGate goes in front of it, and the transport aiohttp and the hub
        use from now on lingers when closed (ws_gate.py)."""
        transport = self.transport
        gate = FrameGate(parser, transport, TokenBucket(WS_RATE, WS_BURST), WS_MAX_MESSAGE)
        self.ws_gate = gate
        # aiohttp types it as asyncio.Transport; a LingeringTransport wraps one, duck-typed.
        self.transport = LingeringTransport(transport, gate)  # type: ignore[assignment]
        # aiohttp types the parser as its WebSocketReader; it only calls feed_data/feed_eof.
        super().set_parser(gate, *args, **kwargs)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        gate = self.ws_gate
        if gate is not None and gate.discarding:
            gate.discard(data)  # whatever state aiohttp is in: read, never parsed
            return
        super().data_received(data)

    def pause_reading(self) -> None:
        gate = self.ws_gate
        if gate is not None and gate.discarding:
            return  # what is thrown away must keep being read (see ws_gate.py)
        super().pause_reading()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        if self.ws_gate is not None:
            self.ws_gate.hurry()  # no lingering at shutdown
        await super().shutdown(timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.head_timer = asyncio.get_running_loop().call_later(
            self.head_timeout, self._head_overdue
        )

    def head_received(self) -> None:
        """A complete request head was parsed: the connection is no longer idle."""
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.head_received()
        self._writing_resumed()
        if self.ws_gate is not None:
            self.ws_gate.finish(polite=True)  # nothing more to read; its timer goes
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The socket's buffer is full: the client is not reading its answers. It has
        `head_timeout` seconds to take them (pipelined requests piled up behind an unread
        answer would otherwise hold memory for ever). Websockets have their own policy."""
        super().pause_writing()
        if not self._upgraded and self.write_timer is None:
            self.write_timer = asyncio.get_running_loop().call_later(
                self.head_timeout, self._write_overdue
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        self._writing_resumed()

    def _writing_resumed(self) -> None:
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def _write_overdue(self) -> None:
        self.write_timer = None
        log.debug(
            "answers not read within %.1fs by %s: disconnected", self.head_timeout, self.peername
        )
        if self.transport is not None:
            self.transport.abort()  # a graceful close would wait to flush to that client

    def _head_overdue(self) -> None:
        self.head_timer = None
        log.debug(
            "no complete request head within %.1fs from %s: disconnected",
            self.head_timeout,
            self.peername,
        )
        self.force_close()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp reads what is left of a body after the answer ("lingering"); a body it
        # cannot decode (bad gzip...) then raises there and would be logged as an unhandled
        # error with a traceback. The client already got its 400: that is not our error.
        if isinstance(kwargs.get("exc_info"), RequestPayloadError):
            log.debug("malformed request body from %s", self.peername)
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer for a request it could not hand to the app: a malformed head
        (status 400), or an exception that escaped the app's middlewares (500/504)."""
        if isinstance(exc, HttpProcessingError):
            status, detail = parser_error(exc)
            log.debug("malformed request from %s: %s", request.remote, type(exc).__name__)
            error = ApiError(status, "invalid_request", detail)
        else:
            # Logs with the traceback, and raises ConnectionError when the response was
            # already started (nothing more may be written then).
            super().handle_error(request, status, exc, message)
            error = ApiError(status, "internal", "Internal server error.")
        response = json_response(error.body(), status=error.status)
        response.force_close()
        return response


def parser_error(exc: HttpProcessingError) -> tuple[int, str]:
    """Status and detail for an aiohttp parser error; the offending bytes are never quoted."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
    ):
        return 431, "The request line or a header is too long, or there are too many headers."
    return 400, "Malformed HTTP request."


class EdgeServer(web.Server):
    """aiohttp's connection factory, making `EdgeProtocol`s."""

    def __init__(
        self,
        handler: Any,
        *,
        request_factory: Any,
        head_timeout: float,
        handler_cancellation: bool = False,
        **kwargs: Any,
    ) -> None:
        def make_request(message, payload, protocol, writer, task):
            # Called once per parsed head, before the app sees the request.
            if isinstance(protocol, EdgeProtocol):
                protocol.head_received()
            return request_factory(message, payload, protocol, writer, task)

        super().__init__(
            handler,
            request_factory=make_request,
            handler_cancellation=handler_cancellation,
            **kwargs,
        )
        self.head_timeout = head_timeout
        self.protocol_kwargs = {k: v for k, v in kwargs.items() if k != "loop"}

    def __call__(self) -> EdgeProtocol:
        return EdgeProtocol(
            self,
            loop=asyncio.get_running_loop(),
            head_timeout=self.head_timeout,
            **self.protocol_kwargs,
        )


class EdgeRunner(web.AppRunner):
    """`web.AppRunner` whose connections are `EdgeProtocol`s."""

    def __init__(
        self,
        app: web.Application,
        *,
        head_timeout: float,
        handle_signals: bool = False,
        shutdown_timeout: float = 60.0,
        access_log_class: type[AbstractAccessLogger] = AccessLogger,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            app,
            handle_signals=handle_signals,
            shutdown_timeout=shutdown_timeout,
            access_log_class=access_log_class,
            **kwargs,
        )
        self.head_timeout = head_timeout
        self.protocol_kwargs = dict(kwargs, access_log_class=access_log_class)

    async def _make_server(self) -> web.Server:
        # AppRunner starts the app and builds aiohttp's plain Server around its handler; the
        # same handler and request factory are served by an EdgeServer instead.
        plain = await super()._make_server()
        return EdgeServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            head_timeout=self.head_timeout,
            **self.protocol_kwargs,
        )


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner for `app`, with the slow-client limits (`HEAD_TIMEOUT` as it is now)."""
    return EdgeRunner(app, head_timeout=HEAD_TIMEOUT, **kwargs)
