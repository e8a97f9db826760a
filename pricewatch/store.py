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

import aiosqlite

from . import clock
from .records import Alert, OutboxItem, Quote, RotateResult, User
from .schema import SchemaError, migrate, username_key

__all__ = ["Alert", "Conflict", "NotFound", "OutboxItem", "Quote", "RotateResult", "Store",
           "StoreError", "UnknownUser", "User", "bcrypt_cost"]

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
               "triggered_price, notified")
_QUOTE_COLS = "id, from_currency, to_currency, rate, bid, ask, source_time, fetched_at"
_USER_COLS = "id, username, email, password_hash, is_admin"
_BCRYPT_PREFIX = re.compile(r"\$2[aby]\$(\d\d)\$")


def bcrypt_cost(password_hash: str) -> int | None:
    """The cost of a bcrypt hash (`$2b$12$...` -> 12), None when it is not one."""
    match = _BCRYPT_PREFIX.match(password_hash)
    return int(match.group(1)) if match else None


def _alert(row) -> Alert:
    return Alert(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9])


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

    async def create_alert(self, user_id: int, asset: str, price: float, direction: str,
                           max_active: int) -> Alert:
        """Insert a CREATED alert. Raises Conflict when the user has `max_active` already,
        UnknownUser when the user does not exist (any more)."""
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
            cur = await db.execute(
                "INSERT INTO alerts(user_id, asset, price, direction, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", (user_id, asset, price, direction, now, now))
            alert_id = cur.lastrowid
        return Alert(alert_id, user_id, asset, price, direction, "CREATED", now, None, None,
                     None)

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

    async def update_alert(self, user_id: int, alert_id: int, asset: str, price: float,
                           direction: str) -> Alert:
        """Change a CREATED alert. NotFound if not the user's; Conflict if not CREATED."""
        async with self._tx() as db:
            async with db.execute(
                "SELECT status FROM alerts WHERE id = ? AND user_id = ?",
                (alert_id, user_id)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound("alert not found")
            if row[0] != "CREATED":
                raise Conflict(f"alert is {row[0]}; only CREATED alerts can change")
            await db.execute(
                "UPDATE alerts SET asset = ?, price = ?, direction = ?, updated_at = ?"
                " WHERE id = ?", (asset, price, direction, clock.now(), alert_id))
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

    async def active_alerts(self) -> list[tuple[int, str, float, str]]:
        """(id, asset, price, direction) of every CREATED alert."""
        return [tuple(r) for r in await self._all(
            "SELECT id, asset, price, direction FROM alerts WHERE status = 'CREATED'")]

    async def trigger_alerts(self, hits: Iterable[tuple[int, str, float, str, float, float]]
                             ) -> list[Alert]:
        """Mark alerts TRIGGERED and queue their emails, all in ONE transaction.

        `hits` holds (alert_id, asset, target, direction, trade price, trade time). An alert
        that is no longer CREATED with that asset, target and direction (deleted or changed
        meanwhile) is skipped. Returns the alerts that were triggered.
        """
        done: list[Alert] = []
        now = clock.now()
        async with self._tx() as db:
            for alert_id, asset, target, direction, price, at in hits:
                cur = await db.execute(
                    "UPDATE alerts SET status = 'TRIGGERED', triggered_at = ?,"
                    " triggered_price = ?, notified = 'pending', updated_at = ?"
                    " WHERE id = ? AND status = 'CREATED' AND asset = ? AND price = ?"
                    " AND direction = ?", (at, price, now, alert_id, asset, target, direction))
                if cur.rowcount == 0:
                    continue
                await db.execute(
                    "INSERT INTO outbox(alert_id, recipient, next_attempt_at, created_at)"
                    " SELECT a.id, u.email, ?, ? FROM alerts a JOIN users u ON u.id = a.user_id"
                    " WHERE a.id = ?", (now, now, alert_id))
                async with db.execute(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?",
                                      (alert_id,)) as c:
                    done.append(_alert(await c.fetchone()))
        return done

    # outbox ---------------------------------------------------------------------------

    async def due_outbox(self, now: float, limit: int, exclude: Collection[int] = ()
                         ) -> list[OutboxItem]:
        """Pending emails whose next attempt is due, oldest first, except `exclude`."""
        ids = tuple(exclude)
        rows = await self._all(
            "SELECT o.id, o.recipient, o.attempts, "
            + ", ".join("a." + c.strip() for c in _ALERT_COLS.split(","))
            + " FROM outbox o JOIN alerts a ON a.id = o.alert_id"
            " WHERE o.status = 'pending' AND o.next_attempt_at <= ?"
            f" AND o.id NOT IN ({','.join('?' * len(ids))})"
            " ORDER BY o.next_attempt_at, o.id LIMIT ?", (now, *ids, limit))
        return [OutboxItem(r[0], r[1], r[2], _alert(r[3:])) for r in rows]

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


async def _revoke_family(db: aiosqlite.Connection, family: str, at: float) -> None:
    await db.execute(
        "UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL",
        (at, family))
