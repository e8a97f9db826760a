"""The hub: owns every websocket client and fans messages out without blocking the caller.

Two kinds of message (CONTRACT "Websocket fan-out at market rates"):

- **Events** (alerts, quotes, errors, acks, snapshots): `publish_event()`/`send()`/
  `send_user()` are synchronous and never wait. A message is serialised once and framed once
  (server frames are unmasked, so one frame serves every receiver); for a client that keeps
  up it is written straight to its socket, else queued in order in its `ClientWriter`.
  Never conflated, reordered or skipped.
- **State** (prices, candles): the tick path only calls `mark_dirty(topic, key)`, which
  serialises nothing. Subscriptions are grouped by their `max_rate` (and dealt to PHASES
  groups per rate, their timers staggered over the interval); each group's timer (every
  1/max_rate s; rate 0: as soon as the loop is free) renders each dirty topic once, through
  the renderer the market registered for its kind, and hands every due client all its
  frames in one socket write. A client that cannot take them now keeps only the newest
  frame per topic and key (`ClientWriter.state`) until its socket drains. The key tells
  states of one topic apart that must each arrive (a candle topic's key is the candle's
  start: a flush that crosses a boundary carries the closed candle's last state too).

The hub's flusher (one task for all clients, polling only while someone is behind) writes
queued events, then held state, several frames per socket write, as buffers drain.

Every client has a bounded cost (CONTRACT "Limits"):
- the bytes the server holds for it (socket buffer + queue) never pass `max_queue_bytes`:
  a message that would pass it closes the client with 1008 at once (QUEUE_FULL); a
  message is never skipped while the client stays open;
- a queued event that waited `slow_timeout` seconds, state held back that long (lag, not
  only buffer fullness), or a socket buffer full for longer than `send_timeout`, closes it
  with 1008 (SLOW);
- it may send WS_RATE frames per second of any kind, pings included (bursts of WS_BURST),
  else 1008 (TOO_MANY_MESSAGES), counted before aiohttp parses them (ws_gate.FrameGate),
  messages under WS_MAX_MESSAGE bytes (else 1009, TOO_BIG), and hold MAX_SUBSCRIPTIONS
  topics; a client closed for any of these gets the close frame before the socket closes
  (the lingering close, ws_gate.py);
- one client address holds at most `max_per_address` open websockets (`admit`/`release`).
Closes by reason are counted in `drops` (for /metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from aiohttp import web

from .client_writer import (  # the reasons and frame() are part of the hub's interface
    DROP_REASONS,
    QUEUE_FULL,
    SESSION_ENDED,
    SHUTDOWN,
    SLOW,
    TOO_BIG,
    TOO_MANY_MESSAGES,
    ClientWriter,
    Disconnect,
    Rendered,
    Topic,
    frame,
)
from .limits import WS_BURST, WS_RATE, TokenBucket
from .ws_gate import LINGER, FrameGate, close_websocket

__all__ = [
    "DROP_REASONS",
    "MAX_SUBSCRIPTIONS",
    "PHASES",
    "QUEUE_FULL",
    "SESSION_ENDED",
    "SHUTDOWN",
    "SLOW",
    "TOO_BIG",
    "TOO_MANY_MESSAGES",
    "WS_BURST",
    "WS_RATE",
    "Client",
    "ClientWriter",
    "Disconnect",
    "Hub",
    "frame",
]

log = logging.getLogger(__name__)


# What one websocket connection may ask of us (docs/limits.md; WS_RATE and WS_BURST, the
# frames it may send, are in limits.py).
MAX_SUBSCRIPTIONS = 64  # topics per connection (live: symbols; ohlc: symbol x timeframe)

FLUSH_INTERVAL = 0.005  # seconds between flusher passes while some client is behind
MAX_RATE = 10  # state messages per topic per second unless PRICEWATCH_WS_MAX_RATE says
# The clients of one max_rate are flushed in this many phases spread over its interval: one
# flush writes to a quarter of them, so the loop never stalls for all of them at once and
# the last one written waits a quarter as long (10,000 clients: ~40 ms instead of ~170 ms).
PHASES = 4

Render = Callable[[tuple, object], "bytes | None"]  # (topic, key) -> JSON, None: nothing


class Client:
    """One websocket connection: its socket, its writer, what it listens to."""

    __slots__ = (
        "ws",
        "request",
        "transport",
        "writer",
        "endpoint",
        "user_id",
        "expires",
        "family",
        "closed",
        "topics",
        "rates",
        "inbound",
        "phase",
        "gate",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        endpoint: str,
        user_id: int | None,
        writer: ClientWriter,
    ):
        self.ws = ws
        self.request = request
        self.transport = request.transport
        self.writer = writer
        self.endpoint = endpoint
        self.user_id = user_id
        self.expires: float | None = None  # an authenticated client's token expiry (epoch s)
        self.family: str | None = None  # ... and the login it belongs to
        self.closed = False
        self.topics: set = set()  # what this client subscribed to (endpoint-specific keys)
        self.rates: dict[Topic, int] = {}  # state topics among them -> their max_rate
        self.inbound = TokenBucket(WS_RATE, WS_BURST)
        self.phase = 0  # which of its rate groups' PHASES flushes this client (set by attach)
        self.gate: FrameGate | None = None  # its input's gate (ws_gate.py), when served by one


class RateGroup:
    """The state subscriptions flushed at one max_rate in one phase: who holds which topic,
    and the keys of each topic changed since this group's last flush."""

    __slots__ = ("rate", "phase", "interval", "subs", "dirty", "timer", "due")

    def __init__(self, rate: int, phase: int):
        self.rate = rate
        self.phase = phase
        self.interval = 1.0 / rate if rate else 0.0
        self.subs: dict[Topic, set[Client]] = {}
        self.dirty: dict[Topic, set] = {}
        self.timer: asyncio.Handle | None = None
        self.due = 0.0  # loop time of the next flush (rate > 0)


class Hub:
    """Every open websocket, their topic subscriptions and the per-client limits."""

    def __init__(
        self,
        max_queue_bytes: int = 1 << 20,
        slow_timeout: float = 5.0,
        send_timeout: float = 5.0,
        write_limit: int = 64 * 1024,
        max_per_address: int = 64,
        max_rate: int = MAX_RATE,
    ):
        self.max_queue_bytes = max_queue_bytes
        self.max_rate = max_rate  # the default and the highest a subscription may ask
        self.write_limit = write_limit  # socket buffer bytes past which frames are queued
        self.slow_timeout = slow_timeout
        self.send_timeout = send_timeout
        self.max_per_address = max_per_address
        self.clients: set[Client] = set()
        self.topics: dict[object, set[Client]] = {}
        self.by_user: dict[int, set[Client]] = {}
        self.by_address: dict[str, int] = {}  # open (or opening) websockets per address
        self.backlog: set[Client] = set()  # clients with queued frames
        self.drops: Counter[str] = Counter()  # 1008 closes by Disconnect.reason
        self._logged_drop: dict[str, float] = {}  # reason -> when last logged
        self.revoked: Callable[[str], bool] = lambda family: False  # set by the app
        # Called with each client at `detach` (the resumer forgets it: resume.py).
        self.on_detach: list[Callable[[Client], None]] = []
        self._closing: set[asyncio.Task] = set()
        self._behind = asyncio.Event()  # set when `backlog` gains a client
        self._dropped = asyncio.Event()  # set (and replaced) at every drop
        self.renderers: dict[str, Render] = {}  # state topic kind -> its renderer
        # (max_rate, phase) -> group, while it has subscribers
        self.groups: dict[tuple[int, int], RateGroup] = {}
        self._phases = 0  # attach counter: clients are dealt to phases in turn
        self._frames: dict[Topic, dict] = {}  # topic -> {key: frame}, valid until marked dirty
        # Group flushes that sent something, their total and longest time (for /metrics:
        # the server's own share of tick -> client latency, apart from the clients').
        self.state_flushes = 0
        self.flush_seconds = 0.0
        self.flush_max = 0.0

    @property
    def dropped(self) -> int:
        """Clients closed for not reading fast enough (slow or queue full)."""
        return self.drops[SLOW.reason] + self.drops[QUEUE_FULL.reason]

    # -- per-address admission ---------------------------------------------------------

    def admit(self, address: str) -> bool:
        """Reserve a websocket slot for `address` (before the upgrade); False at the cap.
        Synchronous, so concurrent upgrades cannot slip past the cap together."""
        count = self.by_address.get(address, 0)
        if count >= self.max_per_address:
            return False
        self.by_address[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self.by_address.get(address, 0) - 1
        if count > 0:
            self.by_address[address] = count
        else:
            self.by_address.pop(address, None)

    # -- registry ----------------------------------------------------------------------

    def attach(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        endpoint: str,
        user_id: int | None = None,
    ) -> Client:
        writer = ClientWriter(request.transport, self.max_queue_bytes, self.write_limit)
        client = Client(ws, request, endpoint, user_id, writer)
        client.phase = self._phases % PHASES
        self._phases += 1
        self.clients.add(client)
        if user_id is not None:
            self.by_user.setdefault(user_id, set()).add(client)
        return client

    async def detach(self, client: Client) -> None:
        """Forget the client (the connection is over)."""
        client.closed = True
        self._forget(client)
        for forget in self.on_detach:
            forget(client)

    def _forget(self, client: Client) -> None:
        self.clients.discard(client)
        self.backlog.discard(client)
        client.writer.clear()  # its memory goes now, not when the socket is finally gone
        for topic, rate in client.rates.items():
            self._leave(rate, topic, client)
        client.rates.clear()
        for topic in client.topics:
            members = self.topics.get(topic)
            if members is not None:
                members.discard(client)
                if not members:
                    del self.topics[topic]
                    self._frames.pop(topic, None)  # not kept fresh without subscribers
        client.topics.clear()
        if client.user_id is not None:
            mine = self.by_user.get(client.user_id)
            if mine is not None:
                mine.discard(client)
                if not mine:
                    del self.by_user[client.user_id]

    def subscribe(self, client: Client, topic: Topic, max_rate: int | None = None) -> bool:
        """Add `topic` to the client's subscriptions; False (nothing changed) when it
        already holds MAX_SUBSCRIPTIONS others. A state topic is flushed to it at
        `max_rate` per second (default `self.max_rate`; 0: as often as the loop allows);
        subscribing again changes the rate."""
        if topic not in client.topics:
            if len(client.topics) >= MAX_SUBSCRIPTIONS:
                return False
            client.topics.add(topic)
            self.topics.setdefault(topic, set()).add(client)
        if self.is_state(topic):
            rate = self.max_rate if max_rate is None else max_rate
            old = client.rates.get(topic)
            if old != rate:
                if old is not None:
                    self._leave(old, topic, client)
                client.rates[topic] = rate
                self._group(rate, client.phase if rate else 0).subs.setdefault(topic, set()).add(
                    client
                )
        return True

    def unsubscribe(self, client: Client, topic: Topic) -> None:
        rate = client.rates.pop(topic, None)
        if rate is not None:
            self._leave(rate, topic, client)
        client.writer.forget(topic)
        client.topics.discard(topic)
        members = self.topics.get(topic)
        if members is not None:
            members.discard(client)
            if not members:
                del self.topics[topic]
                self._frames.pop(topic, None)  # not kept fresh without subscribers

    def received(self, client: Client) -> bool:
        """Count one message from the client; False (and the client is being closed with
        1008) past WS_RATE per second, bursts of WS_BURST. (Only for a connection without
        a FrameGate, which counts every frame before it is parsed.)"""
        if client.inbound.take():
            return True
        self.drop(client, TOO_MANY_MESSAGES, f"over {WS_RATE:g} messages/s")
        return False

    # -- sending -----------------------------------------------------------------------

    def publish_event(self, topic: Topic, data: bytes) -> None:
        """Send the event `data` to every subscriber of `topic` (no-op without any)."""
        members = self.topics.get(topic)
        if members:
            framed = frame(data)
            deliver = self._deliver
            for client in tuple(members):
                deliver(client, framed)

    def send_user(self, user_id: int, data: bytes) -> None:
        clients = self.by_user.get(user_id)
        if clients:
            framed = frame(data)
            for client in tuple(clients):
                self._deliver(client, framed)

    def send(self, client: Client, data: bytes) -> None:
        """Send one message to one client without waiting."""
        self._deliver(client, frame(data))

    def send_framed(self, client: Client, framed: bytes) -> None:
        """Send one message already made into a frame by `frame()` (cached messages)."""
        self._deliver(client, framed)

    def _deliver(self, client: Client, framed: bytes) -> None:
        """Hand a frame to the client's writer; past the byte bound close the client
        instead (it must never just miss this message)."""
        if client.closed or client.ws.closed:
            return
        writer = client.writer
        if writer.transport is None or writer.transport.is_closing():
            return
        reason = writer.push(framed)
        if reason is not None:
            self.drop(client, reason, f"over {self.max_queue_bytes} bytes undelivered")
        elif writer.events and client not in self.backlog:
            self.backlog.add(client)
            self._behind.set()

    def flush(self, client: Client) -> None:
        """Let the client's writer hand queued frames to its socket (see ClientWriter)."""
        writer = client.writer
        if client.closed or writer.transport is None or writer.transport.is_closing():
            self.backlog.discard(client)
            return
        if writer.state and not writer.events:
            self._refresh(writer)
        writer.flush()
        if not writer.events and not writer.state:
            self.backlog.discard(client)

    def _refresh(self, writer: ClientWriter) -> None:
        """Bring held state up to date before it is written: what a client that was behind
        gets is the newest value of each topic and key, not the one current when it fell
        behind (events sent meanwhile may carry newer values)."""
        size = 0
        for topic, frames in writer.state.items():
            if topic in self.topics:  # the cache is only kept fresh for subscribed topics
                rendered = self._render(topic, set(frames))
                if rendered is not None:
                    frames.update(rendered[1])
            size += sum(map(len, frames.values()))
        writer.state_bytes = size

    # -- state (conflated) -------------------------------------------------------------

    def register_state(self, kind: str, render: Render) -> None:
        """Topics `(kind, ...)` are state; `render(topic, key)` makes the JSON of one."""
        self.renderers[kind] = render

    def is_state(self, topic: Topic) -> bool:
        return type(topic) is tuple and topic[0] in self.renderers

    def mark_dirty(self, topic: Topic, key: object = None) -> None:
        """The state `key` of `topic` changed (the tick path: serialises nothing; a topic
        nobody is subscribed to costs a lookup per group)."""
        frames = self._frames.get(topic)
        if frames:
            frames.pop(key, None)
        for group in self.groups.values():
            if topic in group.subs:
                keys = group.dirty.get(topic)
                if keys is None:
                    group.dirty[topic] = {key}
                    if group.timer is None:  # rate 0: flush once the loop is free
                        group.timer = asyncio.get_running_loop().call_soon(self._flush_soon, group)
                else:
                    keys.add(key)

    def flush_state(self, rate: int) -> None:
        """Flush every phase of `rate` now (what their timers do; for tests)."""
        for group in [g for g in self.groups.values() if g.rate == rate]:
            self._flush_group(group)

    def _group(self, rate: int, phase: int) -> RateGroup:
        group = self.groups.get((rate, phase))
        if group is None:
            group = self.groups[rate, phase] = RateGroup(rate, phase)
            if rate:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (unit tests): flushed by hand
                    return group
                # Phases are staggered over the interval from the first one's start.
                group.due = loop.time() + group.interval * (phase + 1) / PHASES
                group.timer = loop.call_at(group.due, self._tick, group)
        return group

    def _leave(self, rate: int, topic: Topic, client: Client) -> None:
        key = (rate, client.phase if rate else 0)
        group = self.groups.get(key)
        if group is None:
            return
        members = group.subs.get(topic)
        if members is not None:
            members.discard(client)
            if not members:
                del group.subs[topic]
                group.dirty.pop(topic, None)
                if not group.subs:  # nobody left at this rate: its timer stops
                    if group.timer is not None:
                        group.timer.cancel()
                    del self.groups[key]

    def _tick(self, group: RateGroup) -> None:
        """A rate group's timer: flush, then run again 1/rate s after the last due time
        (skipping what an overloaded loop missed rather than flushing in a burst)."""
        if self.groups.get((group.rate, group.phase)) is not group:
            return
        self._flush_group(group)
        loop = asyncio.get_running_loop()
        now = loop.time()
        group.due += group.interval
        if group.due <= now:
            group.due = now + group.interval
        group.timer = loop.call_at(group.due, self._tick, group)

    def _flush_soon(self, group: RateGroup) -> None:
        group.timer = None
        if self.groups.get((group.rate, group.phase)) is group:
            self._flush_group(group)

    def _render(self, topic: Topic, keys: set) -> Rendered | None:
        """The frames of `topic`'s changed `keys`, each made once until marked dirty."""
        cache = self._frames.get(topic)
        if cache is None or len(cache) > 16:  # a few keys of a topic stay useful
            cache = self._frames[topic] = {}
        # Only a state topic gets here: a tuple whose [0] names its renderer (Topic is object).
        render = self.renderers[topic[0]]  # type: ignore[index]
        frames = {}
        for key in sorted(keys) if len(keys) > 1 else keys:
            framed = cache.get(key)
            if framed is None:
                data = render(topic, key)  # type: ignore[arg-type]
                if data is None:  # e.g. a late trade's candle already gone from the ring
                    continue
                framed = cache[key] = frame(data)
            frames[key] = framed
        if not frames:
            return None
        joined = next(iter(frames.values())) if len(frames) == 1 else b"".join(frames.values())
        return joined, frames

    def _flush_group(self, group: RateGroup) -> None:
        """Render each dirty topic once; hand each subscriber all of its due frames at
        once (one socket write for a client that keeps up)."""
        dirty = group.dirty
        if not dirty:
            return
        began = time.perf_counter()
        group.dirty = {}
        due: dict[Client, list[tuple[Topic, Rendered]]] = {}
        for topic, keys in dirty.items():
            members = group.subs.get(topic)
            if not members:
                continue
            rendered = self._render(topic, keys)
            if rendered is None:
                continue
            entry = (topic, rendered)
            for client in members:
                entries = due.get(client)
                if entries is None:
                    due[client] = [entry]
                else:
                    entries.append(entry)
        for client, entries in due.items():
            if client.closed:
                continue
            writer = client.writer
            if writer.transport is None or writer.transport.is_closing():
                continue
            reason = writer.offer(entries)
            if reason is not None:
                self.drop(client, reason, f"over {self.max_queue_bytes} bytes undelivered")
            elif writer.state and client not in self.backlog:
                self.backlog.add(client)
                self._behind.set()
        if due:
            took = time.perf_counter() - began
            self.state_flushes += 1
            self.flush_seconds += took
            if took > self.flush_max:
                self.flush_max = took

    async def flusher(self) -> None:
        """Run until cancelled: flush every client that is behind, every FLUSH_INTERVAL
        while anyone is (clients that keep up never pass through here)."""
        while True:
            await self._behind.wait()
            self._behind.clear()
            while self.backlog:
                for client in tuple(self.backlog):
                    self.flush(client)
                if self.backlog:
                    await asyncio.sleep(FLUSH_INTERVAL)

    # -- closing -----------------------------------------------------------------------

    def end_session(self, client: Client) -> None:
        """Close a client whose token expired or whose login was revoked (1008)."""
        self.drop(client, SESSION_ENDED, "session ended")

    def drop(self, client: Client, reason: Disconnect, why: str = "") -> None:
        """Close a client with `reason` in the background; counted in `drops`."""
        if client.closed:
            return
        client.closed = True
        self.drops[reason.reason] += 1
        signal, self._dropped = self._dropped, asyncio.Event()
        signal.set()
        if reason is not SESSION_ENDED:
            # At most one line per reason a minute: a client that gets itself closed on
            # purpose, again and again, must not flood the log (/metrics counts them all).
            now = time.monotonic()
            if now >= self._logged_drop.get(reason.reason, 0.0) + 60.0:
                self._logged_drop[reason.reason] = now
                log.warning(
                    "closing %s client %s (%s): %s (further %s closes are counted "
                    "in /metrics, logged once a minute)",
                    client.endpoint,
                    client.request.remote,
                    reason.reason,
                    why,
                    reason.reason,
                )
        self._forget(client)
        task = asyncio.create_task(self._close(client, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(
        self, client: Client, reason: Disconnect, timeout: float = LINGER + 1.0
    ) -> None:
        """Close the client with `reason`'s code; see ws_gate.close_websocket."""
        await close_websocket(
            client.ws, client.transport, client.gate, reason.code, reason.message, timeout
        )

    async def dropped_for(self, reason: Disconnect, count: int = 1) -> None:
        """Wait until `count` clients were closed for `reason` (for tests and benches)."""
        while self.drops[reason.reason] < count:
            await self._dropped.wait()

    async def settled(self) -> None:
        """Wait until every close started by `drop` has finished."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def watchdog(self) -> None:
        """Run until cancelled, sweeping (see `sweep`) several times per timeout period."""
        while True:
            await asyncio.sleep(min(1.0, self.send_timeout / 4, self.slow_timeout / 4))
            self.sweep()

    async def run(self) -> None:
        """The hub's background work (flusher, watchdog; the rate groups' timers run
        meanwhile) until cancelled."""
        try:
            await asyncio.gather(self.flusher(), self.watchdog())
        finally:
            self._stop_timers()

    def _stop_timers(self) -> None:
        for group in self.groups.values():
            if group.timer is not None:
                group.timer.cancel()
                group.timer = None

    def sweep(self) -> None:
        """Close clients whose writer reports them too slow or over the byte bound (see
        ClientWriter.check); end sessions whose token expired or whose login was revoked."""
        now, wall = time.monotonic(), time.time()
        for client in tuple(self.clients):
            if client.closed:
                continue
            if client.expires is not None and (
                wall >= client.expires
                or (client.family is not None and self.revoked(client.family))
            ):
                self.end_session(client)
                continue
            writer = client.writer
            if writer.transport is None or writer.transport.is_closing():
                continue
            reason = writer.check(now, self.slow_timeout, self.send_timeout)
            if reason is not None:
                self.drop(client, reason, "found by the watchdog")

    async def close_all(self) -> None:
        """Close every client (shutdown: 1001 going away)."""
        clients = list(self.clients)
        for client in clients:
            client.closed = True
            if client.gate is not None:
                client.gate.hurry()  # no lingering at shutdown
            self._forget(client)
        self._stop_timers()
        # Half a second for each peer's closing handshake (all at once), then cut it off:
        # shutdown must stay under 5 s even with thousands of busy clients.
        await asyncio.gather(
            *(self._close(c, SHUTDOWN, 0.5) for c in clients), return_exceptions=True
        )
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def counts(self) -> Counter:
        return Counter(c.endpoint for c in self.clients)
