"""Webhooks: a signed POST of the event (json) or its text (discord, slack).

One ClientSession per sink: connections stay open per host and are reused by the next
sends. Unless PRICEWATCH_ALLOW_PRIVATE_WEBHOOKS, every connection is made by a resolver that
refuses a host with any non-public address, so the address checked is the one connected to
(DNS cannot change in between); an IP-literal URL (never resolved) is checked before the
request. Redirects are never followed. Only the first RESPONSE_HEAD bytes of an answer are
read.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
from collections.abc import Sequence

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from ..addresses import is_public_address
from ..config import Settings
from ..records import Delivery
from ..upstream_read import read_head
from .base import Failed, Outcome, Retry, Sent
from .http import RESPONSE_HEAD, describe, retry_after
from .message import chat, event_json

LIMITS = {"discord": 2000, "slack": 3000}  # characters of a message's text


class HostRefused(Exception):
    """The webhook's host has a non-public address (and private ones are not allowed)."""


class PublicResolver(AbstractResolver):
    """The default resolver, refusing a host when any of its addresses is not public."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            if not is_public_address(info["host"]):
                raise HostRefused(f"{host} resolves to a non-public address ({info['host']})")
        if not infos:
            raise HostRefused(f"{host} has no address")
        return infos

    async def close(self) -> None:
        await self._inner.close()


def slack_escape(text: str) -> str:
    """Text as Slack takes it literally: `&`, `<` and `>` escaped (Slack's control
    sequences, `<!channel>`, `<!here>`, `<!everyone>`, `<@U123>`, are written in `<...>`)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def body(batch: Sequence[Delivery], format: str, public_url: str | None) -> bytes:
    """The raw body of the POST about `batch` in the channel's format. A note saying
    `@everyone`, `<@id>` or `<!channel>` pings nobody: Discord is told to parse no mention
    (`allowed_mentions`), Slack gets the text escaped."""
    if format == "discord":
        return orjson.dumps(
            {"content": chat(batch, LIMITS[format], public_url), "allowed_mentions": {"parse": []}}
        )
    if format == "slack":
        return orjson.dumps({"text": chat(batch, LIMITS[format], public_url, escape=slack_escape)})
    if len(batch) == 1:
        return orjson.dumps(event_json(batch[0]))
    return orjson.dumps({"digest": True, "events": [event_json(d) for d in batch]})


def signature(secret: str, raw: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


MAX_EVENT_IDS = 100  # a digest's X-Pricewatch-Event lists at most this many ids


def event_header(batch: Sequence[Delivery]) -> str:
    """X-Pricewatch-Event: the event id; a digest's ids comma-separated, or FIRST-LAST
    beyond MAX_EVENT_IDS (a header line must stay short: proxies refuse ~8 KB ones)."""
    ids = [d.event.id for d in batch]
    if len(ids) > MAX_EVENT_IDS:
        return f"{min(ids)}-{max(ids)}"
    return ",".join(map(str, ids))


class WebhookSink:
    type = "webhook"
    concurrency = 64
    per_user = 8  # sends in flight per user: a receiver that hangs holds an eighth at most
    configured = True

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session: aiohttp.ClientSession | None = None
        self._resolver: PublicResolver | None = None

    async def start(self) -> None:
        if not self.settings.allow_private_webhooks:
            self._resolver = PublicResolver()
        connector = aiohttp.TCPConnector(
            limit=self.concurrency, resolver=self._resolver, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(
                total=self.settings.delivery_timeout,
                sock_connect=min(5.0, self.settings.delivery_timeout),
            ),
            headers={"User-Agent": "pricewatch"},
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def send(self, batch: Sequence[Delivery]) -> Outcome:
        channel = batch[0].channel
        url = channel.url or ""
        raw = body(batch, channel.format or "json", self.settings.public_url)
        headers = {
            "Content-Type": "application/json",
            "X-Pricewatch-Event": event_header(batch),
            "X-Pricewatch-Signature": signature(channel.secret or "", raw),
        }
        try:
            host = URL(url).host or ""
            if not self.settings.allow_private_webhooks and not _public_literal(host):
                return Failed(f"refused: {host} is not a public address")
            session = self.session
            assert session is not None, "send() before start()"
            async with session.post(url, data=raw, headers=headers, allow_redirects=False) as resp:
                head = await read_head(resp, min(RESPONSE_HEAD, self.settings.upstream_max_bytes))
                status = resp.status
                if 200 <= status < 300:
                    return Sent()
                snippet = " ".join(head[:200].decode(errors="replace").split())
                error = f"HTTP {status}: {snippet}"
                if status == 429 or status >= 500:
                    return Retry(error, retry_after(resp, head))
                if 300 <= status < 400:
                    return Failed(f"HTTP {status}: redirects are not followed")
                return Failed(error)
        except HostRefused as exc:
            return Failed(f"refused: {exc}")
        except Exception as exc:
            return describe(exc, url_secrets(url))


def _public_literal(host: str) -> bool:
    """False for an IP-literal host that is not public (aiohttp never resolves those);
    True for a public one and for names (the resolver checks them)."""
    try:
        return is_public_address(host)
    except ValueError:
        return True


def url_secrets(url: str) -> tuple[str, ...]:
    """What an error text must not show of a webhook URL: its path and query (a Discord or
    Slack webhook's token is there) and any password."""
    try:
        u = URL(url)
        parts = (u.raw_path_qs, u.path_qs, u.raw_password or "", u.password or "")
    except (ValueError, TypeError):
        return (url,)
    return tuple(p for p in parts if len(p) > 1)
