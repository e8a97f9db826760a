"""One websocket client's outgoing bytes: the ClientWriter (the shape of centrifuge's
writer.go), the reasons a client is closed, and the frame format.

The hub decides what each client gets (see hub.py); the writer decides when the bytes go:
straight to the socket while it keeps up, else queued (events, in order) or held (state,
newest per topic and key), and it reports — never carries out — the Disconnect when the
client holds too much or lags too long.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from aiohttp import WSCloseCode

POLICY_VIOLATION = WSCloseCode.POLICY_VIOLATION  # 1008
GOING_AWAY = WSCloseCode.GOING_AWAY  # 1001
MESSAGE_TOO_BIG = WSCloseCode.MESSAGE_TOO_BIG  # 1009

Topic = object  # a hashable key; state topics are tuples whose [0] names a registered kind
Rendered = tuple[bytes, dict]  # (the frames joined in key order, {key: frame})


class Disconnect(NamedTuple):
    """Why the server closed a websocket: close code, metrics label, close message."""

    code: int
    reason: str
    message: bytes


QUEUE_FULL = Disconnect(POLICY_VIOLATION, "queue_full", b"send queue full")
SLOW = Disconnect(POLICY_VIOLATION, "slow", b"slow consumer")
TOO_MANY_MESSAGES = Disconnect(POLICY_VIOLATION, "too_many_messages", b"too many messages")
TOO_BIG = Disconnect(MESSAGE_TOO_BIG, "too_big", b"message too big")
SESSION_ENDED = Disconnect(POLICY_VIOLATION, "session_ended", b"token expired or revoked")
SHUTDOWN = Disconnect(GOING_AWAY, "shutdown", b"server shutdown")
# Counted in Hub.drops, by reason.
DROP_REASONS = (QUEUE_FULL, SLOW, TOO_MANY_MESSAGES, TOO_BIG, SESSION_ENDED)


_NONE = ()  # an empty queue that allocates nothing (see ClientWriter.__init__)


class ClientWriter:
    """One client's outgoing frames (the shape of centrifuge's writer.go).

    A frame goes straight to the transport while nothing waits and the socket buffer is
    under `write_limit`; otherwise it is queued, in order, in `events` (each with the
    monotonic time it was queued; `queued` is their size in bytes) until `flush` can hand it
    over. State frames offered by a flush (`offer`) are written at once under the same
    conditions, else held in `state`, only the newest per topic and key, until `flush` can
    hand them over after the events. `push`, `offer` and `check` *return* the Disconnect the
    hub then carries out: the bytes held for the client (socket buffer + queue + held state)
    never pass `max_bytes`.
    """

    __slots__ = (
        "transport",
        "max_bytes",
        "write_limit",
        "events",
        "queued",
        "peak",
        "full_since",
        "state",
        "state_bytes",
        "state_since",
        "written",
        "marks",
    )

    def __init__(self, transport, max_bytes: int, write_limit: int):
        self.transport = transport
        self.max_bytes = max_bytes
        self.write_limit = write_limit
        # Both queues start as the shared empty tuple and become deques when first needed:
        # most clients never queue anything (an empty deque costs ~760 bytes each).
        self.events: deque[tuple[bytes, float]] = _NONE  # type: ignore[assignment]
        self.queued = 0  # bytes in `events`
        self.peak = 0  # most bytes ever held (socket buffer + queue), for tests and benches
        self.full_since: float | None = None  # when the socket buffer was seen full
        self.state: dict[Topic, dict] = {}  # topic -> {key: newest frame} not yet written
        self.state_bytes = 0  # bytes in `state`
        self.state_since: float | None = None  # when `state` was first held back
        # Lag inside the socket buffer: bytes ever written, and (end offset, time) of each
        # write that left bytes unsent; the first mark past what the socket has sent
        # dates the oldest byte still waiting. A client that keeps up records nothing.
        self.written = 0
        self.marks: deque[tuple[int, float]] = _NONE  # type: ignore[assignment]

    def forget(self, topic: Topic) -> None:
        """Drop the state held for `topic` (unsubscribed: none of it may follow the ack)."""
        held = self.state.pop(topic, None)
        if held:
            self.state_bytes -= sum(len(frame) for frame in held.values())
            if not self.state:
                self.state_since = None

    def _write(self, data: bytes) -> None:
        transport = self.transport
        transport.write(data)
        self.written += len(data)
        if transport.get_write_buffer_size():
            if self.marks is _NONE:
                self.marks = deque()
            self.marks.append((self.written, time.monotonic()))

    def lag(self, now: float) -> float:
        """Seconds the oldest byte written but not yet taken by the peer has waited."""
        marks = self.marks
        if not marks:
            return 0.0
        sent = self.written - self.transport.get_write_buffer_size()
        while marks and marks[0][0] <= sent:
            marks.popleft()
        return now - marks[0][1] if marks else 0.0

    def push(self, framed: bytes) -> Disconnect | None:
        """Write or queue `framed`; QUEUE_FULL (and nothing done) past `max_bytes`."""
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        held = buffered + self.queued + self.state_bytes + len(framed)
        if held > self.max_bytes:
            return QUEUE_FULL
        if held > self.peak:
            self.peak = held
        if not self.events and buffered < self.write_limit:
            # Nothing waits ahead of it and the socket has room: straight out, in order.
            # (aiohttp's own frames, pings and close, are whole writes too.)
            self._write(framed)
        else:
            if self.events is _NONE:
                self.events = deque()
            self.events.append((framed, time.monotonic()))
            self.queued += len(framed)
        return None

    def offer(self, entries: list[tuple[Topic, Rendered]]) -> Disconnect | None:
        """State due now: written in one write when nothing waits and the socket has room,
        else held (newest per topic and key); QUEUE_FULL past `max_bytes`."""
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        if not self.events and not self.state and buffered < self.write_limit:
            data = entries[0][1][0] if len(entries) == 1 else b"".join(e[1][0] for e in entries)
            held = buffered + len(data)
            if held > self.max_bytes:
                return QUEUE_FULL
            if held > self.peak:
                self.peak = held
            self._write(data)
            return None
        state = self.state
        size = self.state_bytes
        for topic, (_, frames) in entries:
            mine = state.get(topic)
            if mine is None:
                state[topic] = dict(frames)
                size += sum(map(len, frames.values()))
                continue
            for key, framed in frames.items():
                old = mine.get(key)
                if old is not None:
                    size -= len(old)
                mine[key] = framed
                size += len(framed)
        self.state_bytes = size
        if self.state_since is None:
            self.state_since = time.monotonic()
        held = buffered + self.queued + size
        if held > self.max_bytes:
            return QUEUE_FULL
        if held > self.peak:
            self.peak = held
        return None

    def flush(self) -> None:
        """Hand queued events, then held state, to the socket while its buffer is under
        `write_limit`, in order, joined into one write."""
        events, transport = self.events, self.transport
        room = self.write_limit - transport.get_write_buffer_size()
        if room <= 0 or not (events or self.state):
            return
        chunk: list[bytes] = []
        size = 0
        while events and size < room:
            framed = events.popleft()[0]
            chunk.append(framed)
            size += len(framed)
        self.queued -= size
        if not events and self.state and size < room:
            # Held state is bounded by the subscriptions (one frame per topic and key):
            # it goes whole, after every event queued before it.
            for frames in self.state.values():
                for key in sorted(frames) if len(frames) > 1 else frames:
                    chunk.append(frames[key])
            self.state = {}
            self.state_bytes = 0
            self.state_since = None
        self._write(chunk[0] if len(chunk) == 1 else b"".join(chunk))

    def check(self, now: float, slow_timeout: float, send_timeout: float) -> Disconnect | None:
        """SLOW when a queued frame, held state, or a byte in the socket buffer waited over
        `slow_timeout` (the lag) or the socket buffer has been full for over `send_timeout`
        (seen by successive checks); QUEUE_FULL when the socket buffer alone passes the
        bound (aiohttp's pongs to a peer that never reads)."""
        if self.events and now - self.events[0][1] > slow_timeout:
            return SLOW
        if self.state_since is not None and now - self.state_since > slow_timeout:
            return SLOW
        if self.lag(now) > slow_timeout:
            return SLOW
        buffered = self.transport.get_write_buffer_size()
        if buffered + self.queued + self.state_bytes > self.max_bytes:
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
        self.events = _NONE  # type: ignore[assignment]
        self.queued = 0
        self.state = {}
        self.state_bytes = 0
        self.state_since = None
        self.marks = _NONE  # type: ignore[assignment]


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
