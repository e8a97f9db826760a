"""The rows the store returns: small frozen dataclasses, never sqlite rows.

Each has `public()`, its shape on the wire (store.py re-exports them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from . import clock


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    email: str
    password_hash: str
    is_admin: bool
    email_verified: bool = True  # False until the address is confirmed with a mailed code

    def public(self) -> dict:
        return {
            "id": self.id,
            "username": self.username,
            "email": self.email,
            "is_admin": self.is_admin,
            "email_verified": self.email_verified,
        }


class Hit(NamedTuple):
    """An alert the tick path found crossed, for the trigger writer (see alerts.py)."""

    alert_id: int
    asset: str
    target: float  # price (price alerts) or percent (percent alerts) and direction when it
    direction: str  # matched: an alert changed since is skipped
    price: float  # the triggering trade's price (the target for a kline)
    at: float  # the triggering trade's time, epoch seconds (a kline's open time)
    backfill: str | None = None  # "trade" or "kline" when found in recovered data
    window: str | None = None  # a percent alert's window when it matched


class Arm(NamedTuple):
    """A repeating alert's step back towards CREATED, for the trigger writer: `armed` False
    when its cooldown has passed (a price alert then waits for the price to go back across
    its target), True when it may trigger again."""

    alert_id: int
    armed: bool


@dataclass(frozen=True, slots=True)
class Event:
    """One trigger of an alert, with its deliveries as ((channel id, type, state), ...)."""

    id: int
    alert_id: int
    user_id: int
    time: float
    price: float
    backfill: str | None = None
    deliveries: tuple[tuple[int | str, str, str], ...] = ()

    def public(self) -> dict:
        return {
            "id": self.id,
            "alert_id": self.alert_id,
            "time": clock.iso(self.time),
            "price": self.price,
            "backfill": self.backfill,
            "deliveries": [{"channel": c, "type": t, "state": s} for c, t, s in self.deliveries],
        }

    def brief(self) -> dict:
        """The shape carried by `{"type": "alert"}` live messages."""
        return {"id": self.id, "time": clock.iso(self.time), "price": self.price}


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    user_id: int
    asset: str
    price: float | None  # None for percent alerts
    direction: str  # above/below (price), up/down/any (percent)
    status: str
    created_at: float
    triggered_at: float | None
    triggered_price: float | None
    notified: str | None
    note: str | None = None
    backfill: str | None = None  # set when triggered by recovered data: "trade" or "kline"
    kind: str = "price"
    percent: float | None = None
    window: str | None = None
    repeat: bool = False
    cooldown: float = 3600.0
    expires_at: float | None = None
    trigger_count: int = 0
    rearm_at: float | None = None  # a repeating alert in its cooldown: when it ends
    armed: bool = True  # False: a re-armed price alert waiting for the far side
    channels: tuple[int | str, ...] = ("email",)  # where its events are delivered
    event: Event | None = None  # the event just recorded (store.trigger_alerts only)

    def public(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "asset": self.asset,
            "price": self.price,
            "percent": self.percent,
            "window": self.window,
            "direction": self.direction,
            "status": self.status,
            "created": clock.iso(self.created_at),
            "triggered_at": clock.iso(self.triggered_at),
            "triggered_price": self.triggered_price,
            "notified": self.notified,
            "backfill": self.backfill,
            "repeat": self.repeat,
            "cooldown": self.cooldown,
            "expires_at": clock.iso(self.expires_at),
            "note": self.note,
            "channels": list(self.channels),
            "trigger_count": self.trigger_count,
        }


@dataclass(frozen=True, slots=True)
class Quote:
    id: int
    from_currency: str
    to_currency: str
    rate: float
    bid: float | None
    ask: float | None
    source_time: str
    fetched_at: float

    def public(self) -> dict:
        return {
            "id": self.id,
            "from_currency": self.from_currency,
            "to_currency": self.to_currency,
            "rate": self.rate,
            "bid": self.bid,
            "ask": self.ask,
            "source_time": self.source_time,
            "fetched_at": clock.iso(self.fetched_at),
        }


EMAIL = "email"  # the id of every user's email channel (other channels have integer ids)


@dataclass(frozen=True, slots=True)
class Channel:
    """Where a user's notifications go: their email (id "email"), a webhook or a Telegram
    chat (integer ids, rows of `channels`)."""

    id: int | str
    user_id: int
    type: str  # "email", "webhook" or "telegram"
    url: str | None = None  # webhook
    format: str | None = None  # webhook: json, discord or slack
    secret: str | None = None  # webhook: the HMAC key (shown once, at creation)
    chat_id: str | None = None  # telegram
    address: str | None = None  # email: the user's address now
    verified: bool = True  # email: whether that address is verified
    created_at: float | None = None

    def public(self, with_secret: bool = False) -> dict:
        body: dict = {"id": self.id, "type": self.type}
        if self.type == "email":
            body.update(email=self.address, verified=self.verified)
        elif self.type == "webhook":
            body.update(url=self.url, format=self.format)
            if with_secret:
                body["secret"] = self.secret
        else:
            body["chat_id"] = self.chat_id
        body["created"] = clock.iso(self.created_at)
        return body


@dataclass(frozen=True, slots=True)
class Delivery:
    """One pending delivery of an event to a channel, with what its message needs: the alert
    as it was triggered by this event (`triggered_at`, `triggered_price`, `backfill` are the
    event's) and the channel as it is now (an email goes to the user's current address)."""

    id: int
    attempts: int
    alert: Alert
    event: Event
    channel: Channel
    held: bool = False  # over the hourly budget: goes out in a digest
    created_at: float = 0.0  # when the trigger queued it

    @property
    def recipient(self) -> str:
        """Where it goes, for logs and the record: an address, a URL's host, a chat id."""
        ch = self.channel
        if ch.type == "email":
            return ch.address or ""
        if ch.type == "telegram":
            return f"telegram chat {ch.chat_id}"
        return f"webhook {ch.id}"


@dataclass(frozen=True, slots=True)
class RotateResult:
    """Outcome of presenting a refresh token: status is ok, unknown, revoked or reused."""

    status: str
    user_id: int | None = None
    family: str | None = None
