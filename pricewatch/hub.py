"""The hub: owns every websocket client and fans messages out without blocking the caller.

`publish()`/`send()` are synchronous and never wait. A message is serialised once and framed
once (server frames are unmasked, so one websocket frame serves every receiver); for a
client that keeps up it is written straight to its socket. Only a client whose socket
buffer is full gets its frames queued (its `ClientWriter`), and the hub's flusher writes them,
in order and several frames per socket write, as the buffer drains (one task for all
clients, which polls only while someone is behind).

Every client has a bounded cost (CONTRACT "Limits"):
- the bytes the server holds for it (socket buffer + queue) never pass `max_queue_bytes`:
  a message that would pass it closes the client with 1008 at once (QUEUE_FULL); a
  message is never skipped while the client stays open;
- a queued message that waited `slow_timeout` seconds, or a socket buffer full for longer
  than `send_timeout`, closes it with 1008 (SLOW);
- it may send WS_RATE messages per second (bursts of WS_BURST), else 1008
  (TOO_MANY_MESSAGES), and hold MAX_SUBSCRIPTIONS topics;
- one client address holds at most `max_per_address` open websockets (`admit`/`release`).
Closes by reason are counted in `drops` (for /metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

from aiohttp import WSCloseCode, web

from .limits import TokenBucket

log = logging.getLogger(__name__)

POLICY_VIOLATION = WSCloseCode.POLICY_VIOLATION  # 1008
GOING_AWAY = WSCloseCode.GOING_AWAY  # 1001

# Contract constants (CONTRACT "Limits"): what one websocket connection may ask of us.
WS_RATE = 20.0  # client messages per second...
WS_BURST = 40  # ...with bursts of this many
MAX_SUBSCRIPTIONS = 64  # topics per connection (live: symbols; ohlc: symbol x timeframe)

FLUSH_INTERVAL = 0.005  # seconds between flusher passes while some client is behind


class Disconnect(NamedTuple):
    """Why the server closed a websocket: close code, metrics label, close message."""

    code: int
    reason: str
    message: bytes


QUEUE_FULL = Disconnect(POLICY_VIOLATION, "queue_full", b"send queue full")
SLOW = Disconnect(POLICY_VIOLATION, "slow", b"slow consumer")
TOO_MANY_MESSAGES = Disconnect(POLICY_VIOLATION, "too_many_messages", b"too many messages")
SESSION_ENDED = Disconnect(POLICY_VIOLATION, "session_ended", b"token expired or revoked")
SHUTDOWN = Disconnect(GOING_AWAY, "shutdown", b"server shutdown")
DROP_REASONS = (QUEUE_FULL, SLOW, TOO_MANY_MESSAGES, SESSION_ENDED)  # counted in Hub.drops


class ClientWriter:
    """One client's outgoing frames (the shape of centrifuge's writer.go).

    A frame goes straight to the transport while nothing waits and the socket buffer is
    under `write_limit`; otherwise it is queued, in order, in `events` (each with the
    monotonic time it was queued; `queued` is their size in bytes) until `flush` can hand it
    over. `push` and `check` *return* the Disconnect the hub then carries out: the bytes held
    for the client (socket buffer + queue) never pass `max_bytes`. (The conflation issue
    adds the newest frame per state topic beside `events`.)
    """

    __slots__ = ("transport", "max_bytes", "write_limit", "events", "queued", "peak",
                 "full_since")

    def __init__(self, transport, max_bytes: int, write_limit: int):
        self.transport = transport
        self.max_bytes = max_bytes
        self.write_limit = write_limit
        self.events: deque[tuple[bytes, float]] = deque()
        self.queued = 0  # bytes in `events`
        self.peak = 0  # most bytes ever held (socket buffer + queue), for tests and benches
        self.full_since: float | None = None  # when the socket buffer was seen full

    def push(self, framed: bytes) -> Disconnect | None:
        """Write or queue `framed`; QUEUE_FULL (and nothing done) past `max_bytes`."""
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        held = buffered + self.queued + len(framed)
        if held > self.max_bytes:
            return QUEUE_FULL
        if held > self.peak:
            self.peak = held
        if not self.events and buffered < self.write_limit:
            # Nothing waits ahead of it and the socket has room: straight out, in order.
            # (aiohttp's own frames, pings and close, are whole writes too.)
            transport.write(framed)
        else:
            self.events.append((framed, time.monotonic()))
            self.queued += len(framed)
        return None

    def flush(self) -> None:
        """Hand queued frames to the socket while its buffer is under `write_limit`, in
        order, joined into one write."""
        events, transport = self.events, self.transport
        room = self.write_limit - transport.get_write_buffer_size()
        if room <= 0 or not events:
            return
        chunk: list[bytes] = []
        size = 0
        while events and size < room:
            framed = events.popleft()[0]
            chunk.append(framed)
            size += len(framed)
        self.queued -= size
        transport.write(chunk[0] if len(chunk) == 1 else b"".join(chunk))

    def check(self, now: float, slow_timeout: float, send_timeout: float) -> Disconnect | None:
        """SLOW when a queued frame waited over `slow_timeout` or the socket buffer has been
        full for over `send_timeout` (seen by successive checks); QUEUE_FULL when the socket
        buffer alone passes the bound (aiohttp's pongs to a peer that never reads)."""
        if self.events and now - self.events[0][1] > slow_timeout:
            return SLOW
        buffered = self.transport.get_write_buffer_size()
        if buffered + self.queued > self.max_bytes:
            return QUEUE_FULL
        if buffered < self.write_limit:
            self.full_since = None
        elif self.full_since is None:
            self.full_since = now
        elif now - self.full_since > send_timeout:
            return SLOW
        return None

    def clear(self) -> None:
        """Forget every queued frame (the client is gone: its memory goes now)."""
        self.events.clear()
        self.queued = 0


class Client:
    """One websocket connection: its socket, its writer, what it listens to."""

    __slots__ = ("ws", "request", "transport", "writer", "endpoint", "user_id", "expires",
                 "family", "closed", "topics", "inbound")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, endpoint: str,
                 user_id: int | None, writer: ClientWriter):
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
        self.inbound = TokenBucket(WS_RATE, WS_BURST)


class Hub:
    """Every open websocket, their topic subscriptions and the per-client limits."""

    def __init__(self, max_queue_bytes: int = 1 << 20, slow_timeout: float = 5.0,
                 send_timeout: float = 5.0, write_limit: int = 64 * 1024,
                 max_per_address: int = 64):
        self.max_queue_bytes = max_queue_bytes
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
        self.revoked: Callable[[str], bool] = lambda family: False  # set by the app
        self._closing: set[asyncio.Task] = set()
        self._behind = asyncio.Event()  # set when `backlog` gains a client
        self._dropped = asyncio.Event()  # set (and replaced) at every drop

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

    def attach(self, ws: web.WebSocketResponse, request: web.Request, endpoint: str,
               user_id: int | None = None) -> Client:
        writer = ClientWriter(request.transport, self.max_queue_bytes, self.write_limit)
        client = Client(ws, request, endpoint, user_id, writer)
        self.clients.add(client)
        if user_id is not None:
            self.by_user.setdefault(user_id, set()).add(client)
        return client

    async def detach(self, client: Client) -> None:
        """Forget the client (the connection is over)."""
        client.closed = True
        self._forget(client)

    def _forget(self, client: Client) -> None:
        self.clients.discard(client)
        self.backlog.discard(client)
        client.writer.clear()  # its memory goes now, not when the socket is finally gone
        for topic in client.topics:
            members = self.topics.get(topic)
            if members is not None:
                members.discard(client)
                if not members:
                    del self.topics[topic]
        client.topics.clear()
        if client.user_id is not None:
            mine = self.by_user.get(client.user_id)
            if mine is not None:
                mine.discard(client)
                if not mine:
                    del self.by_user[client.user_id]

    def subscribe(self, client: Client, topic: object) -> bool:
        """Add `topic` to the client's subscriptions; False (nothing changed) when it
        already holds MAX_SUBSCRIPTIONS others."""
        if topic not in client.topics:
            if len(client.topics) >= MAX_SUBSCRIPTIONS:
                return False
            client.topics.add(topic)
            self.topics.setdefault(topic, set()).add(client)
        return True

    def unsubscribe(self, client: Client, topic: object) -> None:
        client.topics.discard(topic)
        members = self.topics.get(topic)
        if members is not None:
            members.discard(client)
            if not members:
                del self.topics[topic]

    def has_topic(self, topic: object) -> bool:
        return topic in self.topics

    def received(self, client: Client) -> bool:
        """Count one message from the client; False (and the client is being closed with
        1008) past WS_RATE per second, bursts of WS_BURST."""
        if client.inbound.take():
            return True
        self.drop(client, TOO_MANY_MESSAGES, f"over {WS_RATE:g} messages/s")
        return False

    # -- sending -----------------------------------------------------------------------

    def publish(self, topic: object, data: bytes) -> None:
        """Send `data` to every subscriber of `topic` (no-op without subscribers)."""
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
        writer.flush()
        if not writer.events:
            self.backlog.discard(client)

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
            log.warning("closing %s client %s (%s): %s", client.endpoint,
                        client.request.remote, reason.reason, why)
        self._forget(client)
        task = asyncio.create_task(self._close(client, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, client: Client, reason: Disconnect, timeout: float = 1.0) -> None:
        closed = False
        try:
            await asyncio.wait_for(client.ws.close(code=reason.code, message=reason.message),
                                   timeout)
            closed = True
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        except asyncio.CancelledError:
            # close() may wait on aiohttp's per-connection drain future, which a cancelled
            # writer elsewhere can cancel. Only a cancellation of this task is passed on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            if not closed:
                # A peer that does not read cannot take the close frame either: cut it off.
                # (Not `if not ws.closed`: close() marks the socket closed before it writes,
                # and a graceful transport close would wait forever to flush to that peer,
                # keeping its handler and socket alive.)
                if client.transport is not None:
                    client.transport.abort()

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
        """The hub's background work (flusher and watchdog) until cancelled."""
        await asyncio.gather(self.flusher(), self.watchdog())

    def sweep(self) -> None:
        """Close clients whose writer reports them too slow or over the byte bound (see
        ClientWriter.check); end sessions whose token expired or whose login was revoked."""
        now, wall = time.monotonic(), time.time()
        for client in tuple(self.clients):
            if client.closed:
                continue
            if client.expires is not None and (
                    wall >= client.expires or self.revoked(client.family)):
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
            self._forget(client)
        # Half a second for each peer's closing handshake (all at once), then cut it off:
        # shutdown must stay under 5 s even with thousands of busy clients.
        await asyncio.gather(*(self._close(c, SHUTDOWN, 0.5) for c in clients),
                             return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def counts(self) -> Counter:
        return Counter(c.endpoint for c in self.clients)


def frame(data: bytes) -> bytes:
    """`data` as one unmasked, final websocket text frame (RFC 6455 section 5.2)."""
    size = len(data)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + data
