"""The hub's per-client limits, against a stand-in transport whose buffer the test sets.

Nothing here runs the hub's background tasks: the tests call `flush` and `sweep` themselves,
so every step is deterministic.
"""

from __future__ import annotations

import asyncio

import pytest

from pricewatch.hub import MAX_SUBSCRIPTIONS, PHASES, QUEUE_FULL, SLOW, WS_BURST, Hub, frame


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
    code: int | None = None

    async def close(self, code: int, message: bytes) -> bool:
        self.closed = True
        self.code = code
        return True


class Request:
    remote = "127.0.0.1"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport


def attach(hub: Hub, endpoint: str = "ohlc"):
    transport = Transport()
    return hub.attach(Socket(), Request(transport), endpoint), transport


async def closed_with(hub: Hub, client, code: int) -> None:
    """Wait for the hub's background close of `client` to reach its socket."""
    await asyncio.wait_for(hub.settled(), 5)
    assert client.ws.code == code


async def test_frames_go_straight_out_in_order_when_the_socket_has_room():
    hub = Hub()
    client, transport = attach(hub, "live")
    for i in range(3):
        hub.send(client, b"%d" % i)
    assert transport.written == [frame(b"0"), frame(b"1"), frame(b"2")]
    assert not client.writer.events and not hub.backlog


async def test_queued_frames_go_out_in_order_in_one_write_once_the_socket_drains():
    hub = Hub(write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 1024  # the socket is full: frames queue up
    for i in range(3):
        hub.send(client, b'{"n": %d}' % i)
    assert transport.written == [] and client in hub.backlog
    assert client.writer.queued == sum(len(frame(b'{"n": %d}' % i)) for i in range(3))
    hub.send(client, b"late")  # even with room now, nothing overtakes the queue
    transport.buffered = 0
    hub.flush(client)
    assert transport.written == [
        b"".join(frame(b'{"n": %d}' % i) for i in range(3)) + frame(b"late")
    ]
    assert client.writer.queued == 0 and not client.writer.events and client not in hub.backlog


async def test_a_client_past_the_byte_bound_is_closed_at_once_and_nothing_is_skipped():
    hub = Hub(max_queue_bytes=4096, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 1024  # the socket buffer counts: 3072 bytes left for the queue
    message = b"x" * 100  # 102 bytes framed
    fits = (4096 - 1024) // 102
    for _ in range(fits):
        hub.send(client, message)
    assert len(client.writer.events) == fits and not client.closed
    hub.send(client, message)  # one more would pass the bound: closed, not skipped
    assert client.closed and hub.drops == {QUEUE_FULL.reason: 1} and hub.dropped == 1
    assert client.writer.peak <= 4096
    assert not client.writer.events and client.writer.queued == 0  # its memory is freed at once
    assert client not in hub.clients and client not in hub.backlog
    await closed_with(hub, client, 1008)
    hub.send(client, message)  # nothing more for a closed client
    assert transport.written == []


async def test_undelivered_bytes_in_the_socket_buffer_alone_close_the_client():
    hub = Hub(max_queue_bytes=4096, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 5000  # e.g. aiohttp's pongs to a peer that sends pings, never reads
    hub.sweep()
    assert client.closed and hub.drops[QUEUE_FULL.reason] == 1


async def test_a_client_that_caught_up_is_not_dropped_for_an_old_backlog():
    hub = Hub(slow_timeout=0.0, send_timeout=60.0, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 1024
    hub.send(client, b"1")
    transport.buffered = 0  # it reads again: the flusher empties its queue
    hub.flush(client)
    hub.sweep()
    assert not client.closed and hub.dropped == 0


async def test_a_client_whose_message_waited_too_long_is_dropped_as_slow():
    hub = Hub(slow_timeout=0.0, send_timeout=60.0, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 1024
    hub.send(client, b"1")
    hub.sweep()
    assert client.closed and hub.drops == {SLOW.reason: 1}
    await closed_with(hub, client, 1008)


async def test_a_client_whose_socket_stays_full_is_dropped_as_slow():
    hub = Hub(slow_timeout=60.0, send_timeout=0.0, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 1024  # full, though nothing is queued
    hub.sweep()  # first seen full...
    assert not client.closed
    hub.sweep()  # ...and still full past send_timeout
    assert client.closed and hub.drops == {SLOW.reason: 1}


def test_subscriptions_stop_at_the_cap_and_resubscribing_is_free():
    hub = Hub()
    client, _ = attach(hub)
    assert all(hub.subscribe(client, n) for n in range(MAX_SUBSCRIPTIONS))
    assert not hub.subscribe(client, "one too many")
    assert "one too many" not in client.topics and "one too many" not in hub.topics
    assert hub.subscribe(client, 0)  # already held
    hub.unsubscribe(client, 0)
    assert hub.subscribe(client, "now it fits")


def test_admission_per_address_is_counted_and_released():
    hub = Hub(max_per_address=2)
    assert hub.admit("a") and hub.admit("a") and not hub.admit("a")
    assert hub.admit("b")
    hub.release("a")
    assert hub.admit("a") and not hub.admit("a")
    for _ in range(3):
        hub.release("a")
        hub.release("b")
    assert hub.by_address == {}


@pytest.mark.parametrize("extra", [0, 1])
async def test_a_burst_over_the_message_rate_closes_the_client(extra):
    hub = Hub()
    client, _ = attach(hub)
    results = [hub.received(client) for _ in range(WS_BURST + extra)]
    assert results == [True] * WS_BURST + [False] * extra
    assert client.closed == bool(extra)


def test_frame_length_encodings():
    assert frame(b"x" * 125)[:2] == b"\x81\x7d"
    assert frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")


# -- state (conflation) -------------------------------------------------------------------


def state_hub(**kw) -> tuple[Hub, dict]:
    """A hub with one state kind "s" whose renderer serves `values[(topic, key)]`."""
    hub = Hub(**kw)
    values: dict = {}
    hub.register_state("s", lambda topic, key: values.get((topic, key)))
    return hub, values


async def test_state_is_conflated_rendered_once_and_sent_in_one_write_per_client():
    hub, values = state_hub()
    calls = []
    hub.register_state("s", lambda topic, key: calls.append(topic) or values[(topic, key)])
    a, b = ("s", "A"), ("s", "B")
    clients = [attach(hub, "live") for _ in range(3)]
    for client, _ in clients:
        hub.subscribe(client, a)
        hub.subscribe(client, b)
    for i in range(100):  # a burst: only the newest value of each topic is sent
        values[(a, None)] = b'{"a":%d}' % i
        hub.mark_dirty(a)
    values[(b, None)] = b'{"b":1}'
    hub.mark_dirty(b)
    hub.flush_state(hub.max_rate)
    assert sorted(calls) == [a, b]  # once per topic, not once per client or per change
    for _, transport in clients:
        assert transport.written == [frame(b'{"a":99}') + frame(b'{"b":1}')]
    hub.flush_state(hub.max_rate)  # nothing changed: nothing sent
    assert all(len(t.written) == 1 for _, t in clients)


async def test_every_changed_key_of_a_topic_is_sent_in_key_order():
    hub, values = state_hub()
    client, transport = attach(hub)
    topic = ("s", "candles")
    hub.subscribe(client, topic)
    values[(topic, 60)] = b"second"
    values[(topic, 0)] = b"first"
    hub.mark_dirty(topic, 60)
    hub.mark_dirty(topic, 0)  # a late trade into the older candle
    hub.mark_dirty(topic, 120)  # renders None (e.g. gone from the ring): nothing for it
    hub.flush_state(hub.max_rate)
    assert transport.written == [frame(b"first") + frame(b"second")]


async def test_a_client_behind_holds_only_the_newest_state_after_its_events():
    hub, values = state_hub(write_limit=1024)
    client, transport = attach(hub)
    topic = ("s", "A")
    hub.subscribe(client, topic)
    transport.buffered = 1024  # full: nothing goes out
    hub.send(client, b"event")
    for i in range(50):
        values[(topic, None)] = b"%d" % i
        hub.mark_dirty(topic)
        hub.flush_state(hub.max_rate)
    assert client.writer.state == {topic: {None: frame(b"49")}}
    assert client.writer.state_bytes == len(frame(b"49")) and client in hub.backlog
    transport.buffered = 0
    hub.flush(client)
    assert transport.written == [frame(b"event") + frame(b"49")]
    assert not client.writer.state and client not in hub.backlog


async def test_state_held_back_past_the_slow_timeout_closes_the_client():
    hub, values = state_hub(slow_timeout=0.0, send_timeout=60.0, write_limit=1024)
    client, transport = attach(hub)
    topic = ("s", "A")
    hub.subscribe(client, topic)
    transport.buffered = 1024
    values[(topic, None)] = b"1"
    hub.mark_dirty(topic)
    hub.flush_state(hub.max_rate)
    assert client.writer.state and not client.writer.events
    hub.sweep()
    assert client.closed and hub.drops == {SLOW.reason: 1}


async def test_bytes_waiting_in_the_socket_buffer_past_the_slow_timeout_are_lag():
    """A client whose socket buffer never stays full (it reads a little now and then) but
    whose oldest written byte is not taken for slow_timeout is slow."""
    hub = Hub(slow_timeout=0.0, send_timeout=60.0, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 10  # the write below stays partly unsent
    hub.send(client, b"x" * 20)
    assert client.writer.marks
    hub.sweep()
    assert client.closed and hub.drops == {SLOW.reason: 1}


async def test_a_client_that_took_every_byte_has_no_lag():
    hub = Hub(slow_timeout=0.0, send_timeout=60.0, write_limit=1024)
    client, transport = attach(hub)
    transport.buffered = 10
    hub.send(client, b"x" * 20)
    transport.buffered = 0  # the peer read it all
    hub.sweep()
    assert not client.closed and not client.writer.marks


async def test_rates_group_subscriptions_and_resubscribing_moves_them():
    hub, values = state_hub()
    client, transport = attach(hub)
    topic = ("s", "A")
    hub.subscribe(client, topic, 2)
    assert set(hub.groups) == {(2, client.phase)}
    hub.subscribe(client, topic, 0)
    assert set(hub.groups) == {(0, 0)} and client.rates == {topic: 0}
    values[(topic, None)] = b"now"
    hub.mark_dirty(topic)  # rate 0: flushed as soon as the loop is free
    assert transport.written == []
    await asyncio.sleep(0)
    assert transport.written == [frame(b"now")]
    hub.unsubscribe(client, topic)
    assert hub.groups == {} and topic not in hub.topics


async def test_the_group_timer_flushes_at_the_rate():
    hub, values = state_hub(max_rate=50)
    client, transport = attach(hub)
    topic = ("s", "A")
    hub.subscribe(client, topic)  # the default rate: 50/s
    values[(topic, None)] = b"1"
    hub.mark_dirty(topic)
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(2):
        while not transport.written:
            await asyncio.sleep(0.001)
    assert loop.time() - start <= 0.02 + 0.05
    await hub.close_all()
    assert all(g.timer is None for g in hub.groups.values())


async def test_held_state_is_brought_up_to_date_before_it_is_written():
    hub, values = state_hub(write_limit=1024)
    client, transport = attach(hub)
    topic = ("s", "A")
    hub.subscribe(client, topic, 0)
    transport.buffered = 1024
    values[(topic, None)] = b"old"
    hub.mark_dirty(topic)
    hub.flush_state(0)
    assert client.writer.state == {topic: {None: frame(b"old")}}
    values[(topic, None)] = b"new"
    hub.mark_dirty(topic)  # changed while the client is behind, not flushed to it yet
    transport.buffered = 0
    hub.flush(client)
    assert transport.written == [frame(b"new")]


async def test_clients_of_one_rate_are_flushed_in_staggered_phases():
    hub, values = state_hub()
    topic = ("s", "A")
    clients = [attach(hub, "live") for _ in range(2 * PHASES)]
    for client, _ in clients:
        hub.subscribe(client, topic)
    assert sorted(hub.groups) == [(hub.max_rate, p) for p in range(PHASES)]
    assert all(len(g.subs[topic]) == 2 for g in hub.groups.values())
    dues = sorted(g.due for g in hub.groups.values())
    interval = 1 / hub.max_rate
    assert all(abs(b - a - interval / PHASES) < 0.01 for a, b in zip(dues, dues[1:]))
    values[(topic, None)] = b"1"
    hub.mark_dirty(topic)
    first = hub.groups[hub.max_rate, 0]
    hub._flush_group(first)  # one phase: only its clients are written to
    assert [bool(t.written) for c, t in clients] == [c.phase == 0 for c, _ in clients]
    await hub.close_all()


async def test_unsubscribing_drops_the_state_held_for_that_topic():
    """Nothing of a topic may follow its `unsubscribed` answer."""
    hub, values = state_hub(write_limit=1024)
    client, transport = attach(hub)
    topic = ("s", "A")
    hub.subscribe(client, topic)
    transport.buffered = 1024  # full: the price is held
    values[(topic, None)] = b"1"
    hub.mark_dirty(topic)
    hub.flush_state(hub.max_rate)
    assert client.writer.state
    hub.unsubscribe(client, topic)
    hub.send(client, b"unsubscribed")
    transport.buffered = 0
    hub.flush(client)
    assert transport.written == [frame(b"unsubscribed")]
    assert client.writer.state_bytes == 0


async def test_repeated_closes_for_one_reason_log_one_line_a_minute(caplog):
    hub = Hub()
    clients = [attach(hub)[0] for _ in range(5)]
    with caplog.at_level("WARNING", logger="pricewatch.hub"):
        for client in clients[:4]:
            hub.drop(client, QUEUE_FULL, "test")
        hub.drop(clients[4], SLOW, "test")  # another reason has its own line
    lines = [r.getMessage() for r in caplog.records if r.name == "pricewatch.hub"]
    assert len(lines) == 2 and "queue_full" in lines[0] and "slow" in lines[1]
    assert hub.drops[QUEUE_FULL.reason] == 4  # every close is still counted
    await asyncio.gather(*hub._closing, return_exceptions=True)
