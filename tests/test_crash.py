"""The real server process (`python -m pricewatch`): SIGKILL under load, and SIGTERM.

Test 1 kills the server with SIGKILL while 20 clients create alerts and trades cross some
of them, restarts it on the same SQLite file, and checks that nothing acknowledged was lost,
nothing was duplicated, every trigger is consistent with the trades that were sent, and each
triggered alert gets exactly one email.

SMTP is DOWN for the whole life of the killed process (the sink only starts after the
kill). So no email can be in the one documented duplicate window of alerts.py (SMTP accepted
it, the process died before recording `sent`): with SMTP down, nothing is accepted before
the kill, and "exactly one email per triggered alert" is a deterministic assertion.

Waiting: on websocket messages, SMTP arrivals and process exit, all with timeouts. The only
polling is of the server process's own state (healthz while it starts, `notified` via the
API), bounded and with a short sleep between attempts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from conftest import bearer, mark_verified
from fake_binance import FakeBinance, free_port
from smtp_sink import SmtpSink

from pricewatch.delivery.message import plain

T0 = 1704067200000  # 2024-01-01T00:00:00Z; trade j happens at T0 + 1000 * (j + 1)
SYMBOL = "BTCUSDT"
CREATORS = 20  # concurrent clients creating alerts
CAP = 600  # at most this many create requests (stays under max_alerts_per_user)
PACE = 40  # a trade after every PACE more 201s
# Trades that are sent and acknowledged (price message back) during the load; each
# oscillation crosses more alerts. Targets: "above" 100.1, 100.2, ...; "below" 99.9, 99.8...
PLAN = [104.05, 96.05, 108.05, 92.05, 112.05, 88.05]
LAST = 116.05  # sent, then the server is killed right after without waiting for it
AFTER_ABOVE, AFTER_BELOW = 10000.0, 0.5  # after the restart: these cross every alert
FORBIDDEN = ("Traceback", "Task was destroyed but it is pending")


def trade_time(j: int) -> int:
    return T0 + 1000 * (j + 1)


def trade_index(iso: str) -> int:
    ms = round(datetime.fromisoformat(iso).timestamp() * 1000)
    assert (ms - T0) % 1000 == 0, iso
    return (ms - T0) // 1000 - 1


def crosses(direction: str, target: float, price: float) -> bool:
    return price >= target if direction == "above" else price <= target


class ServerProcess:
    """`python -m pricewatch` on a port, env from scratch, cwd = tmp dir (no .env)."""

    def __init__(self, tmp_path: Path, name: str, fake_url: str, smtp_port: int):
        self.tmp_path, self.name, self.smtp_port = tmp_path, name, smtp_port
        self.stderr_path = tmp_path / f"{name}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
        self.env.update(
            {
                "PRICEWATCH_DB": str(tmp_path / "pricewatch.db"),
                "PRICEWATCH_FEED": "binance",
                "PRICEWATCH_BINANCE_WS_URL": fake_url,
                # The fake answers Binance's REST too: no test may reach the internet.
                "PRICEWATCH_BINANCE_REST_URL": "http" + fake_url[len("ws") :],
                "PRICEWATCH_SMTP_HOST": "127.0.0.1",
                # One user's load triggers hundreds of alerts: every one is mailed at once here
                # (the hourly budget and its digest are tests/test_budget.py's business).
                "PRICEWATCH_NOTIFY_PER_HOUR": "100000",
                "PRICEWATCH_SMTP_PORT": str(smtp_port),
                "PRICEWATCH_SMTP_RETRY_BASE": "0.05",
                # SMTP is down on purpose in test 1: retries must not run out meanwhile.
                "PRICEWATCH_SMTP_MAX_ATTEMPTS": "100",
                "PRICEWATCH_BCRYPT_ROUNDS": "4",
                "PRICEWATCH_LOG_LEVEL": "WARNING",
                # One user creates alerts under load, far faster than a person would.
                "PRICEWATCH_ALERT_CREATE_RATE": "100000",
            }
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    def ws_url(self, path: str) -> str:
        return "ws" + self.url[len("http") :] + path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    async def start(self, http: aiohttp.ClientSession, fake: FakeBinance, connections: int) -> None:
        """Start and wait until /healthz answers 200 and the feed is connected to `fake`."""
        port = free_port()
        while port == self.smtp_port:  # that one is free only because SMTP is down
            port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(self.env, PRICEWATCH_PORT=str(port))
        with open(self.stderr_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pricewatch",
                cwd=self.tmp_path,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        for _ in range(300):  # bounded: at most ~15 s of 50 ms attempts
            assert self.proc.returncode is None, f"{self.name} exited:\n{self.stderr()}"
            try:
                async with http.get(self.url + "/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"{self.name} never became healthy:\n{self.stderr()}")
        await fake.wait_connections(connections, timeout=10)
        await fake.wait_open(1, timeout=10)

    async def kill(self) -> None:
        self.proc.kill()
        assert await asyncio.wait_for(self.proc.wait(), 5) == -signal.SIGKILL

    async def terminate(self, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or `sig`); the process must exit within 5 s."""
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 5)

    async def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def register(
    http: aiohttp.ClientSession, server: ServerProcess, username: str = "alice"
) -> dict:
    """Register a user with a verified address (see conftest.register)."""
    async with http.post(
        server.url + "/auth/register",
        json={
            "username": username,
            "password": "correct horse",
            "email": f"{username}@example.com",
        },
    ) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
    mark_verified(server.env["PRICEWATCH_DB"], body["id"])
    return body


class LiveFeed:
    """A /live-feed/subscribe/ socket read in the background: trade acks and alert events."""

    def __init__(self):
        self.acked = -1  # index of the latest trade whose price message came back
        self.alerts: dict[int, dict] = {}  # {"type": "alert"} events by alert id
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self, http: aiohttp.ClientSession, server: ServerProcess, token: str):
        self.ws = await http.ws_connect(
            server.ws_url("/live-feed/subscribe/"), headers=bearer(token)
        )
        await self.ws.send_json({"action": "subscribe", "symbols": [SYMBOL]})
        while True:  # subscribed: every later trade reaches this socket
            msg = orjson.loads((await asyncio.wait_for(self.ws.receive(), 10)).data)
            if msg["type"] == "subscribed":
                break
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.ws:  # ends when the socket closes (or the server dies)
            if msg.type != WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            async with self._changed:
                if data["type"] == "price" and data["symbol"] == SYMBOL:
                    self.acked = max(self.acked, trade_index(data["time"]))
                elif data["type"] == "alert":
                    assert data["alert"]["id"] not in self.alerts, "alert event twice"
                    self.alerts[data["alert"]["id"]] = data["alert"]
                self._changed.notify_all()

    async def wait_acked(self, j: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.acked >= j)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)


class Load:
    """Concurrent alert creation plus trades through the fake, with everything recorded."""

    def __init__(self, http, server: ServerProcess, fake: FakeBinance, feed: LiveFeed, token: str):
        self.http, self.server, self.fake, self.feed = http, server, fake, feed
        self.headers = bearer(token)
        self.trades: list[float] = []  # price of trade j, appended before it is sent
        self.created: dict[int, dict] = {}  # every 201: id -> what we know about it
        self.unknown: list[tuple[float, str]] = []  # requests cut off by the kill
        self.refused: list = []  # any answer other than 201 (a failure)
        self.killed = False
        self._counter = itertools.count()
        self._progress = asyncio.Condition()

    async def trade(self, price: float) -> int:
        j = len(self.trades)
        self.trades.append(price)
        await self.fake.send_trade(SYMBOL, j + 1, price, 1, trade_time(j))
        return j

    async def wait_created(self, n: int) -> None:
        async with asyncio.timeout(15), self._progress:
            await self._progress.wait_for(lambda: len(self.created) >= n or self.refused)
        assert not self.refused, self.refused

    async def creator(self) -> None:
        while not self.killed:
            n = next(self._counter)
            if n >= CAP:
                return
            direction = "above" if n % 2 == 0 else "below"
            k = n // 2 + 1
            target = round(100 + k / 10 if direction == "above" else 100 - k / 10, 1)
            acked_before = self.feed.acked  # trades 0..acked_before ran before this alert
            try:
                async with self.http.post(
                    self.server.url + "/api/v1/alerts",
                    headers=self.headers,
                    json={"asset": SYMBOL, "price": target, "direction": direction},
                ) as r:
                    status, body = r.status, await r.json()
            except aiohttp.ClientError:  # the kill cut it off: it may or may not exist
                self.unknown.append((target, direction))
                return
            async with self._progress:
                if status != 201:
                    self.refused.append((status, body))
                else:
                    assert (body["price"], body["direction"]) == (target, direction), body
                    assert body["status"] == "CREATED", body
                    # Trades from index `sent_before` on were sent after this alert existed.
                    self.created[body["id"]] = {
                        "price": target,
                        "direction": direction,
                        "acked_before": acked_before,
                        "sent_before": len(self.trades),
                    }
                self._progress.notify_all()
            if status != 201:
                return

    async def drive(self) -> None:
        """Trades paced by creations; SIGKILL right after the last one, mid-load."""
        await self.feed.wait_acked(await self.trade(100.0))
        creators = [asyncio.create_task(self.creator()) for _ in range(CREATORS)]
        try:
            for i, price in enumerate(PLAN):
                await self.wait_created(PACE * (i + 1))
                await self.feed.wait_acked(await self.trade(price))
            await self.wait_created(PACE * (len(PLAN) + 1))
            await self.trade(LAST)
            await self.wait_created(len(self.created) + 3)
            self.killed = True
            await self.server.kill()
        finally:
            self.killed = True
            await asyncio.wait_for(asyncio.gather(*creators), 10)
        assert not self.refused, self.refused


async def fetch_all(http, url: str, headers: dict) -> list[dict]:
    listed, page = [], 1
    while True:
        async with http.get(
            url + f"/api/v1/alerts?page={page}&page_size=100", headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        listed += body["results"]
        if body["next"] is None:
            assert body["count"] == len(listed)
            return listed
        page += 1


async def fetch_each(http, url: str, headers: dict, ids) -> dict[int, dict]:
    slots = asyncio.Semaphore(20)

    async def one(alert_id: int) -> tuple[int, dict]:
        async with slots, http.get(url + f"/api/v1/alerts/{alert_id}", headers=headers) as r:
            assert r.status == 200, (alert_id, r.status, await r.text())
            return alert_id, await r.json()

    return dict(await asyncio.gather(*(one(i) for i in ids)))


async def test_sigkill_under_load_loses_nothing_and_emails_each_trigger_once(tmp_path):
    smtp_port = free_port()  # nothing listens there until the first process is dead
    async with FakeBinance() as fake, aiohttp.ClientSession() as http:
        first = ServerProcess(tmp_path, "first", fake.url, smtp_port)
        second = ServerProcess(tmp_path, "second", fake.url, smtp_port)
        sink: SmtpSink | None = None
        feeds = [LiveFeed(), LiveFeed()]  # one per server process
        feed = feeds[0]
        try:
            await first.start(http, fake, connections=1)
            user = await register(http, first)
            headers = bearer(user["access"])
            await feed.open(http, first, user["access"])
            load = Load(http, first, fake, feed, user["access"])
            await load.drive()
            await asyncio.wait_for(feed._task, 5)  # the socket died with the process
            assert "Traceback" not in first.stderr(), first.stderr()
            pre_kill_events = dict(feed.alerts)
            sent_before_kill = list(load.trades)

            sink = await SmtpSink(port=smtp_port).start()
            await second.start(http, fake, connections=2)
            url = second.url

            # 1. Nothing lost, nothing duplicated (the JWT secret persists in the DB).
            listed = await fetch_all(http, url, headers)
            ids = [a["id"] for a in listed]
            assert len(ids) == len(set(ids)), "an alert id is listed twice"
            keys = Counter((a["price"], a["direction"]) for a in listed)
            assert max(keys.values()) == 1, "a create request was stored twice"
            assert set(load.created) <= set(ids), "an acknowledged alert was lost"
            extras = [a for a in listed if a["id"] not in load.created]
            assert not Counter((a["price"], a["direction"]) for a in extras) - Counter(
                load.unknown
            ), "an alert nobody asked for (or acknowledged) exists"
            before = await fetch_each(http, url, headers, load.created)
            by_id = {a["id"]: a for a in listed}
            for alert_id, alert in before.items():
                info = load.created[alert_id]
                assert (alert["asset"], alert["price"], alert["direction"]) == (
                    SYMBOL,
                    info["price"],
                    info["direction"],
                ), alert
                # The same as listed, but for `notified`: the notifier is already at work.
                assert {**alert, "notified": None} == {**by_id[alert_id], "notified": None}

            # 2. Every trigger is consistent with the trades sent before the kill.
            triggered = {a["id"]: a for a in listed if a["status"] == "TRIGGERED"}
            assert {a["status"] for a in listed} <= {"CREATED", "TRIGGERED"}
            for alert in listed:
                if alert["status"] == "CREATED":
                    assert alert["triggered_at"] is None and alert["notified"] is None, alert
                    continue
                j = trade_index(alert["triggered_at"])
                assert 0 <= j < len(sent_before_kill), alert
                assert alert["triggered_price"] == sent_before_kill[j], alert
                assert crosses(alert["direction"], alert["price"], alert["triggered_price"])
                assert alert["notified"] in ("pending", "sent"), alert
                info = load.created.get(alert["id"])
                if info is not None:
                    # Not on a trade processed before the alert existed; and at the latest on
                    # the first crossing trade sent after its 201 (never on a later one).
                    assert j > info["acked_before"], (alert, info)
                    first_sure = next(
                        (
                            i
                            for i in range(info["sent_before"], len(sent_before_kill))
                            if crosses(alert["direction"], alert["price"], sent_before_kill[i])
                        ),
                        None,
                    )
                    assert first_sure is None or j <= first_sure, (alert, info, first_sure)
            # What the server announced as triggered was on disk.
            for alert_id, event in pre_kill_events.items():
                assert by_id[alert_id]["status"] == "TRIGGERED", event
                assert by_id[alert_id]["triggered_price"] == event["triggered_price"]
                assert by_id[alert_id]["triggered_at"] == event["triggered_at"]
            assert pre_kill_events and triggered, "the load triggered nothing before the kill"
            assert len(triggered) < len(listed), "nothing was left to trigger after restart"

            # 3. After the restart, two trades cross every remaining alert.
            feed = feeds[1]
            await feed.open(http, second, user["access"])
            await load.trade(AFTER_ABOVE)
            await feed.wait_acked(await load.trade(AFTER_BELOW))
            after_trades = {len(load.trades) - 2: AFTER_ABOVE, len(load.trades) - 1: AFTER_BELOW}

            # 4. One email per alert: wait for them all, then for every `sent` on disk.
            total = len(listed)
            await sink.wait_messages(total, timeout=20)
            for _ in range(200):  # bounded: ~10 s of the server's own state
                final = {a["id"]: a for a in await fetch_all(http, url, headers)}
                if all(a["notified"] == "sent" for a in final.values()):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(Counter(a["notified"] for a in final.values()))
            # A graceful stop, then the sink can receive nothing more from pricewatch.
            assert await second.terminate() == 0
            assert not any(s in second.stderr() for s in FORBIDDEN), second.stderr()
            await feed.close()

            assert set(final) == set(by_id)
            for alert_id, alert in final.items():
                assert alert["status"] == "TRIGGERED", alert
                if alert_id in triggered:  # triggered once: the restart did not re-fire it
                    old = triggered[alert_id]
                    assert (alert["triggered_at"], alert["triggered_price"]) == (
                        old["triggered_at"],
                        old["triggered_price"],
                    ), alert
                else:
                    j = trade_index(alert["triggered_at"])
                    assert after_trades.get(j) == alert["triggered_price"], alert
                    assert crosses(alert["direction"], alert["price"], alert["triggered_price"])
            emailed = Counter()
            for msg in sink.messages:
                body = msg.get_content()
                found = re.search(r"Your price alert #(\d+) has triggered", body)
                assert found, body
                alert = final[int(found.group(1))]
                emailed[alert["id"]] += 1
                assert msg["To"] == "alice@example.com"
                lines = body.splitlines()
                assert f"Trigger price: {plain(alert['triggered_price'])}" in lines, body
                assert f"Time (UTC):    {alert['triggered_at']}" in lines, body
                assert f"Target:        {plain(alert['price'])} ({alert['direction']}" in body
            assert emailed == Counter(set(final)), "an email is missing or duplicated"
            assert len(sink.messages) == total
        finally:
            await first.cleanup()
            await second.cleanup()
            for each in feeds:
                if each.ws is not None:
                    await each.ws.close()
            if sink is not None:
                await sink.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_closes_websockets_with_1001_and_exits_cleanly(tmp_path, sig):
    async with FakeBinance() as fake, aiohttp.ClientSession() as http:
        server = ServerProcess(tmp_path, "server", fake.url, free_port())
        sockets = []
        try:
            await server.start(http, fake, connections=1)
            token = (await register(http, server))["access"]
            ohlc = await http.ws_connect(server.ws_url("/ws/ohlc/"))
            sockets.append(ohlc)
            await ohlc.send_json({"symbol": SYMBOL, "timeframe": "1m"})
            assert (await asyncio.wait_for(ohlc.receive_json(), 5))["type"] == "snapshot"
            live = await http.ws_connect(
                server.ws_url("/live-feed/subscribe/"), headers=bearer(token)
            )
            sockets.append(live)
            await live.send_json({"action": "subscribe"})
            assert (await asyncio.wait_for(live.receive_json(), 5))["type"] == "subscribed"
            # Both sockets are live and carrying data when the signal comes.
            await fake.send_trade(SYMBOL, 1, 100.0, 1, trade_time(0))
            assert (await asyncio.wait_for(ohlc.receive_json(), 5))["type"] == "candle"
            assert (await asyncio.wait_for(live.receive_json(), 5))["type"] == "price"

            # Read while the server shuts down, so that the close handshake can complete.
            reads = [asyncio.create_task(ws.receive()) for ws in sockets]
            assert await server.terminate(sig) == 0  # run_app: SIGTERM/SIGINT = graceful
            for ws, read in zip(sockets, reads, strict=True):
                msg = await asyncio.wait_for(read, 5)
                assert msg.type == WSMsgType.CLOSE, msg
                assert msg.data == 1001 and ws.close_code == 1001, (msg, ws.close_code)
            await fake.wait_open(0)  # the upstream connection was closed, too
            stderr = server.stderr()
            assert not any(s in stderr for s in FORBIDDEN), stderr
        finally:
            await server.cleanup()
            for ws in sockets:
                await ws.close()
