"""Verified email: a 6-digit code by mail, `POST /auth/verify-email`, resend, change of address.

With SMTP configured (PRICEWATCH_SMTP_HOST), registering with an email and `PATCH /auth/me
{"email"}` issue a code (valid CODE_TTL, CODE_TRIES attempts) and mail it in the background:
the HTTP answer never waits for SMTP, and a mail that fails is logged (the user can ask for
another with `POST /auth/verify-email/resend`). The code is stored only as an HMAC keyed
with the server's secret (`Auth.code_key`).

Guessing is bounded: a code allows CODE_TRIES attempts, a new code (resend, change of
address) is issued at most once per RESEND_INTERVAL and USER_CODES_PER_DAY times a day per
user, and wrong codes count against the client address (VERIFY_FAILURES an hour). Nobody can
use pricewatch to flood an address: at most ADDRESS_CODES code mails go to one address,
whichever accounts ask for them (addresses compared as providers do: `mailbox`). These
counts live in memory (a restart forgets them).

Without SMTP no code is ever sent, addresses stay unverified (alert mail could not go out
anyway), and resend answers 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import suppress

from aiohttp import web

from . import clock
from .addresses import client_address, limit_key
from .api import ApiError, conflict, invalid, json_response, read_json, text_field
from .auth import AUTH, EMAIL_RE, require_identity
from .delivery.email import MAILER
from .delivery.outbox import DELIVERER
from .limits import SlidingWindow
from .records import User

log = logging.getLogger(__name__)

CODE_TTL = 24 * 3600.0  # seconds a code is valid
CODE_TRIES = 5  # attempts per code
RESEND_INTERVAL = 60.0  # seconds between two codes for one user
USER_CODES_PER_DAY = 10  # codes issued to one account a day
ADDRESS_CODES = ((3, 3600.0), (10, 86400.0))  # code mails to one address: an hour, a day
VERIFY_FAILURES = 30  # wrong codes per client address an hour
MAX_MAILS_IN_FLIGHT = 1000  # code mails waiting for SMTP; past it a mail is dropped (logged)
SUBJECT = "pricewatch: your verification code"
CODE_DIGITS = 6

NEW_CODE_NEEDED = (
    "This code can no longer be used (5 wrong tries, or older than 24 hours); "
    "request a new one with POST /auth/verify-email/resend."
)


def new_code() -> str:
    """A random 6-digit code, zero-padded."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def code_hash(key: bytes, user_id: int, code: str) -> str:
    """What is stored of `code`: HMAC-SHA256 keyed with the server secret, bound to the user
    (a leaked table cannot be checked against the 10**6 codes without the key)."""
    return hmac.new(key, f"{user_id}:{code}".encode(), hashlib.sha256).hexdigest()


def mailbox(address: str) -> str:
    """The mailbox `address` reaches, as mail providers compare addresses: lower-case, with
    a `+tag` taken out of the local part (`Victim+1@Example.com` -> `victim@example.com`).
    Every cap per address counts by it: `victim+N@` variants are one mailbox."""
    local, at, domain = address.strip().lower().rpartition("@")
    if not at:
        return domain
    return f"{local.partition('+')[0] or local}@{domain}"


def code_text(code: str) -> str:
    """The body of the verification mail (built and sent by the mailer, as alert mail is)."""
    return (
        f"Your pricewatch verification code is {code}\n\n"
        'Enter it with POST /auth/verify-email {"code": "' + code + '"}.\n'
        "It is valid for 24 hours. Until the address is verified, no alert mail is sent "
        "to it.\n\nIf you did not ask for this, ignore this mail.\n"
    )


class CodeMail:
    """The verification mails being sent: one task each, all cancelled at shutdown (the user
    can ask for another code)."""

    def __init__(self, app: web.Application):
        self.app = app
        self._tasks: set[asyncio.Task] = set()
        self.sent = 0  # accepted by the SMTP server (tests)
        self.failed = 0
        self._to_address = [SlidingWindow(n, window) for n, window in ADDRESS_CODES]
        self._to_user = SlidingWindow(USER_CODES_PER_DAY, 86400.0)
        self.failures = SlidingWindow(VERIFY_FAILURES, 3600.0)  # by client address

    @staticmethod
    def _address_key(address: str) -> str:
        return hashlib.sha256(mailbox(address).encode()).hexdigest()

    def wait(self, user_id: int, address: str) -> int | None:
        """Seconds until a code may be mailed to `address` for this user, None: now."""
        key = self._address_key(address)
        checks = [w.check(key) for w in self._to_address]
        checks.append(self._to_user.check(str(user_id)))
        waits = [w for w in checks if w is not None]
        return max(waits) if waits else None

    @property
    def configured(self) -> bool:
        return self.app[AUTH].settings.smtp_host is not None

    def send(self, user: User, code: str) -> None:
        """Mail `code` to `user.email` in the background."""
        mailer = self.app.get(MAILER)
        if mailer is None:
            log.warning("verification code for user %d not sent: no mailer", user.id)
            return
        key = self._address_key(user.email)
        for window in self._to_address:
            window.hit(key)
        self._to_user.hit(str(user.id))
        if len(self._tasks) >= MAX_MAILS_IN_FLIGHT:
            self.failed += 1
            log.warning(
                "verification code for user %d not sent: %d mails already waiting",
                user.id,
                len(self._tasks),
            )
            return
        task = asyncio.create_task(self._send(mailer, user, code), name="verification-mail")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, mailer, user: User, code: str) -> None:
        try:
            await mailer.send_mail(user.email, SUBJECT, code_text(code))
        except Exception as exc:  # SMTP down, refused: the user can resend
            self.failed += 1
            log.warning(
                "verification code for user %d not sent: %s: %s", user.id, type(exc).__name__, exc
            )
        else:
            self.sent += 1

    async def drained(self) -> None:
        """Return once every mail started so far has been sent or has failed."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task

    async def on_register(self, user: User) -> None:
        """auth.register's hook: a code for the new user's address (when there is one and
        SMTP is configured). Never fails the registration: the user can resend."""
        if not self.configured or not user.email:
            return
        if self.wait(user.id, user.email) is not None:
            log.warning(
                "no verification code for user %d: the address has had its share of "
                "code mails (the user can resend later)",
                user.id,
            )
            return
        auth = self.app[AUTH]
        code = new_code()
        try:
            result = await auth.store.issue_email_code(
                user.id,
                code_hash(auth.code_key, user.id, code),
                clock.now(),
                CODE_TTL,
                CODE_TRIES,
                RESEND_INTERVAL,
            )
        except Exception:
            log.exception("no verification code issued for user %d", user.id)
            return
        if result.issued:
            self.send(result.user, code)


CODE_MAIL = web.AppKey("code_mail", CodeMail)


async def code_mail_ctx(app: web.Application) -> AsyncIterator[None]:
    """Registration mails a code (a hook on Auth); mails in flight are cancelled at the end."""
    mail = app[CODE_MAIL] = CodeMail(app)
    app[AUTH].register_hooks.append(mail.on_register)
    try:
        yield
    finally:
        await mail.close()


def _rate_limited(wait: float) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        "A code was sent less than a minute ago; wait for it, or try again later.",
        headers={"Retry-After": str(math.ceil(wait))},
    )


def _too_many(wait: int) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        "Too many codes were mailed to this address or account; try again later.",
        headers={"Retry-After": str(wait)},
    )


def _no_email() -> ApiError:
    return conflict("There is no email address to verify; set one with PATCH /auth/me.")


async def verify_email(request: web.Request) -> web.Response:
    """`POST /auth/verify-email {"code"}` -> 200 `{"email_verified": true}` (also when the
    address was verified already); 400 for a wrong, spent or missing code."""
    identity = require_identity(request)
    data = await read_json(request)
    errors: dict[str, str] = {}
    code = text_field(data, "code", errors)
    if not errors and not (len(code) == CODE_DIGITS and code.isascii() and code.isdigit()):
        errors["code"] = "Enter the 6-digit code from the verification mail."
    if errors:
        raise invalid(errors)
    auth, failures = request.app[AUTH], request.app[CODE_MAIL].failures
    client = limit_key(client_address(request))
    wait = failures.check(client)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            "Too many wrong codes from this address; try again later.",
            headers={"Retry-After": str(wait)},
        )
    result = await auth.store.check_email_code(
        identity.user_id, code_hash(auth.code_key, identity.user_id, code), clock.now()
    )
    if result.status in ("wrong", "spent"):
        failures.hit(client)
    if result.status == "verified":
        if DELIVERER in request.app:  # alert mail that waited for the address goes now
            request.app[DELIVERER].wake()
    elif result.status == "no_email":
        raise _no_email()
    elif result.status == "none":
        raise invalid(
            {
                "code": "No code was sent to this address; request one with "
                "POST /auth/verify-email/resend."
            }
        )
    elif result.status == "spent" or (result.status == "wrong" and result.tries_left <= 0):
        raise invalid({"code": NEW_CODE_NEEDED})
    elif result.status == "wrong":
        raise invalid(
            {
                "code": f"Wrong code; {result.tries_left} "
                f"{'try' if result.tries_left == 1 else 'tries'} left."
            }
        )
    return json_response({"email_verified": True})


async def resend(request: web.Request) -> web.Response:
    """`POST /auth/verify-email/resend` -> 202 `{"email", "expires_at"}`: a new code (the old
    one stops working) is on its way. 409 when verified or without an address, 429 within a
    minute of the last code, 503 without SMTP."""
    identity = require_identity(request)
    if not request.app[CODE_MAIL].configured:
        raise ApiError(
            503,
            "unavailable",
            "This server sends no mail (PRICEWATCH_SMTP_HOST "
            "is not set), so addresses cannot be verified.",
        )
    auth = request.app[AUTH]
    user = await auth.store.user_by_id(identity.user_id)
    if user is not None and user.email and not user.email_verified:
        wait = request.app[CODE_MAIL].wait(user.id, user.email)
        if wait is not None:
            raise _too_many(wait)
    code, now = new_code(), clock.now()
    result = await auth.store.issue_email_code(
        identity.user_id,
        code_hash(auth.code_key, identity.user_id, code),
        now,
        CODE_TTL,
        CODE_TRIES,
        RESEND_INTERVAL,
    )
    if result.user.email_verified:
        raise conflict("The email address is already verified.")
    if not result.user.email:
        raise _no_email()
    if result.wait is not None:
        raise _rate_limited(result.wait)
    request.app[CODE_MAIL].send(result.user, code)
    return json_response(
        {"email": result.user.email, "expires_at": clock.iso(now + CODE_TTL)}, status=202
    )


async def change_email(request: web.Request) -> web.Response:
    """`PATCH /auth/me {"email"}` -> 200 with the /auth/me body: the new address is
    unverified, and (with SMTP) a code is mailed to it. The same address changes nothing.
    429 within a minute of the last code."""
    identity = require_identity(request)
    data = await read_json(request)
    errors: dict[str, str] = {}
    email = text_field(data, "email", errors)
    if not errors and (len(email) > 254 or not EMAIL_RE.fullmatch(email)):
        errors["email"] = "Enter a valid email address."
    if errors:
        raise invalid(errors)
    auth, mail = request.app[AUTH], request.app[CODE_MAIL]
    if mail.configured:
        wait = mail.wait(identity.user_id, email)
        if wait is not None:
            raise _too_many(wait)
    code = new_code()
    hashed = code_hash(auth.code_key, identity.user_id, code) if mail.configured else None
    result = await auth.store.change_email(
        identity.user_id, email, hashed, clock.now(), CODE_TTL, CODE_TRIES, RESEND_INTERVAL
    )
    if result.wait is not None:
        raise _rate_limited(result.wait)
    if result.issued:
        mail.send(result.user, code)
    return json_response(result.user.public())


def add_routes(app: web.Application, add_route) -> None:
    add_route(app, "POST", "/auth/verify-email", verify_email)
    add_route(app, "POST", "/auth/verify-email/resend", resend)
    add_route(app, "PATCH", "/auth/me", change_email)
    # Last of the contexts: up after Auth and the mailer, closed before them.
    app.cleanup_ctx.append(code_mail_ctx)
