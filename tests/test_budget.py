"""The hourly delivery budget per user and channel, and the digest that carries the rest;
the SMTP connections kept open between messages; alerts choosing their channels."""

from __future__ import annotations

import asyncio

import pytest
from conftest import LiveServer, bearer, register
from smtp_sink import SmtpSink
from test_alerts import Trader, create, market_settings

from pricewatch import clock
from pricewatch.server import DELIVERER, STORE


@pytest.fixture
async def smtp():
    async with SmtpSink() as sink:
        yield sink


async def events(http, server, token) -> list[dict]:
    async with http.get(server.url + "/api/v1/events?page_size=100", headers=bearer(token)) as resp:
        assert resp.status == 200
        return (await resp.json())["results"]


async def cross_five(http, server, market, token, count: int = 5) -> list[dict]:
    """Five (`count`) alerts just above 100, then one trade crossing them all."""
    await market.trade(100.0)
    alerts = []
    for i in range(count):
        status, alert = await create(
            http,
            server,
            token,
            asset="BTCUSDT",
            price=100.5 + i / 100,
            direction="above",
            note=f"n{i}",
        )
        assert status == 201, alert
        alerts.append(alert)
    await market.trade(110.0)
    return alerts


async def backlog_held(store, timeout: float = 10.0) -> None:
    """Wait until every pending email delivery is held for the next hour (due in more than
    59 minutes): the deliverer has planned the whole backlog. Moving the clock before that
    lets the rows it has not read yet go out one by one in the new hour (they are due
    before the held ones) instead of in the digest."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        due = await store.next_delivery_due(["email"])
        if due is not None and due > clock.now() + 3540:
            return
        assert loop.time() < deadline, f"backlog not held after {timeout} s (next due {due})"
        await asyncio.sleep(0.01)


async def test_beyond_the_hourly_budget_triggers_wait_for_one_digest(
    make_settings, http, fake, smtp, later
):
    settings = market_settings(make_settings, fake, smtp.port, notify_per_hour=2)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            alerts = await cross_five(http, server, market, tok)
            await smtp.wait_messages(2)
            # The alerts themselves are never held back by the budget.
            for alert in alerts:
                assert (await market.alert_event(alert["id"]))["status"] == "TRIGGERED"
            await deliverer.wait_until(lambda: deliverer.sent >= 2, timeout=10)
            states = sorted(e["deliveries"][0]["state"] for e in await events(http, server, tok))
            assert states == ["pending", "pending", "pending", "sent", "sent"]
            assert len(smtp.messages) == 2
            assert all("digest" not in m["Subject"] for m in smtp.messages)

            await backlog_held(server.app[STORE])
            later(3601)  # the hour has passed: one digest with the three others
            deliverer.wake()
            await deliverer.wait_until(lambda: deliverer.sent >= 5, timeout=10)
            messages = await smtp.wait_messages(3)
            assert len(messages) == 3
            digest = messages[2]
            assert digest["Subject"] == "pricewatch: 3 alerts triggered (digest)"
            body = digest.get_content()
            mentioned = [a for a in alerts if f"#{a['id']} BTCUSDT above" in body]
            assert len(mentioned) == 3, body  # the three that waited, each once
            assert all(f"({a['note']})" in body for a in mentioned)
            states = [e["deliveries"][0]["state"] for e in await events(http, server, tok)]
            assert states == ["sent"] * 5

            # The digest used one of the new hour's two: the next trigger goes alone.
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=120.0, direction="above"
            )
            assert status == 201
            await market.trade(121.0)
            messages = await smtp.wait_messages(4)
            assert messages[3]["Subject"] == "pricewatch: BTCUSDT above 120 reached"


async def test_one_digest_carries_more_than_one_claim_holds(make_settings, http, fake, smtp, later):
    # One connection: the deliverer claims 4 emails at a time; the digest takes all 11.
    settings = market_settings(
        make_settings, fake, smtp.port, notify_per_hour=1, smtp_concurrency=1
    )
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            await cross_five(http, server, market, tok, count=12)
            await deliverer.wait_until(lambda: deliverer.sent >= 1, timeout=10)
            await backlog_held(server.app[STORE])
            later(3601)
            deliverer.wake()
            await deliverer.wait_until(lambda: deliverer.sent >= 12, timeout=10)
        messages = await smtp.wait_messages(2)
        assert len(messages) == 2
        assert messages[1]["Subject"] == "pricewatch: 11 alerts triggered (digest)"


async def test_budget_is_kept_across_a_restart(make_settings, http, fake, smtp):
    settings = market_settings(make_settings, fake, smtp.port, notify_per_hour=2)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        async with Trader(fake, server, http, tok) as market:
            await cross_five(http, server, market, tok)
            await smtp.wait_messages(2)
            deliverer = server.app[DELIVERER]
            await deliverer.wait_until(lambda: deliverer.sent >= 2, timeout=10)
    async with LiveServer(settings) as server:  # same database: the hour is not over
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            status, alert = await create(
                http, server, tok, asset="BTCUSDT", price=200.0, direction="above"
            )
            assert status == 201
            await market.trade(201.0)
        counts = await server.app[STORE].delivery_counts()
        assert counts["email"]["pending"] == 4 and counts["email"]["sent"] == 2
        assert len(smtp.messages) == 2


async def test_smtp_connections_are_kept_open_between_messages(make_settings, http, fake, smtp):
    settings = market_settings(make_settings, fake, smtp.port, smtp_concurrency=1)
    async with LiveServer(settings) as server:
        tok = (await register(http, server))["access"]
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            await cross_five(http, server, market, tok)
            await deliverer.wait_until(lambda: deliverer.sent >= 5, timeout=10)
        assert len(await smtp.wait_messages(5)) == 5
        assert smtp.sessions == 1  # five messages, one SMTP session


async def test_alert_channels_default_to_all_and_unknown_ids_are_400(make_settings, http, fake):
    async with LiveServer(market_settings(make_settings, fake)) as server:
        tok = (await register(http, server))["access"]
        store = server.app[STORE]
        user_id = (await store.user_by_name("alice")).id
        hook = await store.add_channel(
            user_id, "webhook", 10, url="https://example.com/h", format="json", secret="s"
        )
        status, alert = await create(
            http, server, tok, asset="BTCUSDT", price=5.0, direction="above"
        )
        assert status == 201 and alert["channels"] == ["email", hook.id]
        status, alert = await create(
            http,
            server,
            tok,
            asset="BTCUSDT",
            price=5.0,
            direction="above",
            channels=[str(hook.id)],
        )
        assert status == 201 and alert["channels"] == [hook.id]
        for wrong in ([hook.id + 1], ["telegram"], [0], [True], "email", []):
            status, body = await create(
                http, server, tok, asset="BTCUSDT", price=5.0, direction="above", channels=wrong
            )
            assert (status, body["error"]) == (400, "validation"), (wrong, body)
            assert "channels" in body["fields"]
        # A deleted channel leaves the alerts naming it; its pending deliveries are skipped.
        await store.delete_channel(user_id, hook.id)
        async with http.get(
            server.url + f"/api/v1/alerts/{alert['id']}", headers=bearer(tok)
        ) as resp:
            assert (await resp.json())["channels"] == []


def test_an_email_carries_any_text_in_its_note_intact():
    import email
    import email.policy

    from test_alerts import delivery

    from pricewatch.delivery.email import compose
    from pricewatch.records import Alert

    note = "Café — 🚀 " + "x" * 150 + "\n.dot line=3"
    alert = Alert(
        7, 1, "BTCUSDT", 100.0, "above", "TRIGGERED", 0.0, 1704067200.5, 101.0, "pending", note=note
    )
    raw = compose([delivery(1, alert)], "Price Watch <pw@example.com>", "https://p.example")
    assert raw.isascii() and all(len(line) <= 78 for line in raw.split(b"\r\n"))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "Price Watch <pw@example.com>" and msg["To"] == "a@example.com"
    body = msg.get_content().replace("\r\n", "\n")  # lines end as SMTP sends them
    assert f"Note:          {note}\n" in body
    assert "Live prices:   https://p.example/" in body
