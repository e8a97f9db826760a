"""The hub: owns every websocket client and fans messages out without blocking the caller.

`publish()`/`send()` are synchronous and never wait. A message is serialised once and framed
once (server frames are unmasked, so one websocket frame serves every receiver); for a
client that keeps up it is written straight to its socket. Only a client whose socket
buffer is full gets its frames queued (bounded), and a sender task writes them as the
buffer drains, in order. A client whose queue overflowed and has not drained empty within
`slow_timeout` seconds, or whose socket stays full for longer than `send_timeout`, is closed
with 1008 and counted; it never slows anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress

from aiohttp import WSCloseCode, web

log = logging.getLogger(__name__)

POLICY_VIOLATION = WSCloseCode.POLICY_VIOLATION  # 1008
GOING_AWAY = WSCloseCode.GOING_AWAY  # 1001


class Client:
    """One websocket connection and what it listens to."""

    __slots__ = ("ws", "request", "transport", "endpoint", "user_id", "queue", "sender",
                 "full_since", "sending_since", "pending", "expires", "family", "closed",
                 "topics")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, endpoint: str,
                 user_id: int | None, queue_size: int):
        self.ws = ws
        self.request = request
        self.transport = request.transport
        self.endpoint = endpoint
        self.user_id = user_id
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self.sender: asyncio.Task | None = None
        self.full_since: float | None = None
        self.sending_since: float | None = None  # loop time the socket buffer filled up
        self.pending = False  # the sender holds a frame it waits to write
        self.expires: float | None = None  # an authenticated client's token expiry (epoch s)
        self.family: str | None = None  # ... and the login it belongs to
        self.closed = False
        self.topics: set = set()  # what this client subscribed to (endpoint-specific keys)


class Hub:
    """Every open websocket, their topic subscriptions and the slow-client policy."""

    def __init__(self, queue_size: int = 512, slow_timeout: float = 5.0,
                 send_timeout: float = 5.0, write_limit: int = 64 * 1024):
        self.queue_size = queue_size
        self.write_limit = write_limit  # socket buffer bytes past which frames are queued
        self.slow_timeout = slow_timeout
        self.send_timeout = send_timeout
        self.clients: set[Client] = set()
        self.topics: dict[object, set[Client]] = {}
        self.by_user: dict[int, set[Client]] = {}
        self.dropped = 0  # slow clients closed with 1008
        self.revoked: Callable[[str], bool] = lambda family: False  # set by the app
        self._closing: set[asyncio.Task] = set()

    def attach(self, ws: web.WebSocketResponse, request: web.Request, endpoint: str,
               user_id: int | None = None) -> Client:
        client = Client(ws, request, endpoint, user_id, self.queue_size)
        client.sender = asyncio.create_task(self._sender(client),
                                            name=f"ws-sender-{endpoint}")
        self.clients.add(client)
        if user_id is not None:
            self.by_user.setdefault(user_id, set()).add(client)
        return client

    async def detach(self, client: Client) -> None:
        """Forget the client and stop its sender (the connection is over)."""
        client.closed = True
        self._forget(client)
        if client.sender is not None and client.sender is not asyncio.current_task():
            client.sender.cancel()
            with suppress(asyncio.CancelledError):
                await client.sender

    def _forget(self, client: Client) -> None:
        self.clients.discard(client)
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

    def subscribe(self, client: Client, topic: object) -> None:
        client.topics.add(topic)
        self.topics.setdefault(topic, set()).add(client)

    def unsubscribe(self, client: Client, topic: object) -> None:
        client.topics.discard(topic)
        members = self.topics.get(topic)
        if members is not None:
            members.discard(client)
            if not members:
                del self.topics[topic]

    def has_topic(self, topic: object) -> bool:
        return topic in self.topics

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

    def _deliver(self, client: Client, framed: bytes) -> None:
        """Write a frame now if the client keeps up, else queue it; enforce the slow policy."""
        if client.closed or client.ws.closed:
            return
        transport = client.transport
        if transport is None or transport.is_closing():
            return
        queue = client.queue
        if not client.pending and not queue.qsize():
            buffered = transport.get_write_buffer_size()
            if buffered < self.write_limit:
                # Nothing waits ahead of it and the socket has room: straight out, in order.
                # (aiohttp's own frames, pings and close, are whole writes too.)
                transport.write(framed)
                if client.full_since is not None and buffered == 0:
                    client.full_since = None  # caught up: queue empty, socket flushed
                return
        try:
            queue.put_nowait(framed)
        except asyncio.QueueFull:
            now = time.monotonic()
            if client.full_since is None:
                client.full_since = now
            elif now - client.full_since >= self.slow_timeout:
                self.drop(client, "send queue full")

    def end_session(self, client: Client) -> None:
        """Close a client whose token expired or whose login was revoked (1008)."""
        client.closed = True
        self._forget(client)
        task = asyncio.create_task(
            self._close(client, POLICY_VIOLATION, b"token expired or revoked"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def drop(self, client: Client, why: str) -> None:
        """Close a client that falls behind with 1008, in the background."""
        if client.closed:
            return
        client.closed = True
        self.dropped += 1
        log.warning("dropping slow %s client %s: %s", client.endpoint,
                    client.request.remote, why)
        self._forget(client)
        task = asyncio.create_task(self._close(client, POLICY_VIOLATION, b"slow consumer"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, client: Client, code: int, message: bytes,
                     timeout: float = 1.0) -> None:
        if client.sender is not None and client.sender is not asyncio.current_task():
            client.sender.cancel()
        closed = False
        try:
            await asyncio.wait_for(client.ws.close(code=code, message=message), timeout)
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

    async def _sender(self, client: Client) -> None:
        """Write the client's queued frames, in order, as its socket buffer drains. The
        watchdog drops a client whose buffer stays full longer than send_timeout."""
        queue, transport = client.queue, client.transport
        clock = asyncio.get_running_loop().time
        while True:
            framed = await queue.get()
            client.pending = True
            pause = 0.005
            while (transport.get_write_buffer_size() >= self.write_limit
                   and not transport.is_closing()):
                if client.sending_since is None:
                    client.sending_since = clock()
                await asyncio.sleep(pause)  # only clients that fell behind ever wait here
                pause = min(pause * 2, 0.1)
            client.sending_since = None
            client.pending = False
            if client.closed or client.ws.closed or transport.is_closing():
                return
            transport.write(framed)

    async def watchdog(self) -> None:
        """Run until cancelled, sweeping (see `sweep`) several times per timeout period."""
        while True:
            await asyncio.sleep(min(1.0, self.send_timeout / 4, self.slow_timeout / 4))
            self.sweep()

    def sweep(self) -> None:
        """Drop clients stuck behind a full socket, or still behind after overflowing, for
        too long; end sessions whose token expired or whose login was revoked."""
        now, mono, wall = asyncio.get_running_loop().time(), time.monotonic(), time.time()
        for client in tuple(self.clients):
            if client.closed:
                continue
            if client.expires is not None and (
                    wall >= client.expires or self.revoked(client.family)):
                self.end_session(client)
            elif (client.sending_since is not None
                    and now - client.sending_since > self.send_timeout):
                self.drop(client, f"send took over {self.send_timeout}s")
            elif (client.full_since is not None and (client.queue.qsize() or client.pending)
                    and mono - client.full_since >= self.slow_timeout):
                # A client that overflowed once but has emptied its queue since is not
                # behind any more, even if no new message has come to prove it.
                self.drop(client, "send queue full")

    async def close_all(self, code: int = GOING_AWAY) -> None:
        """Close every client (shutdown: 1001 going away)."""
        clients = list(self.clients)
        for client in clients:
            client.closed = True
            self._forget(client)
        # Half a second for each peer's closing handshake (all at once), then cut it off:
        # shutdown must stay under 5 s even with thousands of busy clients.
        await asyncio.gather(*(self._close(c, code, b"server shutdown", 0.5) for c in clients),
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
