"""The hub's slow-client policy, against a stand-in transport whose buffer the test sets."""

from __future__ import annotations

import asyncio

from pricewatch.hub import Hub, frame


class Transport:
    def __init__(self) -> None:
        self.buffered = 0
        self.written: list[bytes] = []
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.aborted

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


class Socket:
    closed = False

    async def close(self, code: int, message: bytes) -> bool:
        self.closed = True
        self.code = code
        return True


class Request:
    remote = "127.0.0.1"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def overflowed_client(hub: Hub):
    transport = Transport()
    client = hub.attach(Socket(), Request(transport), "ohlc")
    transport.buffered = hub.write_limit  # the socket is full: frames queue up...
    for i in range(hub.queue_size + 1):  # ...until the queue overflows
        hub.send(client, b'{"n": %d}' % i)
    assert client.full_since is not None and client.queue.full()
    return client, transport


async def test_a_client_that_caught_up_is_not_dropped_for_an_old_overflow():
    hub = Hub(queue_size=4, slow_timeout=0.0, send_timeout=60.0)
    client, transport = await overflowed_client(hub)
    transport.buffered = 0  # it reads again: the sender drains the queue, in order
    await until(lambda: not client.queue.qsize() and not client.pending)
    assert transport.written == [frame(b'{"n": %d}' % i) for i in range(4)]
    hub.sweep()
    assert not client.closed and hub.dropped == 0
    await hub.detach(client)


async def test_a_client_still_behind_after_overflowing_is_dropped():
    hub = Hub(queue_size=4, slow_timeout=0.0, send_timeout=60.0)
    client, transport = await overflowed_client(hub)
    hub.sweep()
    assert client.closed and hub.dropped == 1
    await until(lambda: client.ws.closed)
    assert client.ws.code == 1008


async def test_frames_go_straight_out_in_order_when_the_socket_has_room():
    hub = Hub()
    transport = Transport()
    client = hub.attach(Socket(), Request(transport), "live")
    for i in range(3):
        hub.send(client, b"%d" % i)
    assert transport.written == [frame(b"0"), frame(b"1"), frame(b"2")]
    assert client.queue.qsize() == 0
    await hub.detach(client)


def test_frame_length_encodings():
    assert frame(b"x" * 125)[:2] == b"\x81\x7d"
    assert frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")
