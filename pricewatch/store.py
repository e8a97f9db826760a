"""SQLite persistence: the only module that speaks SQL (its schema's DDL is in schema.py).

One writer connection (serialised by a lock, explicit `BEGIN IMMEDIATE` transactions) and
one reader connection (WAL lets it read committed data while a write is in progress).
Every write method returns only after COMMIT, so a 2xx answer built on it is durable.
Rows come back as dataclasses, never as sqlite rows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import replace

import aiosqlite

from . import clock
from .records import Alert, Arm, Event, Hit, OutboxItem, Quote, RotateResult, User
from .schema import SchemaError, migrate, username_key

__all__ = ["Alert", "Conflict", "Event", "NotFound", "OutboxItem", "Quote", "RotateResult",
           "Store", "StoreError", "UnknownUser", "User", "bcrypt_cost"]

log = logging.getLogger(__name__)

# aiosqlite logs every call at DEBUG with its parameters: the JWT secret, password hashes and
# refresh-token ids would reach the log at PRICEWATCH_LOG_LEVEL=DEBUG. Nothing it says below
# INFO is worth that, so its logger never goes below INFO (a level set higher is kept).
_AIOSQLITE_LOG = logging.getLogger("aiosqlite")


class StoreError(Exception):
    """Base class of store errors."""


class NotFound(StoreError):
    """The row does not exist (or belongs to someone else)."""


class Conflict(StoreError):
    """The write conflicts with existing state (duplicate, wrong status, cap reached)."""


class UnknownUser(StoreError):
    """The user a write is made for no longer exists (deleted while a token of theirs lives)."""


_ALERT_COLS = ("id, user_id, asset, price, direction, status, created_at, triggered_at, "
               "triggered_price, notified, note, triggered_backfill, kind, percent, win, "
               "repeat, cooldown, expires_at, trigger_count, rearm_at, armed")
# What a create or an update may set besides asset, price and direction (column names).
ALERT_FIELDS = ("kind", "percent", "win", "repeat", "cooldown", "expires_at", "note")
_EVENT_COLS = ("e.id, e.alert_id, e.user_id, e.time, e.price, e.backfill,"
               " (SELECT o.status FROM outbox o WHERE o.event_id = e.id)")
_QUOTE_COLS = "id, from_currency, to_currency, rate, bid, ask, source_time, fetched_at"
_USER_COLS = "id, username, email, password_hash, is_admin"
_BCRYPT_PREFIX = re.compile(r"\$2[aby]\$(\d\d)\$")


def bcrypt_cost(password_hash: str) -> int | None:
    """The cost of a bcrypt hash (`$2b$12$...` -> 12), None when it is not one."""
    match = _BCRYPT_PREFIX.match(password_hash)
    return int(match.group(1)) if match else None


def _alert(row) -> Alert:
    return Alert(*row[:15], bool(row[15]), *row[16:20], bool(row[20]))


def _event(row) -> Event:
    return Event(*row[:6], (("email", row[6]),) if row[6] is not None else ())


def _quote(row) -> Quote:
    return Quote(*row)


def _user(row) -> User:
    return User(row[0], row[1], row[2], row[3], bool(row[4]))


class Store:
    """The database. Open with `await Store.open(path)`, close with `await store.close()`."""

    def __init__(self, path: str, writer: aiosqlite.Connection, reader: aiosqlite.Connection,
                 probe: sqlite3.Connection | None = None):
        self.path = path
        self._w = writer
        self._r = reader
        self._lock = asyncio.Lock()
        # `version()`'s own connection (read-only, never waits), used on the loop thread.
        self._probe = probe
        # Alert pages read at a data version: (user, status, offset, limit) -> (version,
        # result). Any commit by any connection changes the version, so an entry is never
        # served after a change, whoever made it.
        self._pages: dict[tuple, tuple[int, tuple[int, list[Alert]]]] = {}
        self._users: dict[int, int] = {}  # user id -> the version it was seen existing at

    @classmethod
    async def open(cls, path: str) -> Store:
        """Open (creating if needed) and migrate the database file at `path`."""
        if _AIOSQLITE_LOG.level < logging.INFO:  # its own level: the root's may change later
            _AIOSQLITE_LOG.setLevel(logging.INFO)
        writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await writer.execute("PRAGMA journal_mode=WAL")
            await _configure(writer)
            await migrate(writer)
            reader = await aiosqlite.connect(path, isolation_level=None)
            await _configure(reader)
            # PRAGMAs only (no table read): a few microseconds, fine on the loop thread.
            probe = sqlite3.connect(path, isolation_level=None)
            probe.execute("PRAGMA query_only=1")
            probe.execute("PRAGMA busy_timeout=0")  # busy: version() says None at once
        except SchemaError as exc:
            await writer.close()
            raise StoreError(str(exc)) from None
        except BaseException:
            await writer.close()
            raise
        return cls(path, writer, reader, probe)

    async def close(self) -> None:
        async with self._lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None
            await self._r.close()
            await self._w.close()

    def version(self) -> int | None:
        """SQLite's `PRAGMA data_version` on a connection of its own: it changes whenever
        any other connection commits (this store's writer, an operator's sqlite3 shell), so
        a result read at one version still holds while the version is unchanged. Synchronous
        (~2 us: it reads the WAL index in shared memory, no table); None when it cannot be
        read at once (the database is busy or closed): then nothing may be reused."""
        probe = self._probe
        if probe is None:
            return None
        try:
            return probe.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error:
            return None

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; commits on success, rolls back on any exception."""
        async with self._lock:
            try:
                # Inside the try: a cancel landing on BEGIN must still roll back, or the
                # connection would stay in a transaction and every later write would fail.
                await self._w.execute("BEGIN IMMEDIATE")
                yield self._w
            except BaseException:
                with suppress(sqlite3.OperationalError):  # "no transaction is active"
                    await asyncio.shield(self._w.execute("ROLLBACK"))
                raise
            try:
                await asyncio.shield(self._w.execute("COMMIT"))
            except BaseException:  # a failed COMMIT must not leave the transaction open
                with suppress(sqlite3.OperationalError):
                    await asyncio.shield(self._w.execute("ROLLBACK"))
                raise

    async def _one(self, sql: str, params: Iterable = ()):
        rows = await self._r.execute_fetchall(sql, tuple(params))
        return rows[0] if rows else None

    async def _all(self, sql: str, params: Iterable = ()) -> list:
        # One round trip to the connection's thread (execute + fetch + close in one call).
        return list(await self._r.execute_fetchall(sql, tuple(params)))

    async def schema_version(self) -> int:
        return (await self._one("SELECT MAX(version) FROM schema_version"))[0] or 0

    async def ping(self) -> None:
        """Raise if the database cannot answer a query."""
        await self._one("SELECT 1 FROM schema_version LIMIT 1")

    # settings -------------------------------------------------------------------------

    async def setting(self, key: str, default: str) -> str:
        """Return the stored value for `key`, storing `default` first if it has none."""
        async with self._tx() as db:
            await db.execute("INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)",
                             (key, default))
            async with db.execute("SELECT value FROM settings WHERE key = ?", (key,)) as cur:
                return (await cur.fetchone())[0]

    # users ----------------------------------------------------------------------------

    async def create_user(self, username: str, email: str, password_hash: str,
                          is_admin: bool = False) -> User:
        """Insert a user (the name stored as given). Raises Conflict when the name, or any
        name with the same `username_key` (`Alice` for `alice`), is taken."""
        try:
            async with self._tx() as db:
                cur = await db.execute(
                    "INSERT INTO users(username, username_key, email, password_hash, is_admin,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (username, username_key(username), email, password_hash, int(is_admin),
                     clock.now()),
                )
                user_id = cur.lastrowid
        except sqlite3.IntegrityError:
            raise Conflict(f"username {username!r} is taken") from None
        return User(user_id, username, email, password_hash, is_admin)

    async def user_by_name(self, username: str) -> User | None:
        """The user `username` names: the one registered exactly so, else the one whose name
        has the same `username_key` (names that collided before keys existed keep their
        exact spelling; see schema.py)."""
        row = await self._one(
            f"SELECT {_USER_COLS} FROM users WHERE username = ? OR username_key = ?"
            " ORDER BY username = ? DESC LIMIT 1",
            (username, username_key(username), username))
        return _user(row) if row else None

    async def user_for_login(self, username: str, address: str, since: float
                             ) -> tuple[User | None, bool]:
        """(`user_by_name(username)`, whether `address` logged into that user at or after
        `since`), in one query: the answer takes the same path whichever it is."""
        row = await self._one(
            f"SELECT {_USER_COLS}, EXISTS(SELECT 1 FROM login_addresses a"
            "  WHERE a.user_id = users.id AND a.address = ? AND a.last_login >= ?)"
            " FROM users WHERE username = ? OR username_key = ?"
            " ORDER BY username = ? DESC LIMIT 1",
            (address, since, username, username_key(username), username))
        return (_user(row), bool(row[5])) if row else (None, False)

    async def user_by_id(self, user_id: int) -> User | None:
        row = await self._one(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,))
        return _user(row) if row else None

    async def user_exists(self, user_id: int) -> bool:
        """Whether user `user_id` exists (a primary-key probe: no row is read), asked of the
        database again only after a commit (see `version`): every authenticated request
        asks, and a deletion by anyone is still seen from the next request on."""
        version = self.version()  # read before the query: a commit after it is a miss
        if version is not None and self._users.get(user_id) == version:
            return True
        exists = await self._one("SELECT 1 FROM users WHERE id = ?", (user_id,)) is not None
        if exists and version is not None:
            if len(self._users) >= 65536:
                self._users.clear()
            self._users[user_id] = version
        return exists

    async def set_password_hash(self, user_id: int, old_hash: str, new_hash: str) -> bool:
        """Replace the user's hash if it is still `old_hash`; whether it was replaced."""
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
                (new_hash, user_id, old_hash))
            return cur.rowcount == 1

    async def password_costs(self) -> dict[int, int]:
        """bcrypt cost -> number of users whose hash has it (unparsable hashes left out)."""
        rows = await self._all(
            "SELECT substr(password_hash, 1, 7), COUNT(*) FROM users GROUP BY 1")
        costs: dict[int, int] = {}
        for prefix, count in rows:
            cost = bcrypt_cost(prefix)
            if cost is not None:
                costs[cost] = costs.get(cost, 0) + count
        return costs

    async def purge_login_addresses(self, before: float) -> int:
        """Forget logins made before `before` (see `add_refresh_token`); returns how many."""
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM login_addresses WHERE last_login < ?",
                                   (before,))
            return cur.rowcount

    # refresh tokens -------------------------------------------------------------------

    async def add_refresh_token(self, jti: str, user_id: int, family: str,
                                issued_at: float, expires_at: float,
                                address: str | None = None, forget_before: float = 0.0,
                                max_addresses: int = 64) -> None:
        """Record the refresh token of a new login. With `address`, also record that the
        user logged in from it (in the same commit), forgetting the user's logins from
        before `forget_before` and all but their `max_addresses` most recent addresses.
        Raises UnknownUser when the user does not exist (any more)."""
        try:
            async with self._tx() as db:
                await db.execute(
                    "INSERT INTO refresh_tokens(jti, user_id, family, issued_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)", (jti, user_id, family, issued_at, expires_at))
                if address is not None:
                    await db.execute(
                        "INSERT INTO login_addresses(user_id, address, last_login)"
                        " VALUES (?, ?, ?) ON CONFLICT(user_id, address)"
                        " DO UPDATE SET last_login = excluded.last_login",
                        (user_id, address, issued_at))
                    await db.execute(
                        "DELETE FROM login_addresses WHERE user_id = ? AND (last_login < ?"
                        " OR address NOT IN (SELECT address FROM login_addresses"
                        "  WHERE user_id = ? ORDER BY last_login DESC LIMIT ?))",
                        (user_id, forget_before, user_id, max_addresses))
        except sqlite3.IntegrityError:  # the only constraint a fresh uuid can fail: the FK
            raise UnknownUser(f"user {user_id} does not exist") from None

    async def rotate_refresh_token(self, jti: str, new_jti: str, issued_at: float,
                                   expires_at: float) -> RotateResult:
        """Spend refresh token `jti` and record `new_jti` in its family, atomically.

        A token that was already spent is a reuse: the whole family is revoked.
        """
        async with self._tx() as db:
            async with db.execute(
                "SELECT t.user_id, t.family, t.spent_at, t.revoked_at FROM refresh_tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.jti = ?", (jti,)) as cur:
                row = await cur.fetchone()
            if row is None:  # no such token, or its user is gone (deleted without cascade)
                return RotateResult("unknown")
            user_id, family, spent_at, revoked_at = row
            if revoked_at is not None:
                return RotateResult("revoked", user_id, family)
            if spent_at is not None:
                await _revoke_family(db, family, issued_at)
                return RotateResult("reused", user_id, family)
            await db.execute("UPDATE refresh_tokens SET spent_at = ? WHERE jti = ?",
                             (issued_at, jti))
            await db.execute(
                "INSERT INTO refresh_tokens(jti, user_id, family, issued_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)", (new_jti, user_id, family, issued_at, expires_at))
            return RotateResult("ok", user_id, family)

    async def revoke_token_family(self, jti: str) -> RotateResult:
        """Revoke every token of the login that refresh token `jti` belongs to."""
        async with self._tx() as db:
            async with db.execute(
                "SELECT t.user_id, t.family FROM refresh_tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.jti = ?", (jti,)) as cur:
                row = await cur.fetchone()
            if row is None:  # as in rotate_refresh_token
                return RotateResult("unknown")
            await _revoke_family(db, row[1], clock.now())
            return RotateResult("ok", row[0], row[1])

    async def purge_refresh_tokens(self, before: float) -> int:
        """Delete refresh tokens that expired before `before`; returns how many."""
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM refresh_tokens WHERE expires_at < ?", (before,))
            return cur.rowcount

    async def revoked_families(self, since: float) -> dict[str, float]:
        """Family -> revoked_at for families revoked at or after `since` (older ones have no
        live access token left)."""
        rows = await self._all(
            "SELECT family, MAX(revoked_at) FROM refresh_tokens WHERE revoked_at >= ?"
            " GROUP BY family", (since,))
        return {r[0]: r[1] for r in rows}

    # alerts ---------------------------------------------------------------------------

    async def create_alert(self, user_id: int, asset: str, price: float | None,
                           direction: str, max_active: int, **fields) -> Alert:
        """Insert a CREATED alert; `fields` may set any of ALERT_FIELDS. Raises Conflict
        when the user has `max_active` already, UnknownUser when the user does not exist
        (any more)."""
        extra = _fields(fields)
        now = clock.now()
        async with self._tx() as db:
            async with db.execute(
                "SELECT EXISTS(SELECT 1 FROM users WHERE id = ?), COUNT(*) FROM alerts"
                " WHERE user_id = ? AND status = 'CREATED'", (user_id, user_id)) as cur:
                exists, active = await cur.fetchone()
            if not exists:
                raise UnknownUser(f"user {user_id} does not exist")
            if active >= max_active:
                raise Conflict(f"at most {max_active} active alerts per user")
            names = "".join(", " + name for name in extra)
            cur = await db.execute(
                f"INSERT INTO alerts(user_id, asset, price, direction, created_at, updated_at"
                f"{names}) VALUES (?, ?, ?, ?, ?, ?{', ?' * len(extra)})",
                (user_id, asset, price, direction, now, now, *extra.values()))
            async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?",
                                  (cur.lastrowid,)) as cur:
                return _alert(await cur.fetchone())

    async def get_alert(self, user_id: int, alert_id: int) -> Alert:
        """The user's alert `alert_id`. Raises NotFound for a missing or foreign alert."""
        row = await self._one(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ? AND user_id = ?",
                              (alert_id, user_id))
        if row is None:
            raise NotFound("alert not found")
        return _alert(row)

    async def list_alerts(self, user_id: int, status: str | None, offset: int,
                          limit: int) -> tuple[int, list[Alert]]:
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
            if len(self._pages) >= 4096:
                self._pages.clear()
            self._pages[key] = (version, result)
        return result

    async def _list_alerts(self, user_id: int, status: str | None, offset: int,
                           limit: int) -> tuple[int, list[Alert]]:
        where, params = "user_id = ?", [user_id]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        # The total rides along each row (a window count): one query for page and count.
        rows = await self._all(
            f"SELECT {_ALERT_COLS}, COUNT(*) OVER () FROM alerts WHERE {where}"
            " ORDER BY id DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        if rows:
            count = rows[0][-1]
        else:  # past the last page: no row carries the count
            (count,) = await self._one(f"SELECT COUNT(*) FROM alerts WHERE {where}", params)
        return count, [_alert(r) for r in rows]

    async def update_alert(self, user_id: int, alert_id: int, asset: str, price: float | None,
                           direction: str, **fields) -> Alert:
        """Change a CREATED alert (`fields`: any of ALERT_FIELDS); it is armed afresh.
        NotFound if not the user's; Conflict if not CREATED."""
        extra = _fields(fields)
        async with self._tx() as db:
            async with db.execute(
                "SELECT status FROM alerts WHERE id = ? AND user_id = ?",
                (alert_id, user_id)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound("alert not found")
            if row[0] != "CREATED":
                raise Conflict(f"alert is {row[0]}; only CREATED alerts can change")
            sets = "".join(f", {name} = ?" for name in extra)
            await db.execute(
                f"UPDATE alerts SET asset = ?, price = ?, direction = ?, updated_at = ?,"
                f" armed = 1{sets} WHERE id = ?",
                (asset, price, direction, clock.now(), *extra.values(), alert_id))
            async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?",
                                  (alert_id,)) as cur:
                return _alert(await cur.fetchone())

    async def delete_alert(self, user_id: int, alert_id: int) -> Alert:
        """Soft-delete the user's alert (status DELETED). NotFound if not the user's."""
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE alerts SET status = 'DELETED', updated_at = ?"
                " WHERE id = ? AND user_id = ?", (clock.now(), alert_id, user_id))
            if cur.rowcount == 0:
                raise NotFound("alert not found")
            async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?",
                                  (alert_id,)) as cur:
                return _alert(await cur.fetchone())

    async def set_alert_note(self, user_id: int, alert_id: int, note: str) -> Alert:
        """Name the user's alert `alert_id` (seed 002's purpose). NotFound if not the user's."""
        async with self._tx() as db:
            cur = await db.execute("UPDATE alerts SET note = ? WHERE id = ? AND user_id = ?",
                                   (note, alert_id, user_id))
            if cur.rowcount == 0:
                raise NotFound("alert not found")
            async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?",
                                  (alert_id,)) as cur:
                return _alert(await cur.fetchone())

    async def delete_alerts_by_note(self, user_id: int, note: str) -> list[Alert]:
        """Soft-delete every CREATED alert of the user with this note, in one transaction;
        returns them (newest first, possibly none)."""
        async with self._tx() as db:
            async with db.execute(
                    "SELECT id FROM alerts WHERE user_id = ? AND note = ? AND status = 'CREATED'"
                    " ORDER BY id DESC", (user_id, note)) as cur:
                ids = [row[0] for row in await cur.fetchall()]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            await db.execute(f"UPDATE alerts SET status = 'DELETED', updated_at = ?"
                             f" WHERE id IN ({marks})", (clock.now(), *ids))
            async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id IN ({marks})"
                                  " ORDER BY id DESC", ids) as cur:
                return [_alert(row) for row in await cur.fetchall()]

    async def active_alerts(self) -> list[Alert]:
        """Every alert the engine watches: CREATED, and repeating ones in their cooldown."""
        return [_alert(r) for r in await self._all(
            f"SELECT {_ALERT_COLS} FROM alerts WHERE status = 'CREATED'"
            " OR (status = 'TRIGGERED' AND repeat = 1)")]

    async def expire_alerts(self, now: float) -> list[int]:
        """Mark EXPIRED every watched alert (see `active_alerts`) whose expires_at <= `now`;
        returns their ids."""
        async with self._tx() as db:
            async with db.execute(
                    "SELECT id FROM alerts WHERE expires_at <= ? AND (status = 'CREATED'"
                    " OR (status = 'TRIGGERED' AND repeat = 1))", (now,)) as cur:
                ids = [r[0] for r in await cur.fetchall()]
            if ids:
                await db.executemany(
                    "UPDATE alerts SET status = 'EXPIRED', updated_at = ?, rearm_at = NULL"
                    " WHERE id = ?", [(now, i) for i in ids])
            return ids

    async def list_events(self, user_id: int, alert_id: int | None, offset: int,
                          limit: int) -> tuple[int, list[Event]]:
        """(total count, one page newest first) of the user's events, of one alert or all."""
        where, params = "e.user_id = ?", [user_id]
        if alert_id is not None:
            where += " AND e.alert_id = ?"
            params.append(alert_id)
        rows = await self._all(
            f"SELECT {_EVENT_COLS}, COUNT(*) OVER () FROM events e WHERE {where}"
            " ORDER BY e.id DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        if rows:
            count = rows[0][-1]
        else:
            (count,) = await self._one(f"SELECT COUNT(*) FROM events e WHERE {where}", params)
        return count, [_event(r) for r in rows]

    async def events_between(self, user_id: int, after: int, upto: int, limit: int
                             ) -> list[tuple[Event, Alert]]:
        """The user's events with `after` < id <= `upto`, oldest first (at most `limit`),
        each with its alert as it is now."""
        cols = ", ".join("a." + c.strip() for c in _ALERT_COLS.split(","))
        rows = await self._all(
            f"SELECT {_EVENT_COLS}, {cols} FROM events e JOIN alerts a ON a.id = e.alert_id"
            " WHERE e.user_id = ? AND e.id > ? AND e.id <= ? ORDER BY e.id LIMIT ?",
            (user_id, after, upto, limit))
        return [(_event(r), _alert(r[7:])) for r in rows]

    async def last_event_id(self) -> int:
        return (await self._one("SELECT COALESCE(MAX(id), 0) FROM events"))[0]

    async def alert_creations(self, since: float) -> tuple[int, list[tuple[int, float]]]:
        """The highest alert id created at or before `since` (0: none), and (id, created_at)
        of the CREATED alerts created after it, by id."""
        before = await self._one("SELECT MAX(id) FROM alerts WHERE created_at <= ?", (since,))
        after = await self._all(
            "SELECT id, created_at FROM alerts WHERE status = 'CREATED' AND created_at > ? "
            "ORDER BY id", (since,))
        return before[0] or 0, [tuple(r) for r in after]

    async def trigger_alerts(self, items: Iterable[Hit | Arm | tuple]) -> list[Alert]:
        """Record triggers (Hit: status TRIGGERED, an event, its outbox row) and re-arms
        (Arm), in order, all in ONE transaction.

        A Hit on an alert that is no longer CREATED and armed with that asset, target,
        direction (and window) -- deleted, changed or expired meanwhile -- is skipped; tuples
        are read as Hits. Returns the alerts triggered, each with its new `event`.
        """
        done: list[Alert] = []
        now = clock.now()
        async with self._tx() as db:
            for item in items:
                if isinstance(item, Arm):
                    await db.execute(
                        "UPDATE alerts SET status = 'CREATED', armed = ?, rearm_at = NULL,"
                        " updated_at = ? WHERE id = ? AND ((status = 'TRIGGERED' AND repeat = 1)"
                        " OR (status = 'CREATED' AND armed = 0))",
                        (int(item.armed), now, item.alert_id))
                    continue
                alert = await _trigger(db, Hit(*item), now)
                if alert is not None:
                    done.append(alert)
        return done

    async def purge_deleted_alerts(self, older_than: float) -> int:
        """Remove for good the DELETED alerts deleted before `older_than` (epoch s), with
        their outbox rows; returns how many. Small transactions, so that other writes (a
        trigger batch) never wait behind one long purge."""
        total = 0
        while True:
            async with self._tx() as db:
                cur = await db.execute(
                    "DELETE FROM alerts WHERE id IN (SELECT id FROM alerts"
                    " WHERE status = 'DELETED' AND updated_at < ? LIMIT 1000)", (older_than,))
                removed = cur.rowcount
            total += removed
            if removed < 1000:
                return total

    # outbox ---------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int, exclude: Collection[int] = ()
                         ) -> list[OutboxItem]:
        """Pending emails whose next attempt is due, oldest first, except `exclude`."""
        ids = tuple(exclude)
        rows = await self._all(
            "SELECT o.id, o.recipient, o.attempts, e.time, e.price, e.backfill, "
            + ", ".join("a." + c.strip() for c in _ALERT_COLS.split(","))
            + " FROM outbox o JOIN alerts a ON a.id = o.alert_id"
            " LEFT JOIN events e ON e.id = o.event_id"
            " WHERE o.status = 'pending' AND o.next_attempt_at <= ?"
            f" AND o.id NOT IN ({','.join('?' * len(ids))})"
            " ORDER BY o.next_attempt_at, o.id LIMIT ?", (now, *ids, limit))
        items = []
        for r in rows:
            alert = _alert(r[6:])
            if r[3] is not None:  # a repeating alert: the email is about this trigger
                alert = replace(alert, triggered_at=r[3], triggered_price=r[4],
                                backfill=r[5])
            items.append(OutboxItem(r[0], r[1], r[2], alert))
        return items

    async def outbox_current(self, outbox_id: int, attempts: int) -> bool:
        """Whether the email is still pending after exactly `attempts` attempts.

        The sender asks right before sending: a row read before another send finished
        (stale) must not be sent twice.
        """
        row = await self._one("SELECT status, attempts FROM outbox WHERE id = ?",
                              (outbox_id,))
        return row is not None and row[0] == "pending" and row[1] == attempts

    async def next_outbox_due(self, exclude: Collection[int] = ()) -> float | None:
        """When the earliest pending email not in `exclude` is due, or None."""
        ids = tuple(exclude)
        row = await self._one(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending'"
            f" AND id NOT IN ({','.join('?' * len(ids))})", ids)
        return row[0]

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._all("SELECT status, COUNT(*) FROM outbox GROUP BY status")
        counts = {"pending": 0, "sent": 0, "failed": 0}
        counts.update({r[0]: r[1] for r in rows})
        return counts

    async def outbox_sent(self, outbox_id: int) -> None:
        """Record that the SMTP server accepted the email (one small commit)."""
        await self._outbox_set(outbox_id, "sent", None, None, sent_at=clock.now())

    async def outbox_retry(self, outbox_id: int, next_attempt_at: float, error: str) -> None:
        await self._outbox_set(outbox_id, "pending", next_attempt_at, error)

    async def outbox_failed(self, outbox_id: int, error: str) -> None:
        await self._outbox_set(outbox_id, "failed", None, error)

    async def _outbox_set(self, outbox_id: int, status: str, next_attempt_at: float | None,
                          error: str | None, sent_at: float | None = None) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE outbox SET status = ?, attempts = attempts + 1,"
                " next_attempt_at = COALESCE(?, next_attempt_at), last_error = ?,"
                " sent_at = ? WHERE id = ?",
                (status, next_attempt_at, error, sent_at, outbox_id))
            await db.execute(
                "UPDATE alerts SET notified = ? WHERE id = (SELECT alert_id FROM outbox"
                " WHERE id = ?)", (status, outbox_id))

    # quotes ---------------------------------------------------------------------------

    async def add_quote(self, from_currency: str, to_currency: str, rate: float,
                        bid: float | None, ask: float | None, source_time: str) -> Quote:
        fetched_at = clock.now()
        async with self._tx() as db:
            cur = await db.execute(
                "INSERT INTO quotes(from_currency, to_currency, rate, bid, ask, source_time,"
                " fetched_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (from_currency, to_currency, rate, bid, ask, source_time, fetched_at))
            quote_id = cur.lastrowid
        return Quote(quote_id, from_currency, to_currency, rate, bid, ask, source_time,
                     fetched_at)

    async def quote_span(self) -> tuple[int, int]:
        """(number of quotes, highest id): a consistent view for listing them all."""
        count, top = await self._one("SELECT COUNT(*), MAX(id) FROM quotes")
        return count, top or 0

    async def latest_quote(self) -> Quote | None:
        row = await self._one(f"SELECT {_QUOTE_COLS} FROM quotes ORDER BY id DESC LIMIT 1")
        return _quote(row) if row else None

    async def list_quotes(self, offset: int, limit: int) -> list[Quote]:
        """One page of quotes, newest first."""
        rows = await self._all(
            f"SELECT {_QUOTE_COLS} FROM quotes ORDER BY id DESC LIMIT ? OFFSET ?",
            (limit, offset))
        return [_quote(r) for r in rows]

    async def iter_quotes(self, upto_id: int, batch: int = 1000
                          ) -> AsyncIterator[list[Quote]]:
        """Every quote with id <= `upto_id`, newest first, in batches (keyset pagination:
        constant memory however many rows there are)."""
        last = upto_id + 1
        while True:
            rows = await self._all(
                f"SELECT {_QUOTE_COLS} FROM quotes WHERE id < ? ORDER BY id DESC LIMIT ?",
                (last, batch))
            if not rows:
                return
            yield [_quote(r) for r in rows]
            last = rows[-1][0]

    # extra feeds ----------------------------------------------------------------------

    async def add_feed(self, url: str, created_by: int | None) -> int:
        """Store an extra feed URL. Raises Conflict when it is stored already."""
        try:
            async with self._tx() as db:
                cur = await db.execute(
                    "INSERT INTO feeds(url, created_by, created_at) VALUES (?, ?, ?)",
                    (url, created_by, clock.now()))
                return cur.lastrowid
        except sqlite3.IntegrityError:
            raise Conflict("feed already exists") from None

    async def remove_feed(self, feed_id: int) -> None:
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM feeds WHERE id = ?", (feed_id,))
            if cur.rowcount == 0:
                raise NotFound("feed not found")

    async def feeds(self) -> list[tuple[int, str]]:
        return [(r[0], r[1]) for r in await self._all("SELECT id, url FROM feeds ORDER BY id")]

    # ---- candles (rows: symbol, timeframe, start, open, high, low, close, volume, trades,
    #      first_ts, last_ts; times in ms)

    async def upsert_candles(self, rows: Collection[tuple]) -> None:
        """Write candles in one transaction (a newer state of a candle replaces the old)."""
        if rows:
            async with self._tx() as db:
                await db.executemany(_UPSERT_CANDLE, rows)

    async def recent_candles(self, symbol: str, timeframe: str, limit: int) -> list[tuple]:
        """The newest `limit` stored candles, oldest first."""
        rows = await self._all(
            f"SELECT {_CANDLE_COLUMNS} FROM candles WHERE symbol = ? AND timeframe = ? "
            "ORDER BY start DESC LIMIT ?", (symbol, timeframe, limit))
        rows.reverse()
        return rows

    async def candles_between(self, symbol: str, timeframe: str, start: int, end: int,
                              limit: int) -> list[tuple]:
        """The newest `limit` stored candles starting within [start, end], oldest first."""
        rows = await self._all(
            f"SELECT {_CANDLE_COLUMNS} FROM candles WHERE symbol = ? AND timeframe = ? "
            "AND start BETWEEN ? AND ? ORDER BY start DESC LIMIT ?",
            (symbol, timeframe, start, end, limit))
        rows.reverse()
        return rows

    async def prune_candles(self, timeframe: str, keep: int, size_ms: int) -> int:
        """Delete candles of `timeframe` older than `keep` periods before each symbol's newest."""
        async with self._tx() as db:
            cur = await db.execute(
                "DELETE FROM candles WHERE timeframe = ?1 AND start < "
                "(SELECT MAX(start) FROM candles c WHERE c.symbol = candles.symbol "
                "AND c.timeframe = ?1) - ?2", (timeframe, keep * size_ms))
            return cur.rowcount


_CANDLE_COLUMNS = ("symbol, timeframe, start, open, high, low, close, volume, trades, "
                   "first_ts, last_ts")
_UPSERT_CANDLE = (f"INSERT OR REPLACE INTO candles ({_CANDLE_COLUMNS}) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


async def _configure(db: aiosqlite.Connection) -> None:
    await db.execute("PRAGMA foreign_keys=ON")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute("PRAGMA busy_timeout=5000")


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
    return fields


async def _trigger(db: aiosqlite.Connection, hit: Hit, now: float) -> Alert | None:
    """One Hit inside trigger_alerts' transaction: the alert, with its event, or None."""
    alert_id, asset, target, direction, price, at, backfill, window = hit
    # A user without an email (seed 000's register, compat.py) gets no email: no outbox
    # row, and `notified` stays null.
    cur = await db.execute(
        "UPDATE alerts SET status = 'TRIGGERED', triggered_at = ?, triggered_price = ?,"
        " triggered_backfill = ?, updated_at = ?, trigger_count = trigger_count + 1,"
        " rearm_at = CASE WHEN repeat = 1 THEN ? + cooldown END,"
        " notified = CASE WHEN (SELECT email"
        " FROM users WHERE id = alerts.user_id) = '' THEN NULL ELSE 'pending' END"
        " WHERE id = ? AND status = 'CREATED' AND armed = 1 AND asset = ?"
        " AND COALESCE(price, percent) = ? AND direction = ? AND COALESCE(win, '') = ?"
        " AND (expires_at IS NULL OR expires_at > ?)",
        (at, price, backfill, now, at, alert_id, asset, target, direction, window or "", at))
    if cur.rowcount == 0:
        return None
    cur = await db.execute(
        "INSERT INTO events(alert_id, user_id, time, price, backfill)"
        " SELECT id, user_id, ?, ?, ? FROM alerts WHERE id = ?", (at, price, backfill, alert_id))
    event_id = cur.lastrowid
    cur = await db.execute(
        "INSERT INTO outbox(alert_id, event_id, recipient, next_attempt_at, created_at)"
        " SELECT a.id, ?, u.email, ?, ? FROM alerts a JOIN users u ON u.id = a.user_id"
        " WHERE a.id = ? AND u.email <> ''", (event_id, now, now, alert_id))
    deliveries = (("email", "pending"),) if cur.rowcount == 1 else ()
    async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,)) as c:
        alert = _alert(await c.fetchone())
    event = Event(event_id, alert_id, alert.user_id, at, price, backfill, deliveries)
    return replace(alert, event=event)


async def _revoke_family(db: aiosqlite.Connection, family: str, at: float) -> None:
    await db.execute(
        "UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL",
        (at, family))
