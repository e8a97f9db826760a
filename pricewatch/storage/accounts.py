"""Settings, users, login addresses and refresh tokens."""

from __future__ import annotations

import hmac
import re
import sqlite3
from typing import NamedTuple

import aiosqlite

from .. import clock
from ..records import RotateResult, User
from ..schema import username_key
from .base import Conflict, Database, UnknownUser, inserted_id, present

_USER_COLS = "id, username, email, password_hash, is_admin, email_verified"
_BCRYPT_PREFIX = re.compile(r"\$2[aby]\$(\d\d)\$")


def bcrypt_cost(password_hash: str) -> int | None:
    """The cost of a bcrypt hash (`$2b$12$...` -> 12), None when it is not one."""
    match = _BCRYPT_PREFIX.match(password_hash)
    return int(match.group(1)) if match else None


def _user(row) -> User:
    return User(row[0], row[1], row[2], row[3], bool(row[4]), bool(row[5]))


class CodeCheck(NamedTuple):
    """The outcome of `check_email_code`. status: "verified" (just now), "already" (it was),
    "wrong" (`tries_left` more may be made), "spent" (no tries left, or expired: a new code
    is needed), "none" (no code was issued for the current address), "no_email"."""

    status: str
    tries_left: int = 0


class IssueResult(NamedTuple):
    """What `issue_email_code` / `change_email` did: the user as it is now, whether a code
    was `issued`, and when none was for being too soon, `wait` seconds until one may be."""

    user: User
    issued: bool
    wait: float | None = None


class AccountsMixin(Database):
    """Store methods for settings, users, login addresses and refresh tokens."""

    # settings -------------------------------------------------------------------------

    async def setting(self, key: str, default: str) -> str:
        """Return the stored value for `key`, storing `default` first if it has none."""
        async with self._tx() as db:
            await db.execute(
                "INSERT OR IGNORE INTO settings(key, value) VALUES (?, ?)", (key, default)
            )
            async with db.execute("SELECT value FROM settings WHERE key = ?", (key,)) as cur:
                return present(await cur.fetchone())[0]

    # users ----------------------------------------------------------------------------

    async def create_user(
        self,
        username: str,
        email: str,
        password_hash: str,
        is_admin: bool = False,
        email_verified: bool = False,
    ) -> User:
        """Insert a user (the name stored as given). Raises Conflict when the name, or any
        name with the same `username_key` (`Alice` for `alice`), is taken. The address is
        unverified unless `email_verified` (`createuser`: the operator vouches for it)."""
        try:
            async with self._tx() as db:
                cur = await db.execute(
                    "INSERT INTO users(username, username_key, email, password_hash, is_admin,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        username,
                        username_key(username),
                        email,
                        password_hash,
                        int(is_admin),
                        clock.now(),
                    ),
                )
                user_id = inserted_id(cur)
                if email_verified:  # a separate statement: the INSERT suits older schemas
                    await db.execute("UPDATE users SET email_verified = 1 WHERE id = ?", (user_id,))
        except sqlite3.IntegrityError:
            raise Conflict(f"username {username!r} is taken") from None
        return User(user_id, username, email, password_hash, is_admin, email_verified)

    async def user_by_name(self, username: str) -> User | None:
        """The user `username` names: the one registered exactly so, else the one whose name
        has the same `username_key` (names that collided before keys existed keep their
        exact spelling; see schema.py)."""
        row = await self._one(
            f"SELECT {_USER_COLS} FROM users WHERE username = ? OR username_key = ?"
            " ORDER BY username = ? DESC LIMIT 1",
            (username, username_key(username), username),
        )
        return _user(row) if row else None

    async def user_for_login(
        self, username: str, address: str, since: float
    ) -> tuple[User | None, bool]:
        """(`user_by_name(username)`, whether `address` logged into that user at or after
        `since`), in one query: the answer takes the same path whichever it is."""
        row = await self._one(
            f"SELECT {_USER_COLS}, EXISTS(SELECT 1 FROM login_addresses a"
            "  WHERE a.user_id = users.id AND a.address = ? AND a.last_login >= ?)"
            " FROM users WHERE username = ? OR username_key = ?"
            " ORDER BY username = ? DESC LIMIT 1",
            (address, since, username, username_key(username), username),
        )
        return (_user(row), bool(row[6])) if row else (None, False)

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
                (new_hash, user_id, old_hash),
            )
            return cur.rowcount == 1

    async def password_costs(self) -> dict[int, int]:
        """bcrypt cost -> number of users whose hash has it (unparsable hashes left out)."""
        rows = await self._all("SELECT substr(password_hash, 1, 7), COUNT(*) FROM users GROUP BY 1")
        costs: dict[int, int] = {}
        for prefix, count in rows:
            cost = bcrypt_cost(prefix)
            if cost is not None:
                costs[cost] = costs.get(cost, 0) + count
        return costs

    async def purge_login_addresses(self, before: float) -> int:
        """Forget logins made before `before` (see `add_refresh_token`); returns how many."""
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM login_addresses WHERE last_login < ?", (before,))
            return cur.rowcount

    # email verification ---------------------------------------------------------------
    # One code per user (email_codes), stored only as a keyed hash of it (the API computes
    # it: the key is a server secret). `sent_at` paces how often codes are issued.

    async def issue_email_code(
        self, user_id: int, code_hash: str, now: float, ttl: float, tries: int, min_interval: float
    ) -> IssueResult:
        """Replace the user's code with `code_hash` for their current address, valid `ttl`
        seconds for `tries` attempts, unless one was issued less than `min_interval` ago
        (then `wait` says how long until one may be). Nothing is issued for an address that
        is verified or empty (`issued` False, `wait` None). Raises UnknownUser."""
        async with self._tx() as db:
            user = await _locked_user(db, user_id)
            if user.email_verified or not user.email:
                return IssueResult(user, False)
            wait = await _code_wait(db, user_id, now, min_interval)
            if wait is not None:
                return IssueResult(user, False, wait)
            await _put_code(db, user, code_hash, now, ttl, tries)
            return IssueResult(user, True)

    async def change_email(
        self,
        user_id: int,
        email: str,
        code_hash: str | None,
        now: float,
        ttl: float,
        tries: int,
        min_interval: float,
    ) -> IssueResult:
        """Set the user's address to `email`, unverified, dropping their code; with
        `code_hash`, a code for the new address is issued in the same commit, and the change
        is refused (`wait` seconds) when a code was issued less than `min_interval` ago.
        The same address again changes nothing (`issued` False). Raises UnknownUser."""
        async with self._tx() as db:
            user = await _locked_user(db, user_id)
            if user.email == email:
                return IssueResult(user, False)
            if code_hash is not None:
                wait = await _code_wait(db, user_id, now, min_interval)
                if wait is not None:
                    return IssueResult(user, False, wait)
            await db.execute(
                "UPDATE users SET email = ?, email_verified = 0 WHERE id = ?", (email, user_id)
            )
            await db.execute("DELETE FROM email_codes WHERE user_id = ?", (user_id,))
            user = User(user.id, user.username, email, user.password_hash, user.is_admin, False)
            if code_hash is not None:
                await _put_code(db, user, code_hash, now, ttl, tries)
            return IssueResult(user, code_hash is not None)

    async def check_email_code(self, user_id: int, code_hash: str, now: float) -> CodeCheck:
        """Try `code_hash` against the user's code: a match verifies the address (and makes
        their waiting email deliveries due now, in the same commit); a miss spends a try.
        Raises UnknownUser."""
        async with self._tx() as db:
            user = await _locked_user(db, user_id)
            if user.email_verified:
                return CodeCheck("already")
            if not user.email:
                return CodeCheck("no_email")
            async with db.execute(
                "SELECT email, code_hash, expires_at, tries_left FROM email_codes"
                " WHERE user_id = ?",
                (user_id,),
            ) as cur:
                row = await cur.fetchone()
            if row is None or row[0] != user.email:
                return CodeCheck("none")
            _, stored, expires_at, tries_left = row
            if tries_left <= 0 or expires_at <= now:
                return CodeCheck("spent")
            if hmac.compare_digest(stored, code_hash):
                await _mark_verified(db, user_id, now)
                return CodeCheck("verified")
            await db.execute(
                "UPDATE email_codes SET tries_left = tries_left - 1 WHERE user_id = ?", (user_id,)
            )
            return CodeCheck("wrong", tries_left - 1)

    # refresh tokens -------------------------------------------------------------------

    async def add_refresh_token(
        self,
        jti: str,
        user_id: int,
        family: str,
        issued_at: float,
        expires_at: float,
        address: str | None = None,
        forget_before: float = 0.0,
        max_addresses: int = 64,
    ) -> None:
        """Record the refresh token of a new login. With `address`, also record that the
        user logged in from it (in the same commit), forgetting the user's logins from
        before `forget_before` and all but their `max_addresses` most recent addresses.
        Raises UnknownUser when the user does not exist (any more)."""
        try:
            async with self._tx() as db:
                await db.execute(
                    "INSERT INTO refresh_tokens(jti, user_id, family, issued_at, expires_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (jti, user_id, family, issued_at, expires_at),
                )
                if address is not None:
                    await db.execute(
                        "INSERT INTO login_addresses(user_id, address, last_login)"
                        " VALUES (?, ?, ?) ON CONFLICT(user_id, address)"
                        " DO UPDATE SET last_login = excluded.last_login",
                        (user_id, address, issued_at),
                    )
                    await db.execute(
                        "DELETE FROM login_addresses WHERE user_id = ? AND (last_login < ?"
                        " OR address NOT IN (SELECT address FROM login_addresses"
                        "  WHERE user_id = ? ORDER BY last_login DESC LIMIT ?))",
                        (user_id, forget_before, user_id, max_addresses),
                    )
        except sqlite3.IntegrityError:  # the only constraint a fresh uuid can fail: the FK
            raise UnknownUser(f"user {user_id} does not exist") from None

    async def rotate_refresh_token(
        self, jti: str, new_jti: str, issued_at: float, expires_at: float
    ) -> RotateResult:
        """Spend refresh token `jti` and record `new_jti` in its family, atomically.

        A token that was already spent is a reuse: the whole family is revoked.
        """
        async with self._tx() as db:
            async with db.execute(
                "SELECT t.user_id, t.family, t.spent_at, t.revoked_at FROM refresh_tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.jti = ?",
                (jti,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:  # no such token, or its user is gone (deleted without cascade)
                return RotateResult("unknown")
            user_id, family, spent_at, revoked_at = row
            if revoked_at is not None:
                return RotateResult("revoked", user_id, family)
            if spent_at is not None:
                await _revoke_family(db, family, issued_at)
                return RotateResult("reused", user_id, family)
            await db.execute(
                "UPDATE refresh_tokens SET spent_at = ? WHERE jti = ?", (issued_at, jti)
            )
            await db.execute(
                "INSERT INTO refresh_tokens(jti, user_id, family, issued_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (new_jti, user_id, family, issued_at, expires_at),
            )
            return RotateResult("ok", user_id, family)

    async def revoke_token_family(self, jti: str) -> RotateResult:
        """Revoke every token of the login that refresh token `jti` belongs to."""
        async with self._tx() as db:
            async with db.execute(
                "SELECT t.user_id, t.family FROM refresh_tokens t"
                " JOIN users u ON u.id = t.user_id WHERE t.jti = ?",
                (jti,),
            ) as cur:
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
            " GROUP BY family",
            (since,),
        )
        return {r[0]: r[1] for r in rows}


async def _revoke_family(db: aiosqlite.Connection, family: str, at: float) -> None:
    await db.execute(
        "UPDATE refresh_tokens SET revoked_at = ? WHERE family = ? AND revoked_at IS NULL",
        (at, family),
    )


async def _locked_user(db: aiosqlite.Connection, user_id: int) -> User:
    """The user, read inside a write transaction. Raises UnknownUser."""
    async with db.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        raise UnknownUser(f"user {user_id} does not exist")
    return _user(row)


async def _code_wait(
    db: aiosqlite.Connection, user_id: int, now: float, min_interval: float
) -> float | None:
    """Seconds until the user may be issued another code, None when they may now."""
    async with db.execute("SELECT sent_at FROM email_codes WHERE user_id = ?", (user_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    # A clock set back since then waits min_interval at most.
    wait = min(row[0] + min_interval - now, min_interval)
    return wait if wait > 0 else None


async def _put_code(
    db: aiosqlite.Connection, user: User, code_hash: str, now: float, ttl: float, tries: int
) -> None:
    await db.execute(
        "INSERT INTO email_codes(user_id, email, code_hash, expires_at, tries_left, sent_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET email = excluded.email,"
        " code_hash = excluded.code_hash, expires_at = excluded.expires_at,"
        " tries_left = excluded.tries_left, sent_at = excluded.sent_at",
        (user.id, user.email, code_hash, now + ttl, tries, now),
    )


async def _mark_verified(db: aiosqlite.Connection, user_id: int, now: float) -> None:
    await db.execute("UPDATE users SET email_verified = 1 WHERE id = ?", (user_id,))
    await db.execute("DELETE FROM email_codes WHERE user_id = ?", (user_id,))
    # Alert mail that waited for the address is due now (the Deliverer is woken by the API).
    await db.execute(
        "UPDATE deliveries SET next_attempt_at = ? WHERE user_id = ? AND channel = 'email'"
        " AND status = 'pending'",
        (now, user_id),
    )
