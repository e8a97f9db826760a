"""SQLite persistence: the entry point of the only package that speaks SQL (its schema's DDL
is in schema.py; the SQL itself in pricewatch/storage/, one module per concern).

One writer connection (serialised by a lock, explicit `BEGIN IMMEDIATE` transactions) and
one reader connection (WAL lets it read committed data while a write is in progress).
Every write method returns only after COMMIT, so a 2xx answer built on it is durable.
Rows come back as dataclasses, never as sqlite rows.
"""

from __future__ import annotations

from .records import Alert, Channel, Delivery, Event, Quote, RotateResult, User
from .storage.accounts import AccountsMixin, bcrypt_cost
from .storage.alerts import AlertsMixin
from .storage.base import (
    Conflict,
    Database,
    NotFound,
    StorageUnavailable,
    StoreError,
    UnknownUser,
    log_failure,
)
from .storage.deliveries import DeliveriesMixin
from .storage.market import MarketMixin

__all__ = [
    "Alert",
    "Channel",
    "Conflict",
    "Delivery",
    "Event",
    "NotFound",
    "Quote",
    "RotateResult",
    "StorageUnavailable",
    "Store",
    "StoreError",
    "UnknownUser",
    "User",
    "bcrypt_cost",
    "log_failure",
]


class Store(AccountsMixin, AlertsMixin, DeliveriesMixin, MarketMixin, Database):
    """The database. Open with `await Store.open(path)`, close with `await store.close()`."""
