"""Every websocket client has a bounded cost (CONTRACT "Limits"), tested with raw sockets.

A client library would read for us, answer for us and refuse to send malformed frames; a
bare socket lets a test be the client that never reads, floods, or nests JSON 1000 deep.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from ipaddress import ip_network

import pytest
from conftest import LiveServer, bearer, register
from raw_ws import RawWebSocket, Refused, client_frame
from test_ops import sample, scrape

from pricewatch.feeds import Tick
from pricewatch.hub import MAX_SUBSCRIPTIONS, QUEUE_FULL, TOO_MANY_MESSAGES, WS_BURST
from pricewatch.market import HUB, MARKET

T0 = 1704067200000
ENDPOINTS = ("/live-feed/subscribe/", "/ws/ohlc/", "/ws/rates/")


USERS = itertools.count()


async def open_ws(server: LiveServer, http, path: str) -> RawWebSocket:
    """A raw websocket on `path`; the live feed gets a fresh user's token in the query
    (these servers have no feed, so it sends nothing on connect)."""
    if path.startswith("/live-feed"):
        user = await register(http, server, username=f"user{next(USERS)}")
        path += "?token=" + user["access"]
    return await RawWebSocket.connect(server.url, path)


# --------------------------------------------------------------------------- queue bytes


async def test_a_non_reader_asking_for_big_snapshots_is_closed_at_the_byte_bound(
    server: LiveServer, http
) -> None:
    """The High finding: snapshot requests from a client that never reads must not grow the
    server's memory. It is closed with 1008 once it would hold more than
    PRICEWATCH_WS_MAX_QUEUE_BYTES, and a reading client keeps getting every price."""
    hub, market = server.app[HUB], server.app[MARKET]
    bound = server.settings.ws_max_queue_bytes
    for i in range(1000):  # 1000 one-second candles: a snapshot of ~128 KB
        market.on_tick(Tick("BTCUSDT", 100.0 + i, 0.5, T0 + i * 1000, i + 1))
    user = await register(http, server)
    async with http.ws_connect(
        server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
    ) as reader:
        msg = await reader.receive_json(timeout=5)  # the latest price on connect
        assert (msg["type"], msg["symbol"]) == ("price", "BTCUSDT")

        attacker = await RawWebSocket.connect(server.url, "/ws/ohlc/", rcvbuf=4096)
        (client,) = [c for c in hub.clients if c.endpoint == "ohlc"]
        # Loopback send buffers grow to megabytes; keep the kernel's share small so the
        # server's own accounting is what fills.
        client.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        request = {"symbol": "BTCUSDT", "timeframe": "1s", "limit": 1000}
        attacker.send_json(*[request] * 30)  # within the burst of 40: not a rate violation
        market.on_tick(Tick("BTCUSDT", 5000.0, 1.0, T0 + 1_000_000, 1001))
        msg = await reader.receive_json(timeout=5)
        assert (msg["type"], msg["price"]) == ("price", 5000.0)

        await asyncio.wait_for(hub.dropped_for(QUEUE_FULL), 5)
        assert client.closed and client not in hub.clients
        assert 0 < client.writer.peak <= bound  # never held more than the bound for it
        assert client.writer.queued == 0 and not client.writer.events  # freed at once

        messages, code = await attacker.until_closed()
        # Whatever it got before the close is whole snapshots, in order; then it is closed
        # (with 1008, or cut off when even the close frame could not be written).
        assert 0 < len(messages) < 30
        assert all(m["type"] == "snapshot" and len(m["data"]) == 1000 for m in messages)
        assert code in (1008, None)
        attacker.abort()

        market.on_tick(Tick("BTCUSDT", 5001.0, 1.0, T0 + 1_001_000, 1002))
        msg = await reader.receive_json(timeout=5)
        assert (msg["type"], msg["price"]) == ("price", 5001.0)
        text = await scrape(http, server)
        assert sample(text, "pricewatch_websocket_dropped_total", reason="queue_full") == 1
        assert sample(text, "pricewatch_websocket_slow_dropped_total") == 1


# --------------------------------------------------------------------------- message rate


def bad_message(path: str) -> dict:
    """A message every endpoint answers with exactly one error."""
    return {"action": "watch"} if path.startswith("/live-feed") else {"timeframe": "2m"}


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_burst_of_40_messages_is_answered_and_41_closes_with_1008(
    server: LiveServer, http, path: str
) -> None:
    ws = await open_ws(server, http, path)
    ws.send_json(*[bad_message(path)] * WS_BURST)
    for _ in range(WS_BURST):
        assert (await ws.recv_json())["type"] == "error"
    ws.abort()

    ws = await open_ws(server, http, path)
    ws.send_json(*[bad_message(path)] * (WS_BURST + 1))  # one write: no time to refill
    messages, code = await ws.until_closed()
    assert code == 1008
    assert len(messages) <= WS_BURST and all(m["type"] == "error" for m in messages)
    await asyncio.wait_for(server.app[HUB].dropped_for(TOO_MANY_MESSAGES), 5)
    ws.abort()


# --------------------------------------------------------------------------- subscriptions


@pytest.fixture
async def many_symbols(make_settings):
    """A server watching 70 symbols: more than one connection may subscribe to."""
    symbols = tuple(f"S{i:03d}USDT" for i in range(70))
    async with LiveServer(make_settings(symbols=symbols)) as live:
        yield live, symbols


async def test_the_65th_live_subscription_is_refused_and_the_connection_stays_open(
    many_symbols, http
) -> None:
    server, symbols = many_symbols
    user = await register(http, server)
    async with http.ws_connect(
        server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
    ) as ws:
        (client,) = server.app[HUB].clients  # default: the first 64 watched symbols
        assert len(client.topics) == MAX_SUBSCRIPTIONS
        await ws.send_json({"action": "subscribe", "symbols": [symbols[64]]})
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "error" and "64" in msg["detail"]
        assert ("price", symbols[64]) not in client.topics
        await ws.send_json({"action": "unsubscribe", "symbols": [symbols[0]]})
        assert len((await ws.receive_json(timeout=5))["symbols"]) == 63
        await ws.send_json({"action": "subscribe", "symbols": [symbols[64]]})
        assert symbols[64] in (await ws.receive_json(timeout=5))["symbols"]
        # A list that would pass the cap changes nothing at all.
        await ws.send_json({"action": "subscribe", "symbols": list(symbols[:66])})
        assert (await ws.receive_json(timeout=5))["type"] == "error"
        assert len(client.topics) == MAX_SUBSCRIPTIONS


async def test_the_65th_ohlc_pair_is_refused_and_the_connection_stays_open(
    many_symbols, http
) -> None:
    server, symbols = many_symbols
    pairs = [(s, tf) for s in symbols[:10] for tf in ("1s", "1m", "5m", "15m", "1h", "4h", "1d")]
    async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
        for symbol, tf in pairs[:MAX_SUBSCRIPTIONS]:
            await ws.send_json({"symbol": symbol, "timeframe": tf})
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
            await asyncio.sleep(0.05)  # stay under 20 messages/s
        symbol, tf = pairs[MAX_SUBSCRIPTIONS]
        await ws.send_json({"symbol": symbol, "timeframe": tf})
        msg = await ws.receive_json(timeout=5)
        assert msg["type"] == "error" and "64" in msg["detail"]
        await ws.send_json({"symbol": pairs[0][0], "timeframe": pairs[0][1]})  # held: fine
        assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
        assert not ws.closed


# --------------------------------------------------------------------------- per address


def refused_429(exc: Refused) -> None:
    assert exc.status == 429
    assert exc.json()["error"] == "rate_limited" and exc.json()["detail"]
    assert int(exc.headers["retry-after"]) >= 1
    assert exc.headers["content-type"].startswith("application/json")


async def test_open_websockets_per_address_are_capped_across_endpoints(make_settings, http) -> None:
    async with LiveServer(make_settings(max_ws_per_address=3)) as server:
        hub = server.app[HUB]
        held = [await open_ws(server, http, path) for path in ENDPOINTS]
        for path in ENDPOINTS:
            with pytest.raises(Refused) as refused:
                await open_ws(server, http, path)
            refused_429(refused.value)
        # X-Forwarded-For from an untrusted peer changes nothing.
        with pytest.raises(Refused) as refused:
            await RawWebSocket.connect(
                server.url, "/ws/ohlc/", headers={"X-Forwarded-For": "203.0.113.9"}
            )
        refused_429(refused.value)
        held.pop().abort()  # a closed socket frees its slot
        async with asyncio.timeout(5):
            while hub.by_address.get("127.0.0.1") != 2:
                await asyncio.sleep(0.01)
        held.append(await open_ws(server, http, "/ws/rates/"))
        for ws in held:
            ws.abort()


async def test_concurrent_upgrades_cannot_pass_the_cap_together(make_settings, http) -> None:
    async with LiveServer(make_settings(max_ws_per_address=2)) as server:
        results = await asyncio.gather(
            *(RawWebSocket.connect(server.url, "/ws/ohlc/") for _ in range(8)),
            return_exceptions=True,
        )
        opened = [r for r in results if isinstance(r, RawWebSocket)]
        assert len(opened) == 2
        assert all(isinstance(r, Refused) and r.status == 429 for r in results if r not in opened)
        for ws in opened:
            ws.abort()


def via(server: LiveServer, address: str):
    """A raw websocket to /ws/ohlc/ through the (trusted) proxy at 127.0.0.1 for `address`."""
    return RawWebSocket.connect(server.url, "/ws/ohlc/", headers={"X-Forwarded-For": address})


async def test_behind_a_trusted_proxy_the_cap_counts_each_forwarded_address(
    make_settings, http
) -> None:
    settings = make_settings(max_ws_per_address=2, trusted_proxies=(ip_network("127.0.0.1/32"),))
    async with LiveServer(settings) as server:
        held = [await via(server, "203.0.113.5"), await via(server, "198.51.100.7, 203.0.113.5")]
        with pytest.raises(Refused) as refused:
            await via(server, "203.0.113.5")
        refused_429(refused.value)
        held.append(await via(server, "203.0.113.6"))  # another client behind the same proxy
        assert server.app[HUB].by_address == {"203.0.113.5": 2, "203.0.113.6": 1}
        for ws in held:
            ws.abort()


async def test_ipv6_clients_share_the_cap_of_their_64(make_settings, http) -> None:
    """One subscriber holds a whole /64: 2**64 addresses must not be 2**64 caps."""
    settings = make_settings(max_ws_per_address=2, trusted_proxies=(ip_network("127.0.0.1/32"),))
    async with LiveServer(settings) as server:
        held = [await via(server, "2001:db8:1:2::1"), await via(server, "2001:db8:1:2::ffff")]
        with pytest.raises(Refused) as refused:
            await via(server, "2001:db8:1:2:aaaa:bbbb:cccc:dddd")
        refused_429(refused.value)
        held.append(await via(server, "2001:db8:1:3::1"))  # another /64
        assert server.app[HUB].by_address == {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1}
        for ws in held:
            ws.abort()


# --------------------------------------------------------------------------- any JSON


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("depth", [1000, 5000])
async def test_deeply_nested_messages_get_an_error_and_the_connection_stays_open(
    server: LiveServer, http, path: str, depth: int
) -> None:
    ws = await open_ws(server, http, path)
    for payload in (
        b'{"action":"subscribe","symbols":' + nested(depth) + b"}",
        b'{"action":"subscribe","symbols":[' + nested(depth) + b"]}",
        b'{"symbol":' + nested(depth) + b',"timeframe":"1m"}',
        b'{"symbol":"BTCUSDT","timeframe":' + nested(depth) + b"}",
        b'{"symbol":"BTCUSDT","limit":' + nested(depth) + b"}",
    ):
        ws.send(client_frame(payload))
        msg = await ws.recv_json()
        assert msg["type"] == "error" and isinstance(msg["detail"], str), payload[:60]
    # Still open and still answering normally.
    good = (
        {"action": "subscribe", "symbols": ["BTCUSDT"]}
        if path.startswith("/live-feed")
        else {"symbol": "BTCUSDT", "timeframe": "1m"}
    )
    ws.send_json(good)
    msg = await ws.recv_json()
    assert (
        msg["type"]
        == {"/live-feed/subscribe/": "subscribed", "/ws/ohlc/": "snapshot", "/ws/rates/": "error"}[
            path
        ]
    )
    ws.abort()


async def test_unknown_symbols_are_named_briefly_whatever_their_json_type(
    server: LiveServer, http
) -> None:
    ws = await open_ws(server, http, "/live-feed/subscribe/")
    ws.send_json({"action": "subscribe", "symbols": ["DOGEUSDT", 7, {"a": [1]}, None] * 10})
    msg = await ws.recv_json()
    assert msg["type"] == "error"
    assert msg["detail"].startswith("Unknown symbols: DOGEUSDT, <int>, <dict>, <NoneType>,")
    assert "and 35 more" in msg["detail"]
    ws.abort()
