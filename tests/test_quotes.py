"""AlphaVantage quotes through the server: POST/GET /api/v1/quotes, the poller, /ws/rates/."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_alphavantage import FakeAlphaVantage

from pricewatch.quotes_api import QUOTES
from pricewatch.server import STORE

KEY = "SECRETKEY123"


@pytest.fixture
async def upstream():
    async with FakeAlphaVantage() as fake:
        yield fake


def quote_settings(make_settings, upstream, **overrides):
    return make_settings(
        alphavantage_url=upstream.url,
        alphavantage_api_key=KEY,
        alphavantage_timeout=0.5,
        **overrides,
    )


async def post_quote(http, server, token, body=None):
    kwargs = {"json": body} if body is not None else {}
    async with http.post(server.url + "/api/v1/quotes", headers=bearer(token), **kwargs) as r:
        return r.status, await r.json(), r.headers


async def test_post_fetches_stores_and_broadcasts_a_quote(make_settings, http, upstream):
    # A long interval: the poller's first fetch happens at start, then not again in the test.
    async with LiveServer(
        quote_settings(make_settings, upstream, alphavantage_interval=3600)
    ) as server:
        await upstream.wait_requests(1)  # the poller's first poll at startup
        tok = (await register(http, server))["access"]
        async with http.ws_connect(server.ws_url("/ws/rates/")) as ws:
            first = orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)
            assert first["type"] == "quote"  # the latest stored quote, on connect
            status, quote, _ = await post_quote(
                http, server, tok, {"from_currency": "btc", "to_currency": "usd"}
            )
            assert status == 201
            assert quote["from_currency"] == "BTC" and quote["to_currency"] == "USD"
            assert quote["rate"] == 58073.74 and quote["bid"] == 58073.73
            assert quote["ask"] == 58073.74 and quote["source_time"] == "2021-05-01T02:58:06Z"
            assert quote["fetched_at"].endswith("Z") and quote["id"] == first["id"] + 1
            pushed = orjson.loads((await asyncio.wait_for(ws.receive(), 5)).data)
            assert pushed == {"type": "quote", **quote}
        assert upstream.requests[-1] == {
            "function": "CURRENCY_EXCHANGE_RATE",
            "from_currency": "BTC",
            "to_currency": "USD",
            "apikey": KEY,
        }
        assert (await server.app[STORE].quote_span())[0] == 2


@pytest.mark.parametrize("mode", ["note", "information"])
async def test_rate_limit_is_503_with_retry_after(make_settings, http, upstream, mode):
    async with LiveServer(quote_settings(make_settings, upstream)) as server:
        await upstream.wait_requests(1)
        tok = (await register(http, server))["access"]
        upstream.mode = mode
        status, err, headers = await post_quote(http, server, tok)
        assert status == 503 and err["error"] == "unavailable"
        assert int(headers["Retry-After"]) > 0 and KEY not in orjson.dumps(err).decode()


@pytest.mark.parametrize(
    "mode, text",
    [
        ("error", "apikey is invalid"),
        ("500", "HTTP 500"),
        ("garbage", "not JSON"),
        ("slow", "no answer"),
        ("missing_field", "Exchange Rate"),
    ],
)
async def test_upstream_failures_are_502_and_store_nothing(
    make_settings, http, upstream, mode, text, caplog
):
    async with LiveServer(quote_settings(make_settings, upstream)) as server:
        await upstream.wait_requests(1)
        tok = (await register(http, server))["access"]
        before = await server.app[STORE].quote_span()
        upstream.mode = mode
        with caplog.at_level(logging.DEBUG):
            status, err, _ = await post_quote(http, server, tok)
        assert status == 502 and err["error"] == "upstream_error"
        assert text in err["detail"] and KEY not in err["detail"]
        assert all(KEY not in r.getMessage() for r in caplog.records)
        assert await server.app[STORE].quote_span() == before


async def test_without_a_key_post_is_503_and_nothing_polls(make_settings, http, upstream):
    async with LiveServer(make_settings(alphavantage_url=upstream.url)) as server:
        tok = (await register(http, server))["access"]
        status, err, _ = await post_quote(http, server, tok)
        assert status == 503 and err["error"] == "unavailable"
        assert server.app[QUOTES].poller is None and upstream.requests == []
        async with http.get(server.url + "/healthz") as resp:
            assert "alphavantage" not in (await resp.json())["feeds"]


async def test_quotes_need_auth_and_valid_input(make_settings, http, upstream):
    async with LiveServer(quote_settings(make_settings, upstream)) as server:
        async with http.get(server.url + "/api/v1/quotes") as resp:
            assert resp.status == 401
        async with http.post(server.url + "/api/v1/quotes") as resp:
            assert resp.status == 401
        tok = (await register(http, server))["access"]
        status, err, _ = await post_quote(http, server, tok, {"from_currency": "B/TC"})
        assert status == 400 and set(err["fields"]) == {"from_currency"}


async def test_poller_stores_and_backs_off_on_rate_limit(make_settings, http, upstream):
    upstream.mode = "note"
    async with LiveServer(
        quote_settings(
            make_settings,
            upstream,
            alphavantage_interval=0.05,
            quote_pairs=(("BTC", "USD"), ("ETH", "USD")),
        )
    ) as server:
        await upstream.wait_requests(3)
        # Rate limited: each slot stops at the first pair instead of hammering the second.
        assert all(r["from_currency"] == "BTC" for r in upstream.requests[:3])
        assert (await server.app[STORE].quote_span())[0] == 0
        upstream.mode = "ok"
        seen = len(upstream.requests)
        await upstream.wait_requests(seen + 4)
        assert {r["from_currency"] for r in upstream.requests[seen:]} == {"BTC", "ETH"}
        async with http.get(server.url + "/healthz") as resp:
            health = (await resp.json())["feeds"]["alphavantage"]
        assert health["rate_limited"] >= 3 and health["messages"] >= 1


async def seed_quotes(server, n):
    store = server.app[STORE]
    for i in range(n):
        await store.add_quote("BTC", "USD", 100.0 + i, None, None, "2024-01-01T00:00:00Z")


async def test_pagination_arithmetic_on_25_rows(server, http):
    tok = (await register(http, server))["access"]
    await seed_quotes(server, 25)

    async def page(query):
        async with http.get(server.url + "/api/v1/quotes?" + query, headers=bearer(tok)) as r:
            return r.status, await r.json()

    status, first = await page("per_page=10")
    assert status == 200
    assert (first["count"], first["page"], first["per_page"], first["pages"]) == (25, 1, 10, 3)
    assert first["previous"] is None and first["next"].endswith("per_page=10&page=2")
    assert [q["rate"] for q in first["results"]] == [124.0 - i for i in range(10)]
    _, last = await page("per_page=10&page=3")
    assert len(last["results"]) == 5 and last["next"] is None
    assert last["previous"].startswith("http://") and "page=2" in last["previous"]
    assert [q["rate"] for q in last["results"]] == [104.0 - i for i in range(5)]
    _, beyond = await page("per_page=10&page=4")
    assert beyond["results"] == [] and beyond["next"] is None and beyond["count"] == 25
    for bad in ("per_page=0", "per_page=abc", "page=0", "page=-1&per_page=5", "per_page=1001"):
        status, err = await page(bad)
        assert status == 400 and err["error"] == "validation", bad


async def test_listing_without_per_page_streams_every_row(server, http):
    tok = (await register(http, server))["access"]
    async with http.get(server.url + "/api/v1/quotes", headers=bearer(tok)) as resp:
        assert orjson.loads(await resp.read()) == {"count": 0, "results": []}
    await seed_quotes(server, 2500)  # more than one streaming batch
    async with http.get(server.url + "/api/v1/quotes", headers=bearer(tok)) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/json")
        body = orjson.loads(await resp.read())
    assert body["count"] == 2500 and len(body["results"]) == 2500
    ids = [q["id"] for q in body["results"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 2500


async def test_quote_min_gap_lets_one_of_many_concurrent_posts_reach_upstream(
    make_settings, http, upstream
):
    async with LiveServer(
        quote_settings(
            make_settings, upstream, quote_min_gap=60, quote_pairs=(("BTC", "USD"), ("ETH", "USD"))
        )
    ) as server:
        await upstream.wait_requests(2)  # the poller's own fetches do not count
        tok = (await register(http, server))["access"]
        before = len(upstream.requests)
        results = await asyncio.gather(*(post_quote(http, server, tok) for _ in range(20)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [201] + [429] * 19
        assert len(upstream.requests) == before + 1
        for status, err, headers in results:
            if status == 429:
                assert err["error"] == "rate_limited"
                assert 1 <= int(headers["Retry-After"]) <= 60
        # The gap is per pair: another pair is fetched at once.
        status, _, _ = await post_quote(
            http, server, tok, {"from_currency": "ETH", "to_currency": "USD"}
        )
        assert status == 201 and len(upstream.requests) == before + 2


async def test_quote_min_gap_zero_turns_the_gap_off(make_settings, http, upstream):
    async with LiveServer(quote_settings(make_settings, upstream, quote_min_gap=0)) as server:
        await upstream.wait_requests(1)
        tok = (await register(http, server))["access"]
        results = await asyncio.gather(*(post_quote(http, server, tok) for _ in range(3)))
        assert [status for status, _, _ in results] == [201] * 3


async def test_a_key_straddling_the_message_cut_is_still_redacted(
    make_settings, http, upstream, caplog
):
    # The upstream error echoes the key about 84 characters into the message: a 250-char key
    # runs across the 300-character cut.
    key = "".join(f"{i:03d}" for i in range(84))[:250]
    upstream.mode = "error"
    settings = make_settings(
        alphavantage_url=upstream.url, alphavantage_api_key=key, alphavantage_timeout=0.5
    )
    with caplog.at_level(logging.DEBUG):
        async with LiveServer(settings) as server:
            poller = server.app[QUOTES].poller
            async with asyncio.timeout(5):  # the poller's first poll at startup fails
                while poller.last_error is None:
                    await asyncio.sleep(0.01)
            tok = (await register(http, server))["access"]
            status, err, _ = await post_quote(http, server, tok)
            async with http.get(server.url + "/healthz") as resp:
                health = await resp.json()
    assert status == 502 and "***" in err["detail"]
    shown = [
        err["detail"],
        health["feeds"]["alphavantage"]["last_error"],
        *(r.getMessage() for r in caplog.records),
    ]
    assert all(key[:40] not in text for text in shown)


async def test_only_configured_pairs_are_fetched_on_demand(make_settings, http, upstream):
    """One gap per pair: with any pair allowed, naming new ones would spend the key's calls."""
    async with LiveServer(quote_settings(make_settings, upstream)) as server:
        await upstream.wait_requests(1)
        tok = (await register(http, server))["access"]
        before = len(upstream.requests)
        for code in ("AAA", "AAB", "AAC"):
            status, err, _ = await post_quote(
                http, server, tok, {"from_currency": code, "to_currency": "USD"}
            )
            assert status == 400 and err["error"] == "validation"
            assert "BTC/USD" in err["fields"]["from_currency"]
        assert len(upstream.requests) == before
