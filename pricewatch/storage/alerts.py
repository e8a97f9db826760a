"""Alerts, their events and triggers (each trigger queues its deliveries: rows.py; their
outbox: deliveries.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import replace

import aiosqlite
import orjson

from .. import clock
from ..records import Alert, Arm, Event, Hit
from .base import Conflict, Database, NotFound, UnknownUser, inserted_id, present
from .rows import ALERT_COLS, CHANNEL_IDS, EVENT_DELIVERIES, insert_deliveries, parse_alert

# What a create or an update may set besides asset, price and direction (column names).
ALERT_FIELDS = ("kind", "percent", "win", "repeat", "cooldown", "expires_at", "note", "channels")
# A repeating alert triggers at most once per max(cooldown, MIN_COOLDOWN) seconds, whatever
# its row says (the API refuses less; rows written before it did are held to it here).
MIN_COOLDOWN = 60
_EVENT_COLS = "e.id, e.alert_id, e.user_id, e.time, e.price, e.backfill, " + EVENT_DELIVERIES


def _event(row) -> Event:
    return Event(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        tuple(tuple(d) for d in orjson.loads(row[6])),
    )


class AlertsMixin(Database):
    """Store methods for alerts, events and triggers."""

    # alerts ---------------------------------------------------------------------------

    async def create_alert(
        self,
        user_id: int,
        asset: str,
        price: float | None,
        direction: str,
        max_active: int,
        **fields,
    ) -> Alert:
        """Insert a CREATED alert; `fields` may set any of ALERT_FIELDS. Raises Conflict
        when the user has `max_active` already, UnknownUser when the user does not exist
        (any more)."""
        extra = _fields(fields)
        now = clock.now()
        async with self._tx() as db:
            async with db.execute(
                "SELECT EXISTS(SELECT 1 FROM users WHERE id = ?), COUNT(*) FROM alerts"
                " WHERE user_id = ? AND (status = 'CREATED' OR (status = 'TRIGGERED'"
                " AND repeat = 1))",
                (user_id, user_id),
            ) as cur:
                exists, active = present(await cur.fetchone())
            if not exists:
                raise UnknownUser(f"user {user_id} does not exist")
            if active >= max_active:
                raise Conflict(f"at most {max_active} active alerts per user")
            if extra.get("channels") is None:  # default: every channel the user has now
                extra["channels"] = orjson.dumps(await _channel_ids(db, user_id)).decode()
            names = "".join(", " + name for name in extra)
            cur = await db.execute(
                f"INSERT INTO alerts(user_id, asset, price, direction, created_at, updated_at"
                f"{names}) VALUES (?, ?, ?, ?, ?, ?{', ?' * len(extra)})",
                (user_id, asset, price, direction, now, now, *extra.values()),
            )
            async with db.execute(
                f"SELECT {ALERT_COLS} FROM alerts WHERE id = ?", (cur.lastrowid,)
            ) as cur:
                return parse_alert(await cur.fetchone())

    async def get_alert(self, user_id: int, alert_id: int) -> Alert:
        """The user's alert `alert_id`. Raises NotFound for a missing or foreign alert."""
        row = await self._one(
            f"SELECT {ALERT_COLS} FROM alerts WHERE id = ? AND user_id = ?", (alert_id, user_id)
        )
        if row is None:
            raise NotFound("alert not found")
        return parse_alert(row)

    async def list_alerts(
        self, user_id: int, status: str | None, offset: int, limit: int
    ) -> tuple[int, list[Alert]]:
        """(total count, one page newest first) of the user's alerts, optionally by status.

        A page is read again only after a commit (see `version`): clients polling their
        list cost a dictionary lookup between changes, not a trip to the reader thread.
        """
        key = (user_id, status, offset, limit)
        version = self.version()  # read before the query: a commit after it is a miss
        cached = self._pages.get(key)
        if cached is not None and version is not None and cached[0] == version:
            return cached[1]
        result = await self._list_alerts(user_id, status, offset, limit)
        if version is not None:
            if len(self._pages) >= 256:  # pages of up to 1000 alerts (seed 002's fetch)
                self._pages.clear()
            self._pages[key] = (version, result)
        return result

    async def _list_alerts(
        self, user_id: int, status: str | None, offset: int, limit: int
    ) -> tuple[int, list[Alert]]:
        where = "user_id = ?"
        params: list[int | str] = [user_id]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        count, rows = await self._counted_page(
            ALERT_COLS, "alerts", where, params, "id", limit, offset
        )
        return count, [parse_alert(r) for r in rows]

    async def _counted_page(
        self,
        columns: str,
        table: str,
        where: str,
        params: list,
        order: str,
        limit: int,
        offset: int,
    ) -> tuple[int, list]:
        """(total count, one page of rows newest first by `order`). The total rides along
        each row (a window count): one query for page and count."""
        rows = await self._all(
            f"SELECT {columns}, COUNT(*) OVER () FROM {table} WHERE {where}"
            f" ORDER BY {order} DESC LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        if rows:
            return rows[0][-1], rows
        # past the last page: no row carries the count
        (count,) = await self._one(f"SELECT COUNT(*) FROM {table} WHERE {where}", params)
        return count, rows

    async def update_alert(
        self, user_id: int, alert_id: int, asset: str, price: float | None, direction: str, **fields
    ) -> Alert:
        """Change a CREATED alert (`fields`: any of ALERT_FIELDS); it is armed afresh.
        NotFound if not the user's; Conflict if not CREATED."""
        extra = _fields(fields)
        async with self._tx() as db:
            async with db.execute(
                "SELECT status FROM alerts WHERE id = ? AND user_id = ?", (alert_id, user_id)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound("alert not found")
            if row[0] != "CREATED":
                raise Conflict(f"alert is {row[0]}; only CREATED alerts can change")
            if "channels" in extra and extra["channels"] is None:  # PUT: every channel now
                extra["channels"] = orjson.dumps(await _channel_ids(db, user_id)).decode()
            sets = "".join(f", {name} = ?" for name in extra)
            await db.execute(
                f"UPDATE alerts SET asset = ?, price = ?, direction = ?, updated_at = ?,"
                f" armed = 1{sets} WHERE id = ?",
                (asset, price, direction, clock.now(), *extra.values(), alert_id),
            )
            async with db.execute(
                f"SELECT {ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,)
            ) as cur:
                return parse_alert(await cur.fetchone())

    async def delete_alert(self, user_id: int, alert_id: int) -> Alert:
        """Soft-delete the user's alert (status DELETED). NotFound if not the user's."""
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE alerts SET status = 'DELETED', updated_at = ? WHERE id = ? AND user_id = ?",
                (clock.now(), alert_id, user_id),
            )
            if cur.rowcount == 0:
                raise NotFound("alert not found")
            async with db.execute(
                f"SELECT {ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,)
            ) as cur:
                return parse_alert(await cur.fetchone())

    async def set_alert_note(self, user_id: int, alert_id: int, note: str) -> Alert:
        """Name the user's alert `alert_id` (seed 002's purpose). NotFound if not the user's."""
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE alerts SET note = ? WHERE id = ? AND user_id = ?", (note, alert_id, user_id)
            )
            if cur.rowcount == 0:
                raise NotFound("alert not found")
            async with db.execute(
                f"SELECT {ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,)
            ) as cur:
                return parse_alert(await cur.fetchone())

    async def delete_alerts_by_note(self, user_id: int, note: str) -> list[Alert]:
        """Soft-delete every CREATED alert of the user with this note, in one transaction;
        returns them (newest first, possibly none)."""
        async with self._tx() as db:
            async with db.execute(
                "SELECT id FROM alerts WHERE user_id = ? AND note = ? AND status = 'CREATED'"
                " ORDER BY id DESC",
                (user_id, note),
            ) as cur:
                ids = [row[0] for row in await cur.fetchall()]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            await db.execute(
                f"UPDATE alerts SET status = 'DELETED', updated_at = ? WHERE id IN ({marks})",
                (clock.now(), *ids),
            )
            async with db.execute(
                f"SELECT {ALERT_COLS} FROM alerts WHERE id IN ({marks}) ORDER BY id DESC", ids
            ) as cur:
                return [parse_alert(row) for row in await cur.fetchall()]

    async def active_alerts(self) -> list[Alert]:
        """Every alert the engine watches: CREATED, and repeating ones in their cooldown."""
        return [
            parse_alert(r)
            for r in await self._all(
                f"SELECT {ALERT_COLS} FROM alerts WHERE status = 'CREATED'"
                " OR (status = 'TRIGGERED' AND repeat = 1)"
            )
        ]

    async def expire_alerts(self, now: float) -> list[int]:
        """Mark EXPIRED every watched alert (see `active_alerts`) whose expires_at <= `now`;
        returns their ids."""
        async with self._tx() as db:
            async with db.execute(
                "SELECT id FROM alerts WHERE expires_at <= ? AND (status = 'CREATED'"
                " OR (status = 'TRIGGERED' AND repeat = 1))",
                (now,),
            ) as cur:
                ids = [r[0] for r in await cur.fetchall()]
            if ids:
                await db.executemany(
                    "UPDATE alerts SET status = 'EXPIRED', updated_at = ?, rearm_at = NULL"
                    " WHERE id = ?",
                    [(now, i) for i in ids],
                )
            return ids

    async def list_events(
        self, user_id: int, alert_id: int | None, offset: int, limit: int
    ) -> tuple[int, list[Event]]:
        """(total count, one page newest first) of the user's events, of one alert or all."""
        where, params = "e.user_id = ?", [user_id]
        if alert_id is not None:
            where += " AND e.alert_id = ?"
            params.append(alert_id)
        count, rows = await self._counted_page(
            _EVENT_COLS, "events e", where, params, "e.id", limit, offset
        )
        return count, [_event(r) for r in rows]

    async def events_between(
        self, user_id: int, after: int, upto: int, limit: int
    ) -> list[tuple[Event, Alert]]:
        """The user's events with `after` < id <= `upto`, oldest first (at most `limit`),
        each with its alert as it is now."""
        cols = ", ".join("a." + c.strip() for c in ALERT_COLS.split(","))
        rows = await self._all(
            f"SELECT {_EVENT_COLS}, {cols} FROM events e JOIN alerts a ON a.id = e.alert_id"
            " WHERE e.user_id = ? AND e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?",
            (user_id, after, upto, limit),
        )
        return [(_event(r), parse_alert(r[7:])) for r in rows]

    async def last_event_id(self) -> int:
        return (await self._one("SELECT COALESCE(MAX(id), 0) FROM events"))[0]

    async def alert_creations(self, since: float) -> tuple[int, list[tuple[int, float]]]:
        """The highest alert id created at or before `since` (0: none), and (id, created_at)
        of the CREATED alerts created after it, by id."""
        before = await self._one("SELECT MAX(id) FROM alerts WHERE created_at <= ?", (since,))
        after = await self._all(
            "SELECT id, created_at FROM alerts WHERE status = 'CREATED' AND created_at > ? "
            "ORDER BY id",
            (since,),
        )
        return before[0] or 0, [tuple(r) for r in after]

    async def trigger_alerts(self, items: Iterable[Hit | Arm | tuple]) -> list[Alert]:
        """Record triggers (Hit: status TRIGGERED, an event, its deliveries) and re-arms
        (Arm), in order, all in ONE transaction.

        A Hit on an alert that is no longer CREATED and armed with that asset, target,
        direction (and window) -- deleted, changed or expired meanwhile -- is skipped; tuples
        are read as Hits. Returns the alerts triggered, each with its new `event`.
        """
        batch = [item if isinstance(item, Arm) else Hit(*item) for item in items]
        now = clock.now()

        def run(db: sqlite3.Connection) -> list[Alert]:
            done: list[Alert] = []
            for item in batch:
                if isinstance(item, Arm):
                    db.execute(
                        "UPDATE alerts SET status = 'CREATED', armed = ?, rearm_at = NULL,"
                        " updated_at = ? WHERE id = ? AND ((status = 'TRIGGERED' AND repeat = 1)"
                        " OR (status = 'CREATED' AND armed = 0))",
                        (int(item.armed), now, item.alert_id),
                    )
                    continue
                alert = _trigger(db, item, now)
                if alert is not None:
                    done.append(alert)
            return done

        return await self._write(run)

    async def purge_deleted_alerts(self, older_than: float) -> int:
        """Remove for good the DELETED alerts deleted before `older_than` (epoch s), with
        their events and deliveries; returns how many. Small transactions, so that other writes (a
        trigger batch) never wait behind one long purge."""
        total = 0
        while True:
            async with self._tx() as db:
                cur = await db.execute(
                    "DELETE FROM alerts WHERE id IN (SELECT id FROM alerts"
                    " WHERE status = 'DELETED' AND updated_at < ? LIMIT 1000)",
                    (older_than,),
                )
                removed = cur.rowcount
            total += removed
            if removed < 1000:
                return total

    async def purge_events(self, older_than: float, window: int = 5000) -> int:
        """Remove the events whose time is before `older_than` (epoch s) with their finished
        deliveries (sent, failed, skipped); an event with a pending delivery stays, whole.
        Returns how many events went.

        In id order, `window` ids per transaction (other writes never wait behind one long
        purge), and only as far as the events are old: the sweep stops at the first window
        without an event older than the cutoff (ids follow time; a backfilled event is a few
        hours older than its id at most), so an hourly sweep reads what it removes, not the
        whole table."""
        total, after = 0, 0
        while True:
            async with self._tx() as db:
                async with db.execute("SELECT MIN(id) FROM events WHERE id > ?", (after,)) as cur:
                    first = present(await cur.fetchone())[0]
                if first is None:
                    return total
                last = first + window - 1
                async with db.execute(
                    "SELECT MIN(time) FROM events WHERE id BETWEEN ? AND ?", (first, last)
                ) as cur:
                    oldest = present(await cur.fetchone())[0]
                if oldest >= older_than:
                    return total
                # Deliveries go with their event (ON DELETE CASCADE).
                cur = await db.execute(
                    "DELETE FROM events WHERE id BETWEEN ? AND ? AND time < ? AND NOT EXISTS"
                    " (SELECT 1 FROM deliveries d WHERE d.event_id = events.id"
                    " AND d.status = 'pending')",
                    (first, last, older_than),
                )
                total += cur.rowcount
            after = last


def _fields(fields: dict) -> dict:
    """`fields` checked against ALERT_FIELDS (`window` may be named so), in column names."""
    fields = dict(fields)
    if "window" in fields:
        fields["win"] = fields.pop("window")
    unknown = set(fields) - set(ALERT_FIELDS)
    if unknown:
        raise TypeError(f"unknown alert fields: {sorted(unknown)}")
    if "repeat" in fields:
        fields["repeat"] = int(bool(fields["repeat"]))
    if fields.get("channels") is not None:
        fields["channels"] = orjson.dumps(list(fields["channels"])).decode()
    return fields


async def _channel_ids(db: aiosqlite.Connection, user_id: int) -> list[int | str]:
    """The user's channel ids inside a transaction (see CHANNEL_IDS)."""
    async with db.execute(CHANNEL_IDS, (user_id, user_id)) as cur:
        return [r[0] for r in await cur.fetchall()]


def _trigger(db: sqlite3.Connection, hit: Hit, now: float) -> Alert | None:
    """One Hit inside trigger_alerts' transaction (on the writer's thread): the alert, with
    its event, or None."""
    alert_id, asset, target, direction, price, at, backfill, window = hit
    cur = db.execute(
        "UPDATE alerts SET status = 'TRIGGERED', triggered_at = ?, triggered_price = ?,"
        " triggered_backfill = ?, updated_at = ?, trigger_count = trigger_count + 1,"
        " rearm_at = CASE WHEN repeat = 1 THEN ? + MAX(cooldown, ?) END"
        " WHERE id = ? AND status = 'CREATED' AND armed = 1 AND asset = ?"
        " AND COALESCE(price, percent) = ? AND direction = ? AND COALESCE(win, '') = ?"
        " AND (expires_at IS NULL OR expires_at > ?)",
        (
            at,
            price,
            backfill,
            now,
            at,
            MIN_COOLDOWN,
            alert_id,
            asset,
            target,
            direction,
            window or "",
            at,
        ),
    )
    if cur.rowcount == 0:
        return None
    event_id = inserted_id(
        db.execute(
            "INSERT INTO events(alert_id, user_id, time, price, backfill)"
            " SELECT id, user_id, ?, ?, ? FROM alerts WHERE id = ?",
            (at, price, backfill, alert_id),
        )
    )
    # A user without an email (seed 000's register, compat.py) gets no email delivery; with
    # no delivery at all `notified` is null.
    deliveries = insert_deliveries(db, event_id, alert_id, now)
    row = db.execute(
        f"UPDATE alerts SET notified = ? WHERE id = ? RETURNING {ALERT_COLS}",
        ("pending" if deliveries else None, alert_id),
    ).fetchone()
    alert = parse_alert(row)
    event = Event(event_id, alert_id, alert.user_id, at, price, backfill, deliveries)
    return replace(alert, event=event)
