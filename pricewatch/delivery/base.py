"""What a sink is: `send(batch) -> Sent | Retry | Failed`, and nothing else.

A batch is one delivery, or several deliveries of one channel sent as one digest message.
The mechanics (outbox.py) decide when and how often; a sink only transports and classifies
the answer: accepted (Sent), worth another try later (Retry, with the wait the other side
asked for, if any), or never going to work (Failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from ..records import Delivery


class Sent(NamedTuple):
    """The other side accepted the message."""


class Retry(NamedTuple):
    """A temporary failure: try again after `after` seconds (None: the usual backoff)."""

    error: str
    after: float | None = None


class Failed(NamedTuple):
    """A permanent failure: no further attempt."""

    error: str


Outcome = Sent | Retry | Failed


class Sink(Protocol):
    type: str  # the channel type it serves: "email", "webhook", "telegram"
    concurrency: int  # messages in flight at most

    @property
    def configured(self) -> bool:
        """False: deliveries of this type wait (pending) until it is configured."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, batch: Sequence[Delivery]) -> Outcome:
        """Send one message about every delivery of `batch` (all of one channel; more than
        one: a digest). Must not raise for anything the other side does."""
