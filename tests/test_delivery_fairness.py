"""What one user's channels may cost everyone else: a webhook that hangs holds a bounded
share of the senders, a wait the receiver asks for never burns attempts, a deleted channel
gets nothing more, and channel creation is rate limited."""

from __future__ import annotations

import pytest
from conftest import LiveServer, register
from fake_hooks import WebhookReceiver
from test_alerts import Trader, create
from test_channels import add, call, market
from test_sinks import delivery

from pricewatch import clock
from pricewatch.delivery.message import chat
from pricewatch.delivery.webhook import WebhookSink, event_header
from pricewatch.records import Channel, Delivery
from pricewatch.server import DELIVERER, STORE


async def webhook_user(http, server, name: str, receiver: WebhookReceiver) -> str:
    tok = (await register(http, server, name))["access"]
    status, made = await add(http, server, tok, type="webhook", url=receiver.url + "/" + name)
    assert status == 201, made
    receiver.secret = made["secret"]
    return tok


async def alerts_at(http, server, tok, count: int) -> None:
    for i in range(count):
        status, alert = await create(
            http, server, tok, asset="BTCUSDT", price=100.5 + i / 100, direction="above"
        )
        assert status == 201, alert


async def test_a_webhook_that_hangs_does_not_hold_back_other_users(make_settings, http, fake):
    settings = market(make_settings, fake, allow_private_webhooks=True, delivery_timeout=5.0)
    async with (
        WebhookReceiver() as stuck,
        WebhookReceiver() as good,
        LiveServer(settings) as server,
    ):
        stuck.hold.set()  # answers nothing until released (the sink times out first)
        mallory = await webhook_user(http, server, "mallory", stuck)
        alice = await webhook_user(http, server, "alice", good)
        async with Trader(fake, server, http, alice) as trader:
            await trader.trade(100.0)
            await alerts_at(http, server, mallory, 30)  # older: first in line
            await alerts_at(http, server, alice, 1)
            await trader.trade(110.0)
            # Alice's webhook is delivered long before mallory's time out (5 s) ...
            await good.wait_for(lambda: len(good.received) == 1, timeout=3)
        # ... while mallory's receiver holds at most WebhookSink.per_user of the senders.
        assert 1 <= len(stuck.arrivals) <= WebhookSink.per_user


async def test_a_retry_after_of_zero_still_waits_the_first_backoff_step(make_settings, http, fake):
    async with (
        WebhookReceiver() as receiver,
        LiveServer(
            make_settings(
                feed="binance",
                binance_ws_url=fake.url,
                allow_private_webhooks=True,
                delivery_retry_base=0.5,
            )
        ) as server,
    ):
        tok = await webhook_user(http, server, "alice", receiver)
        receiver.answer(429, times=2, headers={"Retry-After": "0"})
        async with Trader(fake, server, http, tok) as trader:
            await trader.cross_new_alert()
        await receiver.wait_for(lambda: len(receiver.received) == 1, timeout=10)
        first, second, third = receiver.arrivals
        assert second - first >= 0.45 and third - second >= 0.45  # not three at once


async def test_a_deleted_channel_gets_nothing_more(make_settings, http, fake):
    settings = market(make_settings, fake, allow_private_webhooks=True, delivery_timeout=30.0)
    async with WebhookReceiver() as receiver, LiveServer(settings) as server:
        receiver.hold.set()
        tok = (await register(http, server, "alice"))["access"]
        status, made = await add(http, server, tok, type="webhook", url=receiver.url + "/a")
        assert status == 201
        receiver.secret = made["secret"]
        async with Trader(fake, server, http, tok) as trader:
            await trader.trade(100.0)
            await alerts_at(http, server, tok, 10)
            await trader.trade(110.0)
            in_flight = WebhookSink.per_user
            await receiver.wait_for(lambda: len(receiver.arrivals) == in_flight, timeout=10)
            status, _ = await call(http, server, "DELETE", f"/api/v1/channels/{made['id']}", tok)
            assert status == 204
            receiver.release.set()  # the sends already made finish ...
            deliverer = server.app[DELIVERER]
            await deliverer.wait_until(lambda: not deliverer._inflight, timeout=10)
        # ... and nothing else went to the deleted channel, nor will.
        assert len(receiver.arrivals) == in_flight
        store = server.app[STORE]
        assert await store.next_delivery_due(["webhook"]) is None
        assert (await store.delivery_counts())["webhook"]["skipped"] == 10


async def test_channel_additions_are_limited_per_user(make_settings, http):
    async with LiveServer(make_settings()) as server:
        tok = (await register(http, server))["access"]
        for _ in range(30):  # each attempt counts: a valid one may cost a DNS lookup
            status, body = await add(http, server, tok, type="pigeon")
            assert status == 400, body
        status, body = await add(http, server, tok, type="pigeon")
        assert status == 429 and body["error"] == "rate_limited", body


def deliveries(count: int, note: str | None = None) -> list[Delivery]:
    """A digest's worth of deliveries to one Telegram chat (events 100, 101, ...)."""
    chat_channel = Channel(3, 7, "telegram", chat_id="5")
    return [delivery(i, chat_channel, note) for i in range(count)]


def test_a_big_digest_names_its_events_as_a_range_in_the_header():
    assert event_header(deliveries(3)) == "100,101,102"
    assert event_header(deliveries(1000)) == "100-1099"


@pytest.mark.parametrize("utf16, limit", [(False, 4096), (True, 4096)])
def test_chat_text_fits_the_limit_as_the_service_counts(utf16, limit):
    text = chat(deliveries(200, note="🚀" * 40), limit, utf16=utf16)
    size = len(text.encode("utf-16-le")) // 2 if utf16 else len(text)
    assert size <= limit and "more lines (GET /api/v1/events" in text
    assert len(text) > limit // 3  # cut where needed, not to nothing


async def test_a_channel_that_asks_to_retry_gets_no_more_until_then(make_settings, http, fake):
    async with (
        WebhookReceiver() as down,
        LiveServer(
            make_settings(
                feed="binance",
                binance_ws_url=fake.url,
                allow_private_webhooks=True,
                delivery_retry_base=30.0,
            )
        ) as server,
    ):
        tok = await webhook_user(http, server, "alice", down)
        down.answer(503, times=100)
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as trader:
            await trader.trade(100.0)
            await alerts_at(http, server, tok, 30)
            await trader.trade(110.0)
            # The first sends (one user: WebhookSink.per_user at once) are answered 503 ...
            await deliverer.wait_until(
                lambda: deliverer.attempts >= WebhookSink.per_user and not deliverer._inflight,
                timeout=10,
            )
        # ... and the 22 others, claimed to go next or not, wait with them (30 s).
        assert len(down.arrivals) == WebhookSink.per_user
        due = await server.app[STORE].next_delivery_due(["webhook"])
        assert due is not None and due - clock.now() > 20


async def test_a_digest_takes_one_claim_however_many_triggers_it_carries(
    make_settings, http, fake, later
):
    settings = market(
        make_settings, fake, allow_private_webhooks=True, notify_per_hour=1, delivery_timeout=30.0
    )
    async with WebhookReceiver() as receiver, LiveServer(settings) as server:
        tok = await webhook_user(http, server, "mallory", receiver)
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as trader:
            await trader.trade(100.0)
            await alerts_at(http, server, tok, 40)
            await trader.trade(110.0)
            await receiver.wait_for(lambda: len(receiver.received) == 1)  # the hour's one
            receiver.hold.set()  # the digest will hang
            later(3601)
            deliverer.wake()
            await receiver.wait_for(lambda: len(receiver.arrivals) == 2)
            assert deliverer._busy["webhook"] == 1  # 39 triggers, one send
            receiver.release.set()
            await deliverer.wait_until(lambda: deliverer.sent == 40, timeout=10)
        assert deliverer._busy["webhook"] == 0


async def test_a_verification_between_the_read_and_the_wait_stands(make_settings, http, fake):
    from smtp_sink import SmtpSink
    from test_verify import code_of, post

    async with (
        SmtpSink() as smtp,
        LiveServer(
            make_settings(
                feed="binance", binance_ws_url=fake.url, smtp_host="127.0.0.1", smtp_port=smtp.port
            )
        ) as server,
    ):
        user = await register(http, server, "kim", verified=False)
        tok = user["access"]
        code = code_of((await smtp.wait_codes(1))[0])
        store = server.app[STORE]
        wait = store.defer_unverified

        async def verified_meanwhile(moves):  # the user verifies right after the due read
            status, body, _ = await post(http, server, "/auth/verify-email", tok, {"code": code})
            assert status == 200, body
            return await wait(moves)

        store.defer_unverified = verified_meanwhile
        async with Trader(fake, server, http, tok) as trader:
            await trader.cross_new_alert()
            [mail] = await smtp.wait_messages(1)  # sent at once, not 24 h later
        assert "BTCUSDT above 101 reached" in mail["Subject"]
