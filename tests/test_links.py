"""Absolute links in paginated lists: a malformed Host is a 400 (never a 500, never
reflected), and PRICEWATCH_PUBLIC_URL replaces the request's host.

aiohttp's client refuses to send such Host headers, so these requests go over a raw socket.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
from conftest import LiveServer, bearer, register

from pricewatch.server import STORE

LISTS = ["/api/v1/alerts?page_size=1", "/api/v1/quotes?per_page=1"]


async def raw_get(server: LiveServer, target: str, host: bytes, token: str) -> tuple[int, dict]:
    """GET `target` with the Host header given as raw bytes; (status, JSON body)."""
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"GET "
            + target.encode()
            + b" HTTP/1.1\r\nHost: "
            + host
            + b"\r\nAuthorization: Bearer "
            + token.encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


async def two_pages(http, server) -> str:
    """A user with two alerts and the store with two quotes; the user's access token."""
    tok = (await register(http, server))["access"]
    for price in (1.0, 2.0):
        async with http.post(
            server.url + "/api/v1/alerts",
            headers=bearer(tok),
            json={"asset": "BTCUSDT", "price": price, "direction": "above"},
        ) as resp:
            assert resp.status == 201
        await server.app[STORE].add_quote("BTC", "USD", price, None, None, "2024-01-01T00:00:00Z")
    return tok


@pytest.mark.parametrize("target", LISTS)
@pytest.mark.parametrize(
    "host", [b"x:99999", b"a:b:c", b"\xff", b"ex ample.com", b"[::zz]", b"evil.com/", b""]
)
async def test_malformed_host_on_a_paginated_list_is_400(server, http, target, host):
    tok = await two_pages(http, server)
    status, body = await raw_get(server, target, host, tok)
    assert status == 400, body
    assert body["error"] == "validation" and set(body["fields"]) == {"Host"}


@pytest.mark.parametrize("target", LISTS)
@pytest.mark.parametrize(
    "host", [b"prices.example.com:8080", b"[::1]:9000", b"127.0.0.1", b"my_app.internal."]
)
async def test_well_formed_host_is_used_in_links(server, http, target, host):
    tok = await two_pages(http, server)
    status, body = await raw_get(server, target, host, tok)
    assert status == 200
    assert body["next"].startswith("http://" + host.decode() + target.split("?")[0] + "?")
    assert body["next"].endswith("page=2")


@pytest.mark.parametrize("target", LISTS)
async def test_public_url_replaces_the_request_host_in_links(make_settings, http, target):
    settings = make_settings(public_url="https://prices.example.com/pw")
    async with LiveServer(settings) as server:
        tok = await two_pages(http, server)
        for host in (b"attacker.example", b"x:99999"):  # not looked at: no 400 either
            status, body = await raw_get(server, target + "&page=2", host, tok)
            assert status == 200, body
            path, query = target.split("?")
            assert body["previous"] == f"https://prices.example.com/pw{path}?{query}&page=1"
            assert body["next"] is None
