"""HTTP handlers for `/api/v1/channels`: where a user's alert notifications go.

Every user has their email (channel "email", listed first while they have an address; it is
changed with `PATCH /auth/me`, never deleted here: 409). They may add webhooks and Telegram
chats, at most MAX_CHANNELS channels in all (the email counts as one). A webhook's `secret`
is generated here and shown once, in the 201 answer. As with alerts, another user's channel
answers 404.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from aiohttp import web

from .addresses import check_public_url
from .api import REQUIRED, ApiError, invalid, json_response, not_found, read_json, strict_int
from .auth import AUTH, require_identity
from .delivery.outbox import DELIVERER
from .limits import SlidingWindow
from .records import EMAIL
from .store import NotFound

MAX_CHANNELS = 10
ADDS_PER_HOUR = 30  # channel creations per user an hour (each may cost a DNS lookup)
MAX_URL = 2048
MAX_CHAT_ID = 64
FORMATS = ("json", "discord", "slack")
TYPES = ("webhook", "telegram")
# A chat's numeric id (groups and channels are negative), or a public "@channelname".
CHAT_ID = re.compile(r"-?[0-9]{1,19}|@[A-Za-z0-9_]{1,63}")


async def _webhook(request: web.Request, data: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, str] = {}
    url = data.get("url")
    if url is None or url == "":
        errors["url"] = REQUIRED
    elif not isinstance(url, str) or len(url) > MAX_URL:
        errors["url"] = f"A URL of at most {MAX_URL} characters is required."
    fmt = data.get("format")
    fmt = "json" if fmt is None else fmt
    if fmt not in FORMATS:
        errors["format"] = "Must be one of " + ", ".join(FORMATS) + "."
    if errors:
        raise invalid(errors)
    assert isinstance(url, str)  # else an error above
    url = url.strip()
    settings = request.app[AUTH].settings
    await check_public_url(
        url,
        settings.allow_private_webhooks,
        schemes=("http", "https"),
        flag="PRICEWATCH_ALLOW_PRIVATE_WEBHOOKS",
    )
    return {"url": url, "format": fmt, "secret": secrets.token_hex(32)}


def _telegram(request: web.Request, data: dict[str, Any]) -> dict[str, Any]:
    if not request.app[AUTH].settings.telegram_bot_token:
        raise invalid(
            {
                "type": "Telegram channels need PRICEWATCH_TELEGRAM_BOT_TOKEN to be "
                "set on the server."
            }
        )
    raw = data.get("chat_id")
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if raw is None or raw == "":
        raise invalid({"chat_id": REQUIRED})
    if (
        not isinstance(raw, str)
        or len(raw.strip()) > MAX_CHAT_ID
        or not CHAT_ID.fullmatch(raw.strip())
    ):
        raise invalid(
            {
                "chat_id": "A chat id: an integer, or a public channel's "
                f'"@name" (at most {MAX_CHAT_ID} characters).'
            }
        )
    return {"chat_id": raw.strip()}


async def list_channels(request: web.Request) -> web.Response:
    identity = require_identity(request)
    channels = await request.app[AUTH].store.list_channels(identity.user_id)
    return json_response({"results": [c.public() for c in channels]})


async def add_channel(request: web.Request) -> web.Response:
    """201 with the channel (a webhook's secret included, this once); 400 naming bad
    fields; 409 when the user has MAX_CHANNELS channels already."""
    identity = require_identity(request)
    data = await read_json(request)
    adds = request.app[CHANNEL_ADDS]
    wait = adds.check(str(identity.user_id))
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"At most {ADDS_PER_HOUR} channels may be added an hour.",
            headers={"Retry-After": str(wait)},
        )
    adds.hit(str(identity.user_id))
    kind = data.get("type")
    if kind not in TYPES:
        hint = (
            " The email channel is your account's address (PATCH /auth/me)."
            if kind == EMAIL
            else ""
        )
        raise invalid(
            {
                "type": REQUIRED
                if kind in (None, "")
                else "Must be one of " + ", ".join(TYPES) + "." + hint
            }
        )
    fields = await _webhook(request, data) if kind == "webhook" else _telegram(request, data)
    channel = await request.app[AUTH].store.add_channel(
        identity.user_id, kind, MAX_CHANNELS, **fields
    )
    return json_response(channel.public(with_secret=True), status=201)


async def delete_channel(request: web.Request) -> web.Response:
    """204; 404 for an unknown channel or another user's; 409 for the email channel."""
    identity = require_identity(request)
    raw = request.match_info["channel_id"]
    if raw == EMAIL:
        raise ApiError(
            409,
            "conflict",
            "The email channel cannot be deleted; change the address with PATCH /auth/me.",
        )
    channel_id = strict_int(raw)
    if channel_id is None or channel_id < 1:
        raise not_found("Channel not found.")
    try:
        await request.app[AUTH].store.delete_channel(identity.user_id, channel_id)
    except NotFound:
        raise not_found("Channel not found.") from None
    if DELIVERER in request.app:  # deliveries of it already claimed are dropped
        request.app[DELIVERER].channel_deleted(channel_id)
    return web.Response(status=204)


CHANNEL_ADDS = web.AppKey("channel_adds", SlidingWindow)


def add_routes(app: web.Application, add_route) -> None:
    app[CHANNEL_ADDS] = SlidingWindow(ADDS_PER_HOUR, 3600.0)
    add_route(app, "GET", "/api/v1/channels", list_channels)
    add_route(app, "POST", "/api/v1/channels", add_channel)
    add_route(app, "DELETE", "/api/v1/channels/{channel_id}", delete_channel)
