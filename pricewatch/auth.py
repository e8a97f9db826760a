"""Users and JWT auth, simplejwt style: register, token pair, rotation, logout, me.

Passwords are bcrypt hashes computed in a thread (never on the event loop; passwords.py).
Tokens are HS256 JWTs verified with a fixed algorithm list. Every login starts a token
*family*; refreshing spends the old refresh token, and presenting a spent one revokes the
family, which also kills that login's access tokens (checked against an in-memory set).
A token speaks only for a user that still exists (`identity_middleware`).

Usernames are unique by `schema.username_key` (NFKC + case folding) and stored as
registered; login accepts any form with the same key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from aiohttp import web

from . import clock
from .addresses import client_address, limit_key
from .api import (
    ApiError,
    invalid,
    json_response,
    not_authenticated,
    read_json,
    text_field,
)
from .config import Settings
from .limits import SlidingWindow
from .passwords import MAX_PASSWORD_BYTES, Passwords
from .schema import username_key
from .store import Conflict, Store, UnknownUser, User

log = logging.getLogger(__name__)

ALGORITHMS = ["HS256"]  # fixed: never taken from the token header
USERNAME_RE = re.compile(r"[\w.@+-]{3,150}")
# A plain ASCII address (what SMTP servers take without extensions): the local part's
# usual characters, a dotted domain. No quotes, brackets, commas or comments.
EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}"
)
MAX_USER_ID = 2**63 - 1  # SQLite's INTEGER
KNOWN_ADDRESS_TTL = 30 * 86400  # a successful login makes its address known for 30 days
MAX_KNOWN_ADDRESSES = 64  # per user: the most recent ones
REGISTER_WINDOW = 3600.0  # PRICEWATCH_REGISTER_LIMIT counts per hour


class TokenInvalid(Exception):
    """The token is missing, malformed, tampered, expired, revoked or of the wrong type."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an access token speaks for."""

    user_id: int
    family: str
    expires: int  # epoch seconds (the token's `exp`)


class LoginLimiter:
    """Sliding-window count of failed logins per username and per client address.

    Parallel guesses must not slip past a check made before their outcome is known: an
    attempt in flight counts against its username as if it had failed, and an address may
    have at most `max_in_flight` attempts in flight. So one username sees at most
    `max_failures` guesses per window however they are sent, and one address at most
    `max_failures + max_in_flight`.
    """

    def __init__(self, max_failures: int, window: float, max_in_flight: int = 32):
        self.max_failures = max_failures
        self.window = window
        self.max_in_flight = max_in_flight
        # Failures per key; a spray of names is bounded (the keys quiet longest go first,
        # never an active attacker's).
        self._fails = SlidingWindow(max_failures, window, max_keys=50_000)
        self._inflight: dict[str, int] = {}

    def retry_after(self, user_key: str, addr_key: str, user_limit: bool = True) -> int | None:
        """Seconds until this attempt may be made, or None when it may be made now.

        With `user_limit` False only the address's own limits apply (an address the account
        owner logged in from: see `token`), counted as strictly as a username's: its
        attempts in flight count as failures, so it too sees at most `max_failures`.
        """
        now = time.monotonic()
        wait = 0
        if user_limit:
            checks = [(user_key, self._inflight.get(user_key, 0)), (addr_key, 0)]
        else:
            checks = [(addr_key, self._inflight.get(addr_key, 0))]
        for key, in_flight in checks:
            if self._fails.count(key, now) + in_flight >= self.max_failures:
                # Blocked by failures (until the oldest counted one leaves the window), or
                # by attempts still being checked (try again in a second).
                wait = max(wait, self._fails.check(key, now) or 1)
        if self._inflight.get(addr_key, 0) >= self.max_in_flight:
            wait = max(wait, 1)
        return wait or None

    def begin(self, keys: tuple[str, str]) -> None:
        for key in keys:
            self._inflight[key] = self._inflight.get(key, 0) + 1

    def end(self, keys: tuple[str, str], failed: bool, clear_user: bool = True) -> None:
        """The attempt `begin` announced is over. A success clears the username's failures
        unless `clear_user` is False (it got past them, so they were someone else's)."""
        now = time.monotonic()
        for key in keys:
            left = self._inflight[key] - 1
            if left:
                self._inflight[key] = left
            else:
                del self._inflight[key]
        if not failed:
            if clear_user:
                self._fails.forget(keys[0])  # the username starts afresh
            return
        for key in keys:
            self._fails.hit(key, now)


class Auth:
    """Password hashing, token issue/verification, the login and registration limits."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        secret: str,
        revoked: dict[str, float],
        costs: dict[int, int] | None = None,
    ):
        self.settings = settings
        self.store = store
        self._secret = secret
        self._revoked = revoked  # family -> when; pruned once no access token can be alive
        self.limiter = LoginLimiter(settings.login_max_failures, settings.login_window)
        # Registrations per client address (see `register` for what counts).
        self.registrations = SlidingWindow(settings.register_limit, REGISTER_WINDOW)
        # The dummy-cost key derives from the JWT secret: stable across restarts, so an
        # unknown name keeps costing the same (passwords.py).
        self.passwords = Passwords(
            settings.bcrypt_rounds,
            costs or {},
            hashlib.sha256(b"pricewatch dummy cost\0" + secret.encode()).digest(),
        )
        self._verified: dict[str, tuple[int, str, int | float]] = {}  # access token -> claims
        # Called with (family, when) at each revocation (a cluster's core publishes them).
        self.revoke_hooks: list[Callable[[str, float], None]] = []
        # Keys the hashes of emailed verification codes (verify_api.py); from the secret too.
        self.code_key = hashlib.sha256(b"pricewatch email code\0" + secret.encode()).digest()
        # Awaited with each newly registered user (verify_api: mails a verification code).
        self.register_hooks: list[Callable[[User], Awaitable[None]]] = []

    @classmethod
    async def create(cls, settings: Settings, store: Store) -> Auth:
        """The JWT secret comes from the settings, or is generated once and kept in the DB."""
        secret = settings.jwt_secret or await store.setting("jwt_secret", secrets.token_urlsafe(48))
        now = clock.now()
        purged = await store.purge_refresh_tokens(now - 86400)  # a day of grace for logs
        if purged:
            log.info("purged %d expired refresh tokens", purged)
        await store.purge_login_addresses(now - KNOWN_ADDRESS_TTL)
        revoked = await store.revoked_families(now - settings.access_ttl)
        return cls(settings, store, secret, revoked, await store.password_costs())

    def _revoke(self, family: str) -> None:
        self.note_revoked(family, clock.now())
        for hook in self.revoke_hooks:
            hook(family, self._revoked[family])

    def note_revoked(self, family: str, at: float) -> None:
        """Revoke `family` as of `at` (a cluster edge: a revocation heard from the core)."""
        self._revoked[family] = at
        if len(self._revoked) > 1000:  # forget families whose access tokens all expired
            horizon = clock.now() - self.settings.access_ttl
            for fam in [f for f, when in self._revoked.items() if when < horizon]:
                del self._revoked[fam]

    def revocations(self) -> dict[str, float]:
        """Every revoked family still remembered -> when."""
        return dict(self._revoked)

    def revoked(self, family: str) -> bool:
        return family in self._revoked

    # passwords ------------------------------------------------------------------------

    async def hash_password(self, password: str) -> str:
        """A bcrypt hash of `password` at the configured cost (computed in a thread)."""
        return await self.passwords.hash(password)

    async def rehash_if_needed(self, user: User, password: str) -> None:
        """After `password` matched: if `user`'s hash has another cost than the configured
        one, store a new hash at the configured cost (so old-cost hashes die out)."""
        if not self.passwords.needs_rehash(user.password_hash):
            return
        new_hash = await self.passwords.hash(password)
        if await self.store.set_password_hash(user.id, user.password_hash, new_hash):
            self.passwords.counted(user.password_hash, new_hash)

    # tokens ---------------------------------------------------------------------------

    def _encode(
        self, user_id: int, token_type: str, family: str, ttl: int, now: float
    ) -> tuple[str, str]:
        jti = uuid.uuid4().hex
        claims = {
            "token_type": token_type,
            "user_id": user_id,
            "iat": int(now),
            "exp": int(now) + ttl,
            "jti": jti,
            "fam": family,
        }
        return jwt.encode(claims, self._secret, algorithm="HS256"), jti

    async def issue_pair(self, user_id: int, address: str | None = None) -> dict[str, str]:
        """A new login: fresh family, access + refresh token, refresh recorded in the DB.

        With `address` (the client's), the login also makes that address known for the
        user (see `token`). Raises UnknownUser when the user no longer exists.
        """
        now = clock.now()
        family = uuid.uuid4().hex
        access, _ = self._encode(user_id, "access", family, self.settings.access_ttl, now)
        refresh, jti = self._encode(user_id, "refresh", family, self.settings.refresh_ttl, now)
        await self.store.add_refresh_token(
            jti,
            user_id,
            family,
            now,
            now + self.settings.refresh_ttl,
            address=address,
            forget_before=now - KNOWN_ADDRESS_TTL,
            max_addresses=MAX_KNOWN_ADDRESSES,
        )
        return {"access": access, "refresh": refresh}

    def decode(self, token: str, token_type: str) -> dict[str, Any]:
        """Verified claims of `token`. Raises TokenInvalid for anything not perfect: a bad
        signature, expiry, another type, a revoked login, or claims of the wrong shape."""
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=ALGORITHMS,
                options={"require": ["exp", "iat", "jti", "token_type", "user_id", "fam"]},
            )
        except jwt.PyJWTError as exc:
            raise TokenInvalid(str(exc)) from None
        except (TypeError, ValueError, OverflowError):  # PyJWT's int() of an odd exp/iat
            raise TokenInvalid("malformed claims") from None
        if claims.get("token_type") != token_type:
            raise TokenInvalid("wrong token type")
        if not _well_formed(claims):
            raise TokenInvalid("malformed claims")
        if claims["fam"] in self._revoked:
            raise TokenInvalid("token revoked")
        return claims

    def identity(self, token: str) -> Identity:
        """The identity of a valid access token. Raises TokenInvalid.

        A token verified once is remembered (bounded) with its expiry: clients present the
        same token on every request, and a full decode costs ~70 us. Expiry and revocation
        are still checked on every use. Whether the user still exists is not checked here
        (that needs the DB): `identity_middleware` does it for every request.
        """
        hit = self._verified.get(token)
        if hit is None:
            claims = self.decode(token, "access")
            if len(self._verified) >= 10_000:
                self._verified.clear()
            hit = self._verified[token] = (claims["user_id"], claims["fam"], claims["exp"])
        user_id, family, exp = hit
        if exp <= time.time() or family in self._revoked:  # PyJWT's rule: valid while now < exp
            del self._verified[token]
            raise TokenInvalid("token expired or revoked")
        return Identity(user_id, family, int(exp))

    async def rotate(self, refresh: str) -> dict[str, str]:
        """Spend `refresh`, return a new pair of the same login. Raises TokenInvalid (also
        when the user no longer exists)."""
        claims = self.decode(refresh, "refresh")
        now = clock.now()
        user_id, family = claims["user_id"], claims["fam"]
        access, _ = self._encode(user_id, "access", family, self.settings.access_ttl, now)
        new_refresh, new_jti = self._encode(
            user_id, "refresh", family, self.settings.refresh_ttl, now
        )
        result = await self.store.rotate_refresh_token(
            claims["jti"], new_jti, now, now + self.settings.refresh_ttl
        )
        if result.status == "reused":
            self._revoke(family)
        if result.status != "ok":
            raise TokenInvalid(f"refresh token {result.status}")
        return {"access": access, "refresh": new_refresh}

    async def logout(self, refresh: str) -> None:
        """End the login `refresh` belongs to. Raises TokenInvalid (also when the user no
        longer exists)."""
        claims = self.decode(refresh, "refresh")
        result = await self.store.revoke_token_family(claims["jti"])
        if result.status != "ok":
            raise TokenInvalid("unknown refresh token")
        assert result.family is not None  # an "ok" result names its login
        self._revoke(result.family)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (exp = 10**400)
        return False


def _well_formed(claims: dict[str, Any]) -> bool:
    """Whether a verified token's claims have the shapes this server writes: a signature
    proves who wrote them, not that every field is usable (`"user_id": true` is 1 to
    Python, 2**70 overflows SQLite, a string `exp` cannot be compared with a time)."""
    user_id = claims.get("user_id")
    return (
        _is_int(user_id)
        and 1 <= user_id <= MAX_USER_ID
        and _is_number(claims.get("exp"))
        and _is_number(claims.get("iat"))
        and isinstance(claims.get("jti"), str)
        and isinstance(claims.get("fam"), str)
    )


AUTH = web.AppKey("auth", Auth)
# Request state set by identity_middleware: access token -> its identity, for the tokens the
# request carries whose user exists.
LIVE_IDENTITIES = web.RequestKey("live_identities", dict[str, Identity])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set by compat.py for seed 000's register, whose users may give no email: then "" is
# stored, and nothing is ever mailed to it (store.trigger_alerts queues no email for "").
EMAIL_OPTIONAL = web.RequestKey("email_optional", bool)


def bearer_token(request: web.Request, allow_query: bool = False) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_query:
        return request.query.get("token") or None
    return None


@web.middleware
async def identity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Before any handler: check that the user of each valid access token the request
    carries (header, `?token=`) still exists, for `require_identity`, which is synchronous;
    and answer 401 when a write finds its user gone meanwhile (store.UnknownUser).

    The check is one primary-key probe on the reader connection (~30 us), made only for a
    token that verified (a forged or expired one costs no query). Tokens are cached, users
    are not: a user deleted from the database is refused from the next request on. A cluster
    edge has no database (`store` None): it trusts a verified, unrevoked token.
    """
    auth = request.app.get(AUTH)
    if auth is not None:
        live: dict[str, Identity] = {}
        for token in {t for t in (bearer_token(request), request.query.get("token")) if t}:
            try:
                identity = auth.identity(token)
            except TokenInvalid:
                continue
            if auth.store is None or await auth.store.user_exists(identity.user_id):
                live[token] = identity
        request[LIVE_IDENTITIES] = live
    try:
        return await handler(request)
    except UnknownUser:
        raise not_authenticated() from None


def require_identity(request: web.Request, allow_query: bool = False) -> Identity:
    """The caller's identity from its access token. Raises ApiError 401 for a missing,
    invalid, expired or revoked token, or one whose user no longer exists."""
    token = bearer_token(request, allow_query)
    if token is None:
        raise not_authenticated()
    try:
        identity = request.app[AUTH].identity(token)
    except TokenInvalid:
        raise not_authenticated() from None
    # Absent when identity_middleware did not run: refused, never served unchecked.
    if token not in request.get(LIVE_IDENTITIES, {}):
        raise not_authenticated()
    return identity


def _text_fields(
    data: dict[str, Any], names: tuple[str, ...]
) -> tuple[dict[str, str], dict[str, str]]:
    errors: dict[str, str] = {}
    values = {name: text_field(data, name, errors) for name in names}
    return values, errors


def _register_limited(wait: int) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        "Too many registrations from this address; try again later.",
        headers={"Retry-After": str(wait)},
    )


async def register(request: web.Request) -> web.Response:
    """Create a user and log in.

    At most PRICEWATCH_REGISTER_LIMIT registrations per client address per hour count: an
    attempt counts when it reaches the bcrypt hash, before hashing, whether it then succeeds
    or not (a name taken by a racing registration). Invalid bodies (400) and names already
    taken (409) never reach the hash and do not count; an address past its limit is
    answered 429 either way.
    """
    auth = request.app[AUTH]
    data = await read_json(request)
    names: tuple[str, ...] = ("username", "password", "email")
    if request.get(EMAIL_OPTIONAL) and data.get("email") in (None, ""):
        names = names[:2]
    values, errors = _text_fields(data, names)
    username, password, email = (values.get(k) for k in ("username", "password", "email"))
    if username is not None and not USERNAME_RE.fullmatch(username):
        errors["username"] = (
            "Enter a valid username of 3-150 characters: letters, digits and @/./+/-/_ only."
        )
    if password is not None:
        if len(password) < 8:
            errors["password"] = "Ensure this field has at least 8 characters."
        elif len(password.encode()) > MAX_PASSWORD_BYTES:
            errors["password"] = f"Ensure this field has at most {MAX_PASSWORD_BYTES} bytes."
        elif "\x00" in password:
            errors["password"] = "Null characters are not allowed."
    if email is not None and (len(email) > 254 or not EMAIL_RE.fullmatch(email)):
        errors["email"] = "Enter a valid email address."
    if errors:
        raise invalid(errors)
    assert username is not None and password is not None  # else an error above
    address = limit_key(client_address(request))
    wait = auth.registrations.check(address)
    if wait is not None:
        raise _register_limited(wait)
    if await auth.store.user_by_name(username) is not None:  # skip the bcrypt cost
        raise ApiError(409, "conflict", "A user with that username already exists.")
    # Counted here, right before the hash: take() checks and counts in one step, so parallel
    # registrations cannot all pass one check (the check above only spares a limited
    # address the lookup, and its answer may be stale after the await).
    wait = auth.registrations.take(address)
    if wait is not None:
        raise _register_limited(wait)
    hashed = await auth.hash_password(password)
    try:
        user = await auth.store.create_user(username, email or "", hashed)
    except Conflict:
        raise ApiError(409, "conflict", "A user with that username already exists.") from None
    auth.passwords.counted(None, hashed)
    tokens = await auth.issue_pair(user.id, address)
    for hook in auth.register_hooks:
        await hook(user)
    return json_response(
        {"id": user.id, "username": user.username, "email": user.email, **tokens}, status=201
    )


async def token(request: web.Request) -> web.Response:
    """Log in. Failures are limited per username (all its forms: one key) and per client
    address (LoginLimiter). An address that logged into the account within
    KNOWN_ADDRESS_TTL is exempt from the username's limit, so guesses made elsewhere never
    lock the owner out; it stays bound by its own address limit, and its attempts still
    cost a full bcrypt check. An unknown address learns nothing new: it is refused as
    before, without a check."""
    auth = request.app[AUTH]
    data = await read_json(request)
    values, errors = _text_fields(data, ("username", "password"))
    if errors:
        raise invalid(errors)
    username, password = values["username"], values["password"]
    address = limit_key(client_address(request))
    # No real username is longer than 150: such a name cannot log in, and is not kept as a
    # limiter key (it still counts against the address).
    name_key = username_key(username[:151])
    keys = ("user:" + name_key, "addr:" + address)
    user, known = None, False
    if len(username) <= 150:
        user, known = await auth.store.user_for_login(
            username, address, clock.now() - KNOWN_ADDRESS_TTL
        )
    # From here to begin() nothing awaits: parallel attempts see each other's in-flight count.
    wait = auth.limiter.retry_after(*keys)
    exempt = False
    if wait is not None and known:
        wait = auth.limiter.retry_after(*keys, user_limit=False)
        exempt = wait is None
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            "Too many failed logins; try again later.",
            headers={"Retry-After": str(wait)},
        )
    auth.limiter.begin(keys)
    ok = False
    try:
        ok = await auth.passwords.check(password, user, name_key)
    finally:
        # A success past the username's limit does not clear it: those failures were
        # someone else's guesses.
        auth.limiter.end(keys, failed=not ok, clear_user=not exempt)
    if not ok:
        raise ApiError(
            401, "bad_credentials", "No active account found with the given credentials."
        )
    assert user is not None  # check() is False without one
    await auth.rehash_if_needed(user, password)
    return json_response(await auth.issue_pair(user.id, address))


async def _refresh_field(request: web.Request) -> str:
    data = await read_json(request)
    values, errors = _text_fields(data, ("refresh",))
    if errors:
        raise invalid(errors)
    return values["refresh"]


async def refresh(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    refresh_token = await _refresh_field(request)
    try:
        return json_response(await auth.rotate(refresh_token))
    except TokenInvalid:
        raise not_authenticated() from None


async def logout(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    refresh_token = await _refresh_field(request)
    try:
        await auth.logout(refresh_token)
    except TokenInvalid:
        raise not_authenticated() from None
    return web.Response(status=204)


async def me(request: web.Request) -> web.Response:
    identity = require_identity(request)
    user = await request.app[AUTH].store.user_by_id(identity.user_id)
    if user is None:
        raise not_authenticated()
    return json_response(user.public())
