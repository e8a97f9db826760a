"""Email: the SMTP sink, over a small pool of persistent connections.

A connection is opened when needed, then reused for up to MESSAGES_PER_CONNECTION messages
(closed after IDLE_CLOSE seconds unused, and at once on any error: its state is then
unknown). At most `PRICEWATCH_SMTP_CONCURRENCY` connections exist. A reused connection the
server closed meanwhile is replaced once, at no attempt's cost. The same pool sends the
verification codes (`send_mail`). Every mail is built by `build` (one set of headers).
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import secrets
import time
from collections.abc import Sequence
from contextlib import suppress
from email.header import Header
from email.utils import formatdate, parseaddr

import aiosmtplib
from aiohttp import web

from ..config import Settings
from ..records import Delivery
from .base import Failed, Outcome, Retry, Sent
from .message import render

log = logging.getLogger("pricewatch.delivery.email")

MESSAGES_PER_CONNECTION = 100  # then a fresh connection (some servers cap it per session)
IDLE_CLOSE = 30.0  # seconds an unused connection stays open


@functools.lru_cache(maxsize=8)
def envelope_sender(sender: str) -> str:
    """The bare address of PRICEWATCH_MAIL_FROM (`Name <a@b>` -> `a@b`), parsed once."""
    return parseaddr(sender)[1] or sender


def message_id(delivery: Delivery, sender: str) -> str:
    """The Message-ID of the email for `delivery` (a digest: for its first delivery): the
    same on every attempt, so that the one duplicate a crash can cause can be recognised as
    such. The domain is the sender's (never the local host name: looking that up could
    block)."""
    domain = envelope_sender(sender).rpartition("@")[2] or "localhost"
    stamp = int(delivery.alert.created_at * 1_000_000)  # keeps ids of other installs apart
    return f"<pricewatch.{delivery.id}.{delivery.alert.id}.{stamp}@{domain}>"


def digest_id(batch: Sequence[Delivery], sender: str) -> str:
    """A digest's Message-ID: never one of its deliveries' own (the first of them may have
    gone out alone before, and providers drop a repeated Message-ID)."""
    lead = message_id(batch[0], sender)
    return lead.replace("<pricewatch.", f"<pricewatch.digest{len(batch)}.", 1)


def _header(value: str) -> str:
    value = " ".join(value.split())  # never a line break inside a header
    return value if value.isascii() else Header(value, "utf-8").encode()


def build(sender: str, to: str, subject: str, text: str, ident: str) -> bytes:
    """Every mail the server sends, as the bytes SMTP sends: From, To, Date, Message-ID
    (some providers refuse mail without them), Subject, and `text` as quoted-printable
    UTF-8.

    Written out directly: the `email` package's EmailMessage costs about a millisecond per
    message, most of the server's work when a thousand alerts trigger at once. Every header
    value is a configured or validated one (sender, address, symbols, numbers)."""
    head = (
        f"From: {_header(sender)}\r\nTo: {_header(to)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: {ident}\r\n"
        f"Subject: {_header(subject)}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    body = binascii.b2a_qp(text.encode(), istext=True).replace(b"\n", b"\r\n")
    return head.encode("ascii") + body


def compose(batch: Sequence[Delivery], sender: str, public_url: str | None = None) -> bytes:
    """The plain-text email about `batch` (one delivery or a digest)."""
    text = render(batch, public_url)
    ident = digest_id(batch, sender) if len(batch) > 1 else message_id(batch[0], sender)
    return build(sender, batch[0].channel.address or "", text.title, text.body, ident)


def other_id(kind: str, sender: str) -> str:
    """A fresh Message-ID for a mail that is not about alerts (`kind`: "code")."""
    domain = envelope_sender(sender).rpartition("@")[2] or "localhost"
    return f"<pricewatch.{kind}.{secrets.token_hex(12)}@{domain}>"


def classify(exc: BaseException) -> Outcome:
    """5xx answers are permanent; 4xx, timeouts and connection errors are worth a retry;
    anything else (an address the library cannot use) is permanent too."""
    error = f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        permanent = all(r.code >= 500 for r in exc.recipients)
        return Failed(error) if permanent else Retry(error)
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 500 <= code < 600:
        return Failed(error)
    if isinstance(exc, (aiosmtplib.SMTPException, OSError, TimeoutError)):
        return Retry(error)
    return Failed(error)


class _Conn:
    __slots__ = ("smtp", "used", "idle_since")

    def __init__(self, smtp: aiosmtplib.SMTP):
        self.smtp = smtp
        self.used = 0
        self.idle_since = time.monotonic()


class SmtpPool:
    """Up to `size` open SMTP connections, each sending one message at a time."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.size = settings.smtp_concurrency
        self._slots = asyncio.Semaphore(self.size)
        self._idle: list[_Conn] = []
        self.opened = 0  # connections opened so far (metrics, tests)
        self._reaper: asyncio.Task | None = None

    def _new(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_user,
            password=s.smtp_password,
            start_tls=s.smtp_starttls,
            timeout=s.smtp_timeout,
        )

    async def send(self, msg: tuple[str, str, bytes]) -> None:
        """Send `msg` (envelope sender, recipient and the message's bytes); raises what
        aiosmtplib raises when it is not accepted."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is not None:
                try:
                    await self._send_on(conn, msg)
                    return
                except aiosmtplib.SMTPServerDisconnected:
                    pass  # closed while idle: a fresh connection, not a failed attempt
            conn = _Conn(self._new())
            self.opened += 1
            try:
                await conn.smtp.connect()
            except BaseException:
                conn.smtp.close()
                raise
            await self._send_on(conn, msg)

    async def _send_on(self, conn: _Conn, msg: tuple[str, str, bytes]) -> None:
        try:
            sender, recipient, raw = msg
            await conn.smtp.sendmail(sender, [recipient], raw)
        except BaseException:
            conn.smtp.close()  # its state is unknown after any error
            raise
        conn.used += 1
        if conn.used >= MESSAGES_PER_CONNECTION:
            await self._quit(conn)
        else:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)

    async def _quit(self, conn: _Conn) -> None:
        with suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            async with asyncio.timeout(2.0):
                await conn.smtp.quit()
        conn.smtp.close()

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap(), name="smtp-pool-reaper")

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(IDLE_CLOSE / 3)
            cutoff = time.monotonic() - IDLE_CLOSE
            stale = [c for c in self._idle if c.idle_since < cutoff]
            self._idle = [c for c in self._idle if c.idle_since >= cutoff]
            for conn in stale:
                await self._quit(conn)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with suppress(asyncio.CancelledError):
                await self._reaper
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c in idle), return_exceptions=True)


class EmailSink:
    """Alert mail over the pool; `send_mail` for other mail (verification codes)."""

    type = "email"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.concurrency = settings.smtp_concurrency
        self.pool = SmtpPool(settings)

    @property
    def configured(self) -> bool:
        return self.settings.smtp_host is not None

    async def start(self) -> None:
        if self.configured:
            await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def send_mail(self, to: str, subject: str, text: str, kind: str = "code") -> None:
        """Send a mail that is not about alerts (verification codes) from
        PRICEWATCH_MAIL_FROM, built as alert mail is; raises when it is not accepted."""
        s = self.settings
        raw = build(s.mail_from, to, subject, text, other_id(kind, s.mail_from))
        await self.pool.send((envelope_sender(s.mail_from), to, raw))

    async def send(self, batch: Sequence[Delivery]) -> Outcome:
        s = self.settings
        try:
            raw = compose(batch, s.mail_from, s.public_url)
            sender = envelope_sender(s.mail_from)
            await self.pool.send((sender, batch[0].channel.address or "", raw))
        except Exception as exc:
            return classify(exc)
        return Sent()


MAILER = web.AppKey("mailer", EmailSink)
