"""The one formatter of notification texts: email, Telegram, Discord and Slack all say the
same things (asset, kind, target, trigger price, time in UTC, note) from here.

`render(batch)` gives a title and a plain-text body for one delivery or a digest of several;
`chat(batch, limit)` is the same as one text for chat services, cut to their size limit;
`event_json(delivery)` is the body of a `json` webhook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from .. import clock
from ..records import Alert, Delivery

MOVES = {"up": "up", "down": "down", "any": "up or down"}


class Message(NamedTuple):
    title: str
    body: str


def plain(value: float | None) -> str:
    """A price in full, as a person writes it: 60018.26, 1250000, 0.00000123 (never 6e+04)."""
    if value is None:
        return "-"
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def condition(alert: Alert) -> str:
    """What the alert waits for, in a few words: `above 100000`, `5% up or down within 1h`."""
    if alert.kind == "percent":
        return f"{plain(alert.percent)}% {MOVES[alert.direction]} within {alert.window}"
    return f"{alert.direction} {plain(alert.price)}"


def title(delivery: Delivery) -> str:
    alert = delivery.alert
    if alert.kind == "percent":
        return f"pricewatch: {alert.asset} moved {condition(alert)}"
    return f"pricewatch: {alert.asset} {condition(alert)} reached"


def _details(delivery: Delivery, public_url: str | None) -> str:
    alert, event = delivery.alert, delivery.event
    if alert.kind == "percent":
        what = f"Move:          {condition(alert)} (trailing window)\n"
    else:
        sign = ">=" if alert.direction == "above" else "<="
        what = f"Target:        {plain(alert.price)} ({alert.direction}: price {sign} target)\n"
    note = f"Note:          {alert.note}\n" if alert.note else ""
    link = f"Live prices:   {public_url}/\n" if public_url else ""
    return (
        f"Your {alert.kind} alert #{alert.id} has triggered.\n\n"
        f"Asset:         {alert.asset}\n" + what + f"Trigger price: {plain(event.price)}\n"
        f"Time (UTC):    {clock.iso(event.time)}\n" + note + link
    )


def digest_line(delivery: Delivery) -> str:
    """One trigger of a digest: `#12 BTCUSDT above 100000: 100012.5 at 2026-...Z (note)`."""
    alert, event = delivery.alert, delivery.event
    note = f" ({alert.note})" if alert.note else ""
    return (
        f"#{alert.id} {alert.asset} {condition(alert)}: {plain(event.price)}"
        f" at {clock.iso(event.time)}{note}"
    )


def render(batch: Sequence[Delivery], public_url: str | None = None) -> Message:
    """The title and body of the message about `batch` (one delivery, or a digest)."""
    if len(batch) == 1:
        return Message(title(batch[0]), _details(batch[0], public_url))
    link = f"\nLive prices: {public_url}/\n" if public_url else ""
    return Message(
        f"pricewatch: {len(batch)} alerts triggered (digest)",
        f"{len(batch)} alert triggers went beyond your hourly notification budget on this"
        " channel; here they are together, oldest first.\n\n"
        + "".join(digest_line(d) + "\n" for d in batch)
        + link,
    )


def chat(
    batch: Sequence[Delivery],
    limit: int,
    public_url: str | None = None,
    utf16: bool = False,
    escape: Callable[[str], str] | None = None,
) -> str:
    """One text for a chat service (title, blank line, body), at most `limit` characters
    (`utf16`: UTF-16 code units, as Telegram counts them: an emoji is two): a digest too
    long loses its last lines, replaced by how many were left out. `escape` (the service's
    markup escaping) is applied before the text is measured."""

    def size(text: str) -> int:
        return len(text.encode("utf-16-le")) // 2 if utf16 else len(text)

    msg = render(batch, public_url)
    text = f"{msg.title}\n\n{msg.body}".rstrip("\n")
    if escape is not None:
        text = escape(text)
    if size(text) <= limit:
        return text
    lines = text.split("\n")
    keep = len(lines) - 1
    while keep > 0:  # drop lines from the end until the rest and the summary fit
        more = f"... and {len(lines) - keep} more lines (GET /api/v1/events lists them all)"
        cut = "\n".join([*lines[:keep], more])
        if size(cut) <= limit:
            return cut
        keep -= max(1, (size(cut) - limit) // 200)  # long digests: several lines a step
    text = text[:limit]
    while size(text) > limit:
        text = text[:-1]
    return text


def event_json(delivery: Delivery) -> dict:
    """A `json` webhook's body for one event: {event_id, alert, price, time}."""
    event = delivery.event
    return {
        "event_id": event.id,
        "alert": delivery.alert.public(),
        "price": event.price,
        "time": clock.iso(event.time),
    }
