"""Alerts, second wave, end to end: percent alerts, repeat with cooldown and hysteresis,
expiry, notes, the events list, resume on the live feed, and the new fields' validation.

Real parts on loopback (the server, the fake Binance upstream, SQLite). The engine runs on
trade time, so cooldowns and expiries are driven by the trades' timestamps: no sleeping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from conftest import LiveServer, bearer, register
from fake_binance import FakeBinance, free_port
from smtp_sink import SmtpSink
from test_alerts import Trader, create, fake, fetch, market_settings  # noqa: F401 (fixture)
from test_crash import ServerProcess
from test_crash import register as crash_register

import pricewatch.alerts as alerts_mod
from pricewatch import clock, schema
from pricewatch.alerts import ENGINE
from pricewatch.feeds import Tick
from pricewatch.hub import Hub
from pricewatch.records import Alert
from pricewatch.server import DELIVERER
from pricewatch.store import Store

NOW_MS = int(clock.now() * 1000) // 1000 * 1000  # trades in these tests start around now


class Market(Trader):
    """A Trader whose trades carry chosen times; keeps every alert message whole."""

    def __init__(self, *args):
        super().__init__(*args)
        self.messages: list[dict] = []

    async def next_of(self, kind: str, **match) -> dict:
        while True:
            msg = orjson.loads((await asyncio.wait_for(self.ws.receive(), 10)).data)
            if msg["type"] == "alert":
                self.messages.append(msg)
            if msg["type"] == kind and all(msg.get(k) == v for k, v in match.items()):
                return msg

    async def at(self, seconds: float, price: float, symbol: str = "BTCUSDT") -> None:
        """One trade `seconds` after NOW_MS, processed and its hits committed."""
        trade_id = next(self.ids)
        await self.fake.send_trade(symbol, trade_id, price, 1, NOW_MS + int(seconds * 1000))
        await self.next_of("price", symbol=symbol, price=price)
        await self.server.app[ENGINE].drained()
        # Alert messages pushed by now are ahead of the answer to this, on the same socket.
        await self.ws.send_json({"action": "subscribe", "symbols": [symbol]})
        await self.next_of("subscribed")

    def events_of(self, alert_id: int) -> list[dict]:
        return [m["event"] for m in self.messages if m["alert"]["id"] == alert_id]


async def get_json(http, server, token, path):
    async with http.get(server.url + path, headers=bearer(token)) as resp:
        return resp.status, await resp.json()


async def patch(http, server, token, alert_id, **body):
    async with http.patch(
        server.url + f"/api/v1/alerts/{alert_id}", json=body, headers=bearer(token)
    ) as resp:
        return resp.status, await resp.json()


def iso_in(seconds: float) -> str:
    return datetime.fromtimestamp(clock.now() + seconds, UTC).isoformat()


@pytest.fixture
async def live(make_settings, http, fake):  # noqa: F811
    # Trades run up to minutes ahead of the clock here, to let alert time pass.
    settings = market_settings(make_settings, fake, max_clock_skew=86400)
    async with LiveServer(settings) as server:
        user = await register(http, server, "alice")
        async with Market(fake, server, http, user["access"]) as market:
            yield market


async def test_percent_up_triggers_on_the_first_trade_p_percent_above_the_window_low(live):
    m = live
    await m.at(0, 100.0)
    status, up = await create(
        m.http,
        m.server,
        m.token,
        kind="percent",
        asset="BTCUSDT",
        percent=5,
        window="1m",
        direction="up",
        note="breakout",
    )
    assert status == 201, up
    assert (
        up["kind"],
        up["percent"],
        up["window"],
        up["direction"],
        up["price"],
        up["note"],
        up["repeat"],
        up["trigger_count"],
    ) == ("percent", 5.0, "1m", "up", None, "breakout", False, 0)
    await m.at(1, 100.0)  # the window's low
    await m.at(10, 103.0)
    await m.at(20, 104.9)  # 4.9 %: not yet
    assert m.events_of(up["id"]) == []
    await m.at(30, 105.0)  # 5 % above 100
    (event,) = m.events_of(up["id"])
    assert event["price"] == 105.0
    _, alert = await fetch(m.http, m.server, m.token, up["id"])
    assert alert["status"] == "TRIGGERED" and alert["trigger_count"] == 1
    await m.at(31, 120.0)  # triggers once only
    assert len(m.events_of(up["id"])) == 1


async def test_percent_down_window_slides_past_the_old_high(live):
    m = live
    await m.at(0, 100.0)
    status, down = await create(
        m.http,
        m.server,
        m.token,
        kind="percent",
        asset="BTCUSDT",
        percent=5,
        window="1m",
        direction="down",
    )
    assert status == 201, down
    await m.at(1, 110.0)  # the high, in second 1
    await m.at(30, 106.0)
    # Second 61: the window holds seconds 2..61, so 110 is out; the high is 106 and 105 is
    # only 0.9 % below it (it is 4.5 % below 110, not enough either way) ...
    await m.at(61, 105.0)
    # ... and 104.4 would be 5.1 % below 110, which has left the window: no trigger.
    await m.at(62, 104.4)
    assert m.events_of(down["id"]) == []
    await m.at(63, 100.6)  # 5.09 % below 106
    (event,) = m.events_of(down["id"])
    assert event["price"] == 100.6


async def test_percent_any_fires_on_either_side_once(live):
    m = live
    await m.at(0, 100.0)
    _, both = await create(
        m.http, m.server, m.token, kind="percent", asset="BTCUSDT", percent=2, window="5m"
    )
    assert both["direction"] == "any"
    await m.at(1, 100.0)
    await m.at(2, 97.9)  # 2.1 % below the high
    await m.at(3, 120.0)  # would be "up" too, but it fired already
    assert [e["price"] for e in m.events_of(both["id"])] == [97.9]


async def test_repeat_with_cooldown_and_hysteresis(live):
    m = live
    await m.at(0, 100.0)
    status, alert = await create(
        m.http,
        m.server,
        m.token,
        asset="BTCUSDT",
        price=101.0,
        direction="above",
        repeat=True,
        cooldown=60,
    )
    assert status == 201 and alert["repeat"] and alert["cooldown"] == 60, alert
    aid = alert["id"]
    await m.at(1, 101.0)  # triggers (>= target)
    await m.at(2, 100.5)  # far side, but inside the cooldown
    await m.at(3, 101.5)
    _, now = await fetch(m.http, m.server, m.token, aid)
    assert (now["status"], now["trigger_count"]) == ("TRIGGERED", 1)
    # The cooldown is over at 61 s; the price hovers at the target and never goes back
    # below it: no second event, however long it stays there.
    for t, price in [(61, 101.0), (62, 101.2), (70, 101.0), (80, 101.0)]:
        await m.at(t, price)
    assert len(m.events_of(aid)) == 1
    _, now = await fetch(m.http, m.server, m.token, aid)
    assert (now["status"], now["trigger_count"]) == ("CREATED", 1)  # re-armed, waiting
    await m.at(90, 100.9)  # back below the target: armed
    await m.at(91, 101.0)  # crosses again
    assert [e["price"] for e in m.events_of(aid)] == [101.0, 101.0]
    events = m.events_of(aid)
    assert events[0]["id"] < events[1]["id"]
    _, now = await fetch(m.http, m.server, m.token, aid)
    assert (now["status"], now["trigger_count"]) == ("TRIGGERED", 2)


async def test_repeating_percent_alert_rearms_after_its_cooldown(live):
    m = live
    await m.at(0, 100.0)
    _, alert = await create(
        m.http,
        m.server,
        m.token,
        kind="percent",
        asset="BTCUSDT",
        percent=1,
        window="1m",
        direction="up",
        repeat=True,
        cooldown=60,
    )
    await m.at(1, 100.0)
    await m.at(2, 101.0)
    await m.at(30, 103.0)  # inside the cooldown
    assert len(m.events_of(alert["id"])) == 1
    await m.at(62, 110.0)  # cooldown over; 110 is far above the window's low
    assert len(m.events_of(alert["id"])) == 2


async def test_expiry_never_triggers_after_its_time_even_before_the_sweep(live):
    m = live
    await m.at(0, 100.0)
    _, soon = await create(
        m.http,
        m.server,
        m.token,
        asset="BTCUSDT",
        price=110.0,
        direction="above",
        expires_at=iso_in(60),
    )
    _, other = await create(
        m.http,
        m.server,
        m.token,
        asset="BTCUSDT",
        price=111.0,
        direction="above",
        expires_at=iso_in(3600),
    )
    assert soon["expires_at"].endswith("Z") and soon["status"] == "CREATED"
    await m.at(120, 112.0)  # past `soon`'s expiry (no sweep has run): crosses both
    assert m.events_of(soon["id"]) == []
    assert len(m.events_of(other["id"])) == 1
    engine = m.server.app[ENGINE]
    assert await engine.expire(clock.now() + 61) == 1
    assert list(engine._expiry) == [other["id"]]  # the next sweep has nothing to ask about
    _, now = await fetch(m.http, m.server, m.token, soon["id"])
    assert now["status"] == "EXPIRED"
    _, listed = await get_json(m.http, m.server, m.token, "/api/v1/alerts?status=expired")
    assert [a["id"] for a in listed["results"]] == [soon["id"]]
    status, body = await patch(m.http, m.server, m.token, soon["id"], price=120.0)
    assert status == 409, body


async def test_events_are_listed_newest_first_with_deliveries(live):
    m = live
    await m.at(0, 100.0)
    _, a = await create(
        m.http,
        m.server,
        m.token,
        asset="BTCUSDT",
        price=101.0,
        direction="above",
        repeat=True,
        cooldown=60,
    )
    _, b = await create(m.http, m.server, m.token, asset="BTCUSDT", price=99.0, direction="below")
    await m.at(1, 101.5)
    await m.at(2, 98.0)
    await m.at(70, 102.0)  # a: cooldown over but still above: waits for the far side
    await m.at(71, 100.0)
    await m.at(72, 101.25)
    status, page = await get_json(m.http, m.server, m.token, "/api/v1/events")
    assert status == 200
    assert page["count"] == 3 and page["next"] is None and page["previous"] is None
    results = page["results"]
    assert [(e["alert_id"], e["price"]) for e in results] == [
        (a["id"], 101.25),
        (b["id"], 98.0),
        (a["id"], 101.5),
    ]
    assert results[0]["id"] > results[1]["id"] > results[2]["id"]
    # No SMTP configured: every email waits (pending).
    assert all(
        e["deliveries"] == [{"channel": "email", "type": "email", "state": "pending"}]
        for e in results
    )
    assert results[2]["time"] == clock.iso((NOW_MS + 1000) / 1000)
    assert results[2]["backfill"] is None
    # The live messages carried the same events.
    assert [e["id"] for e in m.events_of(a["id"])] == [results[2]["id"], results[0]["id"]]
    _, one = await get_json(
        m.http, m.server, m.token, f"/api/v1/alerts/{a['id']}/events?page_size=1"
    )
    assert one["count"] == 2 and [e["price"] for e in one["results"]] == [101.25]
    assert one["next"].endswith("page=2") or "page=2" in one["next"]
    _, two = await get_json(
        m.http, m.server, m.token, f"/api/v1/alerts/{a['id']}/events?page_size=1&page=2"
    )
    assert [e["price"] for e in two["results"]] == [101.5] and two["next"] is None
    status, _ = await get_json(
        m.http, m.server, m.token, f"/api/v1/alerts/{a['id']}/events?page=3&page_size=1"
    )
    assert status == 404
    # Another user sees none of them, and not the alert's events either.
    bob = await register(m.http, m.server, "bob")
    status, theirs = await get_json(m.http, m.server, bob["access"], "/api/v1/events")
    assert (status, theirs["count"]) == (200, 0)
    status, _ = await get_json(m.http, m.server, bob["access"], f"/api/v1/alerts/{a['id']}/events")
    assert status == 404


async def test_resume_after_a_disconnect_sends_exactly_the_missed_events_in_order(live):
    m = live
    url = m.server.ws_url("/live-feed/subscribe/")
    await m.at(0, 100.0)
    ids = []
    for target in (101.0, 102.0, 103.0, 104.0):
        _, alert = await create(
            m.http, m.server, m.token, asset="BTCUSDT", price=target, direction="above"
        )
        ids.append(alert["id"])
    browser = await m.http.ws_connect(url, headers=bearer(m.token))
    await m.at(1, 101.0)  # the browser sees this event live ...
    seen = await next_alert(browser)
    assert seen["alert"]["id"] == ids[0]
    last_seen = seen["event"]["id"]
    await browser.close()  # ... then goes offline
    await m.at(2, 102.0)
    await m.at(3, 103.0)  # two events meanwhile
    browser = await m.http.ws_connect(url, headers=bearer(m.token))
    await browser.send_json({"action": "resume", "since": last_seen})
    replayed = [await next_alert(browser), await next_alert(browser)]
    assert [r["alert"]["id"] for r in replayed] == ids[1:3]
    assert [r["event"]["price"] for r in replayed] == [102.0, 103.0]
    assert replayed[0]["event"]["id"] < replayed[1]["event"]["id"]
    done = await next_of(browser, "resumed")
    assert (done["since"], done["last"], done["complete"]) == (
        last_seen,
        replayed[1]["event"]["id"],
        True,
    )
    await m.at(4, 104.0)  # then live ones, with nothing replayed twice
    live_one = await next_alert(browser)
    assert live_one["alert"]["id"] == ids[3]
    assert live_one["event"]["id"] > replayed[1]["event"]["id"]
    await browser.send_json({"action": "resume", "since": "x"})
    assert (await next_of(browser, "error"))["detail"].startswith("since must be")
    # A replay costs the trigger writer a read per event: once per 5 s per connection.
    await browser.send_json({"action": "resume", "since": 0})
    assert (await next_of(browser, "error"))["detail"].startswith("At most one resume")
    await browser.close()


async def test_repeating_alerts_in_their_cooldown_count_towards_the_active_cap(
    make_settings,
    http,
    fake,  # noqa: F811
):
    """A repeating alert that fired is still active (it re-arms by itself): otherwise one
    user could hold any number of alerts firing every cooldown."""
    async with LiveServer(
        make_settings(feed="binance", binance_ws_url=fake.url, max_alerts_per_user=2)
    ) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            await market.trade(100.0)
            status, alert = await create(
                http,
                server,
                tok,
                asset="BTCUSDT",
                price=101.0,
                direction="above",
                repeat=True,
                cooldown=60,
            )
            assert status == 201
            await market.trade(102.0)
            assert (await market.alert_event(alert["id"]))["status"] == "TRIGGERED"
            status, _ = await create(http, server, tok, asset="BTCUSDT", price=500.0)
            assert status == 201
            status, answer = await create(http, server, tok, asset="BTCUSDT", price=600.0)
            assert status == 409, answer


async def next_of(ws, kind: str) -> dict:
    while True:
        msg = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
        if msg["type"] == kind:
            return msg


async def next_alert(ws) -> dict:
    msg = await next_of(ws, "alert")
    assert set(msg["event"]) == {"id", "time", "price"}
    return msg


async def test_resume_racing_a_commit_replays_first_then_the_live_event(live, monkeypatch):
    """A resume that arrives while a trigger batch is being committed: the replay (what was
    announced before) goes out first, then the batch, with nothing twice."""
    m = live
    url = m.server.ws_url("/live-feed/subscribe/")
    await m.at(0, 100.0)
    targets = [100.0 + i / 10 for i in range(1, 12)]
    for target in targets:
        await create(m.http, m.server, m.token, asset="BTCUSDT", price=target, direction="above")
    for i, target in enumerate(targets[:10]):
        await m.at(1 + i, target)  # 10 events, announced while the browser is away
    engine = m.server.app[ENGINE]
    store = engine.store
    committing, release = asyncio.Event(), asyncio.Event()
    trigger = store.trigger_alerts

    async def held_trigger(items):
        committing.set()
        await release.wait()
        return await trigger(items)

    monkeypatch.setattr(store, "trigger_alerts", held_trigger)
    registered = asyncio.Event()
    resume = engine.resume

    def resume_and_tell(*args):
        resume(*args)
        registered.set()

    monkeypatch.setattr(engine, "resume", resume_and_tell)
    await m.fake.send_trade("BTCUSDT", next(m.ids), targets[10], 1, NOW_MS + 20_000)
    await asyncio.wait_for(committing.wait(), 10)  # the 11th event is being committed
    browser = await m.http.ws_connect(url, headers=bearer(m.token))
    await browser.send_json({"action": "resume", "since": 0})
    await asyncio.wait_for(registered.wait(), 10)
    release.set()
    seen = []
    while len(seen) < 12:
        msg = await next_of_any(browser, ("alert", "resumed"))
        seen.append(msg["event"]["id"] if msg["type"] == "alert" else "resumed")
    ids = [x for x in seen if x != "resumed"]
    assert seen.index("resumed") == 10 and ids == sorted(ids) and len(set(ids)) == 11
    await browser.close()


async def next_of_any(ws, kinds) -> dict:
    while True:
        msg = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
        if msg["type"] in kinds:
            return msg


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "volume"}, "kind"),
        ({"kind": "percent", "window": "1m"}, "percent"),
        ({"kind": "percent", "percent": 0, "window": "1m"}, "percent"),
        ({"kind": "percent", "percent": 100.5, "window": "1m"}, "percent"),
        ({"kind": "percent", "percent": True, "window": "1m"}, "percent"),
        ({"kind": "percent", "percent": 5}, "window"),
        ({"kind": "percent", "percent": 5, "window": "2m"}, "window"),
        ({"kind": "percent", "percent": 5, "window": ["1m"]}, "window"),
        ({"kind": ["percent"], "percent": 5, "window": "1m"}, "kind"),
        ({"kind": "percent", "percent": 5, "window": "1m", "direction": "above"}, "direction"),
        ({"kind": "percent", "percent": 5, "window": "1m", "price": 3}, "price"),
        ({"price": 5, "percent": 5}, "percent"),
        ({"price": 5, "window": "1m"}, "window"),
        ({"price": 5, "direction": "up"}, "direction"),
        ({"price": 5, "repeat": "yes"}, "repeat"),
        ({"price": 5, "cooldown": 59}, "cooldown"),
        ({"price": 5, "cooldown": "60"}, "cooldown"),
        ({"price": 5, "cooldown": float("inf")}, "cooldown"),
        ({"price": 5, "expires_at": "tomorrow"}, "expires_at"),
        ({"price": 5, "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"price": 5, "expires_at": 1893456000}, "expires_at"),
        ({"price": 5, "expires_at": "9999-12-31T23:59:59-14:00"}, "expires_at"),  # year 10000
        ({"kind": "percent", "percent": 10**400, "window": "1m"}, "percent"),
        ({"price": 5, "cooldown": 10**400}, "cooldown"),
        ({"price": 5, "note": "x" * 201}, "note"),
        ({"price": 5, "note": 7}, "note"),
        ({"price": 5, "channels": ["telegram"]}, "channels"),
        ({"price": 5, "channels": []}, "channels"),
        ({"price": 5, "channels": "email"}, "channels"),
    ],
)
async def test_new_fields_are_validated_by_name(server, http, body, field):
    tok = (await register(http, server))["access"]
    if "direction" not in body and "kind" not in body:
        body = {"direction": "above", **body}  # no price is known: derive nothing
    status, answer = await create(http, server, tok, asset="BTCUSDT", **body)
    assert status == 400, answer
    assert answer["error"] == "validation" and field in answer["fields"], answer


async def test_every_bad_field_is_named_at_once_and_patch_validates_too(server, http):
    tok = (await register(http, server))["access"]
    status, answer = await create(
        http,
        server,
        tok,
        asset="BTCUSDT",
        kind="percent",
        percent=-1,
        window="9m",
        cooldown=1,
        note="x" * 300,
        expires_at="soon",
        repeat=1,
    )
    assert status == 400
    assert set(answer["fields"]) == {
        "percent",
        "window",
        "cooldown",
        "note",
        "expires_at",
        "repeat",
    }
    status, alert = await create(
        http,
        server,
        tok,
        asset="BTCUSDT",
        price=5.0,
        direction="above",
        note="why",
        channels=["email"],
    )
    assert status == 201 and alert["channels"] == ["email"] and alert["note"] == "why"
    status, answer = await patch(http, server, tok, alert["id"], cooldown=30, note=1)
    assert status == 400 and set(answer["fields"]) == {"cooldown", "note"}
    # PATCH keeps what it does not name; switching kind needs the new kind's fields.
    status, answer = await patch(http, server, tok, alert["id"], kind="percent")
    assert status == 400 and set(answer["fields"]) == {"percent", "window"}
    expires = iso_in(3600)
    status, changed = await patch(
        http,
        server,
        tok,
        alert["id"],
        kind="percent",
        percent=2.5,
        window="4h",
        repeat=True,
        cooldown=120,
        expires_at=expires,
    )
    assert status == 200, changed
    assert (
        changed["kind"],
        changed["price"],
        changed["percent"],
        changed["window"],
        changed["direction"],
        changed["note"],
        changed["repeat"],
        changed["cooldown"],
    ) == ("percent", None, 2.5, "4h", "any", "why", True, 120)
    status, cleared = await patch(http, server, tok, alert["id"], expires_at=None, note=None)
    assert status == 200 and cleared["expires_at"] is None and cleared["note"] is None
    engine = server.app[ENGINE]
    assert alert["id"] in engine.percent and alert["id"] not in engine.index


async def test_note_is_in_the_email(make_settings, http, fake):  # noqa: F811
    async with (
        SmtpSink() as smtp,
        LiveServer(market_settings(make_settings, fake, smtp.port)) as server,
    ):
        user = await register(http, server, "alice")
        async with Market(fake, server, http, user["access"]) as m:
            await m.at(0, 100.0)
            _, alert = await create(
                http,
                server,
                m.token,
                kind="percent",
                asset="BTCUSDT",
                percent=10,
                window="1h",
                direction="down",
                note="buy the dip",
            )
            await m.at(1, 89.0)  # 11 % below 100, the last trade before the alert
            notifier = server.app[DELIVERER]
            await notifier.wait_until(lambda: notifier.sent >= 1, timeout=10)
            (mail,) = smtp.messages
            assert "moved 10% down within 1h" in mail["Subject"]
            assert "Note:          buy the dip" in mail.get_content()
            _, events = await get_json(http, server, m.token, "/api/v1/events")
            assert events["results"][0]["deliveries"] == [
                {"channel": "email", "type": "email", "state": "sent"}
            ]


async def test_sigkill_keeps_a_repeating_alerts_cooldown_and_trigger_count(tmp_path):
    """Killed during the cooldown, the restarted server still holds the alert back until
    the cooldown is over and the price has been back below the target."""
    async with FakeBinance() as fake, aiohttp.ClientSession() as http:  # noqa: F811
        servers = [
            ServerProcess(tmp_path, name, fake.url, free_port()) for name in ("first", "second")
        ]
        for server in servers:  # no test reaches the internet: REST goes to the fake
            server.env["PRICEWATCH_BINANCE_REST_URL"] = fake.rest_url
            server.env["PRICEWATCH_MAX_CLOCK_SKEW"] = "86400"  # trades run ahead to pass time
        first, second = servers
        trade_ids = iter(range(1, 100))

        alerts_seen: list[dict] = []  # alert events may come before a (conflated) price

        async def trade(ws, seconds: float, price: float) -> None:
            await fake.send_trade(
                "BTCUSDT", next(trade_ids), price, 1, NOW_MS + int(seconds * 1000)
            )
            while True:
                msg = await asyncio.wait_for(ws.receive_json(), 10)
                if msg["type"] == "alert":
                    alerts_seen.append(msg)
                elif msg["type"] == "price" and msg["price"] == price:
                    return

        async def alert_message(ws) -> dict:
            return alerts_seen.pop(0) if alerts_seen else await next_alert(ws)

        try:
            await first.start(http, fake, connections=1)
            user = await crash_register(http, first)
            headers = bearer(user["access"])
            ws = await http.ws_connect(first.ws_url("/live-feed/subscribe/"), headers=headers)
            await trade(ws, 0, 100.0)
            async with http.post(
                first.url + "/api/v1/alerts",
                headers=headers,
                json={
                    "asset": "BTCUSDT",
                    "price": 101.0,
                    "direction": "above",
                    "repeat": True,
                    "cooldown": 60,
                },
            ) as resp:
                alert = await resp.json()
                assert resp.status == 201, alert
            await trade(ws, 1, 102.0)
            assert (await alert_message(ws))["event"]["price"] == 102.0
            await first.kill()
            await ws.close()

            await second.start(http, fake, connections=2)
            async with http.get(
                second.url + f"/api/v1/alerts/{alert['id']}", headers=headers
            ) as resp:
                stored = await resp.json()
            assert (stored["status"], stored["trigger_count"]) == ("TRIGGERED", 1)
            ws = await http.ws_connect(second.ws_url("/live-feed/subscribe/"), headers=headers)
            await trade(ws, 30, 100.5)  # back below, but inside the cooldown: not armed
            await trade(ws, 31, 102.0)  # a forgotten cooldown would trigger here
            await trade(ws, 70, 102.5)  # cooldown over; still above: waits for the far side
            await trade(ws, 71, 100.5)  # armed
            await trade(ws, 72, 101.5)  # triggers
            again = await alert_message(ws)  # the first alert message since the restart
            assert again["event"]["price"] == 101.5
            assert again["alert"]["trigger_count"] == 2
            async with http.get(second.url + "/api/v1/events", headers=headers) as resp:
                events = (await resp.json())["results"]
            assert [e["price"] for e in events] == [101.5, 102.0]
            await ws.close()
        finally:
            for server in servers:
                await server.cleanup()


async def test_migration_6_keeps_alerts_and_gives_each_trigger_its_event(tmp_path, monkeypatch):
    """A database from before events: ids, emails and the id high-water mark survive."""
    path = str(tmp_path / "pw.db")
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:5])
    store = await Store.open(path)
    user = await store.create_user("alice", "a@example.com", "$2b$hash")
    await store.close()
    with sqlite3.connect(path) as db:  # as the version-5 writer left it
        rows = [
            (user.id, 100.0, "above", "TRIGGERED", 1.7e9, 101.0, "sent"),
            (user.id, 50.0, "below", "CREATED", None, None, None),
            (user.id, 60.0, "below", "CREATED", None, None, None),
        ]
        fired, waiting, gone = (
            db.execute(
                "INSERT INTO alerts(user_id, asset, price, direction, status, created_at,"
                " updated_at, triggered_at, triggered_price, notified)"
                " VALUES (?, 'BTCUSDT', ?, ?, ?, 0, 0, ?, ?, ?)",
                row,
            ).lastrowid
            for row in rows
        )
        db.execute(
            "INSERT INTO outbox(alert_id, recipient, status, next_attempt_at,"
            " created_at) VALUES (?, 'a@example.com', 'sent', 0, 0)",
            (fired,),
        )
        db.execute("DELETE FROM alerts WHERE id = ?", (gone,))  # purged
    monkeypatch.undo()
    store = await Store.open(path)
    try:
        assert await store.schema_version() == len(schema.MIGRATIONS)
        count, events = await store.list_events(user.id, None, 0, 10)
        assert count == 1
        (event,) = events
        assert (event.alert_id, event.time, event.price, event.deliveries) == (
            fired,
            1.7e9,
            101.0,
            (("email", "email", "sent"),),
        )
        old = await store.get_alert(user.id, fired)
        assert (old.status, old.trigger_count, old.kind, old.repeat) == (
            "TRIGGERED",
            1,
            "price",
            False,
        )
        assert (await store.get_alert(user.id, waiting)).trigger_count == 0
        new = await store.create_alert(user.id, "BTCUSDT", 1.0, "below", max_active=10)
        assert new.id == gone + 1  # a purged id is never handed out again
        assert (await store.delivery_counts())["email"] == {
            "pending": 0,
            "sent": 1,
            "failed": 0,
            "skipped": 0,
        }
    finally:
        await store.close()


async def test_the_sweep_task_marks_expired_alerts_on_its_own(
    make_settings,
    http,
    fake,  # noqa: F811
    monkeypatch,
):
    monkeypatch.setattr(alerts_mod, "EXPIRE_EVERY", 0.05)
    async with LiveServer(market_settings(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        engine = server.app[ENGINE]
        swept = asyncio.Event()
        expire = engine.expire

        async def expire_and_tell(now=None):
            count = await expire(now)
            if count:
                swept.set()
            return count

        engine.expire = expire_and_tell
        status, alert = await create(
            http, server, tok, asset="BTCUSDT", price=5.0, direction="above", expires_at=iso_in(0.3)
        )
        assert status == 201, alert
        await asyncio.wait_for(swept.wait(), 10)
        assert (await fetch(http, server, tok, alert["id"]))[1]["status"] == "EXPIRED"


def test_creating_and_deleting_alerts_with_expiries_keeps_the_heap_bounded():
    engine = alerts_mod.AlertEngine(None, Hub())  # type: ignore[arg-type]
    for alert_id in range(1, 10_001):
        engine.track(
            Alert(
                alert_id,
                1,
                "BTCUSDT",
                5.0,
                "above",
                "CREATED",
                0.0,
                None,
                None,
                None,
                expires_at=4e9,
                repeat=True,
            )
        )
        engine.untrack(alert_id)
    assert len(engine._exp_heap) <= 1024 + 1 and not engine._expiry
    engine.track(
        Alert(10_001, 1, "BTCUSDT", 5.0, "above", "CREATED", 0.0, None, None, None, expires_at=4e9)
    )
    engine.on_tick(Tick("BTCUSDT", 6.0, 1.0, 4 * 10**12, 1))  # past it: never triggers
    assert 10_001 not in engine.index and engine._hits == []


async def test_a_replay_that_fails_never_stops_the_trigger_writer(tmp_path):
    """Whatever one resuming client does, the writer that commits everyone's triggers goes on."""
    from pricewatch.alerts import AlertEngine
    from pricewatch.feeds import Tick
    from pricewatch.hub import Hub
    from pricewatch.store import Store

    store = await Store.open(str(tmp_path / "pw.db"))
    engine = AlertEngine(store, Hub())
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        alert = await store.create_alert(user.id, "BTCUSDT", 100.0, "above", max_active=10)
        await engine.load()
        await engine.start()

        def broken(data: bytes) -> None:
            raise RuntimeError("this client's send fails")

        engine.resume(user.id, 0, broken)
        await asyncio.wait_for(engine.drained(), 5)
        engine.on_tick(Tick("BTCUSDT", 150.0, 1.0, int(time.time() * 1000), 1))
        await asyncio.wait_for(engine.drained(), 5)
        assert (await store.get_alert(user.id, alert.id)).status == "TRIGGERED"
    finally:
        await engine.stop()
        await store.close()
