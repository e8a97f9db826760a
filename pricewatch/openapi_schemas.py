"""The JSON Schemas (2020-12) of the OpenAPI document's components, and the helpers that
build them; openapi.py holds the table of operations that refers to them."""

from __future__ import annotations

from typing import Any

from . import compat
from .alerts_api import (
    CHANNELS_TEXT,
    DEFAULT_COOLDOWN,
    DIRECTIONS,
    KINDS,
    MAX_COOLDOWN,
    MAX_NOTE,
    MIN_COOLDOWN,
    STATUSES,
)
from .channels_api import FORMATS, MAX_CHAT_ID, MAX_URL
from .ohlc import TIMEFRAMES
from .percent_index import MIN_PERCENT, PERCENT_DIRECTIONS, WINDOWS

Schema = dict[str, Any]

# -- schema helpers -------------------------------------------------------------------------

STR: Schema = {"type": "string"}
NUM: Schema = {"type": "number"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "format": "date-time", "description": "ISO-8601 UTC"}
CHANNEL_ID: Schema = {
    "oneOf": [{"type": "string", "enum": ["email"]}, {"type": "integer", "minimum": 1}]
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def obj(
    required: dict[str, Schema],
    optional: dict[str, Schema] | None = None,
    *,
    closed: bool = True,
    description: str | None = None,
) -> Schema:
    """An object schema. `closed` (for responses) forbids properties not listed."""
    schema: Schema = {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
    }
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def schemas(symbols: tuple[str, ...] | None) -> dict[str, Schema]:
    """The named schemas; `symbols` (the watched markets) becomes the Symbol enum."""
    symbol = enum(*symbols) if symbols else {"type": "string", "pattern": "^[A-Z0-9]{2,20}$"}
    currency = {"type": "string", "pattern": "^[A-Za-z0-9]{2,10}$", "examples": ["BTC"]}
    page_link = nullable({"type": "string", "format": "uri"})
    register = obj(
        {
            "username": {"type": "string", "pattern": "^[A-Za-z0-9@.+_-]{3,150}$"},
            "password": {
                "type": "string",
                "minLength": 8,
                "maxLength": 72,
                "description": "8 characters to 72 bytes, no NUL.",
            },
            "email": {
                "type": "string",
                "maxLength": 254,
                "pattern": r"^[^@\s]+@[^@\s]+\.[^@\s.]+$",
            },
        },
        closed=False,
    )
    alert = obj(
        {
            "id": INT,
            "kind": enum(*KINDS),
            "asset": STR,
            "price": nullable(NUM),
            "percent": nullable(NUM),
            "window": nullable(enum(*WINDOWS)),
            "direction": enum(*DIRECTIONS, *PERCENT_DIRECTIONS),
            "status": enum(*STATUSES),
            "created": TIME,
            "triggered_at": nullable(TIME),
            "triggered_price": nullable(NUM),
            "notified": nullable(enum("pending", "sent", "failed")),
            "backfill": nullable(enum("trade", "kline")),
            "repeat": BOOL,
            "cooldown": NUM,
            "expires_at": nullable(TIME),
            "note": nullable(STR),
            "channels": array(CHANNEL_ID),
            "trigger_count": INT,
        }
    )
    alert_fields = {
        "kind": {**enum(*KINDS), "default": "price"},
        "price": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "Price alerts: the target (required).",
        },
        "percent": {
            "type": "number",
            "minimum": MIN_PERCENT,
            "maximum": 100,
            "description": "Percent alerts: the move (required).",
        },
        "window": {
            **enum(*WINDOWS),
            "description": "Percent alerts: the trailing window (required).",
        },
        "direction": {
            **enum(*DIRECTIONS, *PERCENT_DIRECTIONS),
            "description": "above/below (price; derived from the latest price "
            "when omitted), up/down/any (percent; default any).",
        },
        "repeat": BOOL,
        "cooldown": {
            "type": "number",
            "minimum": MIN_COOLDOWN,
            "maximum": MAX_COOLDOWN,
            "default": DEFAULT_COOLDOWN,
        },
        "expires_at": nullable({**TIME, "description": "ISO-8601 UTC, in the future."}),
        "note": nullable({"type": "string", "maxLength": MAX_NOTE}),
        "channels": {
            **array(CHANNEL_ID),
            "minItems": 1,
            "maxItems": 64,
            "description": CHANNELS_TEXT,
        },
    }
    event = obj(
        {
            "id": INT,
            "alert_id": INT,
            "time": TIME,
            "price": NUM,
            "backfill": nullable(enum("trade", "kline")),
            "deliveries": array(
                obj(
                    {
                        "channel": CHANNEL_ID,
                        "type": enum("email", "webhook", "telegram"),
                        "state": enum("pending", "sent", "failed", "skipped"),
                    }
                )
            ),
        }
    )
    seed_alert = {
        **alert["properties"],
        "alert_purpose": nullable(STR),
        "alert_price": NUM,
        "alert_status": enum(*STATUSES),
    }
    seed_user = {"type": "string", "minLength": 1, "description": "Must be the token's user."}
    purpose = {"type": "string", "minLength": 1, "maxLength": compat.MAX_PURPOSE}
    return {
        "Error": obj(
            {"error": STR, "detail": STR},
            {
                "fields": {
                    "type": "object",
                    "additionalProperties": STR,
                    "description": "Only for `validation`: field -> message.",
                }
            },
        ),
        "Symbol": {**symbol, "description": "A watched market (Binance symbol); any case."},
        "Register": register,
        "Registered": obj(
            {"id": INT, "username": STR, "email": STR, "access": STR, "refresh": STR}
        ),
        "Login": obj(
            {
                "username": {"type": "string", "minLength": 1},
                "password": {"type": "string", "minLength": 1},
            },
            closed=False,
        ),
        "Refresh": obj({"refresh": {"type": "string", "minLength": 1}}, closed=False),
        "TokenPair": obj(
            {"access": STR, "refresh": STR},
            description="HS256 JWTs; claims token_type, user_id, exp, iat, jti.",
        ),
        "User": obj(
            {"id": INT, "username": STR, "email": STR, "is_admin": BOOL, "email_verified": BOOL}
        ),
        "EmailIn": obj({"email": register["properties"]["email"]}, closed=False),
        "VerifyIn": obj({"code": {"type": "string", "pattern": "^[0-9]{6}$"}}, closed=False),
        "Verified": obj({"email_verified": {"const": True}}),
        "CodeSent": obj({"email": STR, "expires_at": TIME}),
        "Price": obj(
            {
                "symbol": STR,
                "price": NUM,
                "bid": nullable(NUM),
                "ask": nullable(NUM),
                "time": TIME,
                "open_24h": nullable(NUM),
                "high_24h": nullable(NUM),
                "low_24h": nullable(NUM),
                "volume_24h": nullable(NUM),
                "change_24h": nullable(NUM),
            },
            description="Latest trade and book; the *_24h figures roll over the "
            "1m candles of the last 24 h (change_24h in percent).",
        ),
        "PriceList": obj({"results": array(ref("Price"))}),
        "Candle": obj(
            {
                "timestamp": TIME,
                "open": NUM,
                "high": NUM,
                "low": NUM,
                "close": NUM,
                "volume": NUM,
                "trades": INT,
            }
        ),
        "Ohlc": obj(
            {"symbol": STR, "timeframe": enum(*TIMEFRAMES), "data": array(ref("Candle"))},
            description="Oldest first; the last candle may still be open.",
        ),
        "QuoteIn": obj(
            {},
            {"from_currency": currency, "to_currency": currency},
            closed=False,
            description="Defaults: the first PRICEWATCH_QUOTE_PAIRS.",
        ),
        "Quote": obj(
            {
                "id": INT,
                "from_currency": STR,
                "to_currency": STR,
                "rate": NUM,
                "bid": nullable(NUM),
                "ask": nullable(NUM),
                "source_time": {"type": "string", "description": "AlphaVantage's time"},
                "fetched_at": TIME,
            }
        ),
        "QuotePage": obj(
            {
                "count": INT,
                "page": INT,
                "per_page": INT,
                "pages": INT,
                "next": page_link,
                "previous": page_link,
                "results": array(ref("Quote")),
            }
        ),
        "QuoteAll": obj({"count": INT, "results": array(ref("Quote"))}),
        "AlertIn": obj(
            {"asset": ref("Symbol")},
            alert_fields,
            closed=False,
            description="A price alert needs price; a percent alert percent "
            "and window (and no price).",
        ),
        "AlertPatch": obj({}, {"asset": ref("Symbol"), **alert_fields}, closed=False),
        "Alert": alert,
        "AlertPage": obj(
            {"count": INT, "next": page_link, "previous": page_link, "results": array(ref("Alert"))}
        ),
        "Event": event,
        "EventPage": obj(
            {"count": INT, "next": page_link, "previous": page_link, "results": array(ref("Event"))}
        ),
        "Health": obj(
            {
                "status": enum("ok", "stale", "degraded", "error"),
                "db": STR,
                "feeds": {
                    "type": "object",
                    "additionalProperties": {"type": "object"},
                    "description": "Feed name -> its state and counters.",
                },
            },
            {"stale_feeds": array(STR), "degraded_feeds": array(STR)},
        ),
        "FeedIn": obj(
            {"url": {"type": "string", "pattern": "^wss?://", "maxLength": 2048}}, closed=False
        ),
        "SaveQuotesIn": obj(
            {"api_url": {"type": "string", "pattern": "^wss?://", "maxLength": 2048}}, closed=False
        ),
        "FeedDelete": {"anyOf": [obj({"id": INT}, closed=False), obj({"url": STR}, closed=False)]},
        "Feed": obj({"id": INT, "url": STR, "name": STR, "health": {"type": "object"}}),
        "FeedList": obj({"results": array(ref("Feed"))}),
        "ChannelIn": obj(
            {"type": enum("webhook", "telegram")},
            {
                "url": {
                    "type": "string",
                    "pattern": "^https?://",
                    "maxLength": MAX_URL,
                    "description": "webhook: where events are POSTed (public hosts only).",
                },
                "format": {**enum(*FORMATS), "default": "json"},
                "chat_id": {
                    "anyOf": [INT, {"type": "string", "maxLength": MAX_CHAT_ID}],
                    "description": "telegram: a chat id, or a public channel's @name.",
                },
            },
            closed=False,
        ),
        "Channel": obj(
            {
                "id": CHANNEL_ID,
                "type": enum("email", "webhook", "telegram"),
                "created": nullable(TIME),
            },
            {
                "email": STR,
                "verified": BOOL,
                "url": STR,
                "format": enum(*FORMATS),
                "chat_id": STR,
                "secret": {
                    "type": "string",
                    "description": "webhook: the HMAC key, in the 201 answer only.",
                },
            },
        ),
        "ChannelList": obj({"results": array(ref("Channel"))}),
        # seed-compatible routes (compat.py)
        "SeedRegister": {
            **register,
            "required": ["username", "password"],
            "description": "The email may be left out.",
        },
        "SeedAccessToken": obj({"access_token": STR}, description="An access token."),
        "SeedAlertIn": obj(
            {
                "username": seed_user,
                "alert_purpose": purpose,
                "alert_price": {
                    "anyOf": [
                        {"type": "number", "exclusiveMinimum": 0},
                        {
                            "type": "string",
                            "pattern": r"^[0-9]{1,15}(\.[0-9]{1,8})?$",
                            "description": compat.SEED_DECIMAL_TEXT,
                        },
                    ]
                },
            },
            {"asset": ref("Symbol")},
            closed=False,
            description="asset defaults to the first watched symbol.",
        ),
        "SeedAlertDelete": obj({"username": seed_user, "alert_purpose": purpose}, closed=False),
        "SeedAlertFetch": obj(
            {"username": seed_user}, {"alert_status": enum(*STATUSES)}, closed=False
        ),
        "SeedAlert": obj(
            seed_alert,
            description="An alert in the tanX.fi price alert app's "
            "names (alert_purpose is the alert's note) and pricewatch's.",
        ),
        "SeedAlertCreated": obj({"username": STR, **seed_alert}),
        "SeedAlertList": obj({"username": STR, "alert details": array(ref("SeedAlert"))}),
    }
