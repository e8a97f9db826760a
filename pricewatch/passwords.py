"""Password hashing: bcrypt in worker threads, and a login costs the same for any name.

New hashes use the configured cost (PRICEWATCH_BCRYPT_ROUNDS); a user whose hash has another
cost gets a new one at their next successful login (`needs_rehash`). A login for a name that
has no user checks a dummy hash instead, so that its timing tells nothing. Which cost that
dummy has is the rule that matters after a cost change, while old-cost hashes remain:

- The costs of the stored hashes are counted (at startup, then kept up to date by this
  process's registrations and rehashes).
- An unknown name gets one of those costs, drawn in proportion to how many users have it,
  by a keyed hash of the name's normalised form: the same name always costs the same, and
  unknown names spread over the costs exactly as the users do. A timing therefore says no
  more about whether a name exists than the share of users at that cost already says.
- With no user stored yet, the configured cost.

One dummy hash is kept per cost (made on first use, in a thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets

import bcrypt

from .store import User, bcrypt_cost

log = logging.getLogger(__name__)

MAX_PASSWORD_BYTES = 72  # bcrypt's limit


class Passwords:
    """Hash and check passwords at `rounds`; `costs` counts stored hashes per cost; `key`
    (secret, stable across restarts) picks an unknown name's dummy cost."""

    def __init__(self, rounds: int, costs: dict[int, int], key: bytes):
        self.rounds = rounds
        self._costs = {cost: n for cost, n in costs.items() if n > 0 and 4 <= cost <= 31}
        self._key = key
        self._dummies: dict[int, bytes] = {}

    async def hash(self, password: str, cost: int | None = None) -> str:
        """A new bcrypt hash of `password` (at the configured cost unless `cost` is given)."""
        salt = bcrypt.gensalt(cost or self.rounds)
        hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def check(self, password: str, user: User | None, name_key: str) -> bool:
        """Whether `password` is `user`'s. With no user (or a hash that is not bcrypt), a
        dummy of `dummy_cost(name_key)` is checked instead and the answer is False; a
        password that could never have been stored still costs one check of the user's
        hash. So each answer takes one bcrypt check of a cost the name already has."""
        cost = bcrypt_cost(user.password_hash) if user is not None else None
        if user is None or cost is None:
            cost = self.dummy_cost(name_key)
            dummy = self._dummies.get(cost)
            if dummy is None:
                dummy = self._dummies[cost] = (await self.hash(secrets.token_hex(8), cost)).encode()
            await asyncio.to_thread(bcrypt.checkpw, b"x", dummy)
            return False
        stored = user.password_hash.encode()
        raw = password.encode()
        if len(raw) > MAX_PASSWORD_BYTES or b"\x00" in raw:  # bcrypt would refuse it
            await asyncio.to_thread(bcrypt.checkpw, b"x", stored)
            return False
        try:
            return await asyncio.to_thread(bcrypt.checkpw, raw, stored)
        except ValueError:  # a corrupt stored hash: nobody can log in with it
            log.warning("user %d has a corrupt password hash; it cannot log in", user.id)
            return False

    def dummy_cost(self, name_key: str) -> int:
        """The cost spent on a login for `name_key` when no user has that name (see the
        module docstring)."""
        total = sum(self._costs.values())
        if not total:
            return self.rounds
        digest = hmac.new(self._key, name_key.encode(), hashlib.sha256).digest()
        pick = int.from_bytes(digest[:8], "big") % total
        for cost in sorted(self._costs):
            pick -= self._costs[cost]
            if pick < 0:
                return cost
        raise AssertionError("unreachable: pick < total")

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether a hash that just matched should be replaced by one at the configured cost."""
        return bcrypt_cost(password_hash) != self.rounds

    def counted(self, old_hash: str | None, new_hash: str) -> None:
        """Record that a stored hash changed from `old_hash` (None: a new user) to `new_hash`."""
        for hashed, step in ((old_hash, -1), (new_hash, 1)):
            cost = bcrypt_cost(hashed) if hashed is not None else None
            if cost is not None and 4 <= cost <= 31:
                count = self._costs.get(cost, 0) + step
                if count > 0:
                    self._costs[cost] = count
                else:
                    self._costs.pop(cost, None)
