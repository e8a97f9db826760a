"""Telegram: `sendMessage` through the Bot API, one kept-alive session.

The bot token is in the URL path (`/bot<token>/sendMessage`): it is never logged and is
taken out of every error text this sink returns (aiohttp's exceptions may carry the URL).
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
import orjson

from ..config import Settings
from ..records import Delivery
from ..upstream_read import read_head
from .base import Failed, Outcome, Retry, Sent
from .http import RESPONSE_HEAD, describe, json_head, redact, seconds
from .message import chat

TEXT_LIMIT = 4096  # characters of a Telegram message


def chat_id(raw: str | None) -> int | str:
    """A chat id as the Bot API takes it: an integer, or a "@channelname" string."""
    text = (raw or "").strip()
    try:
        return int(text)
    except ValueError:
        return text


class TelegramSink:
    type = "telegram"
    concurrency = 8

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None

    @property
    def configured(self) -> bool:
        return bool(self.settings.telegram_bot_token)

    @property
    def _secrets(self) -> tuple[str, ...]:
        return (self.settings.telegram_bot_token or "",)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self.settings.delivery_timeout),
            headers={"User-Agent": "pricewatch"},
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def send(self, batch: Sequence[Delivery]) -> Outcome:
        s = self.settings
        if not self.configured:
            return Retry("PRICEWATCH_TELEGRAM_BOT_TOKEN is not set")
        url = f"{s.telegram_api_url.rstrip('/')}/bot{s.telegram_bot_token}/sendMessage"
        raw = orjson.dumps(
            {
                "chat_id": chat_id(batch[0].channel.chat_id),
                "text": chat(batch, TEXT_LIMIT, s.public_url, utf16=True),
            }
        )
        try:
            session = self.session
            assert session is not None, "send() before start()"
            async with session.post(
                url, data=raw, allow_redirects=False, headers={"Content-Type": "application/json"}
            ) as resp:
                # A sent message's answer repeats it (up to 4096 characters and entities).
                answer = json_head(
                    await read_head(resp, min(4 * RESPONSE_HEAD, s.upstream_max_bytes))
                )
                status = resp.status
        except Exception as exc:
            return describe(exc, self._secrets)
        if 200 <= status < 300 and answer.get("ok") is not False:
            return Sent()
        code = answer.get("error_code", status)
        error = redact(f"telegram {code}: {answer.get('description', '')}"[:500], self._secrets)
        if code == 429 or status == 429 or status >= 500:
            params = answer.get("parameters")
            after = seconds(params.get("retry_after")) if isinstance(params, dict) else None
            if after is None:
                after = seconds(resp.headers.get("Retry-After"))
            return Retry(error, after)
        return Failed(error)
