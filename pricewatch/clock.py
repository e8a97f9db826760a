"""Wall-clock time as epoch seconds, and its one wire format (ISO-8601 UTC with `Z`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import overload


def now() -> float:
    """Seconds since the epoch (UTC)."""
    return time.time()


@overload
def iso(ts: float) -> str: ...


@overload
def iso(ts: None) -> None: ...


@overload
def iso(ts: float | None) -> str | None: ...


def iso(ts: float | None) -> str | None:
    """`1700000000.5` -> `"2023-11-14T22:13:20.500Z"`; None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(ms: int) -> str:
    """Epoch milliseconds -> ISO-8601 UTC string."""
    return iso(ms / 1000.0)


def parse_time_ms(raw: str) -> int | None:
    """Milliseconds since the epoch from `raw`: an integer of ms, or ISO-8601 (`Z`, an offset,
    or none for UTC). None when it is neither, or outside years 1970-9999."""
    raw = raw.strip()
    if raw.isascii() and raw.isdigit() and len(raw) <= 15:  # str.isdigit() takes "³" too
        return int(raw)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        ms = int(when.timestamp() * 1000)
    except (OverflowError, OSError, ValueError):
        return None
    return ms if ms >= 0 else None
