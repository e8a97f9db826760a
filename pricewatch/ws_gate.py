"""The inbound side of a websocket connection: every frame a client sends is counted before
aiohttp parses it, and a connection the server closes is let go without a reset.

**Where.** aiohttp parses websocket input in `WebSocketReader.feed_data`, which the
connection protocol calls with each chunk read from the socket. There is no public hook
before it, and after it a 64 KiB read of 6-byte pings has become ~11,000 messages, each
answered with a pong by `receive()` before the handler sees anything. The narrowest seam is
`RequestHandler.set_parser(parser, ...)`, which `WebSocketResponse.prepare` calls once with
that reader: `httpd.EdgeProtocol.set_parser` puts a `FrameGate` in front of the reader and
wraps the connection's transport in a `LingeringTransport`. pyproject pins the aiohttp
versions this was checked with, and tests/test_ws_flood.py fails loudly if the seam moves.

**FrameGate** reads frame headers only (2 to 14 bytes a frame; payloads are skipped, never
copied or unmasked). Every frame, whether data, continuation, ping or pong, takes a token
from the connection's inbound bucket (WS_RATE a second, bursts of WS_BURST); a close frame
never does, but it is the last frame parsed: the parser gets input up to its end, and what
follows is dropped unparsed (the lingering close below). A frame past the budget
(TOO_MANY_MESSAGES, 1008), or a message reaching `max_size` bytes (TOO_BIG, 1009), stops
all parsing: the read holding it and every later one are thrown away unparsed, and the
gate reports the Disconnect once (`on_over`).

**Lingering close.** Closing a TCP socket with unread bytes in its receive buffer, or one
that receives bytes after it was closed, makes the kernel send a reset, and a client that
has not read the close frame yet loses it: it sees 1006, not the code. So once the server
closes a websocket, whichever way (a limit, aiohttp's own 1009, the handler ending), its
input is still read and thrown away, unparsed, until the client closes too (its close
frame or EOF) or LINGER seconds pass (reading stops after LINGER_BYTES: a flood then
waits in the kernel); only then does the socket close. A server shutdown does not linger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from enum import Enum
from typing import Any, Final

from .client_writer import TOO_BIG, TOO_MANY_MESSAGES, Disconnect
from .limits import TokenBucket

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds a closed websocket's input is still read (and dropped) at most
LINGER_BYTES = 1 << 20  # ...and bytes
# Frames looked at, after the server closed, for the client's own close frame (which ends
# the lingering early); past this the rest is dropped without looking (a flood).
LINGER_FRAMES = 1024

CLOSE = 0x8
_EMPTY = (False, b"")  # what a parser's feed_data returns: (eof, unparsed tail)


class _Peer(Enum):
    CLOSED = "closed"  # `_scan` met the client's close frame


_PEER_CLOSED: Final = _Peer.CLOSED


def _header_size(buf: bytes) -> int:
    """Bytes of the frame header at the start of `buf`, 0 while it is incomplete."""
    if len(buf) < 2:
        return 0
    b1 = buf[1]
    length = b1 & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if b1 & 0x80 else 0)
    return size if len(buf) >= size else 0


class FrameGate:
    """Put in front of aiohttp's websocket parser (the same feed_data/feed_eof interface):
    counts frames, refuses floods and oversized messages, and runs the lingering close."""

    __slots__ = (
        "parser",
        "transport",
        "bucket",
        "max_size",
        "head",
        "skip",
        "message",
        "over",
        "on_over",
        "discarding",
        "frames_left",
        "discarded",
        "peer_closed",
        "finished",
        "close_wanted",
        "timer",
        "linger",
    )

    def __init__(self, parser: Any, transport: Any, bucket: TokenBucket, max_size: int):
        self.parser = parser
        self.transport = transport  # the real asyncio transport
        self.bucket = bucket
        self.max_size = max_size
        self.head = b""  # the start of a frame header split across reads
        self.skip = 0  # payload bytes of the current frame still to come
        self.message = 0  # payload bytes of the current fragmented message so far
        self.over: Disconnect | None = None  # why the gate refused input, once it did
        self.on_over: Callable[[Disconnect], None] | None = None  # set by the websocket
        self.discarding = False  # input is dropped unparsed (refused, or closing)
        self.frames_left = LINGER_FRAMES
        self.discarded = 0
        self.peer_closed = False  # the client sent its close frame
        self.finished = False  # nothing more will be read: the socket may close
        self.close_wanted = False  # the server is done with the connection
        self.timer: asyncio.TimerHandle | None = None
        self.linger = LINGER

    # -- the parser interface (called by the connection protocol) ---------------------

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.discarding:
            self.discard(data)
            return _EMPTY
        if self.peer_closed:  # the rest of the client's close frame (its payload)
            return self._close_frame(data, 0)
        verdict, pos = self._scan(data, 0, True)
        if verdict is None:
            return self.parser.feed_data(data)
        if verdict is _PEER_CLOSED:
            return self._close_frame(data, pos)
        self.over = verdict
        self.start_discarding()
        self.discarded += len(data) - pos
        self._look_for_close(data, pos)
        if self.on_over is not None:
            self.on_over(verdict)
        return _EMPTY

    def _close_frame(self, data: bytes, pos: int) -> tuple[bool, bytes]:
        """The client's close frame: the parser gets `data` up to that frame's end (its
        payload, `skip` bytes from `pos`, may span reads); what follows is dropped unparsed
        (nothing valid follows a close frame: a read of 10,000 of them is one message)."""
        end = min(len(data), pos + self.skip)
        self.skip -= end - pos
        result = self.parser.feed_data(data[:end]) if end else _EMPTY
        if not self.skip:
            self.start_discarding()
            self.discarded += len(data) - end
        return result

    def feed_eof(self) -> None:
        """The client closed its side (or the connection is gone)."""
        self.finish(polite=True)

    # -- scanning ----------------------------------------------------------------------

    def _scan(self, data: bytes, pos: int, counting: bool) -> tuple[Disconnect | _Peer | None, int]:
        """Walk the frame headers of `data` from `pos`, taking a token per frame when
        `counting`. Returns (None, len) when all is well, else (the Disconnect, or
        _PEER_CLOSED at a close frame; the offset after its header)."""
        n = len(data)
        now = time.monotonic() if counting else 0.0
        while True:
            skip = self.skip
            if skip:
                if skip >= n - pos:
                    self.skip = skip - (n - pos)
                    return None, n
                pos += skip
                self.skip = 0
            if pos >= n:
                return None, n
            head = self.head
            buf = head + data[pos : pos + 14] if head else data[pos : pos + 14]
            size = _header_size(buf)
            if not size:
                self.head = head + data[pos:]
                return None, n
            self.head = b""
            pos += size - len(head)
            b0, length = buf[0], buf[1] & 0x7F
            if length == 126:
                length = int.from_bytes(buf[2:4], "big")
            elif length == 127:
                length = int.from_bytes(buf[2:10], "big")
            self.skip = length
            opcode = b0 & 0x0F
            if opcode == CLOSE:
                self.peer_closed = True
                return _PEER_CLOSED, pos
            if not counting:
                self.frames_left -= 1
                if self.frames_left <= 0:
                    return None, n
                continue
            if not self.bucket.take(now):
                return TOO_MANY_MESSAGES, pos
            if opcode < 3:  # continuation, text, binary: part of a message
                total = length + (self.message if opcode == 0 else 0)
                if total >= self.max_size:  # aiohttp's own bound is the same `>=`
                    return TOO_BIG, pos
                self.message = 0 if b0 & 0x80 else total

    # -- lingering ---------------------------------------------------------------------

    def start_discarding(self) -> None:
        """From now on input is read and dropped unparsed, for `linger` seconds at most."""
        if self.discarding:
            return
        self.discarding = True
        if self.finished:
            return
        self.timer = asyncio.get_running_loop().call_later(self.linger, self.finish)
        with suppress(RuntimeError, AttributeError):
            self.transport.resume_reading()  # flow control may have paused it

    def discard(self, data: bytes) -> None:
        """Input that arrived while discarding: only the client's close frame is looked
        for (in the first LINGER_FRAMES frames). Past LINGER_BYTES the socket is no longer
        read (a flood costs nothing more; its sender is held back by TCP) until the
        lingering ends: a client still flooding then gets a reset, LINGER seconds after
        its close frame was written, time enough for it to read that."""
        if self.finished:
            return
        self.discarded += len(data)
        self._look_for_close(data, 0)
        if self.discarded > LINGER_BYTES and not self.finished:
            with suppress(RuntimeError, AttributeError):
                self.transport.pause_reading()

    def _look_for_close(self, data: bytes, pos: int) -> None:
        if (
            self.frames_left > 0
            and not self.peer_closed
            and not self.finished
            and self._scan(data, pos, False)[0] is _PEER_CLOSED
        ):
            self.finish(polite=True)

    def hurry(self) -> None:
        """Do not linger (server shutdown): the socket closes as soon as it is let go."""
        self.linger = 0.0
        if self.discarding:
            self.finish()

    def finish(self, polite: bool = False) -> None:
        """Nothing more is read: a close() waiting for the client's close frame returns,
        and the socket closes once the server let go of it. `polite`: the client closed
        (its close frame or EOF), so what is left to write may still go."""
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.parser.feed_eof()
        if self.close_wanted:
            self._let_go(polite)

    def close(self) -> None:
        """The server is done with the connection (its transport's close())."""
        if self.close_wanted:
            return
        self.close_wanted = True
        # A client whose close frame came with more behind it (dropped: `discarded`) may
        # still be sending: it lingers too, as a client closed by the server does.
        if self.finished or (self.peer_closed and not self.discarded) or self.linger <= 0:
            self.finished = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._let_go(polite=True)
        else:
            self.start_discarding()

    def _let_go(self, polite: bool) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if not transport.get_write_buffer_size():
            transport.close()
        elif polite:
            transport.close()  # flushes first; a client that stopped reading is cut off:
            asyncio.get_running_loop().call_later(LINGER, transport.abort)
        else:  # still holding output after the lingering: the client is not reading
            transport.abort()


class LingeringTransport:
    """The transport of one websocket connection as aiohttp and the hub see it: the same
    socket (writes go straight to it), but `close()` lingers (see the module docstring)."""

    def __init__(self, real: Any, gate: FrameGate):
        self.real = real
        self.gate = gate
        # The hot path, bound once: no proxy call per write.
        self.write = real.write
        self.writelines = real.writelines
        self.get_write_buffer_size = real.get_write_buffer_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def is_closing(self) -> bool:
        return self.gate.close_wanted or self.real.is_closing()

    def close(self) -> None:
        self.gate.close()

    def abort(self) -> None:
        self.gate.finished = True
        if self.gate.timer is not None:
            self.gate.timer.cancel()
            self.gate.timer = None
        self.real.abort()


async def close_websocket(
    ws: Any, transport: Any, gate: FrameGate | None, code: int, message: bytes, timeout: float
) -> None:
    """Close one websocket with `code`: stop reading what it sends, write the close frame
    and linger (see the module docstring). A client that cannot take the close frame
    within `timeout` seconds (it does not read) is cut off."""
    closed = False
    if gate is not None:
        gate.start_discarding()
    try:
        await asyncio.wait_for(ws.close(code=code, message=message), timeout)
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
        if not closed and transport is not None:
            # A peer that does not read cannot take the close frame either: cut it off.
            # (Not `if not ws.closed`: close() marks the socket closed before it writes,
            # and a graceful transport close would wait forever to flush to that peer,
            # keeping its handler and socket alive.)
            transport.abort()
