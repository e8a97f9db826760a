"""Websocket floods below the message level: pings, pongs and empty continuation frames
count against the same inbound budget as messages, on every endpoint, and a client closed
for a limit reads the close frame with its code (never a reset) — raw sockets throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import random
import struct

import pytest
from aiohttp.web_protocol import RequestHandler
from conftest import LiveServer, register
from raw_ws import CLOSE, CONTINUATION, PING, PONG, TEXT, RawWebSocket, client_frame

from pricewatch import ws_gate
from pricewatch.hub import TOO_BIG, TOO_MANY_MESSAGES, WS_BURST
from pricewatch.limits import WS_MAX_MESSAGE, TokenBucket
from pricewatch.market import HUB
from pricewatch.ws_gate import FrameGate, LingeringTransport

USERS = itertools.count()
# Every websocket endpoint: anonymous ones, the live feed with a login, and its compat form.
ENDPOINTS = (
    "/ws/ohlc/",
    "/ws/rates/",
    "/live-feed/subscribe/",
    "/live-feed/subscribe/?format=binance",
)

PINGS = client_frame(b"", PING) * 10_000  # 60 KB of empty pings, one write
PONGS = client_frame(b"", PONG) * 10_000
CONTINUATIONS = (
    client_frame(b'{"a":', TEXT, fin=False) + client_frame(b"", CONTINUATION, fin=False) * 10_000
)  # a message that never ends


async def open_ws(server: LiveServer, http, path: str, **kwargs) -> RawWebSocket:
    if path.startswith("/live-feed"):
        user = await register(http, server, username=f"flood{next(USERS)}")
        path += ("&" if "?" in path else "?") + "token=" + user["access"]
    return await RawWebSocket.connect(server.url, path, **kwargs)


async def close_code(ws: RawWebSocket) -> int | None:
    """Read to the end: the close code, or None when the connection was reset or ended
    without a close frame."""
    try:
        return (await ws.until_closed(timeout=10))[1]
    finally:
        ws.abort()


# ------------------------------------------------------------------------------- the seam


async def test_aiohttp_hands_every_websocket_parser_to_the_gate(server, http) -> None:
    """The seam ws_gate relies on (aiohttp internals, pinned in pyproject): the parser
    `WebSocketResponse.prepare` makes is handed to the connection by `set_parser`, and the
    connection's `transport` is what the websocket closes. If aiohttp changes either, this
    fails here rather than floods passing uncounted."""
    assert "set_parser" in RequestHandler.__dict__
    ws = await open_ws(server, http, "/ws/ohlc/")
    try:
        (client,) = server.app[HUB].clients
        protocol = client.request.protocol
        assert isinstance(protocol.ws_gate, FrameGate)
        assert client.gate is protocol.ws_gate
        assert protocol._payload_parser is protocol.ws_gate  # what data_received feeds
        assert isinstance(protocol.transport, LingeringTransport)
        assert client.ws._req.transport is protocol.transport  # what ws.close() closes
    finally:
        ws.abort()


# ------------------------------------------------------------------------ control floods


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_ping_flood_is_closed_with_1008_on_every_endpoint(server, http, path) -> None:
    ws = await open_ws(server, http, path)
    ws.send(PINGS)
    assert await close_code(ws) == 1008
    assert server.app[HUB].drops[TOO_MANY_MESSAGES.reason] == 1


async def test_a_flood_sent_with_the_upgrade_request_is_closed_with_1008(server) -> None:
    """Frames written in the same packet as the handshake reach the gate before the
    websocket handler runs: counted all the same."""
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /ws/ohlc/ HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        + PINGS
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    assert await close_code(RawWebSocket(reader, writer)) == 1008


@pytest.mark.skipif(
    importlib.util.find_spec("redis") is None,
    reason="the redis client is not installed (pip install -e '.[test]')",
)
@pytest.mark.parametrize("path", ["/ws/ohlc/", "/ws/rates/"])
async def test_a_cluster_edge_closes_a_ping_flood_with_1008(
    make_settings, http, monkeypatch, path
) -> None:
    """Edges serve the same websockets through the same gate (Redis need not be up)."""
    from pricewatch.cluster import edge as edge_module

    monkeypatch.setattr(edge_module, "START_WAIT", 0.2)
    settings = make_settings(
        redis_url="redis://127.0.0.1:9/0", role="edge", jwt_secret="edge-test-secret-" + "x" * 32
    )
    async with LiveServer(settings) as edge:
        ws = await RawWebSocket.connect(edge.url, path)
        ws.send(PINGS)
        assert await close_code(ws) == 1008


@pytest.mark.parametrize("flood", [PONGS, CONTINUATIONS], ids=["pongs", "continuations"])
async def test_pong_and_empty_continuation_floods_are_closed_with_1008(server, http, flood) -> None:
    ws = await open_ws(server, http, "/ws/ohlc/")
    ws.send(flood)
    assert await close_code(ws) == 1008


async def test_pings_within_the_budget_are_answered_and_the_socket_stays_open(server, http) -> None:
    ws = await open_ws(server, http, "/ws/ohlc/")
    try:
        ws.send(client_frame(b"hi", PING) * (WS_BURST - 1))
        for _ in range(WS_BURST - 1):
            opcode, payload = await ws.frame()
            assert (opcode, payload) == (PONG, b"hi")
        ws.send_json({"symbol": "NOPE"})  # the budget's last token: still answered
        assert (await ws.recv_json())["type"] == "error"
        assert server.app[HUB].drops[TOO_MANY_MESSAGES.reason] == 0
    finally:
        ws.abort()


async def test_a_flood_split_into_single_bytes_is_counted_all_the_same(server, http) -> None:
    """Frame headers cut across reads are still counted, one token per frame."""
    ws = await open_ws(server, http, "/ws/ohlc/")
    data = client_frame(b"x" * 200, PING) + client_frame(b"", PING) * (WS_BURST + 5)
    for i in range(len(data)):
        ws.send(data[i : i + 1])
        await ws.writer.drain()
    assert await close_code(ws) == 1008


# ---------------------------------------------------------------------- close, no reset


async def test_100_messages_in_one_write_always_read_the_close_frame(server, http) -> None:
    """The client is reading: it gets the 1008 close frame every time, never a reset,
    even with more input (a ping flood) still arriving after the server closed."""
    burst = b"".join(client_frame(b'{"symbol": "NOPE"}') for _ in range(100)) + PINGS
    for _ in range(20):
        ws = await open_ws(server, http, "/ws/ohlc/")
        ws.send(burst)
        assert await close_code(ws) == 1008
    assert server.app[HUB].drops[TOO_MANY_MESSAGES.reason] == 20


async def test_a_client_that_reads_late_still_reads_the_close_frame(server, http) -> None:
    """A client (on a loaded machine, say) writes 100 messages, then more, and reads only
    afterwards: its input is still arriving when the server closes it. Closing the socket
    then would reset the connection and destroy the unread close frame (1006)."""
    message = client_frame(b'{"symbol": "NOPE"}')
    for _ in range(5):
        ws = await open_ws(server, http, "/ws/ohlc/")
        ws.send(message * 100)
        for _ in range(20):  # pacing: the writes go on after the server closed
            await asyncio.sleep(0.005)
            ws.send(message * 50)
        assert await close_code(ws) == 1008


async def test_a_client_still_sending_after_the_close_frame_reads_it(server, http) -> None:
    """Input keeps arriving while the client reads: the server reads and drops it (the
    lingering close) instead of closing a socket with unread bytes (a reset)."""
    ws = await open_ws(server, http, "/ws/ohlc/")
    done = asyncio.Event()

    async def keep_flooding() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while not done.is_set():
                ws.send(client_frame(b"", PING) * 1000)
                await ws.writer.drain()

    flooder = asyncio.create_task(keep_flooding())
    try:
        assert (await ws.until_closed(timeout=10))[1] == 1008
    finally:
        done.set()
        await flooder
        ws.abort()


async def test_an_oversized_message_reads_the_1009_close_frame(server, http) -> None:
    """A frame announcing WS_MAX_MESSAGE bytes is refused at its header: the client gets
    1009 (its payload is never read in), not a reset."""
    ws = await open_ws(server, http, "/ws/ohlc/")
    ws.send(client_frame(b"x" * WS_MAX_MESSAGE))
    assert await close_code(ws) == 1009
    assert server.app[HUB].drops[TOO_BIG.reason] == 1


async def test_a_message_growing_past_the_bound_in_fragments_is_closed_with_1009(
    server, http
) -> None:
    ws = await open_ws(server, http, "/ws/ohlc/")
    part = b"x" * (WS_MAX_MESSAGE // 4)
    ws.send(client_frame(part, TEXT, fin=False) + client_frame(part, CONTINUATION, fin=False) * 4)
    assert await close_code(ws) == 1009


async def test_a_polite_client_is_let_go_without_waiting(server, http, monkeypatch) -> None:
    """After the server's close frame, the client's own close (or EOF) ends the lingering
    at once: the socket closes then, not LINGER seconds later. (Only the first
    LINGER_FRAMES frames after the cut are looked at: a flood is dropped unread.) LINGER is
    raised so that "let go early" (within LINGER / 2) and "the timer fired" stay far
    apart on a loaded machine."""
    monkeypatch.setattr(ws_gate, "LINGER", 10.0)
    ws = await open_ws(server, http, "/ws/ohlc/")
    ws.send(client_frame(b"", PING) * (WS_BURST * 2))
    assert (await ws.until_closed(timeout=10))[1] == 1008
    ws.send(client_frame(struct.pack("!H", 1000), 0x8))
    async with asyncio.timeout(ws_gate.LINGER / 2):
        assert await ws.reader.read() == b""  # the server closed (EOF), no reset
    ws.abort()


async def test_a_read_of_many_close_frames_is_answered_once_and_the_connection_ends(
    server, http
) -> None:
    """10,000 close frames in one write: the first is answered (one close frame), the rest
    are dropped unparsed (and read, not left to reset the connection), and the connection
    ends once the client ends its side."""
    ws = await open_ws(server, http, "/ws/ohlc/")
    ws.send(client_frame(struct.pack("!H", 1000), CLOSE) * 10_000)
    try:
        assert (await ws.until_closed(timeout=10))[1] == 1000
        ws.writer.write_eof()
        async with asyncio.timeout(ws_gate.LINGER / 2):
            assert await ws.reader.read() == b""  # no second close frame: EOF
    finally:
        ws.abort()


# ---------------------------------------------------------------------- nobody starves


async def test_three_ping_flooders_do_not_starve_other_clients(server, http) -> None:
    """Three clients flood pings as fast as they can, reconnecting when closed; meanwhile
    other clients' requests are answered promptly and a websocket client is served. (The
    bounds are loose, for a loaded test machine; bench/abuse.py --attack ping_flood
    measures the p99. Without the gate, aiohttp parses and answers every ping: requests
    then wait seconds.)"""
    stop = asyncio.Event()
    flooding = [asyncio.Event() for _ in range(3)]

    async def flooder(i: int) -> None:
        while not stop.is_set():
            with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
                ws = await RawWebSocket.connect(server.url, "/ws/ohlc/")
                try:
                    while not stop.is_set() and not ws.writer.is_closing():
                        ws.send(PINGS)
                        await ws.writer.drain()
                        flooding[i].set()
                finally:
                    ws.abort()

    flooders = [asyncio.create_task(flooder(i)) for i in range(3)]
    loop = asyncio.get_running_loop()
    latencies = []
    try:
        hub = server.app[HUB]
        async with asyncio.timeout(30):
            for event in flooding:
                await event.wait()
            for _ in range(20):
                started = loop.time()
                async with http.get(server.url + "/api/v1/prices") as resp:
                    assert resp.status == 200
                    await resp.read()
                latencies.append(loop.time() - started)
            async with http.ws_connect(server.ws_url("/ws/ohlc/")) as ws:
                await ws.send_json({"symbol": "NOPE"})
                assert (await ws.receive_json())["type"] == "error"
            await hub.dropped_for(TOO_MANY_MESSAGES, 3)  # the flooders were closed
        latencies.sort()
        assert latencies[-1] < 1.0 and latencies[len(latencies) // 2] < 0.25, latencies
    finally:
        stop.set()
        await asyncio.gather(*flooders, return_exceptions=True)


# --------------------------------------------------------------------- the gate, alone


class Parser:
    """What aiohttp's WebSocketReader looks like to the gate: collects what it is fed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        self.eof = True


def frames(count: int) -> bytes:
    rng = random.Random(count)
    sizes = [0, 1, 125, 126, 127, 300, 65535, 65536, 70000]
    out = []
    for _ in range(count):
        opcode = rng.choice([TEXT, PING, PONG, 0x2])
        size = rng.choice(sizes) if opcode in (TEXT, 0x2) else rng.choice([0, 1, 125])
        out.append(client_frame(bytes(size), opcode))
    return b"".join(out)


async def test_the_gate_counts_one_token_per_frame_however_reads_are_cut() -> None:
    data = frames(60)
    for seed in range(10):
        rng = random.Random(seed)
        parser = Parser()
        bucket = TokenBucket(0.0, 1000.0, now=0.0)
        gate = FrameGate(parser, None, bucket, 1 << 20)
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 13, 500, 70000])
            assert gate.feed_data(data[pos : pos + step]) == (False, b"")
            pos += step
        assert bytes(parser.data) == data  # passed through untouched
        assert round(1000 - bucket.tokens) == 60
        assert gate.over is None and gate.skip == 0 and gate.head == b""


async def test_the_gate_refuses_the_read_that_goes_over_and_everything_after() -> None:
    parser = Parser()
    gate = FrameGate(parser, _Transport(), TokenBucket(0.0, 3.0, now=0.0), 1 << 20)
    reported = []
    gate.on_over = reported.append
    ping = client_frame(b"", PING)
    gate.feed_data(ping * 2)
    gate.feed_data(ping * 2)  # the 4th frame is over: this whole read is dropped
    gate.feed_data(ping * 100)
    assert bytes(parser.data) == ping * 2
    assert reported == [TOO_MANY_MESSAGES] and gate.discarding
    gate.finish()
    assert parser.eof


class _Transport:
    """Enough of an asyncio transport for the gate alone."""

    def __init__(self) -> None:
        self.closed = self.aborted = self.paused = False

    def resume_reading(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


async def test_a_closed_connection_lingers_until_the_client_closes() -> None:
    transport = _Transport()
    gate = FrameGate(Parser(), transport, TokenBucket(20.0, 40.0), 1 << 20)
    gate.close()  # the server is done: input is read and dropped, the socket stays open
    assert gate.discarding and not transport.closed
    gate.feed_data(client_frame(b"", PING) * 10)
    assert not transport.closed
    gate.feed_data(client_frame(struct.pack("!H", 1000), 0x8))  # the client's close
    assert transport.closed


async def test_lingering_reads_a_bounded_number_of_bytes_then_waits() -> None:
    transport = _Transport()
    gate = FrameGate(Parser(), transport, TokenBucket(20.0, 40.0), 1 << 20)
    gate.close()
    chunk = client_frame(b"", PING) * 10_000
    for _ in range(ws_gate.LINGER_BYTES // len(chunk)):
        gate.feed_data(chunk)
    assert not transport.paused
    gate.feed_data(chunk)
    assert transport.paused and not transport.closed  # a flood waits in the kernel...
    gate.finish()  # ...until the lingering time is over
    assert transport.closed


async def test_the_gate_hands_the_parser_nothing_after_a_close_frame() -> None:
    """A close frame is the last one parsed: however the reads are cut, the parser gets the
    input up to its end (its payload included) and nothing after it."""
    before = client_frame(b"hi", PING) + client_frame(b'{"a": 1}')
    close = client_frame(struct.pack("!H", 1000) + b"bye" * 50, CLOSE)
    after = (client_frame(struct.pack("!H", 1000), CLOSE) + client_frame(b"", PING)) * 5000
    data = before + close + after
    for step in (len(data), 1, 3, 64, 4096):
        parser = Parser()
        gate = FrameGate(parser, _Transport(), TokenBucket(0.0, 40.0, now=0.0), 1 << 20)
        for pos in range(0, len(data), step):
            assert gate.feed_data(data[pos : pos + step]) == (False, b"")
        assert bytes(parser.data) == before + close, step
        assert gate.discarding and gate.over is None
        gate.finish()


async def test_a_close_frame_with_more_behind_it_lingers_a_lone_one_does_not() -> None:
    """The server's close after the client's: at once when the close frame came alone; after
    the client's end of stream when more came behind it (closing with unread input would
    reset the connection)."""
    close = client_frame(struct.pack("!H", 1000), CLOSE)
    for extra, lingers in ((b"", False), (client_frame(b"", PING) * 100, True)):
        transport = _Transport()
        gate = FrameGate(Parser(), transport, TokenBucket(20.0, 40.0), 1 << 20)
        gate.feed_data(close + extra)
        gate.close()  # the server answered the close frame and is done
        assert transport.closed is not lingers
        gate.feed_eof()
        assert transport.closed
