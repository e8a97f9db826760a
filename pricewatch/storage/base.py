"""Connections and transactions: one writer (serialised, explicit `BEGIN IMMEDIATE`), one
reader (WAL: committed data while a write runs), a probe for `PRAGMA data_version`.

A write refused by the storage itself (disk full, read-only file, I/O error) raises
`StorageUnavailable`, whatever the statement: the HTTP edge answers 503, `ping` reports the
database "degraded" until a write succeeds again, and the log gets one line a minute."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from typing import Self, TypeVar

import aiosqlite

from ..records import Alert
from ..schema import SchemaError, migrate

log = logging.getLogger("pricewatch.store")
T = TypeVar("T")
R = TypeVar("R")

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


class StorageUnavailable(StoreError):
    """The database cannot take writes now: the disk is full, the file is read-only, or an
    I/O error. Reads may still work, and the condition passes by itself once space (or the
    permission) returns: the HTTP edge answers 503 with Retry-After, never 500."""

    detail = "The database cannot store anything right now (disk full or read-only)."
    retry_after = 30  # seconds; what a client is told to wait before it tries again


def present(row: R | None) -> R:
    """`row` from a query that always returns one (an aggregate, a row known to exist)."""
    assert row is not None
    return row


def inserted_id(cursor: sqlite3.Cursor | aiosqlite.Cursor) -> int:
    """The rowid of the row the INSERT just run on `cursor` made."""
    rowid = cursor.lastrowid
    assert rowid is not None
    return rowid


def log_failure(logger: logging.Logger, exc: BaseException, msg: str, *args: object) -> None:
    """Log a background write's failure with its traceback, except StorageUnavailable: the
    store itself logs a full disk or read-only file once a minute, however many fail (this
    one only at DEBUG, without the traceback)."""
    if isinstance(exc, StorageUnavailable):
        logger.debug(msg, *args)
    else:
        logger.error(msg, *args, exc_info=exc)


# SQLite primary result codes that are about the storage, not the statement: the same write
# can succeed later. Extended codes (SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED...) carry the
# primary code in their low byte.
_UNAVAILABLE_CODES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)
LOG_EVERY = 60.0  # seconds between two log lines about refused writes
PROBE_EVERY = 1.0  # seconds between two write probes while degraded (see `ping`)


def _probe_write(conn: sqlite3.Connection) -> None:
    """A write that must allocate pages and append to the WAL as any real write would: a
    table with two pages of data, created and dropped in one transaction (nothing stays)."""
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute("CREATE TABLE IF NOT EXISTS pricewatch_write_probe (data BLOB)")
    conn.execute("INSERT INTO pricewatch_write_probe VALUES (zeroblob(?))", (2 * page,))
    conn.execute("DROP TABLE pricewatch_write_probe")


class Database:
    """The connections. Open with `await Store.open(path)`, close with `await store.close()`."""

    def __init__(
        self,
        path: str,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        probe: sqlite3.Connection | None = None,
    ):
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
        # Writes refused for want of storage (StorageUnavailable): since when (monotonic;
        # None while writes work), how many since the last log line, and when that was.
        self._refused_since: float | None = None
        self._refused = 0
        self._logged_at = -LOG_EVERY
        self._told = False  # a refusal was logged and its end not yet
        self._probed_at = -PROBE_EVERY

    @classmethod
    async def open(cls, path: str) -> Self:
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
        """One write transaction; commits on success, rolls back on any exception. A write
        refused for want of storage raises StorageUnavailable."""
        async with self._lock:
            changes = self._w.total_changes
            try:
                try:
                    # Inside the try: a cancel landing on BEGIN must still roll back, or the
                    # connection would stay in a transaction and every later write would fail.
                    await self._w.execute("BEGIN IMMEDIATE")
                    yield self._w
                except BaseException:
                    with suppress(sqlite3.Error):  # "no transaction is active"
                        await asyncio.shield(self._w.execute("ROLLBACK"))
                    raise
                try:
                    await asyncio.shield(self._w.execute("COMMIT"))
                except BaseException:  # a failed COMMIT must not leave the transaction open
                    with suppress(sqlite3.Error):
                        await asyncio.shield(self._w.execute("ROLLBACK"))
                    raise
            except sqlite3.Error as exc:
                raise self._unavailable(exc) or exc  # noqa: B904 - exc, or one in its context
            if self._w.total_changes != changes:
                self._wrote()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in ONE write transaction, in one hop to the writer's thread (as
        datasette's `execute_write_fn`): a batch of many statements costs one thread switch,
        not one per statement, and no cancel can land between its statements (a cancelled
        caller stops waiting; the transaction still commits or rolls back whole)."""

        def run(conn: sqlite3.Connection) -> tuple[T, bool]:
            changes = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):  # "no transaction is active"
                    conn.execute("ROLLBACK")
                raise
            return result, conn.total_changes != changes

        async with self._lock:
            try:
                # aiosqlite runs every call of this connection on its one thread, in order;
                # `_execute` queues a function there (the same queue its own methods use).
                result, changed = await asyncio.shield(self._w._execute(run, self._w._conn))
            except sqlite3.Error as exc:
                raise self._unavailable(exc) or exc  # noqa: B904 - exc, or one in its context
            if changed:
                self._wrote()
            return result

    def _unavailable(self, exc: sqlite3.Error) -> StorageUnavailable | None:
        """StorageUnavailable for an error that says the storage cannot take writes (then
        remembered for `ping`, and logged once a minute at most: a full disk must not fill
        the log with a traceback per request); None for any other error."""
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in _UNAVAILABLE_CODES:
            return None
        now = time.monotonic()
        if self._refused_since is None:
            self._refused_since = now
        self._refused += 1
        if now - self._logged_at >= LOG_EVERY:
            log.error(
                "database %s refuses writes (%s): they answer 503 until it takes "
                "them again (%d refused since the previous such line)",
                self.path,
                exc,
                self._refused,
            )
            self._logged_at, self._refused, self._told = now, 0, True
        return StorageUnavailable(str(exc))

    def _wrote(self) -> None:
        """A write changed rows and committed: the storage takes writes (again). (A write
        that changed nothing proves nothing: it never touched the disk.)"""
        if self._refused_since is not None:
            if self._told:  # once per line about refusals, never more often
                self._told = False
                log.warning(
                    "database %s takes writes again after %.0fs",
                    self.path,
                    time.monotonic() - self._refused_since,
                )
            self._refused_since = None

    async def _one(self, sql: str, params: Iterable = ()):
        rows = list(await self._r.execute_fetchall(sql, tuple(params)))
        return rows[0] if rows else None

    async def _all(self, sql: str, params: Iterable = ()) -> list:
        # One round trip to the connection's thread (execute + fetch + close in one call).
        return list(await self._r.execute_fetchall(sql, tuple(params)))

    async def schema_version(self) -> int:
        return present(await self._one("SELECT MAX(version) FROM schema_version"))[0] or 0

    async def ping(self) -> str:
        """ "ok"; "degraded" while writes are refused for want of storage (reads work). Raises
        if the database cannot answer a query. While degraded, a probe write (at most once
        a second) notices when writes work again even if nobody else writes."""
        await self._one("SELECT 1 FROM schema_version LIMIT 1")
        now = time.monotonic()
        if self._refused_since is not None and now - self._probed_at >= PROBE_EVERY:
            self._probed_at = now
            with suppress(StorageUnavailable):
                await self._write(_probe_write)
        return "ok" if self._refused_since is None else "degraded"


async def _configure(db: aiosqlite.Connection) -> None:
    await db.execute("PRAGMA foreign_keys=ON")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute("PRAGMA busy_timeout=5000")
