"""Alerts: the in-memory engine on the tick path and the trigger writer.

Flow: `AlertEngine.on_tick` (synchronous, per trade) matches the trade against every watched
price alert of its symbol in O(log n + k) (alert_index.py) and every percent alert of its
windows (percent_index.py), and only *enqueues* the hits. The writer task commits each
batch of hits in ONE transaction (status TRIGGERED + event + one delivery row per channel),
then pushes `{"type": "alert", "alert", "event"}` to the owner's live sockets (through the
Resumer, which holds them for a socket that is resuming: resume.py) and wakes the deliverer
(pricewatch/delivery: email, webhooks, Telegram, with the exactly-once rules). A purge sweep
removes deleted alerts and events past the retention.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial

import orjson
from aiohttp import web

from . import clock
from .alert_index import AlertIndex, CreationLog
from .feeds import Bar, Tick
from .hub import Hub
from .limits import SlidingWindow
from .percent_index import PercentIndex
from .records import Arm, Event, Hit
from .resume import REPLAY_MAX, Events, Resumer
from .storage.alerts import MIN_COOLDOWN
from .store import Alert, Store, log_failure

log = logging.getLogger(__name__)


KEEP_DELETED = 30 * 86400.0  # seconds a DELETED alert stays listable before it is purged
PURGE_EVERY = 3600.0  # seconds between purges
PURGE_FIRST = 60.0  # seconds from start to the first purge
# How far back alert creation times are kept to judge backfilled trades (older trades are
# judged as if every alert then active had always existed).
CREATION_HORIZON = 86400.0
EXPIRE_EVERY = 5.0  # seconds between expiry sweeps (the tick path never waits for one)


def _push(
    heap: list[tuple[float, int]], live: dict[int, float], when: float, alert_id: int
) -> list[tuple[float, int]]:
    """Push onto a heap whose entries are valid only while `live` still maps the id to that
    time (stale ones are skipped when popped); rebuilt from `live` once stale entries would
    be most of it, so that creating and deleting alerts cannot grow it without end."""
    if len(heap) > 2 * len(live) + 1024:
        heap = [(t, i) for i, t in live.items()]
        heapq.heapify(heap)
        if live.get(alert_id) == when:
            return heap  # the new entry is in `live` already
    heapq.heappush(heap, (when, alert_id))
    return heap


def alert_message(alert: Alert, event: Event | None) -> bytes:
    """The `{"type": "alert"}` live message for one trigger."""
    return orjson.dumps(
        {
            "type": "alert",
            "alert": alert.public(),
            "event": event.brief() if event is not None else None,
        }
    )


class AlertEngine:
    """Watched alerts in memory, kept in step with the database (DB first, then memory).

    Price alerts live in `index`, percent alerts in `percent`. Time on the tick path is trade
    time: a repeating alert's cooldown ends, and an alert's expiry passes, at the first trade
    at or after that time (the expiry sweep task marks EXPIRED on disk by the wall clock).
    """

    def __init__(
        self,
        store: Store,
        hub: Hub,
        max_active: int = 1000,
        create_rate: int = 60,
        event_retention_days: int = 90,
    ):
        self.store = store
        self.hub = hub
        self.max_active = max_active  # CREATED alerts per user
        # Events older than this are purged with their finished deliveries (pending ones
        # stay): what a user's repeating alerts may store is bounded in time.
        self.event_retention = event_retention_days * 86400.0
        # Alert creations per user per minute (PRICEWATCH_ALERT_CREATE_RATE): the active cap
        # alone lets a client create and delete rows without end.
        self.creations = SlidingWindow(create_rate, 60.0)
        self.purged = 0  # DELETED alerts purged by this process
        self.purged_events = 0  # events purged by this process (past the retention)
        self.expired = 0  # alerts marked EXPIRED by this process
        self.index = AlertIndex()
        self.percent = PercentIndex()
        self.created = CreationLog()  # which alerts existed at a (backfilled) trade's time
        self.triggered = 0  # triggers committed by this process
        self.announced = 0  # the highest event id pushed to live sockets (see `resume`)
        # Repeating alerts: id -> how to arm them again (kind, asset, target, direction,
        # window, cooldown); those cooling down, as a heap of (rearm time ms, id) plus
        # id -> rearm time ms; price alerts back from their cooldown and waiting for the
        # price to be on the far side of their target (the index holds that far side).
        self._repeat: dict[int, tuple[str, str, float, str, str | None, float]] = {}
        self._cool_heap: list[tuple[float, int]] = []
        self._cooling: dict[int, float] = {}
        self._rearming: set[int] = set()
        # Alerts with an expiry only: heap of (expires ms, id) plus id -> expires ms.
        self._exp_heap: list[tuple[float, int]] = []
        self._expiry: dict[int, float] = {}
        self._next_due = math.inf  # the earliest time either heap needs a look
        self._hits: list[Hit | Arm] = []
        # Live-feed resumes, replayed from the database beside the writer (resume.py).
        self.resumer = Resumer(hub, self._events)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._purger: asyncio.Task | None = None
        self._expirer: asyncio.Task | None = None
        # Called after each committed batch (wakes the deliverer).
        self.notify_hook: Callable[[], None] | None = None

    async def load(self) -> int:
        rows = await self.store.active_alerts()
        price_rows = []
        for alert in rows:
            entry = self._watch(alert)
            if entry is not None:
                price_rows.append(entry)
        self.index.load(price_rows)
        floor, recent = await self.store.alert_creations(clock.now() - CREATION_HORIZON)
        self.created.floor_id = floor  # every alert up to it existed before the horizon
        for alert_id, created in recent:
            self.created.add(alert_id, created * 1000)
        self.announced = await self.store.last_event_id()
        return len(rows)

    # the tick path --------------------------------------------------------------------

    def on_tick(self, tick: Tick) -> None:
        if tick.time >= self._next_due:
            self._due(tick.time)
        hits = self.index.match_targets(tick.symbol, tick.price)
        if hits and self._rearming:
            hits = self._far_side(hits)
        if hits and tick.backfill and tick.time < self.created.newest:
            hits = self._existing_at(tick.symbol, tick.time, hits)
        symbol, price, at = tick.symbol, tick.price, tick.time / 1000.0
        if hits:
            # Each hit keeps the asset and target it matched: the writer triggers an alert only
            # if it still has them, so an alert changed meanwhile never fires at the old ones.
            self._hits.extend(
                Hit(aid, symbol, target, direction, price, at, tick.backfill)
                for aid, target, direction in hits
            )
            self._cool([hit[0] for hit in hits], tick.time)
        percent = self.percent
        if symbol in percent.groups:
            moves = percent.on_trade(symbol, tick.time, price)
        else:  # no percent alert on this symbol: only remember where a window would start
            percent.last[symbol] = tick
            moves = None
        if moves and tick.backfill and tick.time < self.created.newest:
            last = self.created.last_id_at(tick.time)
            for aid, pct, direction, window in moves:
                if aid > last:
                    self.percent.add(aid, symbol, window, pct, direction)
            moves = [move for move in moves if move[0] <= last]
        if moves:
            self._hits.extend(
                Hit(aid, symbol, pct, direction, price, at, tick.backfill, window)
                for aid, pct, direction, window in moves
            )
            self._cool([move[0] for move in moves], tick.time)
        if self._hits:
            self._idle.clear()
            self._wake.set()

    def on_bar(self, bar: Bar) -> None:
        """A kline filling a gap: every alert whose target lies within its range was crossed
        by a trade inside it (one outside the range would have been crossed by a trade seen,
        and triggered then). It triggers at its target, at the kline's open time. Percent
        alerts are not judged on klines."""
        if bar.end >= self._next_due:
            self._due(bar.end)
        hits = self.index.match_targets(bar.symbol, bar.high) + self.index.match_targets(
            bar.symbol, bar.low
        )
        if hits and self._rearming:
            hits = self._far_side(hits)
        if hits and bar.end < self.created.newest:
            hits = self._existing_at(bar.symbol, bar.end, hits)
        if hits:
            at = bar.start / 1000.0
            self._hits.extend(
                Hit(aid, bar.symbol, target, direction, target, at, "kline")
                for aid, target, direction in hits
            )
            self._cool([hit[0] for hit in hits], bar.start)
        if self._hits:
            self._idle.clear()
            self._wake.set()

    def _existing_at(
        self, symbol: str, t_ms: float, hits: list[tuple[int, float, str]]
    ) -> list[tuple[int, float, str]]:
        """The hits on alerts that existed at a backfilled trade's time. Alerts created after
        it (a trade recovered from before their creation is history, not news) go back into
        the index untouched. Streamed trades are news by definition and never filtered: the
        exchange's clock and ours may differ by a little."""
        last = self.created.last_id_at(t_ms)
        kept = []
        for hit in hits:
            if hit[0] <= last:
                kept.append(hit)
            else:
                self.index.add(hit[0], symbol, hit[1], hit[2])
        return kept

    def _far_side(self, hits: list[tuple[int, float, str]]) -> list[tuple[int, float, str]]:
        """Split off the re-arming price alerts whose far side this trade reached: they are
        armed again at their target (no trigger); the rest are triggers."""
        kept = []
        for hit in hits:
            alert_id = hit[0]
            if alert_id not in self._rearming:
                kept.append(hit)
                continue
            self._rearming.discard(alert_id)
            _, asset, target, direction, _, _ = self._repeat[alert_id]
            self.index.add(alert_id, asset, target, direction)
            self._hits.append(Arm(alert_id, True))
        return kept

    def _cool(self, alert_ids: list[int], at_ms: float) -> None:
        """Triggered alerts that repeat start their cooldown, from the trigger's time (the
        writer stores the same end as `rearm_at`)."""
        if not self._repeat:
            return
        for alert_id in alert_ids:
            spec = self._repeat.get(alert_id)
            if spec is not None:
                self._start_cooldown(alert_id, at_ms + spec[5] * 1000)

    def _start_cooldown(self, alert_id: int, until_ms: float) -> None:
        self._cooling[alert_id] = until_ms
        self._cool_heap = _push(self._cool_heap, self._cooling, until_ms, alert_id)
        self._next_due = min(self._next_due, until_ms)

    def _due(self, t_ms: float) -> None:
        """Expire alerts whose time has come, and end the cooldowns that are over."""
        heap = self._exp_heap
        while heap and heap[0][0] <= t_ms:
            when, alert_id = heapq.heappop(heap)
            if self._expiry.get(alert_id) == when:
                self.untrack(alert_id)  # never triggers from now; the sweep marks it EXPIRED
                self._expiry[alert_id] = when  # (and it is still one for the sweep)
        heap = self._cool_heap
        while heap and heap[0][0] <= t_ms:
            when, alert_id = heapq.heappop(heap)
            if self._cooling.get(alert_id) != when:
                continue
            del self._cooling[alert_id]
            kind, asset, target, direction, window, _ = self._repeat[alert_id]
            if kind == "percent":
                assert window is not None  # a percent alert has one
                self.percent.add(alert_id, asset, window, target, direction)
                self._hits.append(Arm(alert_id, True))
            else:
                self._wait_far_side(alert_id, asset, target, direction)
                self._hits.append(Arm(alert_id, False))
            self._idle.clear()
            self._wake.set()
        self._next_due = min(
            self._exp_heap[0][0] if self._exp_heap else math.inf,
            self._cool_heap[0][0] if self._cool_heap else math.inf,
        )

    def _wait_far_side(self, alert_id: int, asset: str, target: float, direction: str) -> None:
        """Hysteresis: index the far side of the target (strictly below it for an "above"
        alert, strictly above for "below"); reaching it arms the alert again."""
        self._rearming.add(alert_id)
        if direction == "above":
            self.index.add(alert_id, asset, math.nextafter(target, 0.0), "below")
        else:
            self.index.add(alert_id, asset, math.nextafter(target, math.inf), "above")

    # keeping memory in step -----------------------------------------------------------

    def _announce(self, alerts: list[Alert]) -> None:
        """Log each committed trigger and push it to its owner's live sockets."""
        for alert in alerts:
            log.info(
                "alert %d triggered: %s %s %s at %s",
                alert.id,
                alert.asset,
                alert.direction,
                alert.price if alert.kind == "price" else alert.percent,
                alert.triggered_price,
            )
            event_id = alert.event.id if alert.event is not None else None
            if event_id is not None:
                self.announced = max(self.announced, event_id)
            self.resumer.deliver(alert.user_id, event_id, alert_message(alert, alert.event))

    def _watch(self, alert: Alert) -> tuple[int, str, float, str] | None:
        """Start watching `alert` as the database has it. Returns the (id, asset, target,
        direction) row for the price index, which the caller adds (one by one or in bulk)."""
        if alert.repeat:
            target = alert.price if alert.kind == "price" else alert.percent
            assert target is not None  # a price alert has a price, a percent alert a percent
            # (a stored row may hold a shorter cooldown than the API takes: held to the floor)
            self._repeat[alert.id] = (
                alert.kind,
                alert.asset,
                target,
                alert.direction,
                alert.window,
                max(alert.cooldown, MIN_COOLDOWN),
            )
        if alert.expires_at is not None and alert.status in ("CREATED", "TRIGGERED"):
            when = alert.expires_at * 1000
            self._expiry[alert.id] = when
            self._exp_heap = _push(self._exp_heap, self._expiry, when, alert.id)
            self._next_due = min(self._next_due, when)
        if alert.status == "TRIGGERED":  # a repeating alert cooling down
            if alert.repeat and alert.rearm_at is not None:
                self._start_cooldown(alert.id, alert.rearm_at * 1000)
            return None
        if alert.status != "CREATED":
            return None
        self.created.add(alert.id, alert.created_at * 1000)
        if alert.kind == "percent":
            assert alert.window is not None and alert.percent is not None  # it has both
            self.percent.add(alert.id, alert.asset, alert.window, alert.percent, alert.direction)
            return None
        price = alert.price
        assert price is not None  # a price alert has one
        if not alert.armed and alert.repeat:
            self._wait_far_side(alert.id, alert.asset, price, alert.direction)
            return None
        return alert.id, alert.asset, price, alert.direction

    def track(self, alert: Alert) -> None:
        """An alert was created or changed in the DB: watch it as it is now."""
        self.untrack(alert.id)
        row = self._watch(alert)
        if row is not None:
            self.index.add(*row)

    def untrack(self, alert_id: int) -> None:
        self.index.remove(alert_id)
        self.percent.remove(alert_id)
        self._rearming.discard(alert_id)
        self._repeat.pop(alert_id, None)
        self._cooling.pop(alert_id, None)  # heap entries left behind are skipped
        self._expiry.pop(alert_id, None)

    # resume ---------------------------------------------------------------------------

    def resume(self, user_id: int, since: int, send: Callable[[bytes], None], client=None) -> None:
        """Re-send, in order, the user's events after `since` through `send` (at most
        REPLAY_MAX, then `"more": true`), then let the live ones follow with no gap and no
        duplicate: everything announced so far is replayed from the database, and what is
        announced from now on is held for `client` until then (resume.py). Events pushed
        live to this socket before it asked to resume may come again: a client resumes with
        its first message."""
        self.resumer.start(user_id, since, send, client)

    def _events(self, user_id: int, since: int) -> Callable[[], Awaitable[Events]]:
        upto = self.announced  # later ones are held for the resuming connection

        async def read() -> Events:
            rows = await self.store.events_between(user_id, since, upto, REPLAY_MAX + 1)
            return [(event.id, partial(alert_message, alert, event)) for event, alert in rows], True

        return read

    def resume_client(self, hub: Hub, client, data: dict) -> None:
        """A live-feed client's `{"action": "resume", "since": EVENT_ID}` (see `resume`;
        once per RESUME_EVERY seconds per connection)."""
        since = self.resumer.check(client, data)
        if since is None:
            return

        def send(data: bytes) -> None:
            hub.send(client, data)

        self.resume(client.user_id, since, send, client)

    # expiry ---------------------------------------------------------------------------

    async def expire(self, now: float | None = None) -> int:
        """One sweep: mark EXPIRED every watched alert whose expires_at <= `now` (default:
        the wall clock); returns how many."""
        now = clock.now() if now is None else now
        if not self._expiry or min(self._expiry.values()) > now * 1000:
            return 0  # nothing the engine watches expires yet: no query
        ids = await self.store.expire_alerts(now)
        # Every alert due by now is done with: expired just now, or no longer one that can
        # expire (triggered for good, deleted): none needs another sweep.
        due = now * 1000
        for alert_id in [a for a, when in self._expiry.items() if when <= due]:
            self.untrack(alert_id)
        self.expired += len(ids)
        return len(ids)

    async def _expire_loop(self) -> None:
        while True:
            try:
                await self.expire()
            except Exception as exc:  # a database hiccup: the next sweep tries again
                log_failure(log, exc, "could not expire alerts")
            await asyncio.sleep(EXPIRE_EVERY)

    # the writer -----------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="alert-writer")
        self._purger = asyncio.create_task(self._purge_loop(), name="alert-purger")
        self._expirer = asyncio.create_task(self._expire_loop(), name="alert-expirer")

    async def stop(self, timeout: float = 2.0) -> None:
        """Commit what is queued (bounded by `timeout`), then stop the writer and sweeps."""
        for sweep in (self._purger, self._expirer):
            if sweep is not None:
                sweep.cancel()
                with suppress(asyncio.CancelledError):
                    await sweep
        await self.resumer.stop()
        if self._task is None:
            return
        with suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task

    # the purger -----------------------------------------------------------------------

    async def purge(self, now: float | None = None) -> int:
        """One sweep: remove alerts DELETED more than KEEP_DELETED seconds before `now`
        (default: the wall clock), and events older than the retention with their finished
        deliveries; returns how many alerts."""
        now = clock.now() if now is None else now
        self.created.prune((now - CREATION_HORIZON) * 1000)
        count = await self.store.purge_deleted_alerts(now - KEEP_DELETED)
        self.purged += count
        if count:
            log.info("purged %d alerts deleted over %d days ago", count, KEEP_DELETED // 86400)
        events = await self.store.purge_events(now - self.event_retention)
        self.purged_events += events
        if events:
            log.info(
                "purged %d alert events older than %g days", events, self.event_retention / 86400
            )
        return count

    async def _purge_loop(self) -> None:
        # The first sweep a little after start: starting (loading alerts, resuming pending
        # deliveries, catching up on trades) comes first; then every PURGE_EVERY seconds.
        await asyncio.sleep(PURGE_FIRST)
        while True:
            try:
                await self.purge()
            except Exception as exc:  # a database hiccup: the next sweep tries again
                log_failure(log, exc, "could not purge deleted alerts and old events")
            await asyncio.sleep(PURGE_EVERY)

    async def drained(self) -> None:
        """Wait until every hit so far is committed (tests and shutdown)."""
        await self._idle.wait()

    async def _writer(self) -> None:
        backoff = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._hits:
                self._idle.set()
                continue
            # Group commit: everything matched since the last commit goes in one transaction.
            batch, self._hits = self._hits, []
            try:
                alerts = await self.store.trigger_alerts(batch)
            except asyncio.CancelledError:
                self._hits[:0] = batch  # not committed: they stay CREATED on disk
                raise
            except Exception as exc:
                log_failure(
                    log,
                    exc,
                    "could not record %d triggered alerts; retrying in %.1fs",
                    len(batch),
                    backoff,
                )
                self._hits[:0] = batch
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                self._wake.set()
                continue
            backoff = 0.1
            self.triggered += len(alerts)
            try:
                self._announce(alerts)
            except Exception:  # they are committed; a push failing must not stop the writer
                log.exception("could not announce %d triggered alerts", len(alerts))
            if alerts and self.notify_hook is not None:
                self.notify_hook()
            if not self._hits:
                self._idle.set()
            else:
                self._wake.set()


ENGINE = web.AppKey("engine", AlertEngine)
