"""Price alerts end to end: REST API, engine, trigger writer, SMTP notifier, restarts.

Real parts on loopback: the server, a fake Binance upstream, aiosmtpd catching mail, and a
SQLite file. Trades go in through the fake; a live-feed websocket tells when each was
processed (its price message), and the engine's `drained()` when hits are committed.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import email.utils
import itertools
import re
import time

import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance, free_port
from smtp_sink import SmtpSink

from pricewatch.alerts import ENGINE
from pricewatch.records import Alert, Channel, Delivery, Event
from pricewatch.server import DELIVERER, STORE

T0 = 1704067200000  # 2024-01-01T00:00:00Z


class Trader:
    """Sends trades through the fake upstream and waits until the server has processed them."""

    def __init__(self, fake: FakeBinance, server: LiveServer, http, token: str):
        self.fake, self.server, self.http, self.token = fake, server, http, token
        self.ids = itertools.count(1)
        self.alerts: list[dict] = []  # {"type": "alert"} events seen on the live feed
        self.ws = None

    async def __aenter__(self) -> Trader:
        await self.fake.wait_open(1)
        self.ws = await self.http.ws_connect(
            self.server.ws_url("/live-feed/subscribe/"), headers=bearer(self.token)
        )
        await self.ws.send_json({"action": "subscribe"})
        await self.next_of("subscribed")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()

    async def next_of(self, kind: str, **match) -> dict:
        while True:
            msg = orjson.loads((await asyncio.wait_for(self.ws.receive(), 10)).data)
            if msg["type"] == "alert":
                self.alerts.append(msg["alert"])
            if msg["type"] == kind and all(msg.get(k) == v for k, v in match.items()):
                return msg

    async def trade(self, price: float, symbol: str = "BTCUSDT") -> None:
        """One trade, processed by the pipeline and any hits committed."""
        trade_id = next(self.ids)
        await self.fake.send_trade(symbol, trade_id, price, 1, T0 + trade_id)
        await self.next_of("price", symbol=symbol, price=price)
        await self.server.app[ENGINE].drained()

    async def cross_new_alert(self, direction: str = "above") -> dict:
        """Trade at 100, create an alert one away, then trade across it; returns the alert."""
        await self.trade(100.0)
        target = 101.0 if direction == "above" else 99.0
        status, alert = await create(
            self.http, self.server, self.token, asset="BTCUSDT", price=target, direction=direction
        )
        assert status == 201, alert
        await self.trade(target + (1.0 if direction == "above" else -1.0))
        return alert

    async def alert_event(self, alert_id: int) -> dict:
        for event in self.alerts:
            if event["id"] == alert_id:
                return event
        while True:
            msg = await self.next_of("alert")
            if msg["alert"]["id"] == alert_id:
                return msg["alert"]


@pytest.fixture
async def fake():
    async with FakeBinance() as fake:
        yield fake


@pytest.fixture
async def smtp():
    async with SmtpSink() as sink:
        yield sink


def delivery(delivery_id: int, alert: Alert, attempts: int = 0) -> Delivery:
    """A delivery of `alert`'s trigger by email, built by hand (message tests)."""
    event = Event(delivery_id, alert.id, alert.user_id, alert.triggered_at, alert.triggered_price)
    return Delivery(
        delivery_id,
        attempts,
        alert,
        event,
        Channel("email", alert.user_id, "email", address="a@example.com"),
    )


def market_settings(make_settings, fake, smtp_port=None, **overrides):
    return make_settings(
        feed="binance",
        binance_ws_url=fake.url,
        smtp_host="127.0.0.1" if smtp_port else None,
        smtp_port=smtp_port or 25,
        smtp_retry_base=0.05,
        **overrides,
    )


async def create(http, server, token, **body):
    async with http.post(server.url + "/api/v1/alerts", json=body, headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def fetch(http, server, token, alert_id):
    async with http.get(server.url + f"/api/v1/alerts/{alert_id}", headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def test_alerts_trigger_on_crossing_with_one_email_each(make_settings, http, fake, smtp):
    async with LiveServer(market_settings(make_settings, fake, smtp.port)) as server:
        user = await register(http, server, "alice", email="alice@example.com")
        tok = user["access"]
        async with Trader(fake, server, http, tok) as market:
            await market.trade(100.0)
            ids = {}
            for name, price, direction in [
                ("eq_above", 110.0, "above"),
                ("jump_above", 150.0, "above"),
                ("far_above", 500.0, "above"),
                ("eq_below", 90.0, "below"),
                ("below_far", 50.0, "below"),
            ]:
                status, body = await create(
                    http, server, tok, asset="BTCUSDT", price=price, direction=direction
                )
                assert status == 201, body
                assert body["status"] == "CREATED" and body["notified"] is None
                ids[name] = body["id"]

            await market.trade(109.99)  # below every "above" target: nothing
            await market.trade(110.0)  # exact equality triggers "above" 110
            await market.trade(200.0)  # a gap jump over 150 triggers it too
            await market.trade(90.0)  # exact equality for "below" 90
            for name in ("eq_above", "jump_above", "eq_below"):
                event = await market.alert_event(ids[name])
                assert event["status"] == "TRIGGERED"
            triggered = {name: (await fetch(http, server, tok, i))[1] for name, i in ids.items()}
            assert triggered["eq_above"]["triggered_price"] == 110.0
            assert triggered["jump_above"]["triggered_price"] == 200.0
            assert triggered["eq_below"]["triggered_price"] == 90.0
            assert triggered["far_above"]["status"] == "CREATED"
            assert triggered["below_far"]["status"] == "CREATED"
            assert triggered["eq_above"]["triggered_at"] == "2024-01-01T00:00:00.003Z"

            await market.trade(110.0)  # crossing again: an alert triggers once only
            notifier = server.app[DELIVERER]
            await notifier.wait_until(lambda: notifier.sent >= 3, timeout=10)
            messages = await smtp.wait_messages(3)
            assert len(messages) == 3
            assert {m["To"] for m in messages} == {"alice@example.com"}
            by_subject = {m["Subject"]: m.get_content() for m in messages}
            body = by_subject["pricewatch: BTCUSDT above 150 reached"]
            assert "Trigger price: 200" in body and "Target:        150" in body
            assert "2024-01-01T00:00:00.004Z" in body
            for name in ("eq_above", "jump_above", "eq_below"):
                assert (await fetch(http, server, tok, ids[name]))[1]["notified"] == "sent"
            assert len(smtp.messages) == 3


async def test_many_alerts_one_trade_commit_together(make_settings, http, fake, smtp):
    async with LiveServer(market_settings(make_settings, fake, smtp.port)) as server:
        users = [await register(http, server, f"user{i}") for i in range(3)]
        async with Trader(fake, server, http, users[0]["access"]) as market:
            await market.trade(1000.0)
            for i, user in enumerate(users):
                for k in range(10):
                    status, _ = await create(
                        http,
                        server,
                        user["access"],
                        asset="BTCUSDT",
                        price=1001.0 + k + i / 10,
                        direction="above",
                    )
                    assert status == 201
            await market.trade(5000.0)
            messages = await smtp.wait_messages(30)
            notifier = server.app[DELIVERER]
            await notifier.wait_until(lambda: notifier.sent >= 30, timeout=10)
            assert len(smtp.messages) == 30
            assert sorted(m["To"] for m in messages) == sorted(
                f"user{i}@example.com" for i in range(3) for _ in range(10)
            )
            # The first user's socket got exactly its own ten alert events, no one else's
            # (some may have come before the conflated price message trade() waited for).
            while len(market.alerts) < 10:
                await market.next_of("alert")
            own = {a["id"] for a in market.alerts}
            assert len(own) == 10
            async with http.get(
                server.url + "/api/v1/alerts?status=TRIGGERED", headers=bearer(users[0]["access"])
            ) as resp:
                listed = await resp.json()
            assert {a["id"] for a in listed["results"]} == own


async def test_explicit_direction_already_crossed_triggers_on_next_trade(
    make_settings, http, fake, caplog
):
    with caplog.at_level("WARNING", logger="pricewatch.alerts"):
        async with LiveServer(market_settings(make_settings, fake)):
            pass
    # No SMTP host: startup warns, once.
    warnings = [r for r in caplog.records if "PRICEWATCH_SMTP_HOST is not set" in r.message]
    assert len(warnings) == 1
    async with LiveServer(market_settings(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            await market.trade(100.0)
            _, alert = await create(
                http, server, tok, asset="BTCUSDT", price=50.0, direction="above"
            )
            assert alert["status"] == "CREATED"
            await market.trade(100.0)
            event = await market.alert_event(alert["id"])
            assert event["triggered_price"] == 100.0
            # SMTP not configured: the email waits, queued.
            assert event["notified"] == "pending"


async def test_direction_is_derived_from_the_latest_price(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        status, body = await create(http, server, tok, asset="BTCUSDT", price=10.0)
        assert status == 409 and body["error"] == "conflict"
        async with Trader(fake, server, http, tok) as market:
            await market.trade(100.0)
            assert (await create(http, server, tok, asset="btcusdt", price=120.0))[1][
                "direction"
            ] == "above"
            _, below = await create(http, server, tok, asset="BTCUSDT", price=80.0)
            assert below["direction"] == "below" and below["asset"] == "BTCUSDT"


async def test_deleted_and_updated_alerts_never_fire_at_the_old_target(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            await market.trade(100.0)
            _, doomed = await create(
                http, server, tok, asset="BTCUSDT", price=110.0, direction="above"
            )
            _, moved = await create(
                http, server, tok, asset="BTCUSDT", price=111.0, direction="above"
            )
            _, patched = await create(
                http, server, tok, asset="BTCUSDT", price=112.0, direction="above"
            )
            async with http.delete(
                server.url + f"/api/v1/alerts/{doomed['id']}/", headers=bearer(tok)
            ) as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "DELETED"
            async with http.put(
                server.url + f"/api/v1/alerts/{moved['id']}",
                headers=bearer(tok),
                json={"asset": "BTCUSDT", "price": 300.0},
            ) as resp:
                body = await resp.json()
                assert resp.status == 200 and body["price"] == 300.0
                assert body["direction"] == "above"
            async with http.patch(
                server.url + f"/api/v1/alerts/{patched['id']}",
                headers=bearer(tok),
                json={"price": 400.0},
            ) as resp:
                assert resp.status == 200 and (await resp.json())["price"] == 400.0
            await market.trade(200.0)  # crosses every old target, none of the new ones
            for alert in (doomed, moved, patched):
                status = (await fetch(http, server, tok, alert["id"]))[1]["status"]
                assert status == ("DELETED" if alert is doomed else "CREATED")
            assert market.alerts == []
            await market.trade(300.0)
            event = await market.alert_event(moved["id"])
            assert event["triggered_price"] == 300.0
            async with http.patch(
                server.url + f"/api/v1/alerts/{moved['id']}",
                headers=bearer(tok),
                json={"price": 1.0},
            ) as resp:
                assert resp.status == 409 and (await resp.json())["error"] == "conflict"


async def test_users_only_ever_see_their_own_alerts(server, http):
    a = (await register(http, server, "anna"))["access"]
    b = (await register(http, server, "bert"))["access"]
    _, mine = await create(http, server, a, asset="BTCUSDT", price=5.0, direction="below")
    url = server.url + f"/api/v1/alerts/{mine['id']}"
    for method, body in [
        ("GET", None),
        ("PUT", {"asset": "BTCUSDT", "price": 1.0, "direction": "below"}),
        ("PATCH", {"price": 1.0}),
        ("DELETE", None),
    ]:
        async with http.request(method, url, json=body, headers=bearer(b)) as resp:
            assert resp.status == 404, method
            assert (await resp.json())["error"] == "not_found"
    async with http.get(server.url + "/api/v1/alerts", headers=bearer(b)) as resp:
        assert (await resp.json())["count"] == 0
    assert (await fetch(http, server, a, mine["id"]))[1]["status"] == "CREATED"
    for path in ("/api/v1/alerts", f"/api/v1/alerts/{mine['id']}"):
        async with http.get(server.url + path) as resp:
            assert resp.status == 401
    for bad_id in ("abc", "0", "99999999999999999999999"):
        async with http.get(server.url + f"/api/v1/alerts/{bad_id}", headers=bearer(a)) as r:
            assert r.status == 404


@pytest.mark.parametrize(
    "body, field",
    [
        ({"price": 10, "direction": "above"}, "asset"),
        ({"asset": "DOGEUSDT", "price": 10, "direction": "above"}, "asset"),
        ({"asset": 7, "price": 10, "direction": "above"}, "asset"),
        ({"asset": "BTCUSDT", "direction": "above"}, "price"),
        ({"asset": "BTCUSDT", "price": 0, "direction": "above"}, "price"),
        ({"asset": "BTCUSDT", "price": -5, "direction": "above"}, "price"),
        ({"asset": "BTCUSDT", "price": "100", "direction": "above"}, "price"),
        ({"asset": "BTCUSDT", "price": True, "direction": "above"}, "price"),
        ({"asset": "BTCUSDT", "price": [1], "direction": "above"}, "price"),
        ({"asset": "BTCUSDT", "price": 10, "direction": "sideways"}, "direction"),
        ({"asset": "BTCUSDT", "price": 10, "direction": 1}, "direction"),
    ],
)
async def test_alert_validation_names_the_field(server, http, body, field):
    tok = (await register(http, server))["access"]
    status, err = await create(http, server, tok, **body)
    assert status == 400 and err["error"] == "validation"
    assert set(err["fields"]) == {field}


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e309"])
async def test_non_finite_prices_are_validation_errors(server, http, raw):
    tok = (await register(http, server))["access"]
    body = b'{"asset": "BTCUSDT", "direction": "above", "price": ' + raw + b"}"
    async with http.post(
        server.url + "/api/v1/alerts",
        data=body,
        headers={**bearer(tok), "Content-Type": "application/json"},
    ) as resp:
        err = await resp.json()
    assert resp.status == 400 and err["fields"] == {"price": err["fields"]["price"]}


async def test_active_alert_cap_is_409(make_settings, http):
    async with LiveServer(make_settings(max_alerts_per_user=3)) as server:
        tok = (await register(http, server))["access"]
        ids = []
        for i in range(3):
            status, body = await create(
                http, server, tok, asset="BTCUSDT", price=10.0 + i, direction="above"
            )
            assert status == 201
            ids.append(body["id"])
        status, body = await create(
            http, server, tok, asset="BTCUSDT", price=20.0, direction="above"
        )
        assert status == 409 and body["error"] == "conflict"
        async with http.delete(server.url + f"/api/v1/alerts/{ids[0]}", headers=bearer(tok)):
            pass
        assert (await create(http, server, tok, asset="BTCUSDT", price=20.0, direction="above"))[
            0
        ] == 201


async def test_pagination_walks_every_alert_exactly_once(server, http):
    tok = (await register(http, server))["access"]
    other = (await register(http, server, "other"))["access"]
    created = []
    for i in range(23):
        _, body = await create(
            http, server, tok, asset="ETHUSDT", price=100.0 + i, direction="above"
        )
        created.append(body["id"])
    await create(http, server, other, asset="ETHUSDT", price=1.0, direction="above")
    for alert_id in created[:5]:
        async with http.delete(server.url + f"/api/v1/alerts/{alert_id}", headers=bearer(tok)):
            pass

    async def walk(url):
        seen, pages = [], 0
        while url:
            async with http.get(url, headers=bearer(tok)) as resp:
                assert resp.status == 200
                page = await resp.json()
            seen += [a["id"] for a in page["results"]]
            pages += 1
            url = page["next"]
        return seen, pages, page

    seen, pages, last = await walk(server.url + "/api/v1/alerts?page_size=5")
    assert seen == sorted(created, reverse=True) and pages == 5  # newest first
    assert last["count"] == 23 and last["previous"].endswith("page=4")

    seen, pages, _ = await walk(server.url + "/api/v1/alerts?status=CREATED&page_size=4")
    assert seen == sorted(created[5:], reverse=True) and pages == 5

    async with http.get(
        server.url + "/api/v1/alerts?status=DELETED&page_size=2&page=2", headers=bearer(tok)
    ) as resp:
        page = await resp.json()
    assert page["count"] == 5 and [a["status"] for a in page["results"]] == ["DELETED"] * 2
    assert "status=DELETED" in page["next"] and "page=3" in page["next"]
    assert page["previous"].startswith("http://") and "page=1" in page["previous"]

    for query in ("page=0", "page=x", "page_size=0", "page_size=101", "status=DONE"):
        async with http.get(server.url + "/api/v1/alerts?" + query, headers=bearer(tok)) as r:
            assert r.status == 400 and (await r.json())["error"] == "validation", query
    async with http.get(server.url + "/api/v1/alerts?page=99", headers=bearer(tok)) as r:
        assert r.status == 404


async def test_email_waits_for_smtp_that_is_down_then_arrives_once(make_settings, http, fake):
    port = free_port()  # nothing listens here yet
    async with LiveServer(market_settings(make_settings, fake, port)) as server:
        tok = (await register(http, server))["access"]
        notifier = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            alert = await market.cross_new_alert()
            await notifier.wait_until(lambda: notifier.attempts >= 2, timeout=10)
            assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "pending"
            async with SmtpSink(port=port) as smtp:
                await notifier.wait_until(lambda: notifier.sent >= 1, timeout=10)
                assert len(await smtp.wait_messages(1)) == 1
                assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "sent"
                assert len(smtp.messages) == 1


@pytest.mark.parametrize(
    "reply, rejected, outcome",
    [
        ("451 4.3.0 try again later", 2, "sent"),  # temporary: retried until accepted, once
        ("550 5.1.1 no such user", 1, "failed"),  # permanent: failed at once, no retry
    ],
)
async def test_smtp_rejections(make_settings, http, fake, reply, rejected, outcome):
    async with SmtpSink(fail_first=2, fail_reply=reply) as smtp:
        async with LiveServer(market_settings(make_settings, fake, smtp.port)) as server:
            tok = (await register(http, server))["access"]
            notifier = server.app[DELIVERER]
            async with Trader(fake, server, http, tok) as market:
                alert = await market.cross_new_alert("below")
                await notifier.wait_until(lambda: notifier.sent + notifier.failed >= 1, timeout=10)
            assert smtp.rejected == rejected
            assert len(smtp.messages) == (1 if outcome == "sent" else 0)
            assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == outcome


async def test_pending_email_is_sent_once_after_a_restart(make_settings, http, fake):
    port = free_port()
    settings = market_settings(make_settings, fake, port)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            alert = await market.cross_new_alert()
            notifier = server.app[DELIVERER]
            await notifier.wait_until(lambda: notifier.attempts >= 1, timeout=10)
    # Stopped with the email pending (SMTP was down). Start mail, then the server again.
    async with SmtpSink(port=port) as smtp:
        async with LiveServer(settings) as server:
            notifier = server.app[DELIVERER]
            await notifier.wait_until(lambda: notifier.sent >= 1, timeout=10)
            assert len(await smtp.wait_messages(1)) == 1
            assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "sent"
        async with LiveServer(settings) as server:  # and once more: nothing is resent
            assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "sent"
            assert server.app[ENGINE].index.count() == 0
        assert len(smtp.messages) == 1


async def test_created_alerts_are_reloaded_after_restart(make_settings, http, fake):
    settings = market_settings(make_settings, fake)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        _, alert = await create(http, server, tok, asset="BTCUSDT", price=150.0, direction="above")
    async with LiveServer(settings) as server:
        assert alert["id"] in server.app[ENGINE].index
        async with Trader(fake, server, http, tok) as market:
            await market.trade(151.0)
            assert (await market.alert_event(alert["id"]))["triggered_price"] == 151.0


async def test_email_fails_after_the_configured_attempts(make_settings, http, fake):
    port = free_port()  # SMTP stays down for good
    settings = market_settings(make_settings, fake, port, smtp_max_attempts=3)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        notifier = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            alert = await market.cross_new_alert()
            await notifier.wait_until(lambda: notifier.failed >= 1, timeout=10)
        assert notifier.attempts == 3 and notifier.sent == 0
        assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "failed"


async def test_shutdown_while_smtp_is_slow_to_say_goodbye_sends_no_duplicate(
    make_settings, http, fake
):
    """Accepted is accepted: a shutdown while the server dawdles on QUIT must not leave the
    row pending (it would be sent again after the restart)."""
    async with SmtpSink(hold_quit=True) as smtp:
        settings = market_settings(make_settings, fake, smtp.port)
        async with LiveServer(settings) as server:
            tok = (await register(http, server))["access"]
            async with Trader(fake, server, http, tok) as market:
                alert = await market.cross_new_alert()
                await smtp.wait_messages(1)  # DATA accepted; the client now waits on QUIT
        async with LiveServer(settings) as server:
            assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "sent"
            assert await server.app[STORE].due_deliveries(float("inf"), ["email"], 10) == []
        assert len(smtp.messages) == 1


@pytest.mark.parametrize(
    "value, text",
    [
        (60018.26, "60018.26"),
        (1_250_000.0, "1250000"),
        (0.00000123, "0.00000123"),
        (150.0, "150"),
        (3001.5, "3001.5"),
    ],
)
def test_email_prices_are_written_in_full(value, text):
    from pricewatch.delivery.email import compose
    from pricewatch.delivery.message import plain

    assert plain(value) == text
    alert = Alert(
        7, 1, "BTCUSDT", value, "above", "TRIGGERED", 0.0, 1704067200.5, value * 2, "pending"
    )
    msg = email.message_from_bytes(
        compose([delivery(1, alert)], "pw@localhost"), policy=email.policy.default
    )
    assert msg["Subject"] == f"pricewatch: BTCUSDT above {text} reached"
    body = msg.get_content()
    assert f"Target:        {text} (above: price >= target)" in body
    assert f"Trigger price: {plain(value * 2)}" in body and "e+" not in body
    assert "Time (UTC):    2024-01-01T00:00:00.500Z" in body and "#7" in body


async def test_an_email_the_library_cannot_send_fails_once_not_forever(
    make_settings, http, fake, smtp, monkeypatch
):
    import pricewatch.delivery.email as email_mod

    def broken(batch, sender, public_url=None):
        raise ValueError("No recipient headers")  # what aiosmtplib raises for odd addresses

    monkeypatch.setattr(email_mod, "compose", broken)
    async with LiveServer(market_settings(make_settings, fake, smtp.port)) as server:
        tok = (await register(http, server))["access"]
        notifier = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            alert = await market.cross_new_alert()
            await notifier.wait_until(lambda: notifier.failed >= 1, timeout=10)
        assert notifier.attempts == 1 and smtp.messages == []
        assert (await fetch(http, server, tok, alert["id"]))[1]["notified"] == "failed"


async def test_alert_creation_rate_per_user_is_429_with_retry_after(make_settings, http):
    async with LiveServer(make_settings(alert_create_rate=5)) as server:
        tok = (await register(http, server))["access"]
        for _ in range(3):  # refused before the database: not counted
            assert (await create(http, server, tok, asset="BTCUSDT", price=-1))[0] == 400
        results = await asyncio.gather(
            *(
                create(http, server, tok, asset="BTCUSDT", price=10.0 + i, direction="above")
                for i in range(12)
            )
        )
        assert sorted(status for status, _ in results) == [201] * 5 + [429] * 7
        async with http.post(
            server.url + "/api/v1/alerts",
            headers=bearer(tok),
            json={"asset": "BTCUSDT", "price": 1.0, "direction": "below"},
        ) as resp:
            assert resp.status == 429 and (await resp.json())["error"] == "rate_limited"
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
        other = (await register(http, server, "bob"))["access"]  # per user
        assert (await create(http, server, other, asset="BTCUSDT", price=1.0, direction="below"))[
            0
        ] == 201


async def test_deleted_alerts_are_purged_after_30_days(server, http):
    tok = (await register(http, server))["access"]
    ids = []
    for price in (10.0, 11.0, 12.0):
        status, body = await create(
            http, server, tok, asset="BTCUSDT", price=price, direction="above"
        )
        assert status == 201
        ids.append(body["id"])
    for alert_id in ids[:2]:
        async with http.delete(
            server.url + f"/api/v1/alerts/{alert_id}", headers=bearer(tok)
        ) as resp:
            assert resp.status == 200

    async def listed(status):
        async with http.get(
            server.url + f"/api/v1/alerts?status={status}", headers=bearer(tok)
        ) as resp:
            return [a["id"] for a in (await resp.json())["results"]]

    engine = server.app[ENGINE]
    now = time.time()
    assert await engine.purge(now=now + 29 * 86400) == 0  # kept for 30 days
    assert sorted(await listed("DELETED")) == ids[:2]
    assert await engine.purge(now=now + 31 * 86400) == 2
    assert await listed("DELETED") == [] and await listed("CREATED") == [ids[2]]
    assert (await fetch(http, server, tok, ids[0]))[0] == 404


async def test_alert_email_has_date_message_id_and_public_link(make_settings, http, fake, smtp):
    settings = market_settings(
        make_settings,
        fake,
        smtp.port,
        mail_from="Pricewatch <alerts@prices.example.com>",
        public_url="https://prices.example.com",
    )
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            await market.cross_new_alert()
            (msg,) = await smtp.wait_messages(1)
    sent = email.utils.parsedate_to_datetime(msg["Date"])
    assert sent.utcoffset().total_seconds() == 0 and abs(sent.timestamp() - time.time()) < 60
    assert re.fullmatch(r"<[^<>@\s]+@prices\.example\.com>", msg["Message-ID"])
    assert "https://prices.example.com/" in msg.get_content()


def test_message_id_is_stable_across_attempts_and_unique_per_email():
    from pricewatch.delivery.email import message_id

    alert = Alert(7, 1, "BTCUSDT", 1.0, "above", "TRIGGERED", 1.7e9, 1.7e9, 1.0, "pending")
    first = message_id(delivery(3, alert), "pw@localhost")
    assert first == message_id(delivery(3, alert, attempts=2), "pw@localhost")
    other = Alert(8, 1, "BTCUSDT", 1.0, "above", "TRIGGERED", 1.7e9, 1.7e9, 1.0, "pending")
    assert first != message_id(delivery(4, other), "pw@localhost")
    assert first.endswith("@localhost>")
