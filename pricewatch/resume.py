"""Resume on the live feed, for the single process (alerts.py) and edges (cluster/edge.py).

A client back from being offline sends `{"action": "resume", "since": EVENT_ID}`; it gets
the user's alert events after that id in order, then `{"type": "resumed", "since", "last",
"more", "complete"}`, then the live ones with no gap and no duplicate: from the request until
its replay is sent, the live alert events for that connection are held (an alert is an
event: every one, in order, or the client is told).

What one connection, and all of them, may cost:
- one resume per connection per RESUME_EVERY seconds, and none while its last one is still
  queued or running: beyond, `{"type": "error"}` and never a second replay;
- at most REPLAY_MAX events per answer. `"more": true` says there are more, `last` is the
  last id sent: the connection then gets no live alert events until it resumes again from
  `last` (the next replay has them, in order). Live events held past REPLAY_MAX are dropped
  the same way (the answer says `"more": true`);
- at most REPLAY_CONCURRENCY replays at a time in the process; the others wait their turn.
  A replay reads its events in one query (off the loop: the database's thread, or Redis)
  and sends them REPLAY_CHUNK at a time, yielding to the loop between chunks, so another
  user's live push never waits behind replays. A read that takes over REPLAY_READ_TIMEOUT
  seconds (a stalled database or Redis) is given up: that client is answered `error` and
  its live events flow again, and the next replay's turn comes;
- nothing of a connection is kept once it is over: the hub's `detach` tells the resumer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import orjson

from .hub import Hub

log = logging.getLogger(__name__)

REPLAY_MAX = 1000  # events per resume answer (then "more": true)
RESUME_EVERY = 5.0  # seconds between two resumes of one connection
REPLAY_CONCURRENCY = 1  # replays reading or sending at once, process-wide (bench/resume.py)
REPLAY_CHUNK = 25  # events sent between two yields to the loop
REPLAY_READ_TIMEOUT = 5.0  # seconds a replay's read may take, then it answers `error`

Payload = bytes | Callable[[], bytes]  # a message, or how to render it (when it is sent)
# What a source's reader returns: up to REPLAY_MAX + 1 (event id, message) after `since`,
# oldest first, and whether nothing older than them is missing (an edge's Redis stream is
# trimmed; the database is not).
Events = tuple[list[tuple[int, Payload]], bool]
# Called when the resume is asked for (it may note what has been announced by then); returns
# the reader, awaited when the replay's turn comes.
Source = Callable[[int, int], Callable[[], Awaitable[Events]]]


class _Hold:
    """Live alert events for one resuming connection, held until its replay is sent."""

    __slots__ = ("dropped", "events")

    def __init__(self) -> None:
        self.events: list[tuple[int, bytes]] = []
        self.dropped = False  # over REPLAY_MAX of them: dropped, the answer says "more"


class Resumer:
    """Answers resumes from `source`; every live alert event goes through `deliver`."""

    def __init__(
        self,
        hub: Hub,
        source: Source,
        *,
        limit: int = REPLAY_MAX,
        every: float = RESUME_EVERY,
        concurrency: int = REPLAY_CONCURRENCY,
        chunk: int = REPLAY_CHUNK,
    ):
        self.hub = hub
        self.source = source
        self.limit = limit
        self.every = every
        self.chunk = chunk
        self._slots = asyncio.Semaphore(concurrency)
        # user -> connection -> its _Hold while resuming, or None once told "more": its live
        # alert events are left to its next resume.
        self._holds: dict[int, dict[Any, _Hold | None]] = {}
        self._resumed_at: dict[Any, float] = {}  # connection -> when it last resumed
        self._tasks: set[asyncio.Task] = set()
        self.replays = 0  # replays answered
        self.refused = 0  # resumes answered with an error (too soon, still running, bad)
        self.failed = 0  # replays that could not be read (or sent): answered with an error
        hub.on_detach.append(self.forget)

    # -- live events --------------------------------------------------------------------

    def deliver(self, user_id: int, event_id: int | None, data: bytes) -> None:
        """Send a live message of the user's to each of their connections, or hold it for
        those resuming. `event_id` None: not an alert event (sent to every connection)."""
        holds = self._holds.get(user_id)
        if not holds or event_id is None:
            self.hub.send_user(user_id, data)
            return
        relay = getattr(self.hub, "relay_user", None)  # a cluster core's hub: edges too
        if relay is not None:
            relay(user_id, data)
        for client in [c for c in holds if c.closed]:
            del holds[client]
        for client in tuple(self.hub.by_user.get(user_id, ())):
            if client not in holds:
                self.hub.send(client, data)
                continue
            hold = holds[client]
            if hold is None or hold.dropped:
                continue  # its next resume replays it
            if len(hold.events) >= self.limit:
                hold.events, hold.dropped = [], True
            else:
                hold.events.append((event_id, data))
        if not holds:
            del self._holds[user_id]

    def forget(self, client) -> None:
        """The connection is over (the hub's `detach`): keep nothing of it. A replay still
        running for it stops at its next step (the client is closed)."""
        self._resumed_at.pop(client, None)
        holds = self._holds.get(client.user_id)
        if holds is not None:
            holds.pop(client, None)
            if not holds:
                del self._holds[client.user_id]

    # -- asking -------------------------------------------------------------------------

    def check(self, client, data: dict) -> int | None:
        """A live-feed client's resume request: its `since`, or None when refused (the
        client has been sent the `error` message)."""
        since = data.get("since")
        now = time.monotonic()
        hold = self._holds.get(client.user_id, {}).get(client)
        if client.user_id is None:
            detail = "This format carries no alert events."
        elif isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 2**63:
            detail = "since must be an event id (an integer >= 0)."
        elif hold is not None:
            detail = "A resume is still running on this connection."
        elif now < self._resumed_at.get(client, -self.every) + self.every:
            detail = f"At most one resume per {self.every:g} s on a connection."
        else:
            self._resumed_at[client] = now  # until the connection is over (`forget`)
            return since
        self.refused += 1
        self.hub.send(client, orjson.dumps({"type": "error", "detail": detail}))
        return None

    def start(self, user_id: int, since: int, send: Callable[[bytes], None], client=None) -> None:
        """Replay the user's events after `since` through `send`, then the `resumed`
        message; with `client`, hold its live alert events meanwhile (see `deliver`)."""
        read = self.source(user_id, since)  # now: what was announced before this request
        if client is not None:
            self._holds.setdefault(user_id, {})[client] = _Hold()
        task = asyncio.create_task(self._run(user_id, since, read, send, client), name="resume")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in tuple(self._tasks):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    def render_metrics(self, out) -> None:
        """Its counters in /metrics (`out`: a metrics.Exposition), single process and edges."""
        for name, text, value in [
            (
                "pricewatch_resume_replays_total",
                "Live-feed resumes answered with a replay.",
                self.replays,
            ),
            (
                "pricewatch_resume_refused_total",
                "Live-feed resumes refused (too soon, still running, invalid).",
                self.refused,
            ),
            (
                "pricewatch_resume_failed_total",
                "Replays whose events could not be read in time (answered error).",
                self.failed,
            ),
        ]:
            out.metric(name, "counter", text)
            out.sample(name, value)

    # -- replaying ----------------------------------------------------------------------

    async def _run(
        self,
        user_id: int,
        since: int,
        read: Callable[[], Awaitable[Events]],
        send: Callable[[bytes], None],
        client,
    ) -> None:
        last, sent, behind = since, set(), True
        try:
            async with self._slots:
                if client is not None and client.closed:
                    return
                async with asyncio.timeout(REPLAY_READ_TIMEOUT):  # then: TimeoutError
                    items, complete = await read()
                more = len(items) > self.limit
                for i, (event_id, payload) in enumerate(items[: self.limit]):
                    if i and i % self.chunk == 0:
                        await asyncio.sleep(0)  # other users' pushes go between chunks
                        if client is not None and client.closed:
                            return
                    send(payload() if callable(payload) else payload)
                    sent.add(event_id)
                    last = event_id
                hold = self._holds.get(user_id, {}).get(client)
                more = more or (hold is not None and hold.dropped)
                send(
                    orjson.dumps(
                        {
                            "type": "resumed",
                            "since": since,
                            "last": last,
                            "more": more,
                            "complete": complete and not more,
                        }
                    )
                )
                self.replays += 1
                behind = more
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store or Redis failed or stalled, or a send failed
            log.warning("could not resume user %s: %r", user_id, exc)
            self.failed += 1
            with suppress(Exception):
                send(orjson.dumps({"type": "error", "detail": "Could not resume; try again."}))
            behind = False  # told to try again; meanwhile live events flow as before
        finally:
            self._release(user_id, client, since, sent, behind)

    def _release(self, user_id: int, client, since: int, sent: set[int], behind: bool) -> None:
        """The replay is over: send what was held after it, or (told "more") leave the
        connection's live alert events to its next resume."""
        holds = self._holds.get(user_id)
        if client is None or holds is None:
            return
        hold = holds.pop(client, None)
        if not client.closed:
            if behind:
                holds[client] = None
            elif hold is not None:
                for event_id, payload in hold.events:
                    if event_id > since and event_id not in sent:
                        self.hub.send(client, payload)
        if not holds:
            del self._holds[user_id]
