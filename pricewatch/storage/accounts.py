"""Settings, users, login addresses and refresh tokens."""

from __future__ import annotations

import re
import sqlite3

import aiosqlite

from .. import clock
from ..records import RotateResult, User
from ..schema import username_key
from .base import Conflict, UnknownUser

_USER_COLS = "id, username, email, password_hash, is_admin"
_BCRYPT_PREFIX = re.compile(r"\$2[aby]\$(\d\d)\$")


def bcrypt_cost(password_hash: str) -> int | None:
    """The cost of a bcrypt hash (`$2b$12$...` -> 12), None when it is not one."""
    match = _BCRYPT_PREFIX.match(password_hash)
    return int(match.group(1)) if match else None


def _user(row) -> User:
    return User(row[0], row[1], row[2], row[3], bool(row[4]))


class AccountsMixin:
    """Store methods for settings, users, login addresses and refresh tokens."""

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


async def _revoke_family(db: aiosqlite.Connection, family: str, at: float) -> None:
    await db.execute(
        "UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL",
        (at, family))

