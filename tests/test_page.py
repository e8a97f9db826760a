"""The live page in a real browser: headless Chromium driven over the DevTools protocol.

A fake Binance feeds a real server; Chromium loads `/`; the test reads the DOM and the canvas
through `Runtime.evaluate`. No new dependency: the protocol is JSON over a websocket, spoken
with aiohttp. Without a Chromium binary the test skips with the reason (CI installs one).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import shutil
import signal
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_alphavantage import FakeAlphaVantage
from fake_binance import FakeBinance, free_port
from smtp_sink import SmtpSink

from pricewatch.alerts import ENGINE
from pricewatch.market import HUB
from pricewatch.server import STORE

BROWSERS = ("/usr/bin/chromium", "chromium", "chromium-browser")
WIDTH, HEIGHT = 1200, 860


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium in its own process group, with one page attached over CDP.

    `evaluate(js)` runs an expression in the page and returns its JSON value; `send` is any
    CDP command on the page's session. Leaving the context kills the whole process group.
    """

    def __init__(self, binary: str, profile: Path, artefacts: Path | None = None):
        self.binary, self.profile = binary, profile
        self.artefacts = artefacts or profile.parent / "artefacts"
        self.console_errors: list[str] = []  # console.error, error log entries, exceptions
        self.log_path = profile.parent / "chromium.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.session_id: str | None = None

    async def __aenter__(self) -> Chromium:
        self.profile.mkdir()
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )  # its own group: the finally kills every child too
        try:
            port, path = await self._devtools_address(timeout=15.0)
            self.http = aiohttp.ClientSession()
            self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
            self.reader = asyncio.create_task(self._read())
            target = await self.send("Target.createTarget", {"url": "about:blank"}, page=False)
            attached = await self.send(
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
                page=False,
            )
            self.session_id = attached["sessionId"]
            await self.send("Runtime.enable")
            await self.send("Log.enable")
            await self.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
            )
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _devtools_address(self, timeout: float) -> tuple[int, str]:
        """Chromium writes its port and browser path to DevToolsActivePort once it listens."""
        marker = self.profile / "DevToolsActivePort"
        try:
            async with asyncio.timeout(timeout):
                while self.proc.returncode is None:
                    lines = marker.read_text().split() if marker.exists() else []
                    if len(lines) == 2:
                        return int(lines[0]), lines[1]
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise RuntimeError("chromium did not open DevTools: " + self.log_tail()) from None
        raise RuntimeError(f"chromium exited with {self.proc.returncode}: " + self.log_tail())

    def _event(self, method: str, params: dict) -> None:
        """Keep every error the page reports: console.error/assert, an error-level log entry
        (a failed request, a 404, a refused websocket), an uncaught exception."""
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self.console_errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in args)
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(
                f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip()
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console_errors.append(
                "exception: "
                + details.get("exception", {}).get("description", details.get("text", ""))
            )

    async def _read(self) -> None:
        """Resolve each command's future by id; collect the page's errors from events."""
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = orjson.loads(msg.data)
            if "method" in data:
                self._event(data["method"], data.get("params", {}))
                continue
            future = self.pending.pop(data.get("id"), None)
            if future is None or future.done():
                continue
            if "error" in data:
                future.set_exception(CDPError(f"{data['error']}"))
            else:
                future.set_result(data.get("result", {}))
        for future in self.pending.values():
            if not future.done():
                future.set_exception(CDPError("devtools connection closed"))

    async def send(
        self, method: str, params: dict | None = None, *, page: bool = True, timeout: float = 10.0
    ) -> dict:
        command_id = next(self.ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session_id
        future = self.pending[command_id] = asyncio.get_running_loop().create_future()
        await self.ws.send_str(orjson.dumps(message).decode())
        async with asyncio.timeout(timeout):
            return await future

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CDPError(
                result["exceptionDetails"]
                .get("exception", {})
                .get("description", str(result["exceptionDetails"]))
            )
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate `expression` until it is truthy; each round is a real query of the page."""
        last: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        last = await self.evaluate(expression)
                    except CDPError as exc:  # e.g. the page is still navigating
                        last = exc
                    if last and not isinstance(last, Exception):
                        return last
                    await asyncio.sleep(0.05)
        except TimeoutError:
            page = await self.evaluate("document.body ? document.body.innerText : ''")
            shot = await self.screenshot("timeout")
            raise AssertionError(
                f"timed out waiting for {expression!r} (last: {last!r})\n"
                f"screenshot: {shot}\nconsole errors: {self.console_errors}"
                f"\npage text:\n{page}"
            ) from None

    async def screenshot(self, name: str) -> Path | str:
        """Save the page as `<artefacts>/<name>-N.png` (a test artefact); its path, or why
        there is none."""
        try:
            shot = await self.send("Page.captureScreenshot", {"format": "png"})
        except (CDPError, TimeoutError) as exc:
            return f"(no screenshot: {exc})"
        self.artefacts.mkdir(parents=True, exist_ok=True)
        path = self.artefacts / f"{name}-{len(list(self.artefacts.iterdir()))}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def check(self, expression: str, what: str) -> None:
        """Assert that `expression` is truthy in the page now; on failure a screenshot."""
        value = await self.evaluate(expression)
        if not value:
            shot = await self.screenshot("check")
            raise AssertionError(f"{what}: {expression!r} is {value!r}; screenshot: {shot}")

    async def assert_no_console_errors(self, *expected: str) -> None:
        """No error reported by the page but those containing one of `expected` (each of
        which must have been reported: a test that provokes an error sees it)."""
        for text in expected:
            assert any(text in error for error in self.console_errors), (text, self.console_errors)
        errors = [e for e in self.console_errors if not any(t in e for t in expected)]
        if errors:
            shot = await self.screenshot("console")
            raise AssertionError(
                f"the page reported errors (screenshot: {shot}):\n" + "\n".join(errors)
            )

    def log_tail(self) -> str:
        with suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    async def close(self) -> None:
        if self.ws is not None:
            with suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close", page=False), 2.0)
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with suppress(asyncio.CancelledError):
                await self.reader
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            with suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 3.0)
            # Renderer and zygote children share the group: end them all, by group id.
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@pytest.fixture
async def chromium(tmp_path: Path):
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "chromium not installed: none of "
            + ", ".join(BROWSERS)
            + " found (Debian: apt-get install chromium)"
        )
    async with Chromium(binary, tmp_path / "profile") as browser:
        yield browser


def cell(symbol: str, field: str) -> str:
    """JS: the text of one price cell, or null while the row does not exist."""
    return (
        f'document.querySelector(\'tr[data-symbol="{symbol}"] '
        f'[data-field="{field}"]\')?.textContent ?? null'
    )


ROW = (
    "JSON.stringify(Object.fromEntries(['price', 'bid', 'ask', 'time'].map("
    "f => [f, document.querySelector(`tr[data-symbol=BTCUSDT] [data-field=${f}]`)"
    "?.textContent])))"
)

# Pixels of the chart in the up-candle colour (#26a69a), give or take anti-aliasing.
UP_PIXELS = """(() => {
  let n = 0;
  for (const c of document.querySelectorAll('#chart canvas')) {
    if (!c.width || !c.height) continue;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] > 200 && Math.abs(d[i] - 0x26) < 24 && Math.abs(d[i + 1] - 0xa6) < 24
          && Math.abs(d[i + 2] - 0x9a) < 24) n++;
    }
  }
  return n;
})()"""


async def book_and_trade(http, server: LiveServer, fake: FakeBinance, now: int) -> None:
    """BTCUSDT book 42000.25/42000.75, then a trade at 42000.5, both processed by the server.

    The server reads the one upstream socket in order: once the candle made by the trade is
    on /ws/ohlc/, the book sent before it was applied too.
    """
    async with http.ws_connect(server.ws_url("/ws/ohlc/")) as probe:
        await probe.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
        assert (await probe.receive_json(timeout=5))["type"] == "snapshot"
        await fake.send_book("BTCUSDT", 42000.25, 42000.75)
        await fake.send_trade("BTCUSDT", 1, 42000.5, 0.25, now)
        assert (await probe.receive_json(timeout=5))["candle"]["close"] == 42000.5


async def test_live_page_shows_prices_quote_and_candles_and_updates_live(
    make_settings, chromium: Chromium, tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        await book_and_trade(http, server, fake, now)

        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '42,000.50'")
        row = orjson.loads(await chromium.evaluate(ROW))
        assert row["bid"] == "42,000.25" and row["ask"] == "42,000.75"
        assert row["time"] == time.strftime("%H:%M:%S", time.gmtime(now / 1000))
        await chromium.wait_for("Number(document.body.dataset.candles) >= 1")
        assert (
            await chromium.evaluate("document.querySelector('#quote-rate').textContent")
            == "no quote yet"
        )  # no AlphaVantage key: nothing stored, nothing pushed
        # ... and the panel says so, with no green dot for a socket that will never carry one.
        await chromium.wait_for("document.querySelector('#quote-source').dataset.source === 'off'")
        assert "Quotes are off" in await chromium.evaluate(
            "document.querySelector('#quote-source').textContent"
        )
        await chromium.wait_for(
            "document.querySelector('#status [data-socket=rates]').dataset.state === 'off'"
        )
        await chromium.wait_for("document.querySelector('#status').dataset.state === 'live'")

        # A trade after the page loaded shows up without a reload: price and candle.
        await fake.send_trade("BTCUSDT", 2, 42100.25, 0.5, now + 1)
        await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '42,100.25'", timeout=5)
        await chromium.wait_for(
            "document.querySelector('#chart-legend').textContent.includes('C 42,100.25')", timeout=5
        )
        assert await chromium.evaluate(UP_PIXELS) > 20  # a green candle body was drawn

        shot = await chromium.send("Page.captureScreenshot", {"format": "png"})
        png = base64.b64decode(shot["data"])
        (tmp_path / "live.png").write_bytes(png)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        await chromium.assert_no_console_errors()


async def test_live_page_reconnects_when_the_server_restarts(
    make_settings, chromium: Chromium
) -> None:
    now = int(time.time() * 1000)
    port = free_port()
    async with FakeBinance() as fake, aiohttp.ClientSession() as http:
        settings = make_settings(feed="binance", binance_ws_url=fake.url)
        async with LiveServer(settings, port=port) as server:
            await fake.wait_connections(1)
            await fake.send_trade("BTCUSDT", 1, 42000.5, 0.25, now)
            await chromium.send("Page.navigate", {"url": server.url + "/"})
            await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '42,000.50'")
            await chromium.wait_for("document.querySelector('#status').dataset.state === 'live'")
        # The server is gone: the page notices, then finds the new one on the same port.
        await chromium.wait_for(
            "document.querySelector('#status').dataset.state === 'offline'", timeout=15
        )
        async with LiveServer(settings, port=port):
            await fake.wait_connections(2)
            await chromium.wait_for(
                "document.querySelector('#status').dataset.state === 'live'", timeout=20
            )
            async with http.ws_connect(f"ws://127.0.0.1:{port}/ws/ohlc/") as probe:
                await probe.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
                assert (await probe.receive_json(timeout=5))["type"] == "snapshot"
                await fake.send_trade("BTCUSDT", 2, 43000.25, 0.5, now + 1)
                assert (await probe.receive_json(timeout=5))["candle"]["close"] == 43000.25
            await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '43,000.25'", timeout=10)


async def test_live_page_shows_a_quote_pushed_on_ws_rates(
    make_settings, chromium: Chromium
) -> None:
    async with FakeAlphaVantage() as upstream:
        upstream.mode = "error"  # the poll made at startup stores nothing
        settings = make_settings(alphavantage_url=upstream.url, alphavantage_api_key="KEY")
        async with LiveServer(settings) as server, aiohttp.ClientSession() as http:
            await upstream.wait_requests(1)
            await chromium.send("Page.navigate", {"url": server.url + "/rates/live"})
            await chromium.wait_for(
                "document.querySelector('#status [data-socket=rates]').dataset.state === 'open'"
            )
            assert (
                await chromium.evaluate("document.querySelector('#quote-rate').textContent")
                == "no quote yet"
            )

            upstream.mode = "ok"
            user = await register(http, server)
            async with http.post(
                server.url + "/api/v1/quotes", headers=bearer(user["access"])
            ) as resp:
                assert resp.status == 201, await resp.text()
            await chromium.wait_for(
                "document.querySelector('#quote-rate').textContent === '58,073.74'", timeout=5
            )
            quote = await chromium.evaluate("""[...document.querySelectorAll(
                '#quote-pair, #quote-bid, #quote-ask, #quote-time')].map(e => e.textContent)""")
            assert quote == ["BTC → USD", "58,073.73", "58,073.74", "2021-05-01 02:58:06 UTC"]


# Records the BTCUSDT row as "price|bid|ask" after every change the page makes to it.
RECORD_ROWS = """(() => {
  const tr = document.querySelector('tr[data-symbol=BTCUSDT]');
  const read = () => ['price', 'bid', 'ask']
    .map(f => tr.querySelector(`[data-field=${f}]`).textContent).join('|');
  window.shownRows = [];
  new MutationObserver(() => window.shownRows.push(read()))
    .observe(tr, { subtree: true, childList: true, characterData: true });
  return true;
})()"""


@pytest.mark.parametrize("with_token", [False, True], ids=["public", "token"])
async def test_live_page_rows_never_mix_a_price_with_another_moments_bid_ask(
    make_settings, chromium: Chromium, with_token: bool
) -> None:
    now = int(time.time() * 1000)
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        query = ""
        if with_token:
            query = "?token=" + (await register(http, server))["access"]
        await book_and_trade(http, server, fake, now)
        await chromium.send("Page.navigate", {"url": server.url + "/" + query})
        first = "42,000.50|42,000.25|42,000.75"
        await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '42,000.50'")
        row = orjson.loads(await chromium.evaluate(ROW))
        assert (row["bid"], row["ask"]) == ("42,000.25", "42,000.75")
        await chromium.wait_for("document.querySelector('#status').dataset.state === 'live'")
        assert await chromium.evaluate(RECORD_ROWS)

        # The server's states are (t1, B1), then (t1, B2), then (t2, B2): never (t2, B1).
        await fake.send_book("BTCUSDT", 42100.0, 42100.5)
        await fake.send_trade("BTCUSDT", 2, 42100.25, 0.5, now + 1)
        last = "42,100.25|42,100.00|42,100.50"
        await chromium.wait_for(f"window.shownRows.includes('{last}')", timeout=5)
        shown = await chromium.evaluate("window.shownRows")
        assert set(shown) <= {first, "42,000.50|42,100.00|42,100.50", last}, shown


async def test_page_is_served_at_both_paths(server: LiveServer) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/rates/live", "/rates/live/"):
            async with http.get(server.url + path) as resp:
                assert resp.status == 200
                assert resp.content_type == "text/html"
                assert 'id="chart"' in await resp.text()


async def test_favicon_and_the_vendored_chart_library_are_served(server: LiveServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/favicon.ico") as resp:
            assert resp.status == 200 and resp.content_type == "image/svg+xml"
            assert (await resp.read()).startswith(b"<svg")
        async with http.get(
            server.url + "/static/vendor/lightweight-charts.standalone.production.js"
        ) as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            assert "Lightweight Charts" in (await resp.text())[:300]


def js_str(value: str) -> str:
    """`value` as a JS string literal."""
    return orjson.dumps(value).decode()


async def fill(chromium: Chromium, values: dict[str, str]) -> None:
    """Type into inputs/selects by selector, as a user would (input and change events)."""
    for selector, value in values.items():
        await chromium.evaluate(f"""(() => {{
            const el = document.querySelector({js_str(selector)});
            el.value = {js_str(value)};
            el.dispatchEvent(new Event('input', {{ bubbles: true }}));
            el.dispatchEvent(new Event('change', {{ bubbles: true }}));
        }})()""")


async def click(chromium: Chromium, selector: str) -> None:
    await chromium.evaluate(f"document.querySelector({js_str(selector)}).click()")


def visible(selector: str) -> str:
    return (
        f"(() => {{ const e = document.querySelector({js_str(selector)}); "
        "return !!e && e.offsetParent !== null; })()"
    )


def auth_form_ready() -> str:
    """The sign-in form is shown and its script has taken it over (the button is disabled
    until then: a click before would submit the form natively)."""
    return f"{visible('#auth-form')} && !document.querySelector('#auth-submit').disabled"


async def test_live_page_signs_up_signs_in_sets_an_alert_and_sees_it_fire(
    make_settings, chromium: Chromium
) -> None:
    """The issue's "done when": no curl. Sign up on the page, sign out, sign in again, set
    an alert; a trade crosses it; the toast and the row's new status appear by themselves."""
    now = int(time.time() * 1000)
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        await book_and_trade(http, server, fake, now)
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '42,000.50'")
        await chromium.check(visible("#alerts-signed-out"), "signed out: alerts need a login")

        await click(chromium, "#auth-mode")
        await fill(
            chromium,
            {
                "#auth-username": "carol",
                "#auth-password": "correct horse",
                "#auth-email": "carol@example.com",
            },
        )
        await click(chromium, "#auth-submit")
        await chromium.wait_for("document.querySelector('#account-name').textContent === 'carol'")
        await click(chromium, "#sign-out")
        await chromium.wait_for(auth_form_ready())
        await chromium.check("sessionStorage.length === 0", "signing out forgets the tokens")

        await click(chromium, "#auth-mode")  # back to "sign in"
        await fill(chromium, {"#auth-username": "carol", "#auth-password": "wrong password"})
        await click(chromium, "#auth-submit")
        await chromium.wait_for("document.querySelector('#auth-error').textContent.length > 0")
        await fill(chromium, {"#auth-password": "correct horse"})
        await click(chromium, "#auth-submit")
        await chromium.wait_for(visible("#alert-form"))
        await chromium.wait_for(
            "document.querySelector('#status [data-socket=live]').dataset.state === 'open'"
        )
        await chromium.check(
            "document.querySelector('#auth-error').textContent === ''",
            "the error of the failed attempt is gone",
        )

        await fill(
            chromium,
            {"#alert-asset": "BTCUSDT", "#alert-direction": "above", "#alert-price": "42050"},
        )
        await click(chromium, "#alert-submit")
        row = "#alerts tr[data-alert-id]"
        await chromium.wait_for(
            f"document.querySelector('{row} [data-field=status]')?.textContent === 'CREATED'"
        )
        alert_id = int(await chromium.evaluate(f"document.querySelector('{row}').dataset.alertId"))
        assert await chromium.evaluate(
            f"[...document.querySelector('{row}').cells].slice(0, 3).map(c => c.textContent)"
        ) == ["BTCUSDT", "above", "42,050.00"]

        await fake.send_trade("BTCUSDT", 2, 42100.25, 0.5, now + 1)
        await chromium.wait_for(
            f"document.querySelector('.toast[data-alert-id=\"{alert_id}\"]')"
            "?.textContent.includes('42,100.25')",
            timeout=5,
        )
        await chromium.wait_for(
            f"document.querySelector('{row} [data-field=status]')"
            ".textContent === 'TRIGGERED at 42,100.25'",
            timeout=5,
        )
        # What the page shows is what the server holds.
        access = await chromium.evaluate(
            "JSON.parse(sessionStorage.getItem('pricewatch.session')).access"
        )
        async with http.get(
            f"{server.url}/api/v1/alerts/{alert_id}", headers=bearer(access)
        ) as resp:
            assert (await resp.json())["status"] == "TRIGGERED"

        # Delete from the page: the row goes, the server keeps it as DELETED.
        await click(chromium, f"{row} button")
        await chromium.wait_for(f"!document.querySelector('{row}')")
        async with http.get(
            f"{server.url}/api/v1/alerts/{alert_id}", headers=bearer(access)
        ) as resp:
            assert (await resp.json())["status"] == "DELETED"
        # The one error: the wrong password's 401, which the browser logs by itself.
        await chromium.assert_no_console_errors(
            f"status of 401 (Unauthorized) {server.url}/auth/token"
        )


async def test_live_page_refreshes_its_tokens_before_they_expire(
    make_settings, chromium: Chromium
) -> None:
    async with LiveServer(make_settings(access_ttl=3)) as server, aiohttp.ClientSession() as http:
        await register(http, server, "dave")
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for(auth_form_ready())
        await fill(chromium, {"#auth-username": "dave", "#auth-password": "correct horse"})
        await click(chromium, "#auth-submit")
        await chromium.wait_for(visible("#alert-form"))
        first = await chromium.evaluate("sessionStorage.getItem('pricewatch.session')")
        await chromium.wait_for(
            f"sessionStorage.getItem('pricewatch.session') !== {js_str(first)}", timeout=10
        )
        fresh = orjson.loads(
            await chromium.evaluate("sessionStorage.getItem('pricewatch.session')")
        )
        async with http.get(server.url + "/auth/me", headers=bearer(fresh["access"])) as resp:
            assert resp.status == 200 and (await resp.json())["username"] == "dave"
        # Past the first token's lifetime (the server ends sockets opened with it), the page
        # is still signed in and its live feed is open again, with a newer token.
        expired = jwt.decode(orjson.loads(first)["access"], options={"verify_signature": False})[
            "exp"
        ]
        await chromium.wait_for(
            f"Date.now() / 1000 > {expired + 1} && document.querySelector("
            "'#status [data-socket=live]').dataset.state === 'open'",
            timeout=15,
        )
        await chromium.check(visible("#alert-form"), "still signed in")
        async with http.get(server.url + "/metrics") as resp:
            assert 'pricewatch_websocket_clients{endpoint="live"} 1' in await resp.text()
        await chromium.assert_no_console_errors()


async def test_live_page_switches_timeframe_and_the_chart_follows(
    make_settings, chromium: Chromium
) -> None:
    """Three trades one second apart: one 1m candle, three 1s candles; a live trade adds a
    fourth 1s candle without a reload."""
    minute = int(time.time()) // 60 * 60 * 1000
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as probe:
            await probe.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
            assert (await probe.receive_json(timeout=5))["type"] == "snapshot"
            for i, price in enumerate((42000.5, 42010.5, 42005.5)):
                await fake.send_trade("BTCUSDT", i + 1, price, 0.25, minute + 1000 * (i + 1))
                assert (await probe.receive_json(timeout=5))["candle"]["close"] == price
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for("document.body.dataset.series === 'BTCUSDT 1m'")
        await chromium.check("document.body.dataset.candles === '1'", "one 1m candle")
        await chromium.check(
            "document.querySelector('#chart-legend').textContent.includes('V 0.75')",
            "the 1m candle holds all three trades",
        )

        await click(chromium, "#timeframes button[data-tf='1s']")
        await chromium.wait_for("document.body.dataset.series === 'BTCUSDT 1s'")
        await chromium.check("document.body.dataset.candles === '3'", "three 1s candles")
        await chromium.check(
            "document.querySelector('#timeframes [aria-pressed=true]').dataset.tf === '1s'",
            "the selector shows the timeframe",
        )
        legend = await chromium.evaluate("document.querySelector('#chart-legend').textContent")
        assert "C 42,005.50" in legend and "V 0.25" in legend, legend

        await fake.send_trade("BTCUSDT", 4, 42020.25, 0.5, minute + 4000)
        await chromium.wait_for("document.body.dataset.candles === '4'", timeout=5)
        await chromium.wait_for(
            "document.querySelector('#chart-legend').textContent.includes('C 42,020.25')", timeout=5
        )
        await click(chromium, "#timeframes button[data-tf='1m']")
        await chromium.wait_for(
            "document.body.dataset.series === 'BTCUSDT 1m' && document.body.dataset.candles === '1'"
        )
        await chromium.wait_for(
            "document.querySelector('#chart-legend').textContent.includes('V 1.25')"
        )
        await chromium.assert_no_console_errors()


async def test_live_page_fits_a_phone_and_shows_demo_quotes(
    make_settings, chromium: Chromium
) -> None:
    now = int(time.time() * 1000)
    await chromium.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": True},
    )
    async with (
        FakeBinance() as fake,
        LiveServer(
            make_settings(
                feed="binance", binance_ws_url=fake.url, quotes="demo", alphavantage_interval=0.2
            )
        ) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        await book_and_trade(http, server, fake, now)
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for("document.querySelector('#quote-source').dataset.source === 'demo'")
        await chromium.wait_for("document.querySelector('#quote-rate').textContent === '42,000.50'")
        await chromium.wait_for("Number(document.body.dataset.candles) >= 1")
        await chromium.check(
            "document.documentElement.scrollWidth <= 375", "nothing wider than the phone"
        )
        await chromium.check(
            "document.querySelector('#chart').clientWidth > 300", "the chart spans the width"
        )
        await chromium.assert_no_console_errors()


async def drag(
    chromium: Chromium, start: tuple[float, float], end: tuple[float, float], steps: int = 10
) -> None:
    """A left-button drag from `start` to `end`, in `steps` moves."""
    await chromium.send(
        "Input.dispatchMouseEvent",
        {"type": "mousePressed", "x": start[0], "y": start[1], "button": "left", "clickCount": 1},
    )
    for i in range(1, steps + 1):
        x = start[0] + (end[0] - start[0]) * i / steps
        y = start[1] + (end[1] - start[1]) * i / steps
        await chromium.send(
            "Input.dispatchMouseEvent",
            {"type": "mouseMoved", "x": x, "y": y, "button": "left", "buttons": 1},
        )
    await chromium.send(
        "Input.dispatchMouseEvent",
        {"type": "mouseReleased", "x": end[0], "y": end[1], "button": "left", "clickCount": 1},
    )


async def test_live_page_loads_older_candles_when_zoomed_out_to_the_start(
    make_settings, chromium: Chromium
) -> None:
    """1100 one-minute candles: the page loads the newest 1000, and zooming out (mouse wheel)
    to the oldest one fetches the page before it (`end` = its start − 1 ms)."""
    count = 1100
    first = (int(time.time()) // 60 - count) * 60_000
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as probe:
            await probe.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
            assert (await probe.receive_json(timeout=5))["type"] == "snapshot"
            for i in range(count):
                await fake.send_trade(
                    "BTCUSDT", i + 1, 42000 + i % 50, 0.25, first + 60_000 * i + 1000
                )
            async with asyncio.timeout(10):
                while (await probe.receive_json())["candle"]["close"] != 42000 + (count - 1) % 50:
                    pass
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for("document.body.dataset.series === 'BTCUSDT 1m'")
        await chromium.check("document.body.dataset.candles === '1000'", "the newest 1000")
        box = await chromium.evaluate(
            "(r => [r.x + r.width / 2, r.y + r.height / 2])"
            "(document.querySelector('#chart').getBoundingClientRect())"
        )
        for _ in range(12):  # wheel down: zoom out as far as the chart goes
            await chromium.send(
                "Input.dispatchMouseEvent",
                {"type": "mouseWheel", "x": box[0], "y": box[1], "deltaX": 0, "deltaY": 600},
            )
        for _ in range(3):  # then drag the chart to the right: back in time
            await drag(chromium, (100, box[1]), (1100, box[1]))
        await chromium.wait_for(f"document.body.dataset.candles === '{count}'", timeout=10)
        await chromium.assert_no_console_errors()


async def test_live_page_resumes_the_alert_events_it_missed_while_offline(
    make_settings, chromium: Chromium
) -> None:
    """An alert that fires while the page's live feed is closed still shows up: after the
    reconnect the page asks for what it missed (resume from the last event it saw)."""
    now = int(time.time() * 1000)
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
        aiohttp.ClientSession() as http,
    ):
        await fake.wait_connections(1)
        await book_and_trade(http, server, fake, now)
        await register(http, server, "erin")
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        # This server's page, loaded (not the previous test's page, still on screen).
        await chromium.wait_for(
            f"location.origin === {js_str(server.url)} && document.readyState === 'complete'"
        )
        await chromium.wait_for(f"{cell('BTCUSDT', 'price')} === '42,000.50'")
        await chromium.wait_for(auth_form_ready())
        await fill(chromium, {"#auth-username": "erin", "#auth-password": "correct horse"})
        await click(chromium, "#auth-submit")
        await chromium.wait_for("document.querySelector('#account-name').textContent === 'erin'")
        await chromium.wait_for(
            "document.querySelector('#status [data-socket=live]').dataset.state === 'open'"
        )
        access = await chromium.evaluate(
            "JSON.parse(sessionStorage.getItem('pricewatch.session')).access"
        )

        async def cross(target: float, trade_id: int) -> int:
            async with http.post(
                server.url + "/api/v1/alerts",
                headers=bearer(access),
                json={"asset": "BTCUSDT", "price": target, "direction": "above"},
            ) as resp:
                alert = await resp.json()
            await fake.send_trade("BTCUSDT", trade_id, target + 1, 0.5, now + trade_id)
            return alert["id"]

        first = await cross(42100.0, 2)  # seen live: the page learns the event id
        await chromium.wait_for(
            f"!!document.querySelector('.toast[data-alert-id=\"{first}\"]')", timeout=5
        )
        await chromium.evaluate("liveFeed.stop(); true")  # offline...
        missed = await cross(42200.0, 3)  # ...while this one fires
        await server.app[ENGINE].drained()
        await chromium.evaluate("startLiveFeed(() => session.access); true")  # back online
        await chromium.wait_for(
            f"!!document.querySelector('.toast[data-alert-id=\"{missed}\"]')", timeout=5
        )

        # The page asks for the rate it needs (conflated prices), not every trade.
        def asked_rate() -> bool:
            live = [c for c in server.app[HUB].clients if c.endpoint == "live"]
            return bool(live) and all(set(c.rates.values()) == {4} for c in live)

        async with asyncio.timeout(5):
            while not asked_rate():
                await asyncio.sleep(0.01)  # its subscribe follows the resume
        await chromium.assert_no_console_errors()


def mailed_code(message) -> str:
    match = re.search(r"\b(\d{6})\b", message.get_content())
    assert match, message.get_content()
    return match.group(1)


async def test_live_page_lets_a_newcomer_verify_the_address_that_alert_mail_waits_for(
    make_settings, chromium: Chromium
) -> None:
    """Signing up on the page leaves the address unverified, so no alert mail would ever go
    out: the page says so, takes the mailed code, and sends a new one on request."""
    async with (
        SmtpSink() as smtp,
        LiveServer(make_settings(smtp_host="127.0.0.1", smtp_port=smtp.port)) as server,
        aiohttp.ClientSession() as http,
    ):
        await chromium.send("Page.navigate", {"url": server.url + "/"})
        await chromium.wait_for("document.readyState === 'complete'")  # its script ran
        await click(chromium, "#auth-mode")
        await fill(
            chromium,
            {
                "#auth-username": "frank",
                "#auth-password": "correct horse",
                "#auth-email": "frank@example.com",
            },
        )
        await click(chromium, "#auth-submit")
        await chromium.wait_for(visible("#verify"))
        notice = await chromium.evaluate("document.querySelector('#verify').textContent")
        assert "Alert emails wait" in notice and "frank@example.com" in notice
        assert await chromium.evaluate(visible("#verify-code"))
        first = mailed_code((await smtp.wait_codes(1))[0])

        # A wrong code: told why, the notice stays.
        await fill(chromium, {"#verify-code": f"{(int(first) + 1) % 10**6:06d}"})
        await click(chromium, "#verify-submit")
        await chromium.wait_for(
            "document.querySelector('#verify-error').textContent.includes('Wrong code')"
        )
        await chromium.check(visible("#verify"), "still unverified")

        # A new code (a minute after the first, as the server asks): the old one is spent.
        async with server.app[STORE]._tx() as db:
            await db.execute("UPDATE email_codes SET sent_at = sent_at - 61")
        await click(chromium, "#verify-resend")
        await chromium.wait_for(
            "document.querySelector('#verify-info').textContent.includes('on its way')"
        )
        code = mailed_code((await smtp.wait_codes(2))[1])
        await fill(chromium, {"#verify-code": code})
        await click(chromium, "#verify-submit")
        await chromium.wait_for(visible("#verified-note"))
        await chromium.check(f"!{visible('#verify')}", "the notice is gone once verified")
        access = await chromium.evaluate(
            "JSON.parse(sessionStorage.getItem('pricewatch.session')).access"
        )
        async with http.get(server.url + "/auth/me", headers=bearer(access)) as resp:
            assert (await resp.json())["email_verified"] is True

        # Back on the page later: a verified address gets no notice.
        await chromium.send("Page.reload", {})
        await chromium.wait_for("document.querySelector('#account').dataset.verified === 'yes'")
        await chromium.check(f"!{visible('#verify')}", "no notice for a verified address")
        await chromium.assert_no_console_errors("status of 400 (Bad Request)")
