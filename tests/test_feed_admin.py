"""Admin-managed extra feeds: /api/v1/feeds and the seed-style /save_quotes/ alias."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance

from pricewatch.addresses import is_public_address
from pricewatch.auth import AUTH
from pricewatch.feed_admin import EXTRA_FEEDS, MAX_EXTRA_FEEDS
from pricewatch.market import MARKET
from pricewatch.server import STORE

T0 = 1704067200000


async def make_admin(server, username="root") -> None:
    """An admin, made the way `createuser --admin` makes one (tested in test_config)."""
    auth = server.app[AUTH]
    await auth.store.create_user(
        username, f"{username}@example.com", await auth.hash_password("admin pass 1"), is_admin=True
    )


async def admin_token(http, server, username="root", create=True) -> str:
    if create:
        await make_admin(server, username)
    async with http.post(
        server.url + "/auth/token", json={"username": username, "password": "admin pass 1"}
    ) as resp:
        assert resp.status == 200
        return (await resp.json())["access"]


async def test_admin_adds_an_extra_feed_that_survives_a_restart(make_settings, http):
    settings = make_settings(allow_private_feeds=True)
    async with FakeBinance() as extra:
        async with LiveServer(settings) as server:
            tok = await admin_token(http, server)
            async with http.post(
                server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": extra.url}
            ) as resp:
                assert resp.status == 201
                feed = await resp.json()
            assert feed["url"] == extra.url and feed["name"] == f"extra-{feed['id']}"
            await extra.wait_open(1)
            assert extra.connections[0] == [
                "btcusdt@trade",
                "btcusdt@bookTicker",
                "ethusdt@trade",
                "ethusdt@bookTicker",
            ]
            async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
                await ws.send_json({"symbol": "ETHUSDT", "timeframe": "1m"})
                assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
                await extra.send_trade("ETHUSDT", 1, 2500.5, 2, T0)
                candle = await ws.receive_json(timeout=5)
            assert candle["candle"]["close"] == 2500.5
            assert server.app[MARKET].latest["ETHUSDT"].price == 2500.5
            async with http.post(
                server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": extra.url}
            ) as resp:
                assert resp.status == 409  # the same URL twice
            async with http.get(server.url + "/healthz") as resp:
                assert f"extra-{feed['id']}" in (await resp.json())["feeds"]

        async with LiveServer(settings) as server:  # stored feeds start again
            await extra.wait_connections(2)
            tok = await admin_token(http, server, create=False)
            async with http.get(server.url + "/api/v1/feeds/", headers=bearer(tok)) as resp:
                listed = (await resp.json())["results"]
            assert [f["id"] for f in listed] == [feed["id"]]
            async with http.delete(
                server.url + f"/api/v1/feeds/{feed['id']}", headers=bearer(tok)
            ) as resp:
                assert resp.status == 204
            await extra.wait_open(0)
            async with http.get(server.url + "/api/v1/feeds", headers=bearer(tok)) as resp:
                assert (await resp.json())["results"] == []
            async with http.delete(
                server.url + f"/api/v1/feeds/{feed['id']}", headers=bearer(tok)
            ) as resp:
                assert resp.status == 404


async def test_save_quotes_alias_and_delete_by_url(make_settings, http):
    settings = make_settings(allow_private_feeds=True)
    async with FakeBinance() as extra, LiveServer(settings) as server:
        tok = await admin_token(http, server)
        async with http.post(
            server.url + "/save_quotes/", headers=bearer(tok), json={"api_url": extra.url}
        ) as resp:
            assert resp.status == 201
        await extra.wait_open(1)
        async with http.post(
            server.url + "/save_quotes/", headers=bearer(tok), json={"url": extra.url}
        ) as resp:
            err = await resp.json()
            assert resp.status == 400 and set(err["fields"]) == {"api_url"}
        async with http.delete(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": extra.url}
        ) as resp:
            assert resp.status == 204
        await extra.wait_open(0)


async def test_non_admins_get_403_and_anonymous_401(make_settings, http):
    async with LiveServer(make_settings(allow_private_feeds=True)) as server:
        tok = (await register(http, server))["access"]
        for method, path in [
            ("GET", "/api/v1/feeds"),
            ("POST", "/api/v1/feeds"),
            ("DELETE", "/api/v1/feeds/1"),
            ("POST", "/save_quotes/"),
        ]:
            async with http.request(
                method, server.url + path, headers=bearer(tok), json={"url": "ws://127.0.0.1:1"}
            ) as resp:
                assert resp.status == 403 and (await resp.json())["error"] == "forbidden"
            async with http.request(method, server.url + path) as resp:
                assert resp.status == 401


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/stream",
        "ftp://x",
        "wss://",
        "not a url",
        "ws://127.0.0.1:9/stream",
        "ws://localhost:9",
        "wss://10.1.2.3/stream",
        "ws://169.254.169.254/",
        "ws://[::1]:9/",
        "ws://192.168.0.10:9443",
        "ws://0.0.0.0:80",
        "ws://127.0.0.1:99999/",
        # not private, but not global either: shared address space (a cloud metadata address)
        "ws://100.100.100.200/",
        "ws://100.64.0.1/",
        # IPv6 forms that lead to 127.0.0.1 / 169.254.169.254: 6to4, mapped, NAT64, Teredo
        "ws://[2002:7f00:1::]/",
        "ws://[2002:a9fe:a9fe::]/",
        "ws://[::ffff:127.0.0.1]/",
        "ws://[64:ff9b::a9fe:a9fe]/",
        "ws://[2001:0:4136:e378:8000:63bf:3f57:fefe]/",
        "ws://224.0.0.1/",
        "ws://[ff0e::1]/",
    ],
)
async def test_feed_urls_must_be_public_websockets(make_settings, http, url):
    settings = make_settings()
    async with LiveServer(settings) as server:
        tok = await admin_token(http, server)
        async with http.post(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": url}
        ) as resp:
            err = await resp.json()
        assert resp.status == 400 and set(err["fields"]) == {"url"}, err


async def test_at_most_sixteen_extra_feeds(make_settings, http):
    settings = make_settings(allow_private_feeds=True)
    async with LiveServer(settings) as server:
        tok = await admin_token(http, server)
        for i in range(MAX_EXTRA_FEEDS):  # nothing listens: they retry in the background
            async with http.post(
                server.url + "/api/v1/feeds",
                headers=bearer(tok),
                json={"url": f"ws://127.0.0.1:9/s{i}"},
            ) as resp:
                assert resp.status == 201
        async with http.post(
            server.url + "/api/v1/feeds",
            headers=bearer(tok),
            json={"url": "ws://127.0.0.1:9/one-more"},
        ) as resp:
            assert resp.status == 409


async def test_feed_url_secrets_stay_out_of_healthz_and_logs(make_settings, http, caplog):
    url = "ws://127.0.0.1:9/a;apikey=MATRIXKEY/stream;token=SEGKEY;BAREKEY?key=QUERYKEY;x=SEMIKEY"
    secrets = ("MATRIXKEY", "SEGKEY", "BAREKEY", "QUERYKEY", "SEMIKEY")
    async with LiveServer(make_settings(allow_private_feeds=True)) as server:
        tok = await admin_token(http, server)
        with caplog.at_level(logging.DEBUG, logger="pricewatch"):
            async with http.post(
                server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": url}
            ) as resp:
                assert resp.status == 201
                name = (await resp.json())["name"]
            async with http.get(server.url + "/healthz") as resp:
                shown = (await resp.json())["feeds"][name]["url"]
    assert shown == "ws://127.0.0.1:9/a;apikey=***/stream;token=***;***?key=***&x=***"
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("pricewatch")]
    assert any("127.0.0.1:9/a;apikey=***" in line for line in logged)
    assert not any(secret in line for secret in secrets for line in logged)


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1", True),
        ("::ffff:8.8.8.8", True),
        ("2002:808:808::", True),
        ("64:ff9b::808:808", True),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),  # Teredo: public server, client 8.8.8.8
        ("100.100.100.200", False),
        ("100.64.0.1", False),
        ("2002:7f00:1::", False),
        ("2002:a9fe:a9fe::", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::7f00:1", False),
        ("2001:0:4136:e378:8000:63bf:3f57:fefe", False),  # Teredo client 192.168.1.1
        ("fe80::1%eth0", False),
        ("[::1]", False),
        ("::", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("::127.0.0.1", False),
    ],
)
def test_only_globally_routable_addresses_are_public(address, public):
    assert is_public_address(address) is public


async def test_feed_cap_holds_under_40_concurrent_posts(make_settings, http):
    async with LiveServer(make_settings(allow_private_feeds=True)) as server:
        tok = await admin_token(http, server)

        async def add(i):  # nothing listens: the feeds retry in the background
            async with http.post(
                server.url + "/api/v1/feeds",
                headers=bearer(tok),
                json={"url": f"ws://127.0.0.1:9/c{i}"},
            ) as resp:
                return resp.status

        statuses = await asyncio.gather(*(add(i) for i in range(40)))
        assert statuses.count(201) == MAX_EXTRA_FEEDS
        assert statuses.count(409) == 40 - MAX_EXTRA_FEEDS
        assert len(server.app[EXTRA_FEEDS].running) == MAX_EXTRA_FEEDS
        assert len(await server.app[STORE].feeds()) == MAX_EXTRA_FEEDS
        # After one delete there is room for exactly one more, and an add refused after its
        # slot was reserved (a duplicate, found by the database) gives the slot back.
        async with http.delete(server.url + "/api/v1/feeds/1", headers=bearer(tok)) as resp:
            assert resp.status == 204
        url, _ = next(iter(server.app[EXTRA_FEEDS].running.values()))
        async with http.post(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": url}
        ) as resp:
            assert resp.status == 409 and "already" in (await resp.text()).lower()
        assert await add(99) == 201 and await add(100) == 409


@pytest.mark.parametrize("url", ["ws://[::1", "ws://a..b/stream", "ws://" + "x" * 64 + ".com/"])
async def test_malformed_feed_hosts_are_400_not_500(make_settings, http, url):
    async with LiveServer(make_settings()) as server:
        tok = await admin_token(http, server)
        async with http.post(
            server.url + "/api/v1/feeds", headers=bearer(tok), json={"url": url}
        ) as resp:
            err = await resp.json()
        assert resp.status == 400 and set(err["fields"]) == {"url"}, err
