"""Seed-compatible routes: each seed system's documented flow, exactly as its clients call it
(trailing slashes included), against a live server on loopback; trades come in through the
fake Binance upstream (tests/fake_binance.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance
from smtp_sink import SmtpSink
from test_alerts import T0, Trader, market_settings

from pricewatch import compat
from pricewatch.alerts import ENGINE
from pricewatch.openapi import build_spec
from pricewatch.server import DELIVERER, STORE, create_app


async def post(
    http, url: str, body: dict, token: str | None = None, method: str = "POST"
) -> tuple[int, dict]:
    headers = bearer(token) if token else {}
    async with http.request(method, url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def fake():
    async with FakeBinance() as fake:
        yield fake


# -- seed 000 --------------------------------------------------------------------------------


async def test_seed_000_register_answers_an_access_token_and_login_works(server, http):
    status, body = await post(
        http,
        server.url + "/feed/user/register/",
        {"username": "satoshi", "password": "correct horse"},
    )
    assert (status, list(body)) == (201, ["access_token"])
    async with http.get(server.url + "/auth/me", headers=bearer(body["access_token"])) as resp:
        me = await resp.json()
    assert (me["username"], me["email"]) == ("satoshi", "")  # stored without an email

    status, tokens = await post(
        http, server.url + "/feed/user/login/", {"username": "satoshi", "password": "correct horse"}
    )
    assert status == 200 and set(tokens) == {"access", "refresh"}
    status, body = await post(
        http,
        server.url + "/feed/user/login/",
        {"username": "satoshi", "password": "wrong password"},
    )
    assert (status, body["error"]) == (401, "bad_credentials")


async def test_seed_000_register_validates_like_register(server, http):
    url = server.url + "/feed/user/register/"
    status, body = await post(http, url, {"username": "satoshi", "password": "short"})
    assert (status, set(body["fields"])) == (400, {"password"})
    status, body = await post(
        http, url, {"username": "satoshi", "password": "correct horse", "email": "not an email"}
    )
    assert (status, set(body["fields"])) == (400, {"email"})
    status, _ = await post(
        http, url, {"username": "satoshi", "password": "correct horse", "email": "s@example.com"}
    )
    assert status == 201
    status, body = await post(http, url, {"username": "satoshi", "password": "correct horse"})
    assert (status, body["error"]) == (409, "conflict")
    # /auth/register itself still requires the email.
    status, body = await post(
        http, server.url + "/auth/register", {"username": "nakamoto", "password": "correct horse"}
    )
    assert (status, set(body["fields"])) == (400, {"email"})


async def test_a_user_without_email_is_never_mailed(make_settings, http, fake):
    async with (
        SmtpSink() as smtp,
        LiveServer(market_settings(make_settings, fake, smtp.port)) as server,
    ):
        status, body = await post(
            http,
            server.url + "/feed/user/register/",
            {"username": "satoshi", "password": "correct horse"},
        )
        mailless = body["access_token"]
        mailed = (await register(http, server, "alice"))["access"]
        async with Trader(fake, server, http, mailed) as market:
            await market.trade(100.0)
            for token in (mailless, mailed):
                status, body = await post(
                    http, server.url + "/alert/", {"asset": "BTCUSDT", "price": 101.0}, token
                )
                assert status == 201, body
            await market.trade(102.0)  # crosses both
            notifier = server.app[DELIVERER]
            await notifier.wait_until(lambda: notifier.sent >= 1, timeout=10)
        messages = await smtp.wait_messages(1)
        assert [m["To"] for m in messages] == ["alice@example.com"]
        counts = (await server.app[STORE].delivery_counts())["email"]
        assert counts == {"pending": 0, "sent": 1, "failed": 0, "skipped": 0}  # none for satoshi
        async with http.get(server.url + "/alert/", headers=bearer(mailless)) as resp:
            (alert,) = (await resp.json())["results"]
        assert (alert["status"], alert["notified"]) == ("TRIGGERED", None)


async def test_seed_000_live_feed_sends_binance_messages(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        _, body = await post(
            http,
            server.url + "/feed/user/register/",
            {"username": "satoshi", "password": "correct horse"},
        )
        token = body["access_token"]
        async with Trader(fake, server, http, token) as market:
            await market.trade(100.5)
            url = server.ws_url("/live-feed/subscribe/?format=binance")
            async with http.ws_connect(url, headers=bearer(token)) as seed:
                # The latest price on connect (then the client is surely subscribed).
                frame = orjson.loads((await asyncio.wait_for(seed.receive(), 10)).data)
                assert list(frame) == ["message"] and isinstance(frame["message"], str)
                assert orjson.loads(frame["message"]) == {
                    "e": "trade",
                    "E": T0 + 1,
                    "s": "BTCUSDT",
                    "p": "100.50000000",
                    "T": T0 + 1,
                }

                # An alert of this user triggers: the default client gets the event, the seed
                # client (which knows only {"message"}) does not.
                status, _ = await post(
                    http,
                    server.url + "/alerts/create/",
                    {"username": "satoshi", "alert_purpose": "moon", "alert_price": 101},
                    token,
                )
                assert status == 201
                await market.trade(102.0)
                await market.alert_event(1)
                await market.trade(103.25)  # the seed client's next frames end with this one
                prices = []
                while not prices or orjson.loads(prices[-1])["p"] != "103.25000000":
                    frame = orjson.loads((await asyncio.wait_for(seed.receive(), 10)).data)
                    assert list(frame) == ["message"], frame
                    prices.append(frame["message"])


async def test_live_feed_refuses_an_unknown_format_before_the_upgrade(server, http):
    token = (await register(http, server))["access"]
    async with http.get(
        server.url + "/live-feed/subscribe/?format=kraken", headers=bearer(token)
    ) as resp:
        body = await resp.json()
    assert (resp.status, body["error"], set(body["fields"])) == (400, "validation", {"format"})


# -- the /users/auth/ seed ---------------------------------------------------------------------


async def test_users_auth_seed_register_token_refresh(server, http):
    base = server.url + "/users/auth"
    status, user = await post(
        http,
        base + "/register",
        {"username": "alice", "password": "correct horse", "email": "alice@example.com"},
    )
    assert status == 201 and {"id", "access", "refresh"} <= set(user)
    status, pair = await post(
        http, base + "/token/", {"username": "alice", "password": "correct horse"}
    )
    assert status == 200 and set(pair) == {"access", "refresh"}
    status, rotated = await post(http, base + "/refresh", {"refresh": pair["refresh"]})
    assert status == 200 and rotated["refresh"] != pair["refresh"]
    status, body = await post(http, base + "/refresh/", {"refresh": pair["refresh"]})
    assert (status, body["error"]) == (401, "not_authenticated")  # spent: the login ends


# -- seed 002 --------------------------------------------------------------------------------


async def test_seed_002_flow_signup_login_create_fetch_delete(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        url = server.url + "/alerts/"
        status, _ = await post(
            http,
            url + "signup/",
            {"username": "alice", "password": "correct horse", "email": "alice@example.com"},
        )
        assert status == 201
        status, tokens = await post(
            http, url + "login/", {"username": "alice", "password": "correct horse"}
        )
        assert status == 200
        token = tokens["access"]
        async with Trader(fake, server, http, token) as market:
            await market.trade(100.0)
            status, created = await post(
                http,
                url + "create/",
                {"username": "alice", "alert_purpose": "buy the dip", "alert_price": "95.50"},
                token,
            )  # the seed took decimals as strings
            assert status == 201, created
            assert created["username"] == "alice"
            assert (created["alert_purpose"], created["alert_price"], created["alert_status"]) == (
                "buy the dip",
                95.5,
                "CREATED",
            )
            assert (created["asset"], created["direction"]) == ("BTCUSDT", "below")
            status, other = await post(
                http,
                url + "create/",
                {"username": "alice", "alert_purpose": "take profit", "alert_price": 150},
                token,
            )
            assert status == 201 and other["direction"] == "above"

            status, fetched = await post(http, url + "fetch/", {"username": "alice"}, token)
            assert status == 200 and fetched["username"] == "alice"
            assert [a["alert_purpose"] for a in fetched["alert details"]] == [
                "take profit",
                "buy the dip",
            ]  # newest first

            await market.trade(95.0)  # crosses "buy the dip"
            event = await market.alert_event(created["id"])
            assert event["status"] == "TRIGGERED"
            status, fetched = await post(
                http, url + "fetch/", {"username": "alice", "alert_status": "triggered"}, token
            )
            assert [(a["id"], a["alert_status"]) for a in fetched["alert details"]] == [
                (created["id"], "TRIGGERED")
            ]

            # Delete by purpose: a triggered alert is not "active", so there is none to delete.
            status, body = await post(
                http,
                url + "delete/",
                {"username": "alice", "alert_purpose": "buy the dip"},
                token,
                "DELETE",
            )
            assert (status, body["error"]) == (404, "not_found")
            status, deleted = await post(
                http,
                url + "delete/",
                {"username": "alice", "alert_purpose": "take profit"},
                token,
                "DELETE",
            )
            assert status == 200
            assert [(a["id"], a["alert_status"]) for a in deleted["alert details"]] == [
                (other["id"], "DELETED")
            ]
            assert other["id"] not in server.app[ENGINE].index  # the engine forgot it
            status, fetched = await post(
                http, url + "fetch/", {"username": "alice", "alert_status": "DELETED"}, token
            )
            assert [a["alert_purpose"] for a in fetched["alert details"]] == ["take profit"]


async def test_seed_002_delete_removes_every_active_alert_with_that_purpose(
    make_settings, http, fake
):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        token = (await register(http, server))["access"]
        async with Trader(fake, server, http, token) as market:
            await market.trade(100.0)
            ids = []
            for purpose in ("same", "same", "other"):
                status, body = await post(
                    http,
                    server.url + "/alerts/create/",
                    {"username": "alice", "alert_purpose": purpose, "alert_price": 200},
                    token,
                )
                ids.append(body["id"])
        status, deleted = await post(
            http,
            server.url + "/alerts/delete/",
            {"username": "alice", "alert_purpose": "same"},
            token,
            "DELETE",
        )
        assert status == 200
        assert [a["id"] for a in deleted["alert details"]] == [ids[1], ids[0]]
        status, active = await post(
            http,
            server.url + "/alerts/fetch/",
            {"username": "alice", "alert_status": "CREATED"},
            token,
        )
        assert [a["id"] for a in active["alert details"]] == [ids[2]]


async def test_seed_002_username_in_the_body_must_be_the_tokens_user(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        alice = (await register(http, server, "alice"))["access"]
        bob = (await register(http, server, "bob"))["access"]
        async with Trader(fake, server, http, alice) as market:
            await market.trade(100.0)
        url = server.url + "/alerts/"
        status, mine = await post(
            http,
            url + "create/",
            {"username": "bob", "alert_purpose": "p", "alert_price": 200},
            bob,
        )
        assert status == 201
        for path, method, body in [
            ("create/", "POST", {"username": "bob", "alert_purpose": "x", "alert_price": 200}),
            ("fetch/", "POST", {"username": "bob"}),
            ("delete/", "DELETE", {"username": "bob", "alert_purpose": "p"}),
        ]:
            status, answer = await post(http, url + path, body, alice, method)
            assert (status, answer["error"]) == (403, "forbidden"), path
            status, answer = await post(http, url + path, body, None, method)
            assert (status, answer["error"]) == (401, "not_authenticated"), path
        # Bob's alert is untouched and Alice made none; names match as logins do (any case).
        status, fetched = await post(http, url + "fetch/", {"username": "BOB"}, bob)
        assert [(a["id"], a["alert_status"]) for a in fetched["alert details"]] == [
            (mine["id"], "CREATED")
        ]
        status, fetched = await post(http, url + "fetch/", {"username": "alice"}, alice)
        assert (status, fetched["alert details"]) == (200, [])


@pytest.mark.parametrize(
    "body, fields",
    [
        ({}, {"username", "alert_purpose", "alert_price"}),
        ({"username": "alice", "alert_purpose": "p", "alert_price": "abc"}, {"alert_price"}),
        ({"username": "alice", "alert_purpose": "p", "alert_price": -5}, {"alert_price"}),
        ({"username": "alice", "alert_purpose": "p", "alert_price": "NaN"}, {"alert_price"}),
        ({"username": 5, "alert_purpose": ["p"], "alert_price": 1}, {"username", "alert_purpose"}),
        ({"username": "alice", "alert_purpose": "p" * 201, "alert_price": 1}, {"alert_purpose"}),
        ({"username": "alice", "alert_purpose": "p", "alert_price": 1, "asset": "DOGE"}, {"asset"}),
        ({"username": "alice", "alert_purpose": "p", "alert_price": 10**400}, {"alert_price"}),
        (
            {"username": "alice", "alert_purpose": "p", "alert_price": 1, "asset": 10**400},
            {"asset"},
        ),
    ],
)
async def test_seed_002_create_names_the_bad_field_as_the_seed_does(server, http, body, fields):
    token = (await register(http, server))["access"]
    status, answer = await post(http, server.url + "/alerts/create/", body, token)
    assert (status, answer["error"], set(answer["fields"])) == (400, "validation", fields)


@pytest.mark.parametrize(
    "path, method, body, fields",
    [
        ("fetch/", "POST", {"username": "alice", "alert_status": "DONE"}, {"alert_status"}),
        ("fetch/", "POST", {"alert_status": 1}, {"username", "alert_status"}),
        ("delete/", "DELETE", {"username": "alice"}, {"alert_purpose"}),
        ("delete/", "DELETE", {"alert_purpose": 7}, {"username", "alert_purpose"}),
    ],
)
async def test_seed_002_fetch_and_delete_name_the_bad_field(
    server, http, path, method, body, fields
):
    token = (await register(http, server))["access"]
    status, answer = await post(http, server.url + "/alerts/" + path, body, token, method)
    assert (status, answer["error"], set(answer["fields"])) == (400, "validation", fields)


# -- seed 003 --------------------------------------------------------------------------------


async def test_seed_003_ohlc_snapshot_data_is_a_list_of_candles(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        token = (await register(http, server))["access"]
        async with Trader(fake, server, http, token) as market:
            await market.trade(100.0)
            await market.trade(101.0)
        async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
            await ws.send_json({"symbol": "BTCUSDT", "timeframe": "1m"})
            snapshot = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
    assert snapshot["type"] == "snapshot" and isinstance(snapshot["data"], list)
    (candle,) = snapshot["data"]
    assert candle == {
        "timestamp": "2024-01-01T00:00:00Z",
        "open": 100.0,
        "high": 101.0,
        "low": 100.0,
        "close": 101.0,
        "volume": 2.0,
        "trades": 2,
    }


# -- seed 004 --------------------------------------------------------------------------------


async def test_seed_004_alert_api_with_page_size(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        token = (await register(http, server))["access"]
        async with Trader(fake, server, http, token) as market:
            await market.trade(100.0)
        url = server.url + "/alert/"
        ids = []
        for price in (110.0, 120.0, 130.0):
            status, body = await post(http, url, {"asset": "BTCUSDT", "price": price}, token)
            assert status == 201 and body["direction"] == "above"
            ids.append(body["id"])
        async with http.get(url + "?page_size=2", headers=bearer(token)) as resp:
            page = await resp.json()
        assert page["count"] == 3 and [a["id"] for a in page["results"]] == ids[:0:-1]
        assert page["next"] == url + "?page_size=2&page=2"
        async with http.get(page["next"], headers=bearer(token)) as resp:
            assert [a["id"] for a in (await resp.json())["results"]] == ids[:1]

        one = f"{url}{ids[0]}/"
        async with http.get(one, headers=bearer(token)) as resp:
            assert (await resp.json())["price"] == 110.0
        status, body = await post(http, one, {"asset": "BTCUSDT", "price": 90.0}, token, "PUT")
        assert (status, body["direction"]) == (200, "below")
        status, body = await post(http, one, {"price": 95.0}, token, "PATCH")
        assert (status, body["price"], body["direction"]) == (200, 95.0, "below")
        status, body = await post(http, one, {}, token, "DELETE")
        assert (status, body["status"]) == (200, "DELETED")
        async with http.get(f"{url}999/", headers=bearer(token)) as resp:
            assert resp.status == 404


# -- the document ----------------------------------------------------------------------------


def test_every_seed_route_is_documented_under_seed_compat(make_settings):
    spec = build_spec(create_app(make_settings()))
    for route in compat.ROUTES:
        operation = spec["paths"][route.path][route.method.lower()]
        assert operation["tags"] == ["compat"], route.path
        if route.same_as is not None:  # an alias answers as its operation says
            same = spec["paths"][route.same_as[1]][route.same_as[0].lower()]
            assert operation["responses"] == same["responses"], route.path
            assert operation.get("requestBody") == same.get("requestBody"), route.path
    live = spec["paths"]["/live-feed/subscribe"]["get"]
    assert {"name": "format", "in": "query"}.items() <= live["parameters"][0].items()
