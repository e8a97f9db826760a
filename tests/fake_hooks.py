"""Fakes of the outside world for notification channels, on loopback ports:

- `WebhookReceiver`: a webhook endpoint that verifies the HMAC signature as docs/channels.md tells
  receivers to (constant-time compare), records what it accepted, and answers as told
  (`answer(500, times=2)`, 429 with Retry-After, a 301, a 400, or no answer at all).
- `FakeTelegram`: the Bot API's `sendMessage`, recording calls, answering as told (a 429
  with `retry_after`, a 403) and `{"ok": true}` otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import orjson
from aiohttp import web


class _Loopback:
    """An aiohttp app served on 127.0.0.1, on a free port, as an async context."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self._answers: list[tuple[int, dict, bytes]] = []
        self.hold = asyncio.Event()  # set: requests wait for `release` (a timeout)
        self.release = asyncio.Event()

    def answer(
        self, status: int, times: int = 1, headers: dict | None = None, body: Any = b""
    ) -> None:
        """Answer the next `times` requests with `status` (then the usual success)."""
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        self._answers.extend([(status, headers or {}, raw)] * times)

    async def _next_answer(self) -> tuple[int, dict, bytes] | None:
        if self.hold.is_set():
            await self.release.wait()
        return self._answers.pop(0) if self._answers else None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        """Wait until `predicate()` is true (re-checked after every request)."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def __aenter__(self):
        # No access log: the Bot API's paths hold the token, which no log line may show.
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.release.set()
        await self._runner.cleanup()


class WebhookReceiver(_Loopback):
    """Accepts POSTs on any path. `received`: the accepted requests ({"path", "body" (raw),
    "json", "headers"}); `requests`: every request seen (path, status answered);
    `connections`: the distinct client (address, port) pairs, one per TCP connection."""

    def __init__(self, secret: str = "") -> None:
        super().__init__()
        self.secret = secret
        self.received: list[dict] = []
        self.requests: list[tuple[str, int]] = []
        self.bad_signatures = 0
        self.connections: set[tuple] = set()
        self.arrivals: list[float] = []  # loop time of every request's arrival
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    def verify(self, raw: bytes, header: str) -> bool:
        expected = "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), header.encode())

    async def handle(self, request: web.Request) -> web.Response:
        self.connections.add(request.transport.get_extra_info("peername")[:2])
        self.arrivals.append(asyncio.get_running_loop().time())
        await self._notify()
        raw = await request.read()
        status, headers, body = await self._next_answer() or (204, {}, b"")
        if status < 300 and not self.verify(raw, request.headers.get("X-Pricewatch-Signature", "")):
            self.bad_signatures += 1
            status, headers, body = 401, {}, b"bad signature"
        if status < 300:
            self.received.append(
                {
                    "path": request.path,
                    "body": raw,
                    "json": orjson.loads(raw),
                    "headers": dict(request.headers),
                }
            )
        self.requests.append((request.path, status))
        await self._notify()
        return web.Response(status=status, headers=headers, body=body)


class FakeTelegram(_Loopback):
    """`POST /bot<token>/sendMessage`. `calls`: every call (token, JSON body); `times`: when
    each came (loop time); `messages`: the bodies it answered `{"ok": true}` to."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict]] = []
        self.times: list[float] = []
        self.messages: list[dict] = []
        self.app.router.add_post("/bot{token}/sendMessage", self.send_message)

    def too_many(self, retry_after: int = 1) -> None:
        """Answer the next call as Telegram does when a bot sends too fast."""
        self.answer(
            429,
            body={
                "ok": False,
                "error_code": 429,
                "description": f"Too Many Requests: retry after {retry_after}",
                "parameters": {"retry_after": retry_after},
            },
        )

    async def send_message(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.calls.append((request.match_info["token"], data))
        self.times.append(asyncio.get_running_loop().time())
        planned = await self._next_answer()
        if planned is None:
            self.messages.append(data)
            planned = (
                200,
                {},
                orjson.dumps(
                    {
                        "ok": True,
                        "result": {"message_id": len(self.messages), "text": data.get("text")},
                    }
                ),
            )
        await self._notify()
        status, headers, body = planned
        return web.Response(
            status=status, headers=headers, body=body, content_type="application/json"
        )
