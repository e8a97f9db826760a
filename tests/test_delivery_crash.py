"""SIGKILL between a trigger and its delivery: delivered exactly once after the restart, for
every channel type (email, webhook, Telegram).

The receiver (aiosmtpd, a webhook endpoint, a fake Telegram Bot API) holds the first
delivery it gets and never answers it: the message is in flight, sent but not accepted, when
the server process is SIGKILLed. The database then still holds the delivery as pending with
no attempt counted. A second process on the same file resumes it: the receiver accepts it
exactly once (counted by the event's X-Pricewatch-Event header, the Telegram message's text,
the email's Message-ID, which is the same on every attempt), and a graceful stop records it
`sent`.

(The other email case, SMTP down for the whole life of the killed process with hundreds of
triggers, is tests/test_crash.py::test_sigkill_under_load_loses_nothing_and_emails_each_
trigger_once.)

Waiting: on the receivers' own events and on process exit, all with timeouts.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import sqlite3
from collections import Counter

import aiohttp
import pytest
from aiohttp import web
from conftest import bearer
from fake_binance import FakeBinance, free_port
from fake_hooks import FakeTelegram, WebhookReceiver
from smtp_sink import CODE_SUBJECT, SmtpSink
from test_crash import FORBIDDEN, SYMBOL, ServerProcess, register, trade_time

TARGET, CROSSING = 101.0, 102.5


class _HoldFirst:
    """The first request is held unanswered (until teardown, then a 503: never accepted)."""

    def _hold_init(self) -> None:
        self.held = asyncio.Event()
        self.held_request: tuple[dict, bytes] | None = None

    async def _hold_first(self, request: web.Request) -> web.Response | None:
        if self.held_request is not None:
            return None
        self.held_request = (dict(request.headers), await request.read())
        self.held.set()
        await self.release.wait()  # set when the receiver stops
        return web.Response(status=503)


class HoldingWebhook(_HoldFirst, WebhookReceiver):
    def __init__(self) -> None:
        super().__init__()
        self._hold_init()

    async def handle(self, request: web.Request) -> web.Response:
        return await self._hold_first(request) or await super().handle(request)

    def accepted(self) -> Counter:
        return Counter(r["headers"]["X-Pricewatch-Event"] for r in self.received)


class HoldingTelegram(_HoldFirst, FakeTelegram):
    def __init__(self) -> None:
        super().__init__()
        self._hold_init()

    async def send_message(self, request: web.Request) -> web.Response:
        return await self._hold_first(request) or await super().send_message(request)

    def accepted(self) -> Counter:
        return Counter(m["text"] for m in self.messages)


class HoldingSmtp(SmtpSink):
    """aiosmtpd whose first DATA is never answered (until stop(), then a 451)."""

    def __init__(self, port: int) -> None:
        super().__init__(port=port)
        self.held = asyncio.Event()
        self.held_id: str | None = None
        self.url = ""

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        if self.held_id is None and msg["Subject"] != CODE_SUBJECT:  # not a code mail
            self.held_id = msg["Message-ID"]
            self._loop.call_soon_threadsafe(self.held.set)
            await asyncio.to_thread(self.release.wait, 60)  # set by stop()
            return "451 4.3.0 never acknowledged"
        return await super().handle_DATA(server, session, envelope)

    def accepted(self) -> Counter:
        return Counter(m["Message-ID"] for m in self.messages)

    async def wait_for(self, predicate, timeout: float) -> None:
        await self.wait_messages(1, timeout)
        assert predicate()


def deliveries(db: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute(
            "SELECT event_id, channel, status, attempts FROM deliveries ORDER BY id"
        ).fetchall()
    conn.close()
    return rows


async def add_channel(http, server: ServerProcess, headers: dict, kind: str, receiver) -> int | str:
    if kind == "email":
        return "email"
    body = (
        {"type": "webhook", "url": receiver.url + "/hook", "format": "json"}
        if kind == "webhook"
        else {"type": "telegram", "chat_id": "4242"}
    )
    async with http.post(server.url + "/api/v1/channels", headers=headers, json=body) as r:
        assert r.status == 201, await r.text()
        channel = await r.json()
    if kind == "webhook":
        receiver.secret = channel["secret"]  # the receiver checks every signature
    return channel["id"]


@pytest.mark.parametrize("kind", ["email", "webhook", "telegram"])
async def test_sigkill_with_a_delivery_in_flight_delivers_it_once_after_restart(tmp_path, kind):
    smtp_port = free_port()
    receiver = {
        "email": lambda: HoldingSmtp(smtp_port),
        "webhook": HoldingWebhook,
        "telegram": HoldingTelegram,
    }[kind]()
    async with FakeBinance() as fake, receiver, aiohttp.ClientSession() as http:
        servers = [
            ServerProcess(tmp_path, name, fake.url, smtp_port) for name in ("first", "second")
        ]
        for server in servers:
            server.env.update(
                {
                    "PRICEWATCH_ALLOW_PRIVATE_WEBHOOKS": "true",
                    "PRICEWATCH_TELEGRAM_BOT_TOKEN": "123:abc",
                    "PRICEWATCH_TELEGRAM_API_URL": receiver.url or "http://127.0.0.1:9",
                    "PRICEWATCH_DELIVERY_RETRY_BASE": "0.05",
                    # The held request must still be in flight when the kill comes.
                    "PRICEWATCH_DELIVERY_TIMEOUT": "60",
                    "PRICEWATCH_SMTP_TIMEOUT": "60",
                }
            )
        first, second = servers
        db = first.env["PRICEWATCH_DB"]
        try:
            await first.start(http, fake, connections=1)
            user = await register(http, first)
            headers = bearer(user["access"])
            channel = await add_channel(http, first, headers, kind, receiver)
            async with http.post(
                first.url + "/api/v1/alerts",
                headers=headers,
                json={
                    "asset": SYMBOL,
                    "price": TARGET,
                    "direction": "above",
                    "channels": [channel],
                },
            ) as r:
                assert r.status == 201, await r.text()
                alert = await r.json()

            await fake.send_trade(SYMBOL, 1, CROSSING, 1, trade_time(0))
            await asyncio.wait_for(receiver.held.wait(), 10)  # sent, never answered
            await first.kill()
            assert "Traceback" not in first.stderr(), first.stderr()
            [(event_id, channel_type, status, attempts)] = deliveries(db)
            assert (channel_type, status, attempts) == (kind, "pending", 0)
            assert not receiver.accepted(), "the held delivery was accepted"

            await second.start(http, fake, connections=2)
            await receiver.wait_for(lambda: len(receiver.accepted()) >= 1, timeout=15)
            # A graceful stop records the accepted delivery; nothing can come after it.
            assert await second.terminate() == 0
            assert not any(s in second.stderr() for s in FORBIDDEN), second.stderr()

            accepted = receiver.accepted()
            assert list(accepted.values()) == [1], accepted
            [key] = accepted
            if kind == "webhook":  # the same event: resent, not a new one
                assert key == str(event_id) == receiver.held_request[0]["X-Pricewatch-Event"]
            elif kind == "telegram":
                assert f"#{alert['id']}" in key
                held = receiver.held_request[1].decode()
                assert f"#{alert['id']}" in held, held
            else:
                assert key == receiver.held_id, (key, receiver.held_id)
            assert deliveries(db) == [(event_id, kind, "sent", 1)]
        finally:
            for server in servers:
                await server.cleanup()
