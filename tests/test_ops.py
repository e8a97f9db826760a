"""Operations: /metrics exposition and /healthz verdicts."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import subprocess
import sys

import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance

from pricewatch import clock
from pricewatch.alerts import ENGINE
from pricewatch.feeds import Tick
from pricewatch.server import MARKET, STORE

T0 = 1704067200000


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample line; fails the test when the line is missing."""
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no sample {name} {labels} in:\n{text}"
    return float(match.group(1))


async def scrape(http, server) -> str:
    async with http.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await resp.text()


async def test_metrics_count_ticks_requests_clients_and_alerts(make_settings, http):
    async with (
        FakeBinance() as fake,
        LiveServer(make_settings(feed="binance", binance_ws_url=fake.url)) as server,
    ):
        tok = (await register(http, server))["access"]
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
            await fake.wait_open(1)
            for i in range(3):
                await fake.send_trade("BTCUSDT", i + 1, 100 + i, 1, T0 + i)
            await fake.send_trade("BTCUSDT", 10, 200, 1, T0 + 10)  # a gap of 6 trades
            # Candles are conflated state: the last trade's candle says all four were handled.
            while True:
                msg = await ws.receive_json(timeout=5)
                assert msg["type"] == "candle"
                if msg["candle"]["close"] == 200:
                    break
            for price in (150.0, 50.0):
                async with http.post(
                    server.url + "/api/v1/alerts",
                    headers=bearer(tok),
                    json={"asset": "BTCUSDT", "price": price, "direction": "above"},
                ) as resp:
                    assert resp.status == 201
            async with http.get(server.url + "/api/v1/alerts/999", headers=bearer(tok)):
                pass
            text = await scrape(http, server)
        assert sample(text, "pricewatch_ticks_total", symbol="BTCUSDT") == 4
        assert sample(text, "pricewatch_ticks_total", symbol="ETHUSDT") == 0
        assert sample(text, "pricewatch_feed_messages_total", feed="binance") == 4
        assert sample(text, "pricewatch_feed_gaps_total", feed="binance", symbol="BTCUSDT") == 1
        assert (
            sample(text, "pricewatch_feed_missed_trades_total", feed="binance", symbol="BTCUSDT")
            == 6
        )
        assert sample(text, "pricewatch_websocket_clients", endpoint="ohlc") == 1
        assert sample(text, "pricewatch_websocket_clients", endpoint="live") == 0
        for reason in ("queue_full", "slow", "too_many_messages", "session_ended"):
            assert sample(text, "pricewatch_websocket_dropped_total", reason=reason) == 0
        assert sample(text, "pricewatch_alerts_active") == 2
        assert sample(text, "pricewatch_emails", state="pending") == 0
        assert (
            sample(
                text,
                "pricewatch_http_requests_total",
                method="POST",
                route="/api/v1/alerts",
                status=201,
            )
            == 2
        )
        assert (
            sample(
                text,
                "pricewatch_http_requests_total",
                method="GET",
                route="/api/v1/alerts/{alert_id}",
                status=404,
            )
            == 1
        )
        assert (
            sample(text, "pricewatch_http_request_duration_seconds_count", route="/api/v1/alerts")
            == 2
        )
        assert (
            sample(
                text,
                "pricewatch_http_request_duration_seconds_bucket",
                route="/api/v1/alerts",
                le="+Inf",
            )
            == 2
        )
        # Every sample line has a HELP and TYPE line for its family.
        families = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name = re.match(r"[a-z_]+", line).group(0)
                assert any(name == f or name.startswith(f + "_") for f in families), line


async def test_unmatched_routes_share_one_label(server, http):
    for path in ("/nope/1", "/nope/2"):
        async with http.get(server.url + path) as resp:
            assert resp.status == 404
    text = await scrape(http, server)
    assert (
        sample(text, "pricewatch_http_requests_total", method="GET", route="unmatched", status=404)
        == 2
    )


async def test_healthz_is_503_when_a_live_feed_goes_quiet(make_settings, http):
    async with (
        FakeBinance() as fake,
        LiveServer(
            make_settings(feed="binance", binance_ws_url=fake.url, feed_stale_after=0.3)
        ) as server,
    ):
        await fake.wait_open(1)
        await fake.send_trade("BTCUSDT", 1, 100, 1, T0)
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
            snapshot = await ws.receive_json(timeout=5)
        async with http.get(server.url + "/healthz") as resp:
            body = await resp.json()
            fresh = resp.status
        assert snapshot["data"] and fresh == 200 and body["feeds"]["binance"]["stale"] is False
        await asyncio.sleep(0.45)  # wait on the clock past the 0.3 s staleness limit
        async with http.get(server.url + "/healthz") as resp:
            body = await resp.json()
            assert resp.status == 503
        assert body["status"] == "stale" and body["stale_feeds"] == ["binance"]


async def test_healthz_is_503_when_the_database_is_unreachable(server, http):
    async with http.get(server.url + "/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["db"] == "ok"
    await server.app[STORE]._r.close()  # the reader connection the check uses is gone
    async with http.get(server.url + "/healthz") as resp:
        body = await resp.json()
        assert resp.status == 503
    assert body["status"] == "error" and body["db"].startswith("error")


# Disk full, read-only file ------------------------------------------------------------------


async def writer_pragma(store, sql: str):
    """Run a PRAGMA on the server's own writer connection, between two of its writes."""
    async with store._lock:
        return await store._w.execute_fetchall(sql)


async def fill_the_disk(store) -> None:
    """SQLite's max_page_count at the file's size, every free page used: a write that needs
    a new page fails with SQLITE_FULL, exactly as on a full disk."""
    async with store._lock:
        ((pages,),) = await store._w.execute_fetchall("PRAGMA page_count")
        await store._w.execute(f"PRAGMA max_page_count = {pages}")
        await store._w.execute("CREATE TABLE ballast (data BLOB)")
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for _ in range(10_000):
                await store._w.execute("INSERT INTO ballast VALUES (zeroblob(500))")


def store_lines(caplog) -> list[logging.LogRecord]:
    """What pricewatch logged at WARNING and above (the access log aside)."""
    return [
        r
        for r in caplog.records
        if r.name.startswith("pricewatch")
        and r.name != "pricewatch.access"
        and r.levelno >= logging.WARNING
    ]


async def assert_unavailable(resp) -> None:
    assert resp.status == 503, await resp.text()
    assert resp.headers["Retry-After"] == "30"
    body = await resp.json()
    assert body["error"] == "unavailable" and body["detail"]


async def healthz(http, server) -> tuple[int, dict]:
    async with http.get(server.url + "/healthz") as resp:
        return resp.status, await resp.json()


async def wait_db_ok(http, server) -> None:
    """Poll /healthz until the database is "ok" again (its probe write runs once a second
    at most), 5 s at most."""
    deadline = asyncio.get_running_loop().time() + 5
    while (status := await healthz(http, server))[0] != 200:
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.1)
    assert status[1]["db"] == "ok"


async def test_a_read_only_database_answers_writes_503_and_reads_200_until_it_recovers(
    make_settings, http, caplog
):
    caplog.set_level(logging.INFO)
    async with LiveServer(make_settings()) as server:
        store = server.app[STORE]
        tok = (await register(http, server))["access"]
        await writer_pragma(store, "PRAGMA query_only = 1")  # SQLITE_READONLY on any write
        caplog.clear()
        for i in range(4):
            async with http.post(
                server.url + "/auth/register",
                json={
                    "username": f"bob{i}",
                    "password": "correct horse",
                    "email": f"bob{i}@example.com",
                },
            ) as resp:
                await assert_unavailable(resp)
            async with http.post(
                server.url + "/auth/token",
                json={  # a refresh-token row
                    "username": "alice",
                    "password": "correct horse",
                },
            ) as resp:
                await assert_unavailable(resp)
            async with http.post(
                server.url + "/api/v1/alerts",
                headers=bearer(tok),
                json={"asset": "BTCUSDT", "price": 100.0 + i, "direction": "above"},
            ) as resp:
                await assert_unavailable(resp)
        for path in ("/auth/me", "/api/v1/alerts", "/api/v1/prices"):
            async with http.get(server.url + path, headers=bearer(tok)) as resp:
                assert resp.status == 200, (path, await resp.text())
        status, body = await healthz(http, server)
        assert status == 503 and body["db"] == "degraded" and body["status"] == "degraded"
        lines = store_lines(caplog)
        assert len(lines) == 1 and "refuses writes" in lines[0].getMessage(), caplog.text
        assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)

        await writer_pragma(store, "PRAGMA query_only = 0")  # writable again, no restart
        await wait_db_ok(http, server)  # with no write from anyone: its probe write notices
        async with http.post(
            server.url + "/auth/token", json={"username": "alice", "password": "correct horse"}
        ) as resp:
            assert resp.status == 200
        async with http.post(
            server.url + "/api/v1/alerts",
            headers=bearer(tok),
            json={"asset": "BTCUSDT", "price": 100.0, "direction": "above"},
        ) as resp:
            assert resp.status == 201


async def test_a_full_disk_answers_writes_503_and_recovers_when_space_returns(
    make_settings, http, caplog
):
    caplog.set_level(logging.INFO)
    async with LiveServer(make_settings(alert_create_rate=10_000)) as server:
        store = server.app[STORE]
        tok = (await register(http, server))["access"]
        await fill_the_disk(store)
        caplog.clear()
        created, refused = 0, 0
        # Rows fit in the pages the table has until one needs a new page: from then on
        # every alert is refused, 503 and never 500.
        for i in range(300):
            async with http.post(
                server.url + "/api/v1/alerts",
                headers=bearer(tok),
                json={"asset": "BTCUSDT", "price": 1000.0 + i, "direction": "above"},
            ) as resp:
                if resp.status == 201:
                    assert not refused, "a write succeeded after a refusal"
                    created += 1
                    continue
                await assert_unavailable(resp)
                refused += 1
                if refused == 20:
                    break
        assert refused == 20, f"{created} alerts fit on the full disk"
        async with http.get(server.url + "/api/v1/alerts", headers=bearer(tok)) as resp:
            assert resp.status == 200 and (await resp.json())["count"] == created
        status, body = await healthz(http, server)
        assert status == 503 and body["db"] == "degraded"
        lines = store_lines(caplog)
        assert len(lines) == 1 and "database or disk is full" in lines[0].getMessage()
        assert "Traceback" not in caplog.text

        await writer_pragma(store, "PRAGMA max_page_count = 1000000")  # space returns
        async with http.post(
            server.url + "/api/v1/alerts",
            headers=bearer(tok),
            json={"asset": "BTCUSDT", "price": 1.0, "direction": "above"},
        ) as resp:
            assert resp.status == 201
        status, body = await healthz(http, server)
        assert status == 200 and body["db"] == "ok"
        assert "takes writes again" in caplog.text


async def test_background_writers_log_no_traceback_while_the_database_refuses_writes(
    make_settings, http, caplog
):
    """The candle writer, the trigger writer and the sweeps retry on their own schedule while
    the file is read-only: the store's one line a minute stands for all of them."""
    caplog.set_level(logging.DEBUG)
    async with LiveServer(make_settings()) as server:
        store, market = server.app[STORE], server.app[MARKET]
        tok = (await register(http, server))["access"]
        async with http.post(
            server.url + "/api/v1/alerts",
            headers=bearer(tok),
            json={"asset": "BTCUSDT", "price": 100.0, "direction": "above"},
        ) as resp:
            assert resp.status == 201
        await writer_pragma(store, "PRAGMA query_only = 1")
        caplog.clear()
        now_ms = int(clock.now() * 1000)
        for i in range(5):  # a candle to write and an alert crossed: both writes refused
            market.on_tick(Tick("BTCUSDT", 101.0 + i, 1.0, now_ms + i, i + 1))
        deadline = asyncio.get_running_loop().time() + 10
        while not ({"candle write", "triggered alerts"} <= refusals(caplog)):
            assert asyncio.get_running_loop().time() < deadline, caplog.text
            await asyncio.sleep(0.05)
        assert not any(r.exc_info for r in caplog.records), caplog.text
        assert len(store_lines(caplog)) == 1, caplog.text
        await writer_pragma(store, "PRAGMA query_only = 0")
        await server.app[ENGINE].drained()  # the trigger is committed once writes work
        async with http.get(
            server.url + "/api/v1/alerts?status=TRIGGERED", headers=bearer(tok)
        ) as resp:
            assert (await resp.json())["count"] == 1


def refusals(caplog) -> set[str]:
    """Which background writers had a write refused (each says so at DEBUG)."""
    return {
        kind
        for kind in ("candle write", "triggered alerts")
        for r in caplog.records
        if kind in r.getMessage()
    }


# Cluster settings without the cluster extra --------------------------------------------------


@pytest.mark.parametrize("role", ["edge", "core"])
def test_a_redis_url_without_the_redis_package_refuses_to_start(tmp_path, role):
    # sys.modules["redis"] = None: `import redis` raises ImportError, as when not installed.
    code = (
        "import runpy, sys\n"
        "sys.modules['redis'] = None\n"
        f"sys.argv = ['pricewatch'{', ' + repr(role) if role == 'edge' else ''}]\n"
        "runpy.run_module('pricewatch', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env.update(
        PYTHONPATH=os.pathsep.join(sys.path),
        PRICEWATCH_ROLE=role,
        PRICEWATCH_REDIS_URL="redis://127.0.0.1:9/0",
        PRICEWATCH_JWT_SECRET="s" * 40,
        PRICEWATCH_DB=str(tmp_path / "pricewatch.db"),
        PRICEWATCH_PORT="0",
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'pricewatch[cluster]'" in lines[0], result.stderr
    assert not (tmp_path / "pricewatch.db").exists()  # nothing started
