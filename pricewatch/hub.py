"""The hub: owns every websocket client and fans messages out without blocking the caller.

Each client has a bounded queue and one sender task. `send()` is synchronous and never
waits: the tick path calls it with bytes serialised once for all receivers. A client whose
queue overflowed and has not drained empty within `slow_timeout` seconds, or whose socket
write takes longer than `send_timeout`, is closed with 1008 and counted; it never slows
anyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress

from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger(__name__)

POLICY_VIOLATION = WSCloseCode.POLICY_VIOLATION  # 1008
GOING_AWAY = WSCloseCode.GOING_AWAY  # 1001


class Client:
    """One websocket connection and what it listens to."""

    __slots__ = ("ws", "request", "endpoint", "user_id", "queue", "sender", "full_since",
                 "sending_since", "expires", "family",
                 "closed", "topics")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, endpoint: str,
                 user_id: int | None, queue_size: int):
        self.ws = ws
        self.request = request
        self.endpoint = endpoint
        self.user_id = user_id
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(queue_size)
        self.sender: asyncio.Task | None = None
        self.full_since: float | None = None
        self.sending_since: float | None = None  # loop time a socket write began, if stuck
        self.expires: float | None = None  # an authenticated client's token expiry (epoch s)
        self.family: str | None = None  # ... and the login it belongs to
        self.closed = False
        self.topics: set = set()  # what this client subscribed to (endpoint-specific keys)


class Hub:
    """Every open websocket, their topic subscriptions and the slow-client policy."""

    def __init__(self, queue_size: int = 512, slow_timeout: float = 5.0,
                 send_timeout: float = 5.0):
        self.queue_size = queue_size
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
        """Queue `data` for every subscriber of `topic` (no-op without subscribers)."""
        members = self.topics.get(topic)
        if members:
            for client in tuple(members):
                self.send(client, data)

    def send_user(self, user_id: int, data: bytes) -> None:
        for client in tuple(self.by_user.get(user_id, ())):
            self.send(client, data)

    def send(self, client: Client, data: bytes) -> None:
        """Queue one message for one client without waiting; enforce the slow policy."""
        if client.closed:
            return
        queue = client.queue
        try:
            queue.put_nowait(data)
        except asyncio.QueueFull:
            now = time.monotonic()
            if client.full_since is None:
                client.full_since = now
            elif now - client.full_since >= self.slow_timeout:
                self.drop(client, "send queue full")
            return
        # The clock runs from the first overflow until the client has caught up (its queue
        # was empty and its socket buffer flushed), not until one slot frees: a client
        # taking only part of what it is sent frees slots now and then, and would otherwise
        # lose messages forever, never dropped.
        if client.full_since is not None and queue.qsize() == 1:
            transport = client.request.transport
            if transport is None or transport.get_write_buffer_size() == 0:
                client.full_since = None

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

    async def _close(self, client: Client, code: int, message: bytes) -> None:
        if client.sender is not None and client.sender is not asyncio.current_task():
            client.sender.cancel()
        closed = False
        try:
            await asyncio.wait_for(client.ws.close(code=code, message=message), timeout=1.0)
            closed = True
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        except asyncio.CancelledError:
            # aiohttp shares one drain future per connection and does not shield it: the
            # sender's timed-out (or cancelled) write cancelled it, so close() waiting on it
            # raises CancelledError too. Only a cancellation of this task is passed on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        finally:
            if not closed:
                # A peer that does not read cannot take the close frame either: cut it off.
                # (Not `if not ws.closed`: close() marks the socket closed before it writes,
                # and a graceful transport close would wait forever to flush to that peer,
                # keeping its handler and socket alive.)
                transport = client.request.transport
                if transport is not None:
                    transport.abort()

    async def _sender(self, client: Client) -> None:
        # No per-message timeout (asyncio.wait_for costs a task and a timer per send): the
        # watchdog drops a client whose write has been stuck for longer than send_timeout.
        ws, queue = client.ws, client.queue
        clock = asyncio.get_running_loop().time
        try:
            while True:
                data = await queue.get()
                client.sending_since = clock()
                await ws.send_frame(data, WSMsgType.TEXT)
                client.sending_since = None
        except (ConnectionError, RuntimeError):
            pass  # the peer went away; the handler's read loop ends and detaches

    async def watchdog(self) -> None:
        """Run until cancelled: drop clients stuck in a write, or full, for too long, and end
        sessions whose token expired or whose login was revoked (logout, token reuse)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.send_timeout / 4, self.slow_timeout / 4))
            now, mono, wall = loop.time(), time.monotonic(), time.time()
            for client in tuple(self.clients):
                if client.closed:
                    continue
                if client.expires is not None and (
                        wall >= client.expires or self.revoked(client.family)):
                    self.end_session(client)
                elif (client.sending_since is not None
                        and now - client.sending_since > self.send_timeout):
                    self.drop(client, f"send took over {self.send_timeout}s")
                elif (client.full_since is not None
                        and mono - client.full_since >= self.slow_timeout):
                    self.drop(client, "send queue full")

    async def close_all(self, code: int = GOING_AWAY) -> None:
        """Close every client (shutdown: 1001 going away)."""
        clients = list(self.clients)
        for client in clients:
            client.closed = True
            self._forget(client)
        await asyncio.gather(*(self._close(c, code, b"server shutdown") for c in clients),
                             return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def counts(self) -> Counter:
        return Counter(c.endpoint for c in self.clients)

