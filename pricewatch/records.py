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
    target: float  # the alert's target and direction when it matched: a change since skips it
    direction: str
    price: float  # the triggering trade's price (the target for a kline)
    at: float  # the triggering trade's time, epoch seconds (a kline's open time)
    backfill: str | None = None  # "trade" or "kline" when found in recovered data


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    user_id: int
    asset: str
    price: float
    direction: str
    status: str
    created_at: float
    triggered_at: float | None
    triggered_price: float | None
    notified: str | None
    note: str | None = None  # seed 002's alert purpose (compat.py); not in public() yet
    backfill: str | None = None  # set when triggered by recovered data: "trade" or "kline"

    def public(self) -> dict:
        return {
            "id": self.id,
            "asset": self.asset,
            "price": self.price,
            "direction": self.direction,
            "status": self.status,
            "created": clock.iso(self.created_at),
            "triggered_at": clock.iso(self.triggered_at),
            "triggered_price": self.triggered_price,
            "notified": self.notified,
            "backfill": self.backfill,
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
