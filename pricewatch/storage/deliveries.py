"""Notification channels and the delivery outbox: one row per (event, channel)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import replace

import aiosqlite

from .. import clock
from ..records import EMAIL, Channel, Delivery, Event
from .base import Conflict, Database, NotFound, inserted_id, present
from .rows import ALERT_COLS, CHANNEL_IDS, parse_alert

_CHANNEL_COLS = "id, user_id, type, url, format, secret, chat_id, created_at"
DELIVERY_STATES = ("pending", "sent", "failed", "skipped")
CHANNEL_TYPES = ("email", "webhook", "telegram")


def _channel(row) -> Channel:
    return Channel(
        row[0],
        row[1],
        row[2],
        url=row[3],
        format=row[4],
        secret=row[5],
        chat_id=row[6],
        created_at=row[7],
    )


_UNVERIFIED = (
    "EXISTS (SELECT 1 FROM users u WHERE u.id = deliveries.user_id AND u.email_verified = 0)"
)


async def _renotify(db: aiosqlite.Connection, delivery_ids: Sequence[int]) -> None:
    """Each alert of these deliveries: `notified` sums up its latest event's deliveries."""
    marks = ",".join("?" * len(delivery_ids))
    await db.execute(
        "UPDATE alerts SET notified = (SELECT CASE WHEN COUNT(*) = 0 THEN NULL"
        " WHEN SUM(d.status = 'pending') > 0 THEN 'pending'"
        " WHEN SUM(d.status = 'sent') > 0 THEN 'sent' ELSE 'failed' END"
        " FROM deliveries d WHERE d.event_id = (SELECT MAX(e.id) FROM events e"
        " WHERE e.alert_id = alerts.id))"
        f" WHERE id IN (SELECT alert_id FROM deliveries WHERE id IN ({marks}))",
        list(delivery_ids),
    )


def _pairs(users: Collection[tuple[str, int]]) -> tuple[str, tuple]:
    """A condition leaving out the deliveries of these (type, user id) pairs."""
    if not users:
        return "", ()
    values = ", ".join("(?, ?)" for _ in users)
    return (
        f" AND (d.channel, d.user_id) NOT IN (VALUES {values})",
        tuple(x for pair in users for x in pair),
    )


class DeliveriesMixin(Database):
    """Store methods for channels and deliveries."""

    # channels -------------------------------------------------------------------------

    async def list_channels(self, user_id: int) -> list[Channel]:
        """The user's channels: their email first (if they have one), then the others by id.
        Secrets are not included."""
        rows = await self._all(
            "SELECT id, user_id, type, url, format, NULL, chat_id, created_at FROM channels"
            " WHERE user_id = ? AND deleted_at IS NULL ORDER BY id",
            (user_id,),
        )
        user = await self._one(
            "SELECT email, email_verified, created_at FROM users WHERE id = ?", (user_id,)
        )
        channels = [_channel(r) for r in rows]
        if user is not None and user[0]:
            channels.insert(
                0,
                Channel(
                    EMAIL,
                    user_id,
                    "email",
                    address=user[0],
                    verified=bool(user[1]),
                    created_at=user[2],
                ),
            )
        return channels

    async def add_channel(
        self,
        user_id: int,
        type: str,
        max_channels: int,
        *,
        url: str | None = None,
        format: str | None = None,
        secret: str | None = None,
        chat_id: str | None = None,
    ) -> Channel:
        """Add a webhook or telegram channel. Conflict when the user has `max_channels`
        channels already (their email counts as one)."""
        now = clock.now()
        async with self._tx() as db:
            async with db.execute(
                "SELECT (SELECT COUNT(*) FROM channels WHERE user_id = ?"
                " AND deleted_at IS NULL) + (SELECT COUNT(*) FROM users WHERE id = ?"
                " AND email <> '')",
                (user_id, user_id),
            ) as cur:
                (count,) = present(await cur.fetchone())
            if count >= max_channels:
                raise Conflict(f"at most {max_channels} channels per user")
            cur = await db.execute(
                "INSERT INTO channels(user_id, type, url, format, secret, chat_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (user_id, type, url, format, secret, chat_id, now),
            )
            return Channel(
                inserted_id(cur),
                user_id,
                type,
                url=url,
                format=format,
                secret=secret,
                chat_id=chat_id,
                created_at=now,
            )

    async def delete_channel(self, user_id: int, channel_id: int) -> None:
        """Delete the user's channel: its pending deliveries become `skipped`, and alerts
        stop naming it. NotFound if it is not the user's (or already deleted)."""
        now = clock.now()
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE channels SET deleted_at = ?, secret = NULL WHERE id = ? AND user_id = ?"
                " AND deleted_at IS NULL",
                (now, channel_id, user_id),
            )
            if cur.rowcount == 0:
                raise NotFound("channel not found")
            await db.execute(
                "UPDATE deliveries SET status = 'skipped', last_error = 'channel deleted'"
                " WHERE channel_id = ? AND status = 'pending'",
                (channel_id,),
            )
            await db.execute(
                "UPDATE alerts SET channels = (SELECT json_group_array(j.value)"
                " FROM json_each(alerts.channels) j WHERE j.value IS NOT ?)"
                " WHERE user_id = ? AND EXISTS (SELECT 1 FROM json_each(alerts.channels) j"
                " WHERE j.value = ?)",
                (channel_id, user_id, channel_id),
            )

    async def channel_ids(self, user_id: int) -> list[int | str]:
        """The ids of the user's channels ("email" first when they have an address)."""
        return [r[0] for r in await self._all(CHANNEL_IDS, (user_id, user_id))]

    # deliveries -----------------------------------------------------------------------

    async def due_deliveries(
        self,
        now: float,
        types: Collection[str],
        limit: int,
        exclude: Collection[int] = (),
        channel: tuple[int, str, int | str] | None = None,
        exclude_users: Collection[tuple[str, int]] = (),
    ) -> list[Delivery]:
        """Pending deliveries of the channel `types` due at `now`, oldest first, except
        `exclude` (being sent) and those of `exclude_users` ((type, user id) pairs), each
        with its event, alert and channel as they are now; `channel` (user id, type,
        channel id) keeps those of one user's channel only."""
        if not types:
            return []
        ids, kinds = tuple(exclude), tuple(types)
        only = ""
        params: tuple[int | str | None, ...] = ()
        if channel is not None:
            user_id, kind, channel_id = channel
            only = " AND d.user_id = ? AND d.channel = ? AND d.channel_id IS ?"
            params = (user_id, kind, None if channel_id == EMAIL else channel_id)
        users, user_params = _pairs(exclude_users)
        alert_cols = ", ".join("a." + c.strip() for c in ALERT_COLS.split(","))
        rows = await self._all(
            "SELECT d.id, d.attempts, d.held, d.channel, d.channel_id, d.created_at,"
            " e.id, e.time, e.price, e.backfill, u.email, u.email_verified,"
            " c.url, c.format, c.secret, c.chat_id, c.created_at, "
            + alert_cols
            + " FROM deliveries d JOIN events e ON e.id = d.event_id"
            " JOIN alerts a ON a.id = d.alert_id JOIN users u ON u.id = d.user_id"
            " LEFT JOIN channels c ON c.id = d.channel_id"
            " WHERE d.status = 'pending' AND d.next_attempt_at <= ?"
            f" AND d.channel IN ({','.join('?' * len(kinds))})"
            f" AND d.id NOT IN ({','.join('?' * len(ids))}){only}{users}"
            " ORDER BY d.next_attempt_at, d.id LIMIT ?",
            (now, *kinds, *ids, *params, *user_params, limit),
        )
        items = []
        for r in rows:
            alert = parse_alert(r[17:])
            event = Event(r[6], alert.id, alert.user_id, r[7], r[8], r[9])
            # The message is about this trigger (a repeating alert has had others since).
            alert = replace(
                alert, triggered_at=event.time, triggered_price=event.price, backfill=event.backfill
            )
            if r[3] == "email":
                to = Channel(
                    EMAIL,
                    alert.user_id,
                    "email",
                    address=r[10],
                    verified=bool(r[11]),
                    created_at=r[5],
                )
            else:
                to = Channel(
                    r[4],
                    alert.user_id,
                    r[3],
                    url=r[12],
                    format=r[13],
                    secret=r[14],
                    chat_id=r[15],
                    created_at=r[16],
                )
            items.append(Delivery(r[0], r[1], alert, event, to, bool(r[2]), created_at=r[5]))
        return items

    async def next_delivery_due(
        self,
        types: Collection[str],
        exclude: Collection[int] = (),
        exclude_users: Collection[tuple[str, int]] = (),
    ) -> float | None:
        """When the earliest pending delivery of `types` not in `exclude` nor of
        `exclude_users` is due, or None."""
        if not types:
            return None
        ids, kinds = tuple(exclude), tuple(types)
        users, user_params = _pairs(exclude_users)
        row = await self._one(
            "SELECT MIN(next_attempt_at) FROM deliveries d WHERE status = 'pending'"
            f" AND channel IN ({','.join('?' * len(kinds))})"
            f" AND id NOT IN ({','.join('?' * len(ids))}){users}",
            (*kinds, *ids, *user_params),
        )
        return row[0]

    async def defer_unverified(self, moves: Sequence[tuple[int, float]]) -> None:
        """Move email deliveries, (id, until) each, while their user's address is still
        unverified when this commits (a verification in between made them due: it stands)."""
        if not moves:
            return
        async with self._tx() as db:
            await db.executemany(
                "UPDATE deliveries SET next_attempt_at = ? WHERE id = ? AND status = 'pending'"
                f" AND {_UNVERIFIED}",
                [(until, i) for i, until in moves],
            )

    async def skip_unverified(self, ids: Sequence[int]) -> int:
        """Mark `skipped` the email deliveries whose user's address is still unverified;
        returns how many."""
        async with self._tx() as db:
            cur = await db.executemany(
                "UPDATE deliveries SET status = 'skipped', attempts = attempts + 1,"
                " last_error = 'email address not verified within 24 h'"
                f" WHERE id = ? AND status = 'pending' AND {_UNVERIFIED}",
                [(i,) for i in ids],
            )
            await _renotify(db, ids)
            return cur.rowcount

    async def defer_channel(
        self,
        user_id: int,
        channel: str,
        channel_id: int | None,
        until: float,
        exclude: Collection[int] = (),
    ) -> None:
        """Move the channel's pending deliveries due before `until` to `until` (no attempt
        counted), except `exclude`: the channel failed, its other rows wait as long."""
        ids = tuple(exclude)
        async with self._tx() as db:
            await db.execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE status = 'pending'"
                " AND user_id = ? AND channel = ? AND channel_id IS ? AND next_attempt_at < ?"
                f" AND id NOT IN ({','.join('?' * len(ids))})",
                (until, user_id, channel, channel_id, until, *ids),
            )

    async def hold_deliveries(self, moves: Sequence[tuple[int, float]]) -> None:
        """Move pending deliveries over the hourly budget, (id, until) each, without an
        attempt; held, they go out as one digest once due."""
        if not moves:
            return
        async with self._tx() as db:
            await db.executemany(
                "UPDATE deliveries SET next_attempt_at = ?, held = 1"
                " WHERE id = ? AND status = 'pending'",
                [(until, i) for i, until in moves],
            )

    async def record_deliveries(self, outcomes: Iterable[tuple]) -> None:
        """Record attempts, all in ONE transaction: each outcome is (id, status,
        next_attempt_at or None, error or None, recipient or None, digest lead id or None);
        `sent` stamps sent_at. Each alert's `notified` then summarises its latest event."""
        now = clock.now()
        rows = [
            (
                status,
                next_at,
                error,
                now if status == "sent" else None,
                recipient,
                digest,
                delivery_id,
            )
            for delivery_id, status, next_at, error, recipient, digest in outcomes
        ]
        if not rows:
            return
        async with self._tx() as db:
            await db.executemany(
                "UPDATE deliveries SET status = ?, attempts = attempts + 1,"
                " next_attempt_at = COALESCE(?, next_attempt_at), last_error = ?,"
                " sent_at = ?, recipient = COALESCE(?, recipient), digest = ?"
                " WHERE id = ? AND status = 'pending'",
                rows,
            )
            await _renotify(db, [r[-1] for r in rows])

    async def recent_sends(
        self, user_id: int, channel: str, channel_id: int | None, since: float
    ) -> list[float]:
        """When each message (a digest counts once) went to this channel of the user after
        `since`, oldest first: what the hourly budget counts."""
        rows = await self._all(
            "SELECT MIN(sent_at) FROM deliveries WHERE user_id = ? AND channel = ?"
            " AND channel_id IS ? AND status = 'sent' AND sent_at > ?"
            " GROUP BY COALESCE(digest, id) ORDER BY 1",
            (user_id, channel, channel_id, since),
        )
        return [r[0] for r in rows]

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        """{channel type: {state: count}} over every delivery, zeros included."""
        rows = await self._all(
            "SELECT channel, status, COUNT(*) FROM deliveries GROUP BY channel, status"
        )
        counts = {t: dict.fromkeys(DELIVERY_STATES, 0) for t in CHANNEL_TYPES}
        for channel, status, count in rows:
            counts[channel][status] = count
        return counts
