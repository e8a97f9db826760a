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
from ..store import Store, log_failure
from .base import Failed, Outcome, Retry, Sent, Sink

log = logging.getLogger("pricewatch.delivery")

HOUR = 3600.0
WAIT_VERIFIED = 86400.0  # an email delivery waits this long for a verified address
DIGEST_MAX = 1000  # deliveries folded into one digest at most (the rest: the next one)
MAX_DELAY = 3600.0  # no retry waits longer, whatever the other side asks
WINDOWS_KEPT = 10_000  # budget windows held before quiet ones are forgotten
COALESCE = 0.005  # seconds a read of due rows waits for more sends to finish
READY_PER_USER = 32  # rows claimed at most per user beyond those being sent

Key = tuple[int, str, int | str]  # (user id, channel type, channel id): what a budget counts


def _key(d: Delivery) -> Key:
    return (d.alert.user_id, d.channel.type, d.channel.id)


def _channel_id(key: Key) -> int | None:
    """The `channel_id` column of the channel `key` (None for the email)."""
    if key[1] == "email":
        return None
    channel_id = key[2]
    assert isinstance(channel_id, int)  # only the email's id is a str
    return channel_id


class Deliverer:
    """Sends pending deliveries through `sinks` (channel type -> sink)."""

    def __init__(self, settings: Settings, store: Store, sinks: Mapping[str, Sink]):
        self.settings = settings
        self.store = store
        self.sinks = dict(sinks)
        self.skipped = 0  # email deliveries skipped (not verified within WAIT_VERIFIED)
        self.attempts = 0  # attempts that did not succeed (retried or given up)
        # Deliveries recorded sent or failed by this process, per type (a digest: each).
        self.by_type: dict[str, dict[str, int]] = {t: {"sent": 0, "failed": 0} for t in self.sinks}
        self.progress = asyncio.Condition()  # notified after every recorded outcome
        self._wake = asyncio.Event()
        self._inflight: set[int] = set()
        self._busy: dict[str, int] = dict.fromkeys(self.sinks, 0)  # sends claimed per type
        self._slots = {t: asyncio.Semaphore(s.concurrency) for t, s in self.sinks.items()}
        self._claim = {t: s.concurrency * 4 for t, s in self.sinks.items()}
        # Sends in flight per (type, user), for types whose sink caps them (webhooks: the
        # receiver is the user's own, and one that hangs must not hold every slot).
        self._per_user = {t: getattr(s, "per_user", None) for t, s in self.sinks.items()}
        self._user_sends: dict[tuple[str, int], int] = {}
        # Rows claimed for users at their cap, started as their sends finish.
        self._ready: dict[tuple[str, int], deque[tuple[Key, Delivery]]] = {}
        self._deleted: dict[int | str, float] = {}  # channel id -> when it was deleted
        self._committing = False
        self._stopping = False
        self._seq = 0  # commits of outcomes so far
        self._recent: dict[int, int] = {}  # delivery id -> the commit that recorded it
        self._windows: dict[Key, deque[float]] = {}  # send times within the last hour
        self._forget_at = WINDOWS_KEPT
        self._sending: set[asyncio.Task] = set()
        # Outcomes to commit: (rows, future, the channel whose claim they end).
        self._queue: list[tuple[list[tuple], asyncio.Future, Key]] = []
        self._queued = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    @property
    def sent(self) -> int:
        return sum(figures["sent"] for figures in self.by_type.values())

    @property
    def failed(self) -> int:
        return sum(figures["failed"] for figures in self.by_type.values())

    def wake(self) -> None:
        self._wake.set()

    def channel_deleted(self, channel_id: int) -> None:
        """The channel is gone (its pending rows are `skipped` on disk): deliveries of it
        already claimed are dropped instead of sent."""
        self._deleted[channel_id] = time.monotonic()

    @property
    def types(self) -> list[str]:
        """The channel types that can send now (their sink is configured)."""
        return [t for t, sink in self.sinks.items() if sink.configured]

    async def start(self) -> None:
        for sink in self.sinks.values():
            await sink.start()
        if not self.sinks["email"].configured:
            log.warning("PRICEWATCH_SMTP_HOST is not set: alert emails stay queued (pending)")
        self._tasks = [
            asyncio.create_task(self._scheduler(), name="deliveries"),
            asyncio.create_task(self._recorder(), name="delivery-recorder"),
        ]

    async def stop(self, timeout: float = 1.5) -> None:
        """Give sends in flight `timeout` seconds, commit the outcomes that arrived, stop."""
        scheduler, recorder = self._tasks or (None, None)
        self._stopping = True  # nothing new starts (ready rows stay pending on disk)
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
                async with asyncio.timeout(5.0):
                    await self._drained()
            recorder.cancel()
            with suppress(asyncio.CancelledError):
                await recorder
        for sink in self.sinks.values():
            with suppress(Exception):
                await sink.close()

    async def _drained(self) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: not self._queue and not self._committing)

    async def wait_until(self, predicate, timeout: float) -> None:
        """Wait (at most `timeout` s) until `predicate()` is true after some outcome."""
        async with self.progress:
            async with asyncio.timeout(timeout):
                await self.progress.wait_for(predicate)

    # scheduling -----------------------------------------------------------------------

    async def _scheduler(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch_due()
                types = [t for t in self.types if self._busy[t] < self._claim[t]]
                # Rows being sent, or of users at their cap, are not "due": an outcome
                # wakes this loop.
                next_due = await self.store.next_delivery_due(
                    types, exclude=self._inflight, exclude_users=self._full_users()
                )
            except Exception as exc:  # a database hiccup must not end delivery for good
                log_failure(log, exc, "could not read the delivery outbox; retrying in 5 s")
                next_due = clock.now() + 5.0
            timeout = 60.0 if next_due is None else max(0.02, next_due - clock.now())
            with suppress(TimeoutError):
                async with asyncio.timeout(min(timeout, 60.0)):
                    await self._wake.wait()
            if self._sending:
                # Sends are finishing one by one: gather a few before the next read, so
                # that one read claims several rows rather than one per finished send.
                await asyncio.sleep(COALESCE)

    async def _dispatch_due(self) -> None:
        """Claim the due rows of every type with room, and plan them group by group."""
        room = {t: self._claim[t] - self._busy[t] for t in self.types}
        types = [t for t, r in room.items() if r > 0]
        if not types:
            return
        # Outcomes committed before this read are in it; later ones may not be (see below).
        self._recent.clear()  # everything committed so far is in the read below
        seq = self._seq
        due = await self.store.due_deliveries(
            clock.now(),
            types,
            sum(room[t] for t in types),
            exclude=tuple(self._inflight),
            exclude_users=self._full_users(),
        )
        if len(self._deleted) > 1000:  # a claim never outlives a minute or so of sending
            cutoff = time.monotonic() - HOUR
            self._deleted = {c: t for c, t in self._deleted.items() if t > cutoff}
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

    def _full_users(self) -> list[tuple[str, int]]:
        return [
            (kind, user)
            for (kind, user), n in self._user_sends.items()
            if n >= (self._per_user[kind] or n + 1)
        ]

    def _free(self, key: Key) -> int:
        """How many more sends the channel's user may start now (types without a cap: as
        many as there are rows)."""
        cap = self._per_user[key[1]]
        return 10**9 if cap is None else cap - self._user_sends.get((key[1], key[0]), 0)

    async def _plan(self, key: Key, rows: list[Delivery]) -> None:
        """Send the due `rows` of one user's channel: one by one within the hourly budget;
        beyond it they wait (held) until the hour allows, and then go as one digest."""
        now = clock.now()
        if key[1] == "email":
            rows = await self._await_verified(rows, now)
        if not rows:
            return
        window = await self._window(key, now)
        waiting = self._ready.get((key[1], key[0]), ())
        room = self.settings.notify_per_hour - len(window) - sum(1 for k, _ in waiting if k == key)
        if room <= 0:
            await self.store.hold_deliveries([(d.id, window[0] + HOUR) for d in rows])
            return
        free = self._free(key)
        if free <= 0:
            return  # the user's sends are at their cap: these stay due for later
        if any(d.held for d in rows):  # the hour allows again: everything due goes together
            self._start(key, await self._gather(key, rows, now), window, now)
            return
        for d in rows[: min(room, free)]:
            self._start(key, [d], window, now)
        # Within the budget but beyond the user's cap: claimed now, started as their
        # sends finish (reading them again for every finished send would cost a read each).
        self._hold_ready(key, rows[min(room, free) : room])
        rest = rows[room:]
        if rest:
            log.info(
                "user %d %s channel %s: over %d deliveries an hour; %d wait for a digest",
                key[0],
                key[1],
                key[2],
                self.settings.notify_per_hour,
                len(rest),
            )
            await self.store.hold_deliveries([(d.id, window[0] + HOUR) for d in rest])

    async def _gather(self, key: Key, rows: list[Delivery], now: float) -> list[Delivery]:
        """`rows` and every other due delivery of the channel (up to DIGEST_MAX): the
        claim read stops at the type's claim limit, a digest must not."""
        seq = self._seq
        more = await self.store.due_deliveries(
            now,
            [key[1]],
            DIGEST_MAX - len(rows),
            exclude=(*self._inflight, *(d.id for d in rows)),
            channel=key,
        )
        return rows + [
            d for d in more if d.id not in self._inflight and self._recent.get(d.id, 0) <= seq
        ]

    async def _await_verified(self, rows: list[Delivery], now: float) -> list[Delivery]:
        """No alert mail goes to an unverified address: such deliveries wait (verification
        makes them due again) and are skipped once they have waited WAIT_VERIFIED."""
        waiting = [d for d in rows if not d.channel.verified]
        if not waiting:
            return rows
        # Both writes hold only while the address is still unverified when they commit: a
        # verification landing meanwhile made these rows due, and that must stand.
        stale = [d.id for d in waiting if d.created_at + WAIT_VERIFIED <= now]
        if stale:
            self.skipped += await self.store.skip_unverified(stale)
            async with self.progress:
                self.progress.notify_all()
        await self.store.defer_unverified(
            [
                (d.id, d.created_at + WAIT_VERIFIED)
                for d in waiting
                if d.created_at + WAIT_VERIFIED > now
            ]
        )
        return [d for d in rows if d.channel.verified]

    async def _window(self, key: Key, now: float) -> deque[float]:
        """The send times of the last hour for `key` (read from the store once)."""
        window = self._windows.get(key)
        if window is None:
            user_id, kind, _ = key
            sends = await self.store.recent_sends(user_id, kind, _channel_id(key), now - HOUR)
            window = self._windows.setdefault(key, deque(sends))
        while window and window[0] <= now - HOUR:
            window.popleft()
        if len(self._windows) > self._forget_at:
            # Forget channels quiet for an hour (read from the store again when needed);
            # amortised: the next sweep waits until the dict has doubled.
            cutoff = now - HOUR
            for k in [
                k for k, w in self._windows.items() if k != key and (not w or w[-1] <= cutoff)
            ]:
                del self._windows[k]
            self._forget_at = max(WINDOWS_KEPT, 2 * len(self._windows))
        return window

    def _claim_rows(self, key: Key, batch: list[Delivery], units: int = 1) -> None:
        """Claim `batch` as `units` sends (a digest is one, however many rows it holds: it
        takes one sender, and must not use up the type's claims of everybody else)."""
        for d in batch:
            self._inflight.add(d.id)
        self._busy[key[1]] += units

    def _hold_ready(self, key: Key, rows: list[Delivery]) -> None:
        """Claim `rows` (at most READY_PER_USER waiting per user; the rest stay on disk, due)
        to be started by `_sent_one` as the user's sends finish."""
        ready = self._ready.setdefault((key[1], key[0]), deque())
        rows = rows[: max(0, READY_PER_USER - len(ready))]
        self._claim_rows(key, rows, units=len(rows))
        ready.extend((key, d) for d in rows)
        if not ready:
            del self._ready[(key[1], key[0])]

    def _start(
        self,
        key: Key,
        batch: list[Delivery],
        window: deque[float],
        now: float,
        claimed: bool = False,
    ) -> None:
        kind = key[1]
        if not claimed:
            self._claim_rows(key, batch)
        user = (kind, key[0])
        self._user_sends[user] = self._user_sends.get(user, 0) + 1
        window.append(now)
        task = asyncio.create_task(
            self._send(key, batch, window, now), name=f"delivery-{batch[0].id}"
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    # sending --------------------------------------------------------------------------

    async def _send(
        self, key: Key, batch: list[Delivery], window: deque[float], stamp: float
    ) -> None:
        kind = key[1]
        recorded = False
        sending = True
        try:
            async with self._slots[kind]:
                if key[2] in self._deleted:  # deleted while waiting for a slot
                    with suppress(ValueError):
                        window.remove(stamp)
                    return
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
            done = self._enqueue(rows, key)
            recorded = True  # from here the recorder owns the claim
            if isinstance(outcome, Retry) and rows[0][1] == "pending":
                # The channel is down: its other due rows wait as long (the ones claimed
                # for later included), rather than each trying (and timing out) on its own.
                await self._defer_channel(key, rows[0][2], {d.id for d in batch})
            sending = False
            self._sent_one(key)  # the receiver is free again; the rows stay claimed
            await asyncio.shield(done)  # until their outcome is committed
        except Exception as exc:
            log_failure(log, exc, "delivery %d: could not finish this attempt", batch[0].id)
        finally:
            if sending:
                self._sent_one(key)
            if not recorded:  # cancelled or dropped before an outcome: the rows stay as
                self._release([d.id for d in batch], key)  # they are on disk

    def _outcome_rows(
        self, kind: str, batch: Sequence[Delivery], outcome: Outcome, took: float
    ) -> list[tuple]:
        """The rows `record_deliveries` takes for `outcome` of `batch`, with the log line."""
        lead = batch[0]
        what = f"alert {lead.alert.id}" if len(batch) == 1 else f"digest of {len(batch)} alerts"
        digest = lead.id if len(batch) > 1 else None
        if isinstance(outcome, Sent):
            log.info("%s %s sent to %s in %.2fs", what, kind, lead.recipient, took)
            return [(d.id, "sent", None, None, d.recipient, digest) for d in batch]
        error = outcome.error[:500]
        attempts = max(d.attempts for d in batch) + 1
        limit = (
            self.settings.smtp_max_attempts
            if kind == "email"
            else self.settings.delivery_max_attempts
        )
        if isinstance(outcome, Failed) or attempts >= limit:
            log.error(
                "%s %s to %s failed after %d attempts: %s",
                what,
                kind,
                lead.recipient,
                attempts,
                error,
            )
            return [(d.id, "failed", None, error, None, None) for d in batch]
        base = self.settings.delivery_retry_base
        if kind == "email" and self.settings.smtp_retry_base is not None:
            base = self.settings.smtp_retry_base
        backoff = base * 2 ** (attempts - 1)
        # A wait the other side asks for is obeyed, but never below the first step: a
        # `Retry-After: 0` (or a date in the past) must not burn every attempt at once.
        delay = backoff if outcome.after is None else max(outcome.after, base)
        delay = min(delay, MAX_DELAY)
        log.warning(
            "%s %s attempt %d failed (%s); retrying in %.1fs", what, kind, attempts, error, delay
        )
        return [(d.id, "pending", clock.now() + delay, error, None, None) for d in batch]

    def _release(self, ids: Sequence[int], key: Key) -> None:
        for i in ids:
            self._inflight.discard(i)
        self._busy[key[1]] -= 1  # one claimed send (a single row or a digest)
        self._wake.set()

    async def _defer_channel(self, key: Key, until: float, sending: set[int]) -> None:
        user = (key[1], key[0])
        ready = self._ready.get(user, deque())
        dropped = [d for k, d in ready if k == key]
        if dropped:
            kept = deque((k, d) for k, d in ready if k != key)
            if kept:
                self._ready[user] = kept
            else:
                self._ready.pop(user, None)
        # Rows of other claims (other sends of this channel) are excluded: their outcome
        # decides for them. The dropped ready rows stay claimed until the deferral landed,
        # so that no read picks them up in between.
        others = self._inflight - sending - {d.id for d in dropped}
        try:
            await self.store.defer_channel(
                key[0], key[1], _channel_id(key), until, exclude=tuple(others)
            )
        finally:
            for d in dropped:
                self._release([d.id], key)

    def _sent_one(self, key: Key) -> None:
        """A send of `key`'s user has its answer: the user may start another, the next of
        their ready rows if they have one."""
        user = (key[1], key[0])
        left = self._user_sends.get(user, 0) - 1
        if left > 0:
            self._user_sends[user] = left
        else:
            self._user_sends.pop(user, None)
        ready = self._ready.get(user)
        if ready and not self._stopping:
            next_key, d = ready.popleft()
            if not ready:
                del self._ready[user]
            window = self._windows.setdefault(next_key, deque())
            self._start(next_key, [d], window, clock.now(), claimed=True)
        self._wake.set()

    # recording ------------------------------------------------------------------------

    def _enqueue(self, rows: list[tuple], key: Key) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        self._queue.append((rows, done, key))
        self._queued.set()
        return done

    async def _recorder(self) -> None:
        """Commit queued outcomes, everything queued so far in one transaction; retried
        until it lands (losing `sent` would mean a resend). Claims end after the commit."""
        delay = 0.1
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                self._committing = True  # a graceful stop waits for this commit too
                try:
                    await self.store.record_deliveries(r for rows, _, _ in batch for r in rows)
                except Exception as exc:
                    self._committing = False
                    log_failure(
                        log,
                        exc,
                        "could not record %d delivery outcomes; retrying in %.1fs",
                        sum(len(rows) for rows, _, _ in batch),
                        delay,
                    )
                    self._queue[:0] = batch
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                self._committing = False
                delay = 0.1
                self._seq += 1
                for rows, done, key in batch:
                    self._committed(rows, key)
                    if not done.done():
                        done.set_result(None)
                self._wake.set()
                async with self.progress:
                    self.progress.notify_all()

    def _committed(self, rows: list[tuple], key: Key) -> None:
        for delivery_id, status, *_ in rows:
            self._recent[delivery_id] = self._seq
            if status in ("sent", "failed"):
                self.by_type[key[1]][status] += 1
        self._release([r[0] for r in rows], key)


DELIVERER = web.AppKey("deliverer", Deliverer)


def make_sinks(settings: Settings) -> dict[str, Sink]:
    """One sink per channel type."""
    from .email import EmailSink
    from .telegram import TelegramSink
    from .webhook import WebhookSink

    return {
        "email": EmailSink(settings),
        "webhook": WebhookSink(settings),
        "telegram": TelegramSink(settings),
    }


async def render_metrics(out, deliverer: Deliverer) -> None:
    """The delivery figures of /metrics (`out`: a metrics.Exposition)."""
    counts = await deliverer.store.delivery_counts()
    out.metric(
        "pricewatch_deliveries", "gauge", "Deliveries in the outbox, by channel type and state."
    )
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
