"""The delivery mechanics, one for every channel: claims due rows of `deliveries`, sends
them through the channel type's sink with bounded concurrency, records the outcome, retries
with backoff, keeps the hourly budget per user and channel (the rest goes out as one
digest), and resumes whatever was pending after a restart.

Exactly once: a delivery is marked `sent` only after the other side accepted it, and once
accepted the record is finished even during a shutdown. A delivery stays claimed (in flight)
from its dispatch until its outcome is committed, and a due-row read that began before a
commit is not trusted for the rows that commit touched (`_recent`), so one process never
sends a row twice. The one window for a duplicate is a crash (power loss, SIGKILL) between
the acceptance and the commit recording it, or a shutdown cutting off a send whose answer
had not come within the grace period; a restart then sends that one message again.

Outcomes are committed in batches (one transaction for every outcome that arrived while
the previous batch was committing): a level crossed by a thousand alerts costs a handful of
commits, not a thousand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from contextlib import suppress

from aiohttp import web

from .. import clock
from ..config import Settings
from ..records import Delivery
from ..store import Store
from .base import Failed, Outcome, Sent, Sink

log = logging.getLogger("pricewatch.delivery")

HOUR = 3600.0
WAIT_VERIFIED = 86400.0  # an email delivery waits this long for a verified address
DIGEST_MAX = 1000  # deliveries folded into one digest at most (the rest: the next one)
MAX_DELAY = 3600.0  # no retry waits longer, whatever the other side asks
WINDOWS_KEPT = 10_000  # budget windows held before quiet ones are forgotten

Key = tuple[int, str, int | str]  # (user id, channel type, channel id): what a budget counts


def _key(d: Delivery) -> Key:
    return (d.alert.user_id, d.channel.type, d.channel.id)


class Deliverer:
    """Sends pending deliveries through `sinks` (channel type -> sink)."""

    def __init__(self, settings: Settings, store: Store, sinks: Mapping[str, Sink]):
        self.settings = settings
        self.store = store
        self.sinks = dict(sinks)
        self.sent = 0  # deliveries recorded sent by this process (a digest: each of them)
        self.failed = 0
        self.skipped = 0
        self.attempts = 0  # attempts that did not succeed (retried or given up)
        self.by_type: dict[str, dict[str, int]] = {
            t: {"sent": 0, "failed": 0} for t in self.sinks}
        self.progress = asyncio.Condition()  # notified after every recorded outcome
        self._wake = asyncio.Event()
        self._inflight: set[int] = set()
        self._busy: dict[str, int] = dict.fromkeys(self.sinks, 0)  # deliveries claimed per type
        self._slots = {t: asyncio.Semaphore(s.concurrency) for t, s in self.sinks.items()}
        self._claim = {t: s.concurrency * 4 for t, s in self.sinks.items()}
        self._seq = 0  # commits of outcomes so far
        self._recent: dict[int, int] = {}  # delivery id -> the commit that recorded it
        self._windows: dict[Key, deque[float]] = {}  # send times within the last hour
        self._forget_at = WINDOWS_KEPT
        self._sending: set[asyncio.Task] = set()
        # Outcomes to commit: (rows, future, the type whose claim they end or None).
        self._queue: list[tuple[list[tuple], asyncio.Future, str | None]] = []
        self._queued = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def wake(self) -> None:
        self._wake.set()

    @property
    def types(self) -> list[str]:
        """The channel types that can send now (their sink is configured)."""
        return [t for t, sink in self.sinks.items() if sink.configured]

    async def start(self) -> None:
        for sink in self.sinks.values():
            await sink.start()
        if not self.sinks["email"].configured:
            log.warning("PRICEWATCH_SMTP_HOST is not set: alert emails stay queued (pending)")
        self._tasks = [asyncio.create_task(self._scheduler(), name="deliveries"),
                       asyncio.create_task(self._recorder(), name="delivery-recorder")]

    async def stop(self, timeout: float = 1.5) -> None:
        """Give sends in flight `timeout` seconds, commit the outcomes that arrived, stop."""
        scheduler, recorder = self._tasks or (None, None)
        if scheduler is not None:
            scheduler.cancel()
            with suppress(asyncio.CancelledError):
                await scheduler
        if self._sending:
            _, pending = await asyncio.wait(self._sending, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if recorder is not None:
            with suppress(TimeoutError):  # accepted messages get their record (DB allowing)
                await asyncio.wait_for(self._drained(), 5.0)
            recorder.cancel()
            with suppress(asyncio.CancelledError):
                await recorder
        for sink in self.sinks.values():
            with suppress(Exception):
                await sink.close()

    async def _drained(self) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: not self._queue)

    async def wait_until(self, predicate, timeout: float) -> None:
        """Wait (at most `timeout` s) until `predicate()` is true after some outcome."""
        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(predicate), timeout)

    # scheduling -----------------------------------------------------------------------

    async def _scheduler(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch_due()
                types = [t for t in self.types if self._busy[t] < self._claim[t]]
                # Rows being sent are not "due": their outcome wakes this loop.
                next_due = await self.store.next_delivery_due(types, exclude=self._inflight)
            except Exception:  # a database hiccup must not end delivery for good
                log.exception("could not read the delivery outbox; retrying in 5 s")
                next_due = clock.now() + 5.0
            timeout = 60.0 if next_due is None else max(0.02, next_due - clock.now())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(timeout, 60.0))

    async def _dispatch_due(self) -> None:
        """Claim the due rows of every type with room, and plan them group by group."""
        room = {t: self._claim[t] - self._busy[t] for t in self.types}
        types = [t for t, r in room.items() if r > 0]
        if not types:
            return
        # Outcomes committed before this read are in it; later ones may not be (see below).
        self._recent.clear()  # everything committed so far is in the read below
        seq = self._seq
        due = await self.store.due_deliveries(clock.now(), types, sum(room[t] for t in types),
                                              exclude=tuple(self._inflight))
        groups: dict[Key, list[Delivery]] = defaultdict(list)
        for d in due:
            if d.id in self._inflight or self._recent.get(d.id, 0) > seq:
                continue  # claimed meanwhile, or recorded after the read began: re-read
            if room[d.channel.type] <= 0:
                continue
            room[d.channel.type] -= 1
            groups[_key(d)].append(d)
        for key, rows in groups.items():
            await self._plan(key, rows)

    async def _plan(self, key: Key, rows: list[Delivery]) -> None:
        """Send the due `rows` of one user's channel: one by one within the hourly budget;
        beyond it they wait (held) until the hour allows, and then go as one digest."""
        now = clock.now()
        if key[1] == "email":
            rows = await self._await_verified(rows, now)
        if not rows:
            return
        window = await self._window(key, now)
        room = self.settings.notify_per_hour - len(window)
        if room <= 0:
            await self.store.defer_deliveries([(d.id, window[0] + HOUR) for d in rows], True)
            return
        if any(d.held for d in rows):  # the hour allows again: everything due goes together
            self._start(key, await self._gather(key, rows, now), window, now)
            return
        for d in rows[:room]:
            self._start(key, [d], window, now)
        rest = rows[room:]
        if rest:
            log.info("user %d %s channel %s: over %d deliveries an hour; %d wait for a digest",
                     key[0], key[1], key[2], self.settings.notify_per_hour, len(rest))
            await self.store.defer_deliveries([(d.id, window[0] + HOUR) for d in rest], True)

    async def _gather(self, key: Key, rows: list[Delivery], now: float) -> list[Delivery]:
        """`rows` and every other due delivery of the channel (up to DIGEST_MAX): the
        claim read stops at the type's claim limit, a digest must not."""
        seq = self._seq
        more = await self.store.due_deliveries(
            now, [key[1]], DIGEST_MAX - len(rows),
            exclude=(*self._inflight, *(d.id for d in rows)), channel=key)
        return rows + [d for d in more
                       if d.id not in self._inflight and self._recent.get(d.id, 0) <= seq]

    async def _await_verified(self, rows: list[Delivery], now: float) -> list[Delivery]:
        """No alert mail goes to an unverified address: such deliveries wait (verification
        makes them due again) and are skipped once they have waited WAIT_VERIFIED."""
        waiting = [d for d in rows if not d.channel.verified]
        if not waiting:
            return rows
        stale = [d.id for d in waiting if d.created_at + WAIT_VERIFIED <= now]
        if stale:
            await self._record_now([(i, "skipped", None, "email address not verified within"
                                     " 24 h", None, None) for i in stale])
        await self.store.defer_deliveries(
            [(d.id, d.created_at + WAIT_VERIFIED) for d in waiting
             if d.created_at + WAIT_VERIFIED > now], False)
        return [d for d in rows if d.channel.verified]

    async def _window(self, key: Key, now: float) -> deque[float]:
        """The send times of the last hour for `key` (read from the store once)."""
        window = self._windows.get(key)
        if window is None:
            user_id, kind, channel_id = key
            sends = await self.store.recent_sends(
                user_id, kind, None if kind == "email" else channel_id, now - HOUR)
            window = self._windows.setdefault(key, deque(sends))
        while window and window[0] <= now - HOUR:
            window.popleft()
        if len(self._windows) > self._forget_at:
            # Forget channels quiet for an hour (read from the store again when needed);
            # amortised: the next sweep waits until the dict has doubled.
            cutoff = now - HOUR
            for k in [k for k, w in self._windows.items()
                      if k != key and (not w or w[-1] <= cutoff)]:
                del self._windows[k]
            self._forget_at = max(WINDOWS_KEPT, 2 * len(self._windows))
        return window

    def _start(self, key: Key, batch: list[Delivery], window: deque[float], now: float
               ) -> None:
        kind = key[1]
        for d in batch:
            self._inflight.add(d.id)
        self._busy[kind] += len(batch)
        window.append(now)
        task = asyncio.create_task(self._send(kind, batch, window, now),
                                   name=f"delivery-{batch[0].id}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    # sending --------------------------------------------------------------------------

    async def _send(self, kind: str, batch: list[Delivery], window: deque[float],
                    stamp: float) -> None:
        recorded = False
        try:
            async with self._slots[kind]:
                began = time.monotonic()
                try:
                    outcome = await self.sinks[kind].send(batch)
                except Exception as exc:  # a sink must classify; a bug is not retried
                    log.exception("%s sink raised", kind)
                    outcome = Failed(f"{type(exc).__name__}: {exc}"[:500])
            if not isinstance(outcome, Sent):
                self.attempts += 1
                with suppress(ValueError):
                    window.remove(stamp)  # nothing went out: the budget is not spent
            rows = self._outcome_rows(kind, batch, outcome, time.monotonic() - began)
            done = self._enqueue(rows, kind)
            recorded = True  # from here the recorder owns the claim
            await asyncio.shield(done)
        except Exception:
            log.exception("delivery %d: could not finish this attempt", batch[0].id)
        finally:
            if not recorded:  # cancelled before an outcome: the rows stay pending
                self._release([d.id for d in batch], kind)

    def _outcome_rows(self, kind: str, batch: Sequence[Delivery], outcome: Outcome,
                      took: float) -> list[tuple]:
        """The rows `record_deliveries` takes for `outcome` of `batch`, with the log line."""
        lead = batch[0]
        what = (f"alert {lead.alert.id}" if len(batch) == 1
                else f"digest of {len(batch)} alerts")
        digest = lead.id if len(batch) > 1 else None
        if isinstance(outcome, Sent):
            log.info("%s %s sent to %s in %.2fs", what, kind, lead.recipient, took)
            return [(d.id, "sent", None, None, d.recipient, digest) for d in batch]
        error = outcome.error[:500]
        attempts = max(d.attempts for d in batch) + 1
        limit = (self.settings.smtp_max_attempts if kind == "email"
                 else self.settings.delivery_max_attempts)
        if isinstance(outcome, Failed) or attempts >= limit:
            log.error("%s %s to %s failed after %d attempts: %s", what, kind, lead.recipient,
                      attempts, error)
            return [(d.id, "failed", None, error, None, None) for d in batch]
        base = self.settings.delivery_retry_base
        if kind == "email" and self.settings.smtp_retry_base is not None:
            base = self.settings.smtp_retry_base
        delay = outcome.after if outcome.after is not None else base * 2 ** (attempts - 1)
        delay = min(max(delay, 0.0), MAX_DELAY)
        log.warning("%s %s attempt %d failed (%s); retrying in %.1fs", what, kind, attempts,
                    error, delay)
        return [(d.id, "pending", clock.now() + delay, error, None, None) for d in batch]

    def _release(self, ids: Sequence[int], kind: str) -> None:
        for i in ids:
            self._inflight.discard(i)
        self._busy[kind] -= len(ids)
        self._wake.set()

    # recording ------------------------------------------------------------------------

    def _enqueue(self, rows: list[tuple], kind: str | None) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        self._queue.append((rows, done, kind))
        self._queued.set()
        return done

    async def _record_now(self, rows: list[tuple]) -> None:
        """Record outcomes decided without a send (skips) through the same queue."""
        await asyncio.shield(self._enqueue(rows, None))

    async def _recorder(self) -> None:
        """Commit queued outcomes, everything queued so far in one transaction; retried
        until it lands (losing `sent` would mean a resend). Claims end after the commit."""
        delay = 0.1
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await self.store.record_deliveries(r for rows, _, _ in batch for r in rows)
                except Exception:
                    log.exception("could not record %d delivery outcomes; retrying in %.1fs",
                                  sum(len(rows) for rows, _, _ in batch), delay)
                    self._queue[:0] = batch
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                delay = 0.1
                self._seq += 1
                for rows, done, kind in batch:
                    self._committed(rows, kind)
                    if not done.done():
                        done.set_result(None)
                self._wake.set()
                async with self.progress:
                    self.progress.notify_all()

    def _committed(self, rows: list[tuple], kind: str | None) -> None:
        for delivery_id, status, *_ in rows:
            self._recent[delivery_id] = self._seq
            if status in ("sent", "failed"):
                setattr(self, status, getattr(self, status) + 1)
                if kind is not None:
                    self.by_type[kind][status] += 1
            elif status == "skipped":
                self.skipped += 1
        if kind is not None:
            self._release([r[0] for r in rows], kind)


DELIVERER = web.AppKey("deliverer", Deliverer)


def make_sinks(settings: Settings) -> dict[str, Sink]:
    """One sink per channel type."""
    from .email import EmailSink
    from .telegram import TelegramSink
    from .webhook import WebhookSink

    return {"email": EmailSink(settings), "webhook": WebhookSink(settings),
            "telegram": TelegramSink(settings)}


async def render_metrics(out, deliverer: Deliverer) -> None:
    """The delivery figures of /metrics (`out`: a metrics.Exposition)."""
    counts = await deliverer.store.delivery_counts()
    out.metric("pricewatch_deliveries", "gauge", "Deliveries in the outbox, by channel type"
               " and state.")
    for kind, states in counts.items():
        for state, count in states.items():
            out.sample("pricewatch_deliveries", count, channel=kind, state=state)
    for state in ("sent", "failed"):
        name = f"pricewatch_deliveries_{state}_total"
        out.metric(name, "counter", f"Deliveries {state} by this process, by channel type.")
        for kind, figures in deliverer.by_type.items():
            out.sample(name, figures[state], channel=kind)
    # The first wave's email figures, kept for dashboards built on them.
    out.metric("pricewatch_emails", "gauge", "Alert emails in the outbox, by state.")
    for state, count in counts["email"].items():
        out.sample("pricewatch_emails", count, state=state)
    out.metric("pricewatch_emails_sent_total", "counter", "Emails sent by this process.")
    out.sample("pricewatch_emails_sent_total", deliverer.by_type["email"]["sent"])
    out.metric("pricewatch_emails_failed_total", "counter", "Emails given up by this process.")
    out.sample("pricewatch_emails_failed_total", deliverer.by_type["email"]["failed"])
