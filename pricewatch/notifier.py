"""Email delivery of alert events: the notifier sends outbox rows over SMTP with bounded
concurrency, retrying with exponential backoff, and resumes pending rows after a restart.

Exactly once: an outbox row is marked `sent` only after the SMTP server accepted the
message, and once accepted the record is finished even during a shutdown. The one window for
a duplicate is a crash (power loss, SIGKILL) between that acceptance and the single local
commit that records it, or a shutdown cutting off a send whose answer to DATA had not come
within the grace period; a restart then sends that one email again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

import aiosmtplib

from . import clock
from .config import Settings
from .store import OutboxItem, Store

log = logging.getLogger(__name__)


def plain(value: float) -> str:
    """A price in full, as a person writes it: 60018.26, 1250000, 0.00000123 (never 6e+04)."""
    text = f"{value:.10f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


def message_id(item: OutboxItem, sender: str) -> str:
    """The Message-ID of the email for `item`: the same on every attempt, so that the one
    duplicate a crash can cause (see the module docstring) can be recognised as such. The
    domain is the sender's (never the local host name: looking that up could block)."""
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    stamp = int(item.alert.created_at * 1_000_000)  # keeps ids of other installs apart
    return f"<pricewatch.{item.id}.{item.alert.id}.{stamp}@{domain}>"


def compose(item: OutboxItem, sender: str, public_url: str | None = None) -> EmailMessage:
    """The plain-text email for one triggered alert, with `Date` and `Message-ID` (some
    providers reject mail without them); with `public_url`, a link to the live page."""
    alert = item.alert
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = item.recipient
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(item, sender)
    if alert.kind == "percent":
        move = {"up": "up", "down": "down", "any": "up or down"}[alert.direction]
        msg["Subject"] = (f"pricewatch: {alert.asset} moved {plain(alert.percent)}% {move}"
                          f" within {alert.window}")
        what = (f"Move:          {plain(alert.percent)}% {move} within {alert.window}"
                " (trailing window)\n")
        kind = "percent"
    else:
        sign = ">=" if alert.direction == "above" else "<="
        msg["Subject"] = (f"pricewatch: {alert.asset} {alert.direction}"
                          f" {plain(alert.price)} reached")
        what = (f"Target:        {plain(alert.price)} ({alert.direction}: price {sign}"
                " target)\n")
        kind = "price"
    note = f"Note:          {alert.note}\n" if alert.note else ""
    link = f"Live prices:   {public_url}/\n" if public_url else ""
    msg.set_content(
        f"Your {kind} alert #{alert.id} has triggered.\n\n"
        f"Asset:         {alert.asset}\n" + what +
        f"Trigger price: {plain(alert.triggered_price)}\n"
        f"Time (UTC):    {clock.iso(alert.triggered_at)}\n" + note + link
    )
    return msg


class Notifier:
    """Sends pending outbox rows over SMTP: bounded concurrency, retries, resumes on start."""

    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.sent = 0
        self.failed = 0
        self.attempts = 0  # SMTP attempts that failed (and were retried or given up)
        self.progress = asyncio.Condition()  # notified after every recorded outcome
        self._wake = asyncio.Event()
        self._inflight: set[int] = set()
        self._sending: set[asyncio.Task] = set()
        self._records: set[asyncio.Future] = set()
        self._batch = settings.smtp_concurrency * 4  # rows claimed at most at once
        self._slots = asyncio.Semaphore(settings.smtp_concurrency)
        self._task: asyncio.Task | None = None

    @property
    def configured(self) -> bool:
        return self.settings.smtp_host is not None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        if not self.configured:
            log.warning("PRICEWATCH_SMTP_HOST is not set: alert emails stay queued (pending)")
            return
        self._task = asyncio.create_task(self._scheduler(), name="notifier")

    async def stop(self, timeout: float = 1.5) -> None:
        """Give sends in flight `timeout` seconds to finish, then cancel everything."""
        if self._task is None:
            return
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        if self._sending:
            _, pending = await asyncio.wait(self._sending, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._records:  # acceptances being recorded finish (unless the DB is gone)
            _, stuck = await asyncio.wait(self._records, timeout=5.0)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    async def _scheduler(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch_due()
                # Rows being sent (or being recorded as sent) are not "due": their outcome
                # wakes this loop. With every slot busy there is nothing to do but wait.
                if len(self._inflight) >= self._batch:
                    next_due = None
                else:
                    next_due = await self.store.next_outbox_due(exclude=self._inflight)
            except Exception:  # a database hiccup must not end email delivery for good
                log.exception("notifier could not read the outbox; retrying in 5 s")
                next_due = clock.now() + 5.0
            timeout = 60.0 if next_due is None else max(0.05, next_due - clock.now())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(timeout, 60.0))

    async def _dispatch_due(self) -> None:
        """Start a send task for every due row not already being sent."""
        room = self._batch - len(self._inflight)
        if room <= 0:
            return
        due = await self.store.due_outbox(clock.now(), limit=room, exclude=self._inflight)
        for item in due:
            if item.id in self._inflight:
                continue
            self._inflight.add(item.id)
            task = asyncio.create_task(self._send(item), name=f"email-{item.id}")
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, item: OutboxItem) -> None:
        s = self.settings
        smtp: aiosmtplib.SMTP | None = None
        accepted = False
        try:
            async with self._slots:
                # The scheduler's read may predate the outcome of an earlier send of this
                # very row; a fresh read after claiming it rules a second send out.
                if not await self.store.outbox_current(item.id, item.attempts):
                    return
                began = time.monotonic()
                smtp = aiosmtplib.SMTP(hostname=s.smtp_host, port=s.smtp_port,
                                       username=s.smtp_user, password=s.smtp_password,
                                       start_tls=s.smtp_starttls, timeout=s.smtp_timeout)
                try:
                    await smtp.connect()
                    await smtp.send_message(compose(item, s.mail_from, s.public_url))
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    self.attempts += 1
                    await self._failed_attempt(item, exc)
                    return
                except Exception as exc:  # e.g. an address the library cannot use: no retry
                    self.attempts += 1
                    await self._failed_attempt(item, exc, permanent=True)
                    return
                # Accepted. From here nothing may stop the record, not even a shutdown
                # cancelling this task; until it lands the row stays claimed (in flight).
                accepted = True
                record = asyncio.ensure_future(self._accepted(item, began))
                self._records.add(record)
                record.add_done_callback(self._records.discard)
                await asyncio.shield(record)
            # The slot is free again; a polite goodbye, bounded.
            with suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(smtp.quit(), 2.0)
        except Exception:  # e.g. the DB refused to record a failed attempt: retried later
            log.exception("email %d: could not finish this attempt", item.id)
        finally:
            if smtp is not None:
                smtp.close()
            if not accepted:  # an accepted row stays claimed until `_accepted` records it
                self._inflight.discard(item.id)
            self._wake.set()
            async with self.progress:
                self.progress.notify_all()

    async def _accepted(self, item: OutboxItem, began: float) -> None:
        """Record an accepted email as sent, retrying until it lands: giving up would leave
        the row pending and send it again. The row stays claimed meanwhile."""
        delay = 0.1
        try:
            while True:
                try:
                    await self.store.outbox_sent(item.id)
                    break
                except Exception:
                    log.exception("could not record email %d as sent; retrying in %.1fs",
                                  item.id, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
        finally:
            self._inflight.discard(item.id)
            self._wake.set()
        self.sent += 1
        log.info("alert %d email sent to %s in %.2fs", item.alert.id, item.recipient,
                 time.monotonic() - began)
        async with self.progress:
            self.progress.notify_all()

    async def wait_until(self, predicate, timeout: float) -> None:
        """Wait (at most `timeout` s) until `predicate()` is true after some outcome."""
        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(predicate), timeout)

    async def _failed_attempt(self, item: OutboxItem, exc: BaseException,
                              permanent: bool = False) -> None:
        error = f"{type(exc).__name__}: {exc}"[:500]
        attempts = item.attempts + 1
        if permanent or _permanent(exc) or attempts >= self.settings.smtp_max_attempts:
            self.failed += 1
            log.error("alert %d email to %s failed after %d attempts: %s", item.alert.id,
                      item.recipient, attempts, error)
            await self._record(self.store.outbox_failed, item.id, error)
            return
        delay = min(self.settings.smtp_retry_base * 2 ** (attempts - 1), 3600.0)
        log.warning("alert %d email attempt %d failed (%s); retrying in %.1fs",
                    item.alert.id, attempts, error, delay)
        await self._record(self.store.outbox_retry, item.id, clock.now() + delay, error)

    async def _record(self, method, *args) -> None:
        """Commit an outbox state change, retrying briefly: losing `sent` means a resend."""
        for attempt in range(5):
            try:
                await method(*args)
                return
            except Exception:
                if attempt == 4:
                    raise
                log.exception("could not record outbox state; retrying")
                await asyncio.sleep(0.1 * 2 ** attempt)


def _permanent(exc: BaseException) -> bool:
    """5xx answers are permanent; 4xx, timeouts and connection errors are worth a retry."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return all(r.code >= 500 for r in exc.recipients)
    code = getattr(exc, "code", None)
    return isinstance(code, int) and 500 <= code < 600
