"""Notification channels through the HTTP API (`/api/v1/channels`), on a live server."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import LiveServer, bearer, register
from fake_hooks import FakeTelegram, WebhookReceiver
from test_alerts import Trader, create

from pricewatch.server import DELIVERER, STORE

TOKEN = "123456:AAF-bot-token-SECRETPART"


async def call(
    http, server, method: str, path: str, token: str | None = None, **kw
) -> tuple[int, dict | None]:
    headers = bearer(token) if token else {}
    async with http.request(method, server.url + path, headers=headers, **kw) as resp:
        body = await resp.json() if resp.status != 204 else None
        return resp.status, body


async def add(http, server, token, **body) -> tuple[int, dict]:
    return await call(http, server, "POST", "/api/v1/channels", token, json=body)


async def listed(http, server, token) -> list[dict]:
    status, body = await call(http, server, "GET", "/api/v1/channels", token)
    assert status == 200, body
    return body["results"]


@pytest.fixture
async def hooks_server(make_settings):
    async with LiveServer(
        make_settings(allow_private_webhooks=True, telegram_bot_token=TOKEN)
    ) as live:
        yield live


async def test_webhook_is_created_with_a_secret_shown_once(hooks_server, http):
    tok = (await register(http, hooks_server, "alice", email="alice@example.com"))["access"]
    status, made = await add(http, hooks_server, tok, type="webhook", url="http://127.0.0.1:9/hook")
    assert status == 201, made
    assert isinstance(made["id"], int) and made["type"] == "webhook"
    assert made["url"] == "http://127.0.0.1:9/hook" and made["format"] == "json"
    assert re.fullmatch(r"[0-9a-f]{64}", made["secret"])
    status, other = await add(
        http,
        hooks_server,
        tok,
        type="webhook",
        format="discord",
        url="https://discord.example/api/webhooks/1/x",
    )
    assert status == 201 and other["format"] == "discord" and other["secret"] != made["secret"]
    channels = await listed(http, hooks_server, tok)
    assert [c["id"] for c in channels] == ["email", made["id"], other["id"]]
    assert channels[0] == {
        "id": "email",
        "type": "email",
        "email": "alice@example.com",
        "verified": channels[0]["verified"],
        "created": channels[0]["created"],
    }
    assert all("secret" not in c for c in channels)  # never again after the 201
    async with http.get(hooks_server.url + "/api/v1/channels/", headers=bearer(tok)) as resp:
        assert resp.status == 200 and len((await resp.json())["results"]) == 3


async def test_telegram_channel_takes_a_chat_id(hooks_server, http):
    tok = (await register(http, hooks_server, "alice"))["access"]
    status, made = await add(http, hooks_server, tok, type="telegram", chat_id=-1001234567890)
    assert status == 201, made
    assert made["type"] == "telegram" and made["chat_id"] == "-1001234567890"
    assert "secret" not in made
    status, named = await add(
        http, hooks_server, tok, type="telegram", chat_id="@pricewatch_alerts"
    )
    assert status == 201 and named["chat_id"] == "@pricewatch_alerts"
    assert [c["type"] for c in await listed(http, hooks_server, tok)] == [
        "email",
        "telegram",
        "telegram",
    ]


async def test_telegram_needs_the_bot_token(make_settings, http):
    async with LiveServer(make_settings()) as server:
        tok = (await register(http, server, "alice"))["access"]
        status, err = await add(http, server, tok, type="telegram", chat_id=42)
    assert status == 400 and err["error"] == "validation"
    assert "PRICEWATCH_TELEGRAM_BOT_TOKEN" in err["fields"]["type"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "type"),
        ({"type": "email"}, "type"),
        ({"type": "sms", "url": "http://127.0.0.1/"}, "type"),
        ({"type": ["webhook"]}, "type"),
        ({"type": "webhook"}, "url"),
        ({"type": "webhook", "url": 5}, "url"),
        ({"type": "webhook", "url": "http://127.0.0.1/" + "a" * 2048}, "url"),
        ({"type": "webhook", "url": "ftp://127.0.0.1/x"}, "url"),
        ({"type": "webhook", "url": "ws://127.0.0.1/x"}, "url"),
        ({"type": "webhook", "url": "http:///nohost"}, "url"),
        ({"type": "webhook", "url": "http://[::1"}, "url"),
        ({"type": "webhook", "url": "http://127.0.0.1/", "format": "xml"}, "format"),
        ({"type": "webhook", "url": "http://127.0.0.1/", "format": ["json"]}, "format"),
        ({"type": "telegram"}, "chat_id"),
        ({"type": "telegram", "chat_id": True}, "chat_id"),
        ({"type": "telegram", "chat_id": 1.5}, "chat_id"),
        ({"type": "telegram", "chat_id": "not a chat"}, "chat_id"),
        ({"type": "telegram", "chat_id": "@" + "a" * 64}, "chat_id"),
        ({"type": "telegram", "chat_id": 10**30}, "chat_id"),
    ],
)
async def test_invalid_channels_name_the_field(hooks_server, http, body, field):
    tok = (await register(http, hooks_server, "alice"))["access"]
    status, err = await add(http, hooks_server, tok, **body)
    assert status == 400, err
    assert err["error"] == "validation" and set(err["fields"]) == {field}, err
    assert await listed(http, hooks_server, tok) == (await listed(http, hooks_server, tok))[:1]


async def test_a_body_that_is_not_json_is_400(hooks_server, http):
    tok = (await register(http, hooks_server, "alice"))["access"]
    status, err = await call(http, hooks_server, "POST", "/api/v1/channels", tok, data=b"{not json")
    assert status == 400 and err["error"] == "invalid_json"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "https://10.1.2.3/",
        "http://[::1]/",
        "http://169.254.169.254/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",
    ],
)
async def test_private_webhook_urls_are_refused_without_the_flag(make_settings, http, url):
    async with LiveServer(make_settings()) as server:
        tok = (await register(http, server, "alice"))["access"]
        status, err = await add(http, server, tok, type="webhook", url=url)
        assert status == 400 and set(err["fields"]) == {"url"}, err
        assert "PRICEWATCH_ALLOW_PRIVATE_WEBHOOKS" in err["fields"]["url"]
        assert [c["type"] for c in await listed(http, server, tok)] == ["email"]


async def test_at_most_ten_channels_the_email_counting_as_one(hooks_server, http):
    tok = (await register(http, hooks_server, "alice"))["access"]
    made = []
    for i in range(9):
        status, body = await add(
            http, hooks_server, tok, type="webhook", url=f"http://127.0.0.1:9/{i}"
        )
        assert status == 201, body
        made.append(body["id"])
    status, err = await add(http, hooks_server, tok, type="telegram", chat_id=1)
    assert status == 409 and err["error"] == "conflict"
    assert len(await listed(http, hooks_server, tok)) == 10
    status, _ = await call(http, hooks_server, "DELETE", f"/api/v1/channels/{made[0]}", tok)
    assert status == 204
    status, _ = await add(http, hooks_server, tok, type="telegram", chat_id=1)
    assert status == 201


async def test_delete_a_channel(hooks_server, http):
    alice = (await register(http, hooks_server, "alice"))["access"]
    bob = (await register(http, hooks_server, "bob"))["access"]
    _, mine = await add(http, hooks_server, alice, type="webhook", url="http://127.0.0.1:9/")
    path = f"/api/v1/channels/{mine['id']}"
    status, err = await call(http, hooks_server, "DELETE", path, bob)  # not bob's
    assert status == 404 and err["error"] == "not_found"
    assert len(await listed(http, hooks_server, alice)) == 2
    assert await call(http, hooks_server, "DELETE", path + "/", alice) == (204, None)
    assert [c["id"] for c in await listed(http, hooks_server, alice)] == ["email"]
    status, err = await call(http, hooks_server, "DELETE", path, alice)  # gone already
    assert status == 404
    for unknown in ("999999", "abc", "0", "-1", "1e3", "99999999999999999999999"):
        status, err = await call(http, hooks_server, "DELETE", f"/api/v1/channels/{unknown}", alice)
        assert status == 404 and err["error"] == "not_found", unknown


async def test_the_email_channel_cannot_be_deleted(hooks_server, http):
    tok = (await register(http, hooks_server, "alice"))["access"]
    status, err = await call(http, hooks_server, "DELETE", "/api/v1/channels/email", tok)
    assert status == 409 and err["error"] == "conflict" and "PATCH /auth/me" in err["detail"]
    assert [c["id"] for c in await listed(http, hooks_server, tok)] == ["email"]


async def test_channels_need_authentication(hooks_server, http):
    for method, path, kw in [
        ("GET", "/api/v1/channels", {}),
        ("POST", "/api/v1/channels", {"json": {"type": "webhook", "url": "http://127.0.0.1/"}}),
        ("DELETE", "/api/v1/channels/1", {}),
    ]:
        for token in (None, "not-a-token"):
            status, err = await call(http, hooks_server, method, path, token, **kw)
            assert status == 401 and err["error"] == "not_authenticated", (method, token)


# -- end to end: an alert crosses, the channels get it -------------------------------------


def market(make_settings, fake, **overrides):
    return make_settings(
        feed="binance", binance_ws_url=fake.url, delivery_retry_base=0.05, **overrides
    )


async def events_of(http, server, token) -> list[dict]:
    status, body = await call(http, server, "GET", "/api/v1/events", token)
    assert status == 200, body
    return body["results"]


async def test_crossed_alert_reaches_the_webhook_once_after_server_errors(
    make_settings, http, fake
):
    async with (
        WebhookReceiver() as receiver,
        LiveServer(market(make_settings, fake, allow_private_webhooks=True)) as server,
    ):
        tok = (await register(http, server, "alice"))["access"]
        status, made = await add(http, server, tok, type="webhook", url=receiver.url + "/in")
        assert status == 201, made
        receiver.secret = made["secret"]
        receiver.answer(500, times=2)
        async with Trader(fake, server, http, tok) as trader:
            alert = await trader.cross_new_alert()  # every channel: email and the webhook
        deliverer = server.app[DELIVERER]
        await deliverer.wait_until(lambda: deliverer.by_type["webhook"]["sent"] >= 1, 10)
        assert receiver.requests == [("/in", 500), ("/in", 500), ("/in", 204)]
        [got] = receiver.received
        assert receiver.bad_signatures == 0  # the receiver verified the signature
        [event] = await events_of(http, server, tok)
        assert got["json"]["event_id"] == event["id"] and got["json"]["price"] == 102.0
        assert got["json"]["alert"]["id"] == alert["id"]
        assert got["headers"]["X-Pricewatch-Event"] == str(event["id"])
        # SMTP is not configured: the email waits; the webhook is done.
        assert event["deliveries"] == [
            {"channel": "email", "type": "email", "state": "pending"},
            {"channel": made["id"], "type": "webhook", "state": "sent"},
        ]
        assert await server.app[STORE].due_deliveries(float("inf"), ["webhook"], 10) == []
        assert deliverer.attempts == 2 and len(receiver.received) == 1


async def test_crossed_alert_reaches_telegram_after_its_retry_after(
    make_settings, http, fake, caplog
):
    caplog.set_level(logging.DEBUG)
    async with (
        FakeTelegram() as telegram,
        LiveServer(
            market(make_settings, fake, telegram_bot_token=TOKEN, telegram_api_url=telegram.url)
        ) as server,
    ):
        tok = (await register(http, server, "alice"))["access"]
        status, chat = await add(http, server, tok, type="telegram", chat_id=-100777)
        assert status == 201, chat
        telegram.too_many(retry_after=1)
        async with Trader(fake, server, http, tok) as trader:
            await trader.trade(100.0)
            status, alert = await create(
                http,
                server,
                tok,
                asset="BTCUSDT",
                price=101.0,
                direction="above",
                channels=[chat["id"]],
            )
            assert status == 201, alert
            await trader.trade(102.0)
        deliverer = server.app[DELIVERER]
        await deliverer.wait_until(lambda: deliverer.by_type["telegram"]["sent"] >= 1, 10)
        assert len(telegram.calls) == 2 and len(telegram.messages) == 1
        assert telegram.times[1] - telegram.times[0] >= 0.9  # retry_after was obeyed
        [message] = telegram.messages
        assert message["chat_id"] == -100777 and "BTCUSDT above 101 reached" in message["text"]
        [event] = await events_of(http, server, tok)
        assert event["deliveries"] == [{"channel": chat["id"], "type": "telegram", "state": "sent"}]
    assert any("429" in r.getMessage() for r in caplog.records)  # the retry was logged...
    assert not any(TOKEN in r.getMessage() for r in caplog.records)  # ...without the token
