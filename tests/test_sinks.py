"""The webhook and Telegram sinks, called directly with hand-built deliveries, against the
loopback fakes of tests/fake_hooks.py."""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
from contextlib import asynccontextmanager

import orjson
import pytest
from aiohttp.client_exceptions import ConnectionTimeoutError
from fake_hooks import FakeTelegram, WebhookReceiver

from pricewatch.config import Settings
from pricewatch.delivery.base import Failed, Retry, Sent
from pricewatch.delivery.http import describe
from pricewatch.delivery.message import chat, event_json
from pricewatch.delivery.telegram import TelegramSink
from pricewatch.delivery.webhook import WebhookSink, slack_escape, url_secrets
from pricewatch.records import Alert, Channel, Delivery, Event

SECRET = "s3cr3t" * 8
TOKEN = "123456:AAF-bot-token-SECRETPART"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def delivery(n: int = 1, channel: Channel | None = None, note: str | None = None) -> Delivery:
    alert = Alert(
        n,
        7,
        "BTCUSDT",
        100_000.0,
        "above",
        "TRIGGERED",
        T0,
        T0 + n,
        100_012.5,
        "pending",
        note=note,
        channels=(1,),
    )
    event = Event(100 + n, n, 7, T0 + n, 100_012.5)
    return Delivery(n, 0, alert, event, channel or Channel(1, 7, "webhook"))


def hook(url: str, format: str = "json", secret: str = SECRET) -> Channel:
    return Channel(1, 7, "webhook", url=url, format=format, secret=secret)


@asynccontextmanager
async def running(sink):
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def receiver():
    async with WebhookReceiver(SECRET) as r:
        yield r


def webhooks(**kw) -> WebhookSink:
    kw.setdefault("allow_private_webhooks", True)
    return WebhookSink(Settings(**kw))


async def test_json_webhook_is_the_signed_event(receiver):
    d = delivery(channel=hook(receiver.url + "/hook"), note="round number")
    async with running(webhooks()) as sink:
        assert await sink.send([d]) == Sent()
    [got] = receiver.received
    assert got["path"] == "/hook"
    assert got["json"] == orjson.loads(orjson.dumps(event_json(d)))
    assert got["json"]["event_id"] == 101 and got["json"]["alert"]["note"] == "round number"
    h = got["headers"]
    assert h["X-Pricewatch-Event"] == "101" and h["Content-Type"] == "application/json"
    assert h["User-Agent"] == "pricewatch"
    expected = hmac.new(SECRET.encode(), got["body"], hashlib.sha256).hexdigest()
    assert h["X-Pricewatch-Signature"] == f"sha256={expected}"
    assert receiver.bad_signatures == 0


def batch_to(url: str, n: int, format: str = "json", secret: str = SECRET) -> list[Delivery]:
    return [delivery(i, hook(url, format, secret)) for i in range(1, n + 1)]


async def test_json_digest_lists_every_event(receiver):
    batch = batch_to(receiver.url, 3)
    async with running(webhooks()) as sink:
        assert await sink.send(batch) == Sent()
    [got] = receiver.received
    assert got["json"]["digest"] is True
    assert [e["event_id"] for e in got["json"]["events"]] == [101, 102, 103]
    assert got["headers"]["X-Pricewatch-Event"] == "101,102,103"


@pytest.mark.parametrize(
    ("format", "key", "limit"), [("discord", "content", 2000), ("slack", "text", 3000)]
)
async def test_chat_formats_carry_the_shared_text(receiver, format, key, limit):
    one = batch_to(receiver.url, 1, format)
    many = batch_to(receiver.url, 80, format)  # a digest longer than the limit
    async with running(webhooks(public_url="https://prices.example")) as sink:
        assert await sink.send(one) == Sent()
        assert await sink.send(many) == Sent()
    first, digest = (r["json"] for r in receiver.received)
    escape = slack_escape if format == "slack" else None
    assert first[key] == chat(one, limit, "https://prices.example", escape=escape)
    assert "BTCUSDT above 100000" in first[key] and "100012.5" in first[key]
    assert digest[key] == chat(many, limit, "https://prices.example", escape=escape)
    assert len(digest[key]) <= limit and "more lines" in digest[key]


NOTE = "@everyone @here <!channel> <!here|here> <!everyone> <@U123> <@&42> & more"


async def test_a_note_with_mentions_pings_nobody_on_discord(receiver):
    async with running(webhooks()) as sink:
        assert (
            await sink.send([delivery(1, hook(receiver.url + "/hook", "discord"), note=NOTE)])
            == Sent()
        )
    [got] = receiver.received
    assert got["json"]["allowed_mentions"] == {"parse": []}  # no mention is parsed
    assert NOTE in got["json"]["content"]  # the note itself is shown as written


async def test_a_note_with_mentions_pings_nobody_on_slack(receiver):
    async with running(webhooks()) as sink:
        assert (
            await sink.send([delivery(1, hook(receiver.url + "/hook", "slack"), note=NOTE)])
            == Sent()
        )
    [got] = receiver.received
    text = got["json"]["text"]
    assert "<" not in text and ">" not in text  # no Slack control sequence survives
    assert (
        "@everyone @here &lt;!channel&gt; &lt;!here|here&gt; &lt;!everyone&gt; "
        "&lt;@U123&gt; &lt;@&amp;42&gt; &amp; more"
    ) in text
    many = [
        delivery(i, hook(receiver.url + "/hook", "slack"), note="<>" * 30) for i in range(1, 81)
    ]
    async with running(webhooks()) as sink:
        assert await sink.send(many) == Sent()
    assert len(receiver.received[1]["json"]["text"]) <= 3000  # measured once escaped


async def test_wrong_secret_is_refused_by_the_receiver(receiver):
    async with running(webhooks()) as sink:
        outcome = await sink.send(batch_to(receiver.url, 1, secret="not the secret"))
    assert isinstance(outcome, Failed) and "401" in outcome.error
    assert receiver.bad_signatures == 1 and receiver.received == []


async def test_server_errors_are_retried_then_sent(receiver):
    receiver.answer(500, times=2, body=b"x" * 100_000)  # a large error body is not read
    batch = batch_to(receiver.url, 1)
    async with running(webhooks()) as sink:
        first = await sink.send(batch)
        assert isinstance(first, Retry) and first.after is None and "500" in first.error
        assert len(first.error) < 300
        assert isinstance(await sink.send(batch), Retry)
        assert await sink.send(batch) == Sent()
    assert len(receiver.received) == 1


async def test_retry_after_header_is_obeyed(receiver):
    receiver.answer(429, headers={"Retry-After": "7"})
    receiver.answer(503, headers={"Retry-After": "999999"})
    async with running(webhooks()) as sink:
        assert await sink.send(batch_to(receiver.url, 1)) == Retry("HTTP 429: ", 7.0)
        capped = await sink.send(batch_to(receiver.url, 1))
    assert capped.after == 3600.0


async def test_discord_json_retry_after_is_obeyed(receiver):
    receiver.answer(
        429, body={"message": "You are being rate limited.", "retry_after": 2.5, "global": False}
    )
    async with running(webhooks()) as sink:
        outcome = await sink.send(batch_to(receiver.url, 1, "discord"))
    assert isinstance(outcome, Retry) and outcome.after == 2.5


async def test_redirect_is_not_followed(receiver):
    receiver.answer(301, headers={"Location": receiver.url + "/elsewhere"})
    async with running(webhooks()) as sink:
        outcome = await sink.send(batch_to(receiver.url + "/hook", 1))
    assert isinstance(outcome, Failed) and "301" in outcome.error
    assert receiver.requests == [("/hook", 301)]  # /elsewhere never asked for


@pytest.mark.parametrize("status", [400, 404, 410])
async def test_client_errors_fail(receiver, status):
    receiver.answer(status)
    async with running(webhooks()) as sink:
        outcome = await sink.send(batch_to(receiver.url, 1))
    assert isinstance(outcome, Failed) and str(status) in outcome.error


async def test_timeout_is_retried(receiver):
    receiver.hold.set()  # the receiver never answers
    async with running(webhooks(delivery_timeout=0.3)) as sink:
        outcome = await sink.send(batch_to(receiver.url, 1))
    assert isinstance(outcome, Retry) and "Timeout" in outcome.error


async def test_connection_refused_is_retried():
    async with running(webhooks()) as sink:
        outcome = await sink.send(batch_to(f"http://127.0.0.1:{closed_port()}", 1))
    assert isinstance(outcome, Retry) and "ClientConnectorError" in outcome.error


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_private_address_is_refused_without_the_flag(receiver, host):
    port = receiver.url.rsplit(":", 1)[1]
    async with running(webhooks(allow_private_webhooks=False)) as sink:
        outcome = await sink.send(batch_to(f"http://{host}:{port}/hook", 1))
    assert isinstance(outcome, Failed) and "refused" in outcome.error, outcome
    assert receiver.requests == []


async def test_sends_reuse_one_kept_alive_connection(receiver):
    async with running(webhooks()) as sink:
        for i in range(1, 6):
            assert await sink.send(batch_to(receiver.url, i)) == Sent()
    assert len(receiver.received) == 5
    assert len(receiver.connections) == 1


def test_error_text_hides_the_webhook_token():
    url = "https://discord.com/api/webhooks/42/TOKENPART"
    exc = ConnectionTimeoutError(f"Connection timeout to host {url}")
    outcome = describe(exc, url_secrets(url))
    assert isinstance(outcome, Retry)
    assert "TOKENPART" not in outcome.error and "discord.com" in outcome.error


# -- Telegram -----------------------------------------------------------------------------


@pytest.fixture
async def telegram():
    async with FakeTelegram() as fake:
        yield fake


def telegrams(api_url: str, **kw) -> TelegramSink:
    return TelegramSink(Settings(telegram_bot_token=TOKEN, telegram_api_url=api_url, **kw))


def to_chat(chat_id: str, n: int = 1) -> list[Delivery]:
    return [delivery(i, Channel(3, 7, "telegram", chat_id=chat_id)) for i in range(1, n + 1)]


def test_telegram_is_configured_by_its_token():
    assert not TelegramSink(Settings()).configured
    assert TelegramSink(Settings(telegram_bot_token=TOKEN)).configured


async def test_telegram_send_message(telegram):
    batch = to_chat("-1001234567")
    async with running(telegrams(telegram.url, public_url="https://p.example")) as sink:
        assert await sink.send(batch) == Sent()
        assert await sink.send(to_chat("@pricewatch_alerts")) == Sent()
    (token, body), (_, named) = telegram.calls
    assert token == TOKEN
    assert body == {"chat_id": -1001234567, "text": chat(batch, 4096, "https://p.example")}
    assert named["chat_id"] == "@pricewatch_alerts"


async def test_telegram_429_retry_after_then_sent(telegram):
    telegram.too_many(retry_after=3)
    async with running(telegrams(telegram.url)) as sink:
        first = await sink.send(to_chat("42"))
        assert isinstance(first, Retry) and first.after == 3.0 and "429" in first.error
        assert await sink.send(to_chat("42")) == Sent()
    assert len(telegram.calls) == 2 and len(telegram.messages) == 1


async def test_telegram_403_fails_and_500_retries(telegram):
    telegram.answer(
        403,
        body={
            "ok": False,
            "error_code": 403,
            "description": "Forbidden: bot was blocked by the user",
        },
    )
    telegram.answer(502, body=b"<html>Bad Gateway</html>")
    async with running(telegrams(telegram.url)) as sink:
        blocked = await sink.send(to_chat("42"))
        assert isinstance(blocked, Failed) and "blocked" in blocked.error
        assert isinstance(await sink.send(to_chat("42")), Retry)


async def test_telegram_token_never_in_errors_or_logs(telegram, caplog):
    caplog.set_level(logging.DEBUG)
    telegram.hold.set()
    outcomes = []
    async with running(telegrams(telegram.url, delivery_timeout=0.3)) as sink:
        outcomes.append(await sink.send(to_chat("42")))  # a timeout
    async with running(telegrams(f"http://127.0.0.1:{closed_port()}")) as sink:
        outcomes.append(await sink.send(to_chat("42")))  # refused
    async with running(telegrams("http://[::1")) as sink:  # an unusable URL
        outcomes.append(await sink.send(to_chat("42")))
    assert [type(o) for o in outcomes] == [Retry, Retry, Failed], outcomes
    for outcome in outcomes:
        assert TOKEN not in outcome.error and "SECRETPART" not in outcome.error
    assert not any(TOKEN in r.getMessage() for r in caplog.records)
