"""A loopback stand-in for AlphaVantage's ``/query?function=CURRENCY_EXCHANGE_RATE``.

Usage::

    async with FakeAlphaVantage() as fake:
        fake.mode = "note"            # see MODES
        await fetch_rate(session, fake.url, "KEY", "BTC", "USD")
        fake.requests                 # query dicts received, in order

Every mode answers the way the real service does (errors are HTTP 200 + JSON), except
"500", "garbage" and "slow" (never answers until the fake closes).
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

SUCCESS = {
    "Realtime Currency Exchange Rate": {
        "1. From_Currency Code": "BTC",
        "2. From_Currency Name": "Bitcoin",
        "3. To_Currency Code": "USD",
        "4. To_Currency Name": "United States Dollar",
        "5. Exchange Rate": "58073.74000000",
        "6. Last Refreshed": "2021-05-01 02:58:06",
        "7. Time Zone": "UTC",
        "8. Bid Price": "58073.73000000",
        "9. Ask Price": "58073.74000000",
    }
}
NOTE = {
    "Note": "Thank you for using Alpha Vantage! Our standard API call frequency is 5 calls "
    "per minute and 500 calls per day."
}
INFORMATION = {
    "Information": "We have detected your API key as {key} and our standard API rate "
    "limit is 25 requests per day."
}
ERROR = {"Error Message": "the parameter apikey is invalid or missing. Got apikey={key}."}

MODES = ("ok", "note", "information", "error", "500", "garbage", "slow", "missing_field")


class FakeAlphaVantage:
    """aiohttp server on 127.0.0.1 answering ``/query`` according to ``mode``."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.success = SUCCESS  # replace to vary the successful answer
        self.requests: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._release = asyncio.Event()
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> FakeAlphaVantage:
        app = web.Application()
        app.router.add_get("/query", self._handle)
        # No access log: it would print the apikey query parameter into the test's log capture.
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()  # let "slow" handlers finish so cleanup does not wait on them
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/query"

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` requests arrived (TimeoutError if not)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= n)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        async with self._changed:
            self.requests.append(query)
            self._changed.notify_all()
        key = query.get("apikey", "")
        mode = self.mode
        if mode == "slow":
            await self._release.wait()
            return web.Response(status=503)
        if mode == "500":
            return web.Response(status=500, text="Internal Server Error")
        if mode == "garbage":
            return web.Response(
                status=200, text="<html>Bad Gateway</html>", content_type="text/html"
            )
        if mode == "ok":
            body: dict = self.success
        elif mode == "missing_field":
            rec = dict(SUCCESS["Realtime Currency Exchange Rate"])
            del rec["5. Exchange Rate"]
            body = {"Realtime Currency Exchange Rate": rec}
        else:
            template = {"note": NOTE, "information": INFORMATION, "error": ERROR}[mode]
            body = {k: v.replace("{key}", key) for k, v in template.items()}
        return web.Response(body=orjson.dumps(body), content_type="application/json")
