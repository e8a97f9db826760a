"""Several machines: a core and edges over a real redis-server on loopback.

The core runs the fake Binance feed; edges (PRICEWATCH_ROLE=edge) have no database and no
feed: everything they send comes over Redis. Each test starts its own redis-server on a free
port (skipped, with the reason, when the Debian package `redis-server` is not installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
import time

import aiohttp
import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_binance import free_port

from pricewatch.alerts import ENGINE
from pricewatch.cluster import edge as edge_module
from pricewatch.cluster.bus import BACKOFF_FIRST, BACKOFF_MAX, RedisBus, backoff
from pricewatch.cluster.core import PUBLISHER
from pricewatch.config import ConfigError, Settings
from pricewatch.ohlc import DAY_OF_MINUTES, TIMEFRAMES, CandleBook
from pricewatch.quotes_api import QUOTES
from pricewatch.upstream.alphavantage import Quote

SECRET = "cluster-test-secret-of-at-least-32-bytes"
T0 = 1704067200000  # 2024-01-01T00:00:00Z
REDIS = shutil.which("redis-server")
HAS_CLIENT = importlib.util.find_spec("redis") is not None
needs_redis = pytest.mark.skipif(
    REDIS is None or not HAS_CLIENT,
    reason="redis-server is not installed (Debian package redis-server; .ci/run installs it)"
    if REDIS is None
    else "the redis client is not installed (pip install -e '.[test]')",
)


class RedisServer:
    """`redis-server` on 127.0.0.1:port, no persistence; stop and start again on the same
    port (a restart loses everything, as a real one without persistence does)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # until it accepts connections and answers PING
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                answer = await asyncio.wait_for(reader.readline(), 2)
                writer.close()
                if answer.startswith(b"+PONG"):
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            assert self.proc.poll() is None, "redis-server exited"
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
async def redis():
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        server.stop()


def core_settings(make_settings, fake, redis, **overrides) -> Settings:
    return make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        candle_history=False,
        redis_url=redis.url,
        jwt_secret=SECRET,
        role="core",
        **overrides,
    )


def edge_settings(make_settings, redis, **overrides) -> Settings:
    return make_settings(redis_url=redis.url, jwt_secret=SECRET, role="edge", **overrides)


async def receive(ws, kind: str, timeout: float = 5.0, **match) -> dict:
    """The next message of `kind` whose fields equal `match` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.receive(), max(0.01, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        data = orjson.loads(msg.data)
        if data.get("type") == kind and all(_matches(data, k, v) for k, v in match.items()):
            return data


def _matches(data: dict, key: str, value) -> bool:
    if key == "close":
        return data.get("candle", {}).get("close") == value
    return data.get(key) == value


async def until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until `await condition()` is true (polling a server's REST answer)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def get_json(http, url: str) -> tuple[int, dict]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def cluster(make_settings, fake, redis, edges: int = 2):
    async with LiveServer(core_settings(make_settings, fake, redis)) as core:
        async with contextlib.AsyncExitStack() as stack:
            started = [
                await stack.enter_async_context(LiveServer(edge_settings(make_settings, redis)))
                for _ in range(edges)
            ]
            await fake.wait_open(1)
            yield core, started


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PRICEWATCH_ROLE": "edge"}, "PRICEWATCH_ROLE=edge needs PRICEWATCH_REDIS_URL"),
        ({"PRICEWATCH_ROLE": "core"}, "PRICEWATCH_ROLE=core needs PRICEWATCH_REDIS_URL"),
        (
            {"PRICEWATCH_ROLE": "edge", "PRICEWATCH_REDIS_URL": "redis://127.0.0.1:6379/0"},
            "PRICEWATCH_REDIS_URL (a cluster) needs PRICEWATCH_JWT_SECRET",
        ),
        ({"PRICEWATCH_REDIS_URL": "http://127.0.0.1"}, "PRICEWATCH_REDIS_URL must be a redis://"),
        ({"PRICEWATCH_ROLE": "middle"}, "PRICEWATCH_ROLE must be one of all, core, edge"),
    ],
)
def test_cluster_settings_are_checked_with_one_clear_line(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env, dotenv=None)


def clean_env() -> dict[str, str]:
    """This environment without PRICEWATCH_ variables, importing this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return env


def test_edge_command_is_role_edge_and_needs_redis(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pricewatch", "edge"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "pricewatch: configuration error: PRICEWATCH_ROLE=edge needs PRICEWATCH_REDIS_URL"
    )


def test_redis_is_not_imported_without_a_redis_url(tmp_path):
    code = (
        "import sys, asyncio\n"
        "from pricewatch.config import Settings\n"
        "from pricewatch.server import create_app\n"
        f"create_app(Settings(db={str(tmp_path / 'x.db')!r}, feed='off'))\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, env=clean_env())


def test_candle_states_put_one_by_one_rebuild_the_rings_exactly():
    """What an edge does with each candle it hears (CandleBook.put) keeps the same rings,
    and the same 24 h figures, as the trades themselves built on the core, late trades
    included."""
    source, edge = CandleBook(sizes=DAY_OF_MINUTES), CandleBook(sizes=DAY_OF_MINUTES)
    rng = random.Random(7)
    for i in range(5000):
        late = rng.randint(-90_000, 0) if rng.random() < 0.05 else 0
        t = T0 + i * 700 + late
        source.add("BTCUSDT", 100 + rng.random(), rng.random(), t)
        for tf, ms in TIMEFRAMES.items():
            for row in source.between("BTCUSDT", tf, t - t % ms, t - t % ms):
                edge.put("BTCUSDT", tf, row)
        if i % 500 == 0:
            assert edge.rolling("BTCUSDT") == source.rolling("BTCUSDT")
    for tf in TIMEFRAMES:
        assert edge.between("BTCUSDT", tf, 0, 2**62) == source.between("BTCUSDT", tf, 0, 2**62)
        assert edge.candles("BTCUSDT", tf, 1000) == source.candles("BTCUSDT", tf, 1000)
    assert edge.rolling("BTCUSDT") == source.rolling("BTCUSDT")


def test_reconnect_backoff_is_jittered_and_capped():
    for attempt in range(12):
        delays = [backoff(attempt) for _ in range(200)]
        cap = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 100  # processes restarting together do not retry in step


async def test_a_publisher_stops_when_cancelled_the_moment_it_is_woken():
    """Cancelled in the loop turn that also wakes it, the publisher's loop ends. (Python
    3.11's asyncio.wait_for returned the wake-up and dropped such a cancellation, so the
    loop went on and a shutdown waiting for it hung: seen as a stuck cluster test.)"""

    class Client:
        async def ping(self) -> bool:
            return True

    bus = RedisBus("redis://127.0.0.1:1/0", on_connect=lambda client: asyncio.sleep(0))
    for _ in range(20):
        task = asyncio.create_task(bus._keep(Client()))
        await asyncio.sleep(0)  # it waits to be woken
        bus._wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done and task.cancelled()


# -- a core and two edges -------------------------------------------------------------------


@needs_redis
async def test_prices_and_candles_reach_clients_on_both_edges(make_settings, fake, redis, http):
    async with cluster(make_settings, fake, redis) as (core, edges):
        user = await register(http, core)
        lives, ohlcs = [], []
        for edge in edges:
            live = await http.ws_connect(
                edge.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
            )
            ohlc = await http.ws_connect(edge.ws_url("/ws/ohlc/"))
            await ohlc.send_json({"symbol": "BTCUSDT", "timeframe": "1m", "limit": 10})
            snapshot = await receive(ohlc, "snapshot")
            assert snapshot["data"] == []
            lives.append(live)
            ohlcs.append(ohlc)
        for i, price in enumerate([100.0, 103.0, 99.0, 101.5], 1):
            await fake.send_trade("BTCUSDT", i, price, 0.5, T0 + i * 1000)
        for live, ohlc in zip(lives, ohlcs, strict=True):
            price = await receive(live, "price", symbol="BTCUSDT", price=101.5)
            assert price["time"] == "2024-01-01T00:00:04.000Z"
            candle = await receive(ohlc, "candle", close=101.5)
            assert candle["candle"] == {
                "timestamp": "2024-01-01T00:00:00Z",
                "open": 100.0,
                "high": 103.0,
                "low": 99.0,
                "close": 101.5,
                "volume": 2.0,
                "trades": 4,
            }
        # The market REST answers of an edge are the core's, 24 h figures included.
        status, on_core = await get_json(http, core.url + "/api/v1/prices")
        assert status == 200 and on_core["results"]
        for edge in edges:

            async def same() -> bool:
                return (await get_json(http, edge.url + "/api/v1/prices"))[1] == on_core

            await until(same, what="the edge's prices")
            query = "/api/v1/ohlc?symbol=BTCUSDT&timeframe=1s&limit=5"
            assert await get_json(http, edge.url + query) == await get_json(http, core.url + query)
            status, body = await get_json(http, edge.url + query + "&start=0")
            assert status == 503 and body["error"] == "unavailable"
            async with http.get(edge.url + "/metrics") as resp:
                text = await resp.text()
            assert "pricewatch_redis_connected 1" in text
            assert 'pricewatch_websocket_clients{endpoint="live"} 1' in text
            assert 'pricewatch_websocket_clients{endpoint="ohlc"} 1' in text
        for ws in lives + ohlcs:
            await ws.close()


@needs_redis
async def test_a_users_alert_event_reaches_their_socket_on_an_edge(
    make_settings, fake, redis, http
):
    async with cluster(make_settings, fake, redis) as (core, edges):
        alice = await register(http, core, "alice")
        bob = await register(http, core, "bob")
        sockets = {}
        for name, user, edge in [("alice", alice, edges[0]), ("bob", bob, edges[1])]:
            sockets[name] = await http.ws_connect(
                edge.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
            )
        await fake.send_trade("BTCUSDT", 1, 100.0, 1, T0)
        await receive(sockets["alice"], "price", price=100.0)
        async with http.post(
            core.url + "/api/v1/alerts",
            headers=bearer(alice["access"]),
            json={"asset": "BTCUSDT", "price": 105.0},
        ) as resp:
            assert resp.status == 201
            alert = await resp.json()
        await fake.send_trade("BTCUSDT", 2, 106.0, 1, T0 + 1)
        event = await receive(sockets["alice"], "alert")
        assert event["alert"]["id"] == alert["id"]
        assert event["alert"]["status"] == "TRIGGERED"
        assert event["alert"]["triggered_price"] == 106.0
        await core.app[ENGINE].drained()
        # Bob's socket (another edge) gets the prices, never Alice's event.
        await fake.send_trade("BTCUSDT", 3, 107.0, 1, T0 + 2)
        seen = []
        while True:
            data = orjson.loads((await asyncio.wait_for(sockets["bob"].receive(), 5)).data)
            seen.append(data["type"])
            if data.get("price") == 107.0:
                break
        assert "alert" not in seen
        for ws in sockets.values():
            await ws.close()


@needs_redis
async def test_resume_on_an_edge_replays_missed_alert_events_in_order(
    make_settings, fake, redis, http
):
    async with cluster(make_settings, fake, redis) as (core, edges):
        alice = await register(http, core, "alice")
        first = await http.ws_connect(
            edges[0].ws_url("/live-feed/subscribe/"), headers=bearer(alice["access"])
        )
        await fake.send_trade("BTCUSDT", 1, 100.0, 1, T0)
        await receive(first, "price", price=100.0)
        for target in (101.0, 102.0, 103.0, 104.0):
            async with http.post(
                core.url + "/api/v1/alerts",
                headers=bearer(alice["access"]),
                json={"asset": "BTCUSDT", "price": target},
            ) as resp:
                assert resp.status == 201
        events = []
        for i, price in enumerate((101.5, 102.5, 103.5), 2):
            await fake.send_trade("BTCUSDT", i, price, 1, T0 + i)
            events.append((await receive(first, "alert"))["event"]["id"])
        await first.close()
        # Reconnected to the other edge: what came after the first event, then live ones.
        ws = await http.ws_connect(
            edges[1].ws_url("/live-feed/subscribe/"), headers=bearer(alice["access"])
        )
        await ws.send_json({"action": "resume", "since": events[0]})
        replayed = [(await receive(ws, "alert"))["event"]["id"] for _ in range(2)]
        assert replayed == events[1:]
        assert await receive(ws, "resumed") == {
            "type": "resumed",
            "since": events[0],
            "last": events[2],
            "more": False,
            "complete": True,
        }
        await fake.send_trade("BTCUSDT", 9, 104.5, 1, T0 + 9)
        assert (await receive(ws, "alert"))["event"]["id"] > events[2]
        await ws.send_json({"action": "resume", "since": -1})
        assert (await receive(ws, "error"))["detail"].startswith("since must be")
        await ws.close()


@needs_redis
async def test_quotes_reach_ws_rates_on_edges_and_a_new_socket_gets_the_latest(
    make_settings, fake, redis, http
):
    async with cluster(make_settings, fake, redis) as (core, edges):
        on_core = await http.ws_connect(core.ws_url("/ws/rates/"))
        sockets = [await http.ws_connect(edge.ws_url("/ws/rates/")) for edge in edges]
        quotes = core.app[QUOTES]
        await quotes.save(Quote("BTC", "USD", 65000.5, 65000.0, 65001.0, "2024-01-01T00:00:00Z"))
        expected = await receive(on_core, "quote")
        assert expected["rate"] == 65000.5
        for ws in sockets:  # the same message, byte for byte
            assert await receive(ws, "quote") == expected
        await quotes.save(Quote("BTC", "USD", 65010.0, None, None, "2024-01-01T00:01:00Z"))
        newest = await receive(on_core, "quote")
        for ws in sockets:
            assert await receive(ws, "quote") == newest
        late = await http.ws_connect(edges[1].ws_url("/ws/rates/"))
        assert await receive(late, "quote") == newest
        for ws in [on_core, late, *sockets]:
            await ws.close()


@needs_redis
async def test_logout_on_the_core_closes_that_logins_sockets_on_every_edge_within_1s(
    make_settings, fake, redis, http
):
    async with cluster(make_settings, fake, redis) as (core, edges):
        user = await register(http, core)
        async with http.post(
            core.url + "/auth/token", json={"username": "alice", "password": "correct horse"}
        ) as resp:
            other = await resp.json()  # a second login of the same user: stays open
        sockets = [
            await http.ws_connect(
                edge.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
            )
            for edge in edges
        ]
        keep = await http.ws_connect(
            edges[0].ws_url("/live-feed/subscribe/"), headers=bearer(other["access"])
        )
        began = time.monotonic()
        async with http.post(core.url + "/auth/logout", json={"refresh": user["refresh"]}) as resp:
            assert resp.status == 204, await resp.text()
        for ws in sockets:
            while True:
                msg = await asyncio.wait_for(ws.receive(), 1.0)
                if msg.type == aiohttp.WSMsgType.CLOSE:
                    break
            assert msg.data == 1008 and msg.extra == "token expired or revoked"
        assert time.monotonic() - began < 1.0
        for edge in edges:  # and the token is refused there from now on
            async with http.get(
                edge.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
            ) as resp:
                assert resp.status == 401
        assert not keep.closed
        await keep.close()
        # An edge started later knows the revocation from the snapshot.
        async with LiveServer(edge_settings(make_settings, redis)) as late:
            async with http.get(
                late.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
            ) as resp:
                assert resp.status == 401
            async with http.ws_connect(
                late.ws_url("/live-feed/subscribe/"), headers=bearer(other["access"])
            ) as ws:
                await ws.send_json({"action": "subscribe"})
                assert (await receive(ws, "subscribed"))["symbols"] == ["BTCUSDT", "ETHUSDT"]


@needs_redis
async def test_redis_restart_edges_resume_without_client_reconnects(
    make_settings, fake, redis, http
):
    async with cluster(make_settings, fake, redis) as (core, edges):
        user = await register(http, core)
        live = await http.ws_connect(
            edges[0].ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
        )
        ohlc = await http.ws_connect(edges[1].ws_url("/ws/ohlc/"))
        await ohlc.send_json({"symbol": "BTCUSDT", "timeframe": "1s", "limit": 10})
        await receive(ohlc, "snapshot")
        await fake.send_trade("BTCUSDT", 1, 100.0, 1, T0)
        await receive(live, "price", price=100.0)

        redis.stop()
        for server in [*edges, core]:  # the core notices at its next ping (2 s)

            async def down(server=server) -> bool:
                status, body = await get_json(http, server.url + "/healthz")
                return status == 503 and body["redis"]["connected"] is False

            await until(down, timeout=8, what="/healthz to report Redis down")
        # Trades while Redis is away: the edges catch up from the snapshot.
        await fake.send_trade("BTCUSDT", 2, 110.0, 1, T0 + 5000)
        await redis.start()
        began = time.monotonic()
        await receive(live, "price", price=110.0, timeout=10)
        candle = await receive(ohlc, "candle", close=110.0, timeout=10)
        assert candle["candle"]["timestamp"] == "2024-01-01T00:00:05Z"
        assert time.monotonic() - began < 8
        await fake.send_trade("BTCUSDT", 3, 111.0, 1, T0 + 6000)
        await receive(live, "price", price=111.0)
        await receive(ohlc, "candle", close=111.0)
        for edge in edges:
            status, body = await get_json(http, edge.url + "/healthz")
            assert status == 200 and body["status"] == "ok"
        assert not live.closed and not ohlc.closed
        await live.close()
        await ohlc.close()


@needs_redis
async def test_an_edge_started_late_shows_prices_and_candles_at_once(
    make_settings, fake, redis, http
):
    async with cluster(make_settings, fake, redis, edges=0) as (core, _):
        user = await register(http, core)
        probe = await http.ws_connect(
            core.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
        )
        for i, price in enumerate([100.0, 102.0, 101.0], 1):
            await fake.send_trade("BTCUSDT", i, price, 1, T0 + i * 60_000)
        await fake.send_trade("ETHUSDT", 4, 2000.0, 1, T0 + 3 * 60_000)
        await receive(probe, "price", symbol="ETHUSDT", price=2000.0)
        await probe.close()
        publisher = core.app[PUBLISHER]

        async def in_redis() -> bool:  # published (within 50 ms) and executed by Redis
            sent = publisher.sent_latest.get("ETHUSDT")
            return (
                sent is not None
                and sent[0] == 2000.0
                and (publisher.bus.published == publisher.bus.queued)
            )

        await until(in_redis, what="the snapshot to hold the last trade")
        async with LiveServer(edge_settings(make_settings, redis)) as edge:
            status, on_edge = await get_json(http, edge.url + "/api/v1/prices")
            assert status == 200
            assert on_edge == (await get_json(http, core.url + "/api/v1/prices"))[1]
            ws = await http.ws_connect(edge.ws_url("/ws/ohlc/"))
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m", "limit": 10})
            snapshot = await receive(ws, "snapshot")
            assert [c["close"] for c in snapshot["data"]] == [100.0, 102.0, 101.0]
            await ws.close()


@needs_redis
async def test_an_edge_started_without_redis_serves_and_catches_up(
    make_settings, fake, redis, http, monkeypatch
):
    monkeypatch.setattr(edge_module, "START_WAIT", 0.2)
    redis.stop()
    async with LiveServer(edge_settings(make_settings, redis)) as edge:
        status, body = await get_json(http, edge.url + "/healthz")
        assert status == 503 and body["status"] == "stale"
        assert body["redis"]["connected"] is False and "error" in body["redis"]
        assert (await get_json(http, edge.url + "/api/v1/prices")) == (200, {"results": []})
        ws = await http.ws_connect(edge.ws_url("/ws/ohlc/"))
        await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
        assert (await receive(ws, "snapshot"))["data"] == []
        await redis.start()
        async with LiveServer(core_settings(make_settings, fake, redis)) as core:
            await fake.wait_open(1)
            await fake.send_trade("BTCUSDT", 1, 100.0, 1, T0)
            candle = await receive(ws, "candle", close=100.0, timeout=10)
            assert candle["candle"]["trades"] == 1
            status, body = await get_json(http, edge.url + "/healthz")
            assert status == 200 and body["redis"]["connected"] is True
            assert (await get_json(http, edge.url + "/api/v1/prices")) == (
                await get_json(http, core.url + "/api/v1/prices")
            )
        await ws.close()
