"""Users and JWT auth, simplejwt style: register, token pair, rotation, logout, me.

Passwords are bcrypt hashes computed in a thread (never on the event loop). Tokens are
HS256 JWTs verified with a fixed algorithm list. Every login starts a token *family*;
refreshing spends the old refresh token, and presenting a spent one revokes the family,
which also kills that login's access tokens (checked against an in-memory set).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import bcrypt
import jwt
from aiohttp import web

from . import clock
from .addresses import client_address
from .api import REQUIRED, ApiError, invalid, json_response, not_authenticated, read_json
from .config import Settings
from .store import Conflict, Store

log = logging.getLogger(__name__)

ALGORITHMS = ["HS256"]  # fixed: never taken from the token header
USERNAME_RE = re.compile(r"[\w.@+-]{3,150}")
# A plain ASCII address (what SMTP servers take without extensions): the local part's
# usual characters, a dotted domain. No quotes, brackets, commas or comments.
EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}")
MAX_PASSWORD_BYTES = 72  # bcrypt's limit


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
        self._fails: dict[str, deque[float]] = {}
        self._inflight: dict[str, int] = {}
        self._next_prune = 0.0

    def _recent(self, key: str, now: float) -> deque[float] | None:
        fails = self._fails.get(key)
        if fails is None:
            return None
        while fails and fails[0] <= now - self.window:
            fails.popleft()
        if not fails:
            del self._fails[key]
            return None
        return fails

    def retry_after(self, user_key: str, addr_key: str) -> int | None:
        """Seconds until this attempt may be made, or None when it may be made now."""
        now = time.monotonic()
        wait = 0.0
        for key, in_flight in ((user_key, self._inflight.get(user_key, 0)), (addr_key, 0)):
            fails = self._recent(key, now)
            count = (len(fails) if fails else 0) + in_flight
            if count >= self.max_failures:
                if fails and len(fails) >= self.max_failures:
                    wait = max(wait, fails[-self.max_failures] + self.window - now)
                else:
                    wait = max(wait, 1.0)  # blocked by attempts still being checked
        if self._inflight.get(addr_key, 0) >= self.max_in_flight:
            wait = max(wait, 1.0)
        return max(1, int(wait + 0.999)) if wait > 0 else None

    def begin(self, keys: tuple[str, str]) -> None:
        for key in keys:
            self._inflight[key] = self._inflight.get(key, 0) + 1

    def end(self, keys: tuple[str, str], failed: bool) -> None:
        now = time.monotonic()
        for key in keys:
            left = self._inflight[key] - 1
            if left:
                self._inflight[key] = left
            else:
                del self._inflight[key]
        if not failed:
            self._fails.pop(keys[0], None)  # the username starts afresh
            return
        size = len(self._fails)
        if size > 50_000 and (now >= self._next_prune or size > 100_000):  # a spray of names
            self._next_prune = now + self.window / 10
            for key in list(self._fails):
                self._recent(key, now)
            while len(self._fails) > 50_000:  # still too many: forget the least recent keys
                del self._fails[next(iter(self._fails))]
        for key in keys:
            # Re-inserted at the end: the dict stays ordered by last failure, so eviction
            # above forgets the keys that have been quiet longest, never an active attacker.
            fails = self._fails.pop(key, None) or deque()
            fails.append(now)
            self._fails[key] = fails


class Auth:
    """Password hashing, token issue/verification and the login limiter."""

    def __init__(self, settings: Settings, store: Store, secret: str,
                 revoked: dict[str, float]):
        self.settings = settings
        self.store = store
        self._secret = secret
        self._revoked = revoked  # family -> when; pruned once no access token can be alive
        self.limiter = LoginLimiter(settings.login_max_failures, settings.login_window)
        self._dummy_hash: bytes | None = None
        self._verified: dict[str, tuple[int, str, int]] = {}  # access token -> claims used

    @classmethod
    async def create(cls, settings: Settings, store: Store) -> Auth:
        """The JWT secret comes from the settings, or is generated once and kept in the DB."""
        secret = settings.jwt_secret or await store.setting(
            "jwt_secret", secrets.token_urlsafe(48))
        now = clock.now()
        purged = await store.purge_refresh_tokens(now - 86400)  # a day of grace for logs
        if purged:
            log.info("purged %d expired refresh tokens", purged)
        revoked = await store.revoked_families(now - settings.access_ttl)
        return cls(settings, store, secret, revoked)

    def _revoke(self, family: str) -> None:
        now = clock.now()
        self._revoked[family] = now
        if len(self._revoked) > 1000:  # forget families whose access tokens all expired
            horizon = now - self.settings.access_ttl
            for fam in [f for f, at in self._revoked.items() if at < horizon]:
                del self._revoked[fam]

    def revoked(self, family: str) -> bool:
        return family in self._revoked

    # passwords ------------------------------------------------------------------------

    async def hash_password(self, password: str) -> str:
        salt = bcrypt.gensalt(self.settings.bcrypt_rounds)
        loop = asyncio.get_running_loop()
        hashed = await loop.run_in_executor(None, bcrypt.hashpw, password.encode(), salt)
        return hashed.decode()

    async def check_password(self, password: str, hashed: str | None) -> bool:
        """Compare in a thread. With no hash (unknown user) a dummy is checked, same cost."""
        loop = asyncio.get_running_loop()
        if hashed is None:
            if self._dummy_hash is None:
                self._dummy_hash = (await self.hash_password(secrets.token_hex(8))).encode()
            await loop.run_in_executor(None, bcrypt.checkpw, b"x", self._dummy_hash)
            return False
        raw = password.encode()
        if len(raw) > MAX_PASSWORD_BYTES or "\x00" in password:
            # Cannot match; still spend a check, so timing tells nothing about the user.
            return await self.check_password(password, None)
        return await loop.run_in_executor(None, bcrypt.checkpw, raw, hashed.encode())

    # tokens ---------------------------------------------------------------------------

    def _encode(self, user_id: int, token_type: str, family: str, ttl: int,
                now: float) -> tuple[str, str]:
        jti = uuid.uuid4().hex
        claims = {"token_type": token_type, "user_id": user_id, "iat": int(now),
                  "exp": int(now) + ttl, "jti": jti, "fam": family}
        return jwt.encode(claims, self._secret, algorithm="HS256"), jti

    async def issue_pair(self, user_id: int) -> dict[str, str]:
        """A new login: fresh family, access + refresh token, refresh recorded in the DB."""
        now = clock.now()
        family = uuid.uuid4().hex
        access, _ = self._encode(user_id, "access", family, self.settings.access_ttl, now)
        refresh, jti = self._encode(user_id, "refresh", family, self.settings.refresh_ttl, now)
        await self.store.add_refresh_token(jti, user_id, family, now,
                                           now + self.settings.refresh_ttl)
        return {"access": access, "refresh": refresh}

    def decode(self, token: str, token_type: str) -> dict[str, Any]:
        """Verified claims of `token`. Raises TokenInvalid for anything not perfect."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=ALGORITHMS,
                                options={"require": ["exp", "iat", "jti", "token_type"]})
        except jwt.PyJWTError as exc:
            raise TokenInvalid(str(exc)) from None
        if claims.get("token_type") != token_type:
            raise TokenInvalid("wrong token type")
        if not isinstance(claims.get("user_id"), int) or not isinstance(claims.get("fam"), str):
            raise TokenInvalid("malformed claims")
        if claims["fam"] in self._revoked:
            raise TokenInvalid("token revoked")
        return claims

    def identity(self, token: str) -> Identity:
        """The identity of a valid access token. Raises TokenInvalid.

        A token verified once is remembered (bounded) with its expiry: clients present the
        same token on every request, and a full decode costs ~70 us. Expiry and revocation
        are still checked on every use.
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
        return Identity(user_id, family, exp)

    async def rotate(self, refresh: str) -> dict[str, str]:
        """Spend `refresh`, return a new pair of the same login. Raises TokenInvalid."""
        claims = self.decode(refresh, "refresh")
        now = clock.now()
        user_id, family = claims["user_id"], claims["fam"]
        access, _ = self._encode(user_id, "access", family, self.settings.access_ttl, now)
        new_refresh, new_jti = self._encode(user_id, "refresh", family,
                                            self.settings.refresh_ttl, now)
        result = await self.store.rotate_refresh_token(claims["jti"], new_jti, now,
                                                       now + self.settings.refresh_ttl)
        if result.status == "reused":
            self._revoke(family)
        if result.status != "ok":
            raise TokenInvalid(f"refresh token {result.status}")
        return {"access": access, "refresh": new_refresh}

    async def logout(self, refresh: str) -> None:
        """End the login `refresh` belongs to. Raises TokenInvalid."""
        claims = self.decode(refresh, "refresh")
        result = await self.store.revoke_token_family(claims["jti"])
        if result.status != "ok":
            raise TokenInvalid("unknown refresh token")
        self._revoke(result.family)  # type: ignore[arg-type]


AUTH = web.AppKey("auth", Auth)
IDENTITY_KEY = "pricewatch.identity"
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


def require_identity(request: web.Request, allow_query: bool = False) -> Identity:
    """The caller's identity from its access token. Raises ApiError 401."""
    token = bearer_token(request, allow_query)
    if token is None:
        raise not_authenticated()
    try:
        return request.app[AUTH].identity(token)
    except TokenInvalid:
        raise not_authenticated() from None


def _text_fields(data: dict[str, Any], names: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    values, errors = {}, {}
    for name in names:
        value = data.get(name)
        if value is None or value == "":
            errors[name] = REQUIRED
        elif not isinstance(value, str):
            errors[name] = "Not a valid string."
        else:
            values[name] = value
    return values, errors


async def register(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    data = await read_json(request)
    names = ("username", "password", "email")
    if request.get(EMAIL_OPTIONAL) and data.get("email") in (None, ""):
        names = names[:2]
    values, errors = _text_fields(data, names)
    username, password, email = (values.get(k) for k in ("username", "password", "email"))
    if username is not None and not USERNAME_RE.fullmatch(username):
        errors["username"] = ("Enter a valid username of 3-150 characters: letters, digits "
                              "and @/./+/-/_ only.")
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
    if await auth.store.user_by_name(username) is not None:  # skip the bcrypt cost
        raise ApiError(409, "conflict", "A user with that username already exists.")
    hashed = await auth.hash_password(password)
    try:
        user = await auth.store.create_user(username, email or "", hashed)
    except Conflict:
        raise ApiError(409, "conflict", "A user with that username already exists.") from None
    tokens = await auth.issue_pair(user.id)
    return json_response({"id": user.id, "username": user.username, "email": user.email,
                          **tokens}, status=201)


async def token(request: web.Request) -> web.Response:
    auth = request.app[AUTH]
    data = await read_json(request)
    values, errors = _text_fields(data, ("username", "password"))
    if errors:
        raise invalid(errors)
    username, password = values["username"], values["password"]
    # No real username is longer than 150: such a name cannot log in, and is not kept as a
    # limiter key (it still counts against the address).
    keys = ("user:" + username[:151], "addr:" + client_address(request))
    wait = auth.limiter.retry_after(*keys)
    if wait is not None:
        raise ApiError(429, "rate_limited", "Too many failed logins; try again later.",
                       headers={"Retry-After": str(wait)})
    auth.limiter.begin(keys)
    ok = False
    try:
        user = await auth.store.user_by_name(username) if len(username) <= 150 else None
        ok = await auth.check_password(password, user.password_hash if user else None)
    finally:
        auth.limiter.end(keys, failed=not ok)
    if not ok:
        raise ApiError(401, "bad_credentials",
                       "No active account found with the given credentials.")
    return json_response(await auth.issue_pair(user.id))


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
