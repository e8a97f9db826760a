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

    def public(self) -> dict:
        return {"id": self.id, "username": self.username, "email": self.email,
                "is_admin": self.is_admin}


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
    """One trigger of an alert, with its deliveries as ((channel, state), ...)."""

    id: int
    alert_id: int
    user_id: int
    time: float
    price: float
    backfill: str | None = None
    deliveries: tuple[tuple[str, str], ...] = ()

    def public(self) -> dict:
        return {"id": self.id, "alert_id": self.alert_id, "time": clock.iso(self.time),
                "price": self.price, "backfill": self.backfill,
                "deliveries": [{"channel": c, "state": s} for c, s in self.deliveries]}

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
            "channels": ["email"],
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


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A queued email with the alert it is about."""

    id: int
    recipient: str
    attempts: int
    alert: Alert


@dataclass(frozen=True, slots=True)
class RotateResult:
    """Outcome of presenting a refresh token: status is ok, unknown, revoked or reused."""

    status: str
    user_id: int | None = None
    family: str | None = None
