"""The bus between a cluster's core and its edges (the shape of centrifuge's broker.go).

`RedisBus` is the carrier: `publish(data)` (fire and forget), `client` (the live Redis
client for snapshot keys, or None while disconnected) and `health()`. It keeps one
connection for commands and, for a subscriber, one pub/sub connection on CHANNEL, and
reconnects forever with equal-jitter exponential backoff. After every (re)connection it calls
`on_connect(client)` *after* the subscription is confirmed and *before* any message is handed
to `on_message(data)`: an edge reads its snapshot there, so nothing published meanwhile is
lost (it waits in the pub/sub connection) and nothing is applied out of order.

`redis` (the `pricewatch[cluster]` extra) is imported here, and this module only when
PRICEWATCH_REDIS_URL is set.

Wire format of one bus message: a JSON header line, `\\n`, then an opaque payload (a
websocket message as the hub sends it, byte for byte; may be empty). See core.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

from ..startup import StartupError

log = logging.getLogger(__name__)

CHANNEL = b"pricewatch:bus"  # every message of a cluster, in publish order
BACKOFF_FIRST = 0.2  # seconds before the first reconnect attempt (at most; jittered)
BACKOFF_MAX = 5.0  # ... doubling up to this
PING_AFTER = 2.0  # seconds without a message before the subscriber pings Redis
TIMEOUT = 3.0  # seconds for a connect, a command or a ping answer
MAX_QUEUE = 10_000  # sends waiting for Redis before the connection is given up
BATCH = 200  # sends per MULTI/EXEC transaction at most


def backoff(attempt: int) -> float:
    """Equal jitter: half the capped exponential delay, plus up to as much again at random
    (never a tight loop, never every process in step after a Redis restart)."""
    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def require_redis() -> None:
    """Raise StartupError (one line naming the install command) unless `redis` imports: a
    process told to use Redis must not start and serve nothing while it retries forever."""
    try:
        import redis.asyncio  # noqa: F401
    except ImportError as exc:
        raise StartupError(
            f"PRICEWATCH_REDIS_URL is set but the redis package cannot be "
            f"imported ({exc}): pip install 'pricewatch[cluster]'"
        ) from None


def connect(url: str):
    """A redis.asyncio client with this module's timeouts and no retries of its own (a
    failure goes to RedisBus's loop, which reconnects and resynchronises)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, retry=Retry(NoBackoff(), 0)
    )


class RedisBus:
    """Publish to, and (with `on_message`) listen on, CHANNEL through Redis at `url`."""

    def __init__(
        self,
        url: str,
        on_connect: Callable[[Any], Awaitable[None]],
        on_message: Callable[[bytes], Awaitable[None] | None] | None = None,
    ):
        self.url = url
        self.on_connect = on_connect
        self.on_message = on_message
        self.client: Any = None  # set while connected and synchronised
        self.connected_since: float | None = None  # epoch seconds
        self.down_since: float | None = time.time()
        self.reconnects = 0  # connection attempts after the first
        self.received = 0  # bus messages handed to on_message
        self.bad_messages = 0  # ... that it could not apply
        self.queued = 0  # sends accepted...
        self.published = 0  # ... and executed by Redis
        self.publish_errors = 0
        self.last_error: str | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._queue: deque[Callable[[Any], Any]] = deque()
        self._wake = asyncio.Event()

    def health(self) -> dict[str, Any]:
        """For /healthz: connected or since when not, with the last error."""
        out: dict[str, Any] = {"connected": self.client is not None, "reconnects": self.reconnects}
        if self.client is None:
            out["down_for"] = round(time.time() - (self.down_since or time.time()), 1)
            if self.last_error:
                out["error"] = self.last_error
        return out

    async def ready(self) -> None:
        """Wait until connected and synchronised."""
        await self._ready.wait()

    def publish(self, data: bytes) -> None:
        """Publish `data` on CHANNEL (see `send`)."""
        self.send(lambda pipe: pipe.publish(CHANNEL, data))

    def send(self, fill: Callable[[Any], Any]) -> None:
        """Queue `fill(pipeline)` (commands added to a MULTI/EXEC pipeline) without waiting.
        One task executes them in order, several per transaction: what one process
        publishes arrives in the order it was sent, each snapshot key written in the same
        transaction as the message that announces it. Dropped while disconnected (the next
        connection's `on_connect` writes a fresh snapshot); a queue past MAX_QUEUE (Redis
        too slow) ends the connection for the same resynchronisation."""
        if self.client is None:
            return
        if len(self._queue) >= MAX_QUEUE:
            self.publish_errors += 1
            self._failed(RuntimeError(f"over {MAX_QUEUE} messages waiting for Redis"))
            return
        self._queue.append(fill)
        self.queued += 1
        self._wake.set()

    def _failed(self, exc: BaseException) -> None:
        if self.client is not None:
            log.warning("redis: %s", _describe(exc))
        self.last_error = _describe(exc)
        self._lost.set()
        self._wake.set()

    async def run(self) -> None:
        """Connect, synchronise, listen; on any failure reconnect with backoff. Forever
        (until cancelled)."""
        attempt = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
            if self.client is not None or self.connected_since is not None:
                log.warning("redis %s: connection lost; reconnecting", _safe(self.url))
            if self.client is not None:
                attempt = 0
            self.client = None
            self.connected_since = None
            self._ready.clear()
            if self.down_since is None:
                self.down_since = time.time()
            delay = backoff(attempt)
            attempt += 1
            self.reconnects += 1
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        client = connect(self.url)
        pubsub = None
        try:
            async with asyncio.timeout(TIMEOUT):
                await client.ping()
            if self.on_message is not None:
                pubsub = client.pubsub()
                await pubsub.subscribe(CHANNEL)
                await self._confirmed(pubsub)
            self._lost.clear()
            self._queue.clear()  # from before: the snapshot written now supersedes it
            await self.on_connect(client)
            self.client = client
            self.connected_since = time.time()
            self.down_since = None
            self.last_error = None
            self._ready.set()
            log.info("redis %s: connected", _safe(self.url))
            if pubsub is None:
                await self._keep(client)
            else:
                await self._listen(pubsub)
        finally:
            self.client = None
            if pubsub is not None:
                with suppress(Exception):
                    await pubsub.aclose()
            with suppress(Exception):
                await client.aclose()

    async def _confirmed(self, pubsub) -> None:
        """Wait for Redis's subscribe confirmation: from then on nothing published is
        missed, so the snapshot read next is complete."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = await pubsub.get_message(timeout=TIMEOUT)
            if msg is not None and msg["type"] == "subscribe":
                return
        raise TimeoutError("no subscribe confirmation")

    async def _keep(self, client) -> None:
        """A publisher's connection: execute what `send` queued, in order, until a command
        fails or a ping does (a restarted Redis has lost the snapshot: the next connection
        writes it again)."""
        queue = self._queue
        while not self._lost.is_set():
            if not queue:
                self._wake.clear()
                try:
                    async with asyncio.timeout(PING_AFTER):
                        await self._wake.wait()
                except TimeoutError:
                    async with asyncio.timeout(TIMEOUT):
                        await client.ping()
                continue
            pipe = client.pipeline(transaction=True)
            count = 0
            while queue and count < BATCH:
                queue.popleft()(pipe)
                count += 1
            async with asyncio.timeout(TIMEOUT):
                await pipe.execute()
            self.published += count
        raise ConnectionError(self.last_error or "connection lost")

    async def _listen(self, pubsub) -> None:
        from redis.exceptions import RedisError

        handle = self.on_message
        assert handle is not None
        heard = time.monotonic()
        pinged = False
        while not self._lost.is_set():
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            now = time.monotonic()
            if msg is None:
                if now - heard > PING_AFTER + TIMEOUT:
                    raise TimeoutError("redis did not answer a ping")
                if now - heard > PING_AFTER and not pinged:  # a silent network?
                    pinged = True
                    await pubsub.ping()
                continue
            heard, pinged = now, False
            if msg["type"] != "message":
                continue
            self.received += 1
            try:
                result = handle(msg["data"])
                if result is not None:
                    await result
            except (RedisError, ConnectionError, TimeoutError, OSError):
                raise  # Redis itself (a resync's reads): reconnect
            except Exception:  # one bad message must not stop the ones after it
                self.bad_messages += 1
                log.exception("redis: could not apply a bus message")
        raise ConnectionError(self.last_error or "connection lost")


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _safe(url: str) -> str:
    """`url` without a password (logs)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
