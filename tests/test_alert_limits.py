"""What one user's alerts may cost: the smallest percent move, the shortest cooldown on every
route that sets one (and on rows stored before the API refused less), plain decimals on the
seed route, event retention, and the resume protocol's limits (single process and edges).
"""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import orjson
import pytest
from conftest import LiveServer, bearer, register
from test_cluster import T0 as CLUSTER_T0
from test_cluster import cluster, needs_redis, receive, redis  # noqa: F401 (fixture)

from pricewatch import clock
from pricewatch import resume as resume_module
from pricewatch.alerts import ENGINE, AlertEngine
from pricewatch.cluster import edge as edge_module
from pricewatch.feeds import Tick
from pricewatch.hub import Hub
from pricewatch.market import HUB, MARKET
from pricewatch.records import Hit
from pricewatch.resume import REPLAY_CONCURRENCY, Resumer
from pricewatch.store import Store

T0 = 1_700_000_000_000  # trade time of the engine-level tests (ms)


async def call(
    http: aiohttp.ClientSession, method: str, url: str, token: str, body: dict
) -> tuple[int, dict]:
    async with http.request(method, url, json=body, headers=bearer(token)) as resp:
        return resp.status, await resp.json()


# -- percent and cooldown floors ---------------------------------------------------------


@pytest.mark.parametrize("percent", [1e-9, 5e-324, 0.0099, 0])
async def test_a_percent_alert_below_a_hundredth_of_a_percent_is_refused(server, http, percent):
    token = (await register(http, server))["access"]
    for path in ("/api/v1/alerts", "/alert/"):
        status, answer = await call(
            http,
            "POST",
            server.url + path,
            token,
            {
                "asset": "BTCUSDT",
                "kind": "percent",
                "percent": percent,
                "window": "1m",
                "repeat": True,
                "cooldown": 60,
            },
        )
        assert (status, answer["error"], set(answer["fields"])) == (
            400,
            "validation",
            {"percent"},
        ), answer
        assert "0.01" in answer["fields"]["percent"]
    status, answer = await call(
        http,
        "POST",
        server.url + "/api/v1/alerts",
        token,
        {"asset": "BTCUSDT", "kind": "percent", "percent": 0.01, "window": "1m"},
    )
    assert status == 201, answer
    status, answer = await call(
        http, "PATCH", server.url + f"/api/v1/alerts/{answer['id']}", token, {"percent": 1e-9}
    )
    assert (status, set(answer["fields"])) == (400, {"percent"})


async def test_the_openapi_schema_states_the_percent_floor(server, http):
    async with http.get(server.url + "/openapi.json") as resp:
        doc = await resp.json()
    percent = doc["components"]["schemas"]["AlertIn"]["properties"]["percent"]
    assert percent["minimum"] == 0.01 and "exclusiveMinimum" not in percent


async def test_a_cooldown_under_a_minute_is_refused_on_every_route(server, http):
    token = (await register(http, server))["access"]
    base = {"asset": "BTCUSDT", "price": 100.0, "direction": "above", "repeat": True}
    for path in ("/api/v1/alerts", "/alert/"):
        for cooldown in (0, 1, 59.99, 5e-324):
            status, answer = await call(
                http, "POST", server.url + path, token, {**base, "cooldown": cooldown}
            )
            assert (status, set(answer["fields"])) == (400, {"cooldown"}), (path, cooldown)
    status, alert = await call(
        http, "POST", server.url + "/api/v1/alerts", token, {**base, "cooldown": 60}
    )
    assert status == 201
    for path in (f"/api/v1/alerts/{alert['id']}", f"/alert/{alert['id']}/"):
        for method, body in (("PUT", {**base, "cooldown": 1}), ("PATCH", {"cooldown": 1})):
            status, answer = await call(http, method, server.url + path, token, body)
            assert (status, set(answer["fields"])) == (400, {"cooldown"}), (path, method)


async def engine_on(tmp_path) -> tuple[Store, AlertEngine]:
    store = await Store.open(str(tmp_path / "pw.db"))
    engine = AlertEngine(store, Hub())
    return store, engine


async def test_a_stored_cooldown_under_a_minute_still_waits_a_minute(tmp_path):
    """A row written with a 1 s cooldown (before the API refused it, or by hand): the engine
    and the trigger's rearm time both hold it to 60 s."""
    store, engine = await engine_on(tmp_path)
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        alert = await store.create_alert(
            user.id, "BTCUSDT", 100.0, "above", max_active=10, repeat=True, cooldown=1
        )
        await engine.load()
        await engine.start()
        for seconds, price in ((0, 150.0), (2, 90.0), (3, 150.0), (30, 90.0), (31, 150.0)):
            engine.on_tick(Tick("BTCUSDT", price, 1.0, T0 + seconds * 1000, seconds + 1))
            await asyncio.wait_for(engine.drained(), 5)
        stored = await store.get_alert(user.id, alert.id)
        assert stored.trigger_count == 1
        assert stored.rearm_at == T0 / 1000 + 60
        # After the minute: back below the target (armed), then above: the second trigger.
        for seconds, price in ((61, 90.0), (62, 150.0)):
            engine.on_tick(Tick("BTCUSDT", price, 1.0, T0 + seconds * 1000, seconds + 1))
            await asyncio.wait_for(engine.drained(), 5)
        assert (await store.get_alert(user.id, alert.id)).trigger_count == 2
    finally:
        await engine.stop()
        await store.close()


# -- the seed route's decimals ----------------------------------------------------------


@pytest.mark.parametrize(
    "price",
    [
        "1_000",
        "١٢٣",
        " 5 ",
        "5 ",
        "+5",
        "1e3",
        "inf",
        "NaN",
        "0x10",
        "５",
        "1.2.3",
        ".5",
        "5.",
        "",
        "1.123456789",
    ],
)
async def test_seed_alert_price_text_must_be_a_plain_decimal(server, http, price):
    user = await register(http, server)
    status, answer = await call(
        http,
        "POST",
        server.url + "/alerts/create/",
        user["access"],
        {"username": "alice", "alert_purpose": "p", "alert_price": price, "asset": "BTCUSDT"},
    )
    assert (status, answer["error"], set(answer["fields"])) == (
        400,
        "validation",
        {"alert_price"},
    ), answer


async def test_seed_alert_price_takes_plain_decimals_as_text(server, http):
    server.app[MARKET].on_tick(Tick("BTCUSDT", 100.0, 1.0, int(clock.now() * 1000), 1))
    user = await register(http, server)
    for price, value in (("65000.50", 65000.5), ("7", 7.0), ("0.00000001", 1e-8)):
        status, answer = await call(
            http,
            "POST",
            server.url + "/alerts/create/",
            user["access"],
            {"username": "alice", "alert_purpose": "p", "alert_price": price, "asset": "BTCUSDT"},
        )
        assert (status, answer.get("alert_price")) == (201, value), answer


async def test_ids_given_as_text_are_ascii_digits_only(server, http):
    token = (await register(http, server))["access"]
    status, alert = await call(
        http,
        "POST",
        server.url + "/api/v1/alerts",
        token,
        {"asset": "BTCUSDT", "price": 100.0, "direction": "above"},
    )
    assert (status, alert["id"]) == (201, 1)
    for path in (
        "/api/v1/alerts/\u0661",
        "/api/v1/alerts/%201",
        "/api/v1/alerts/0_1",
        "/api/v1/alerts/+1",
        "/alert/\uff11/",
    ):
        async with http.get(server.url + path, headers=bearer(token)) as resp:
            assert resp.status == 404, path
    for channel in (" 1 ", "1_0", "\u0661", "+1"):
        status, answer = await call(
            http,
            "POST",
            server.url + "/api/v1/alerts",
            token,
            {"asset": "BTCUSDT", "price": 100.0, "direction": "above", "channels": [channel]},
        )
        assert (status, set(answer["fields"])) == (400, {"channels"}), channel
        assert answer["fields"]["channels"].startswith("A non-empty list of channel ids")


# -- event retention ----------------------------------------------------------------------


async def trigger_at(store: Store, user_id: int, at: float) -> int:
    """A fresh alert triggered at `at` (epoch s); returns its event id (one email delivery)."""
    alert = await store.create_alert(user_id, "BTCUSDT", 100.0, "above", max_active=10**6)
    [done] = await store.trigger_alerts([Hit(alert.id, "BTCUSDT", 100.0, "above", 150.0, at)])
    assert len(done.event.deliveries) == 1
    return done.event.id


def set_statuses(db_path: str, statuses: dict[int, str]) -> None:
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "UPDATE deliveries SET status = ? WHERE event_id = ?",
            [(status, event) for event, status in statuses.items()],
        )
    db.close()


def rows(db_path: str, table: str) -> set[int]:
    column = "id" if table == "events" else "event_id"
    with sqlite3.connect(db_path) as db:
        found = {r[0] for r in db.execute(f"SELECT {column} FROM {table}")}  # noqa: S608
    db.close()
    return found


async def test_retention_purges_old_events_and_their_finished_deliveries_only(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    engine = AlertEngine(store, Hub(), event_retention_days=2)
    try:
        assert engine.event_retention == 2 * 86400
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        now = clock.now()
        old = {
            status: await trigger_at(store, user.id, now - 3 * 86400)
            for status in ("sent", "failed", "skipped", "pending")
        }
        recent = {
            status: await trigger_at(store, user.id, now - 86400)
            for status in ("sent", "failed", "skipped", "pending")
        }
        set_statuses(
            path, {event: status for batch in (old, recent) for status, event in batch.items()}
        )
        await engine.purge(now)
        kept = {old["pending"], *recent.values()}
        assert rows(path, "events") == kept
        assert rows(path, "deliveries") == kept
        assert engine.purged_events == 3
        # Once its delivery is done, the old pending one goes at the next sweep.
        set_statuses(path, {old["pending"]: "sent"})
        await engine.purge(now)
        assert rows(path, "events") == rows(path, "deliveries") == set(recent.values())
    finally:
        await store.close()


async def test_retention_purge_walks_every_window_of_old_events(tmp_path):
    """Many small transactions, in id order, until the events are recent."""
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        now = clock.now()
        old = [await trigger_at(store, user.id, now - 100 * 86400 + i) for i in range(23)]
        set_statuses(path, dict.fromkeys(old[::2], "sent"))  # the others stay pending
        recent = [await trigger_at(store, user.id, now - 60) for _ in range(5)]
        assert await store.purge_events(now - 90 * 86400, window=4) == 12
        assert rows(path, "events") == set(old[1::2]) | set(recent)
    finally:
        await store.close()


async def test_the_retention_setting_reaches_the_engine(make_settings):
    app_settings = make_settings(event_retention_days=7)
    async with LiveServer(app_settings) as server:
        assert server.app[ENGINE].event_retention == 7 * 86400


# -- resume: the single process -----------------------------------------------------------


async def next_message(ws) -> dict:
    msg = await asyncio.wait_for(ws.receive(), 10)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return orjson.loads(msg.data)


async def replay_of(ws) -> tuple[list[int], dict]:
    """The alert event ids up to the `resumed` answer, and that answer (prices skipped)."""
    ids = []
    while True:
        msg = await next_message(ws)
        if msg["type"] == "alert":
            ids.append(msg["event"]["id"])
        elif msg["type"] == "resumed":
            return ids, msg
        else:
            assert msg["type"] == "price", msg


async def refused_without_replay(ws, resumer: Resumer) -> str:
    """The error a resume got; no replay was started for it (the refusal and the replay's
    start happen in the same step) and nothing but prices came before the error."""
    while True:
        msg = await next_message(ws)
        if msg["type"] == "error":
            assert not resumer._tasks, "a replay started"
            return msg["detail"]
        assert msg["type"] == "price", msg


def add_events(db_path: str, alert_id: int, user_id: int, count: int) -> list[int]:
    """`count` events of the alert written beside the server (a user's long history)."""
    with sqlite3.connect(db_path) as db:
        db.executemany(
            "INSERT INTO events(alert_id, user_id, time, price) VALUES (?, ?, ?, ?)",
            [(alert_id, user_id, 1.7e9 + i, 150.0) for i in range(count)],
        )
        ids = [r[0] for r in db.execute("SELECT id FROM events ORDER BY id")]
    db.close()
    return ids


async def test_resume_sends_at_most_1000_events_then_more_and_refuses_a_second_within_5s(
    server, http
):
    user = await register(http, server)
    status, alert = await call(
        http,
        "POST",
        server.url + "/api/v1/alerts",
        user["access"],
        {"asset": "BTCUSDT", "price": 110.0, "direction": "above"},
    )
    assert status == 201
    ids = add_events(server.settings.db, alert["id"], user["id"], 1500)
    engine = server.app[ENGINE]
    engine.announced = ids[-1]  # as if this process had announced them
    ws = await http.ws_connect(
        server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
    )
    await ws.send_json({"action": "resume", "since": 0})
    replayed, done = await replay_of(ws)
    assert replayed == ids[:1000]
    assert done == {
        "type": "resumed",
        "since": 0,
        "last": ids[999],
        "more": True,
        "complete": False,
    }
    # Again at once, from where it stopped: refused, no second replay.
    await ws.send_json({"action": "resume", "since": ids[999]})
    assert (await refused_without_replay(ws, engine.resumer)).startswith("At most one resume")
    # Told "more", the connection gets no live event until it resumes: a trigger now comes
    # in the next replay, in order, once.
    server.app[MARKET].on_tick(Tick("BTCUSDT", 150.0, 1.0, int(clock.now() * 1000), 1))
    await asyncio.wait_for(engine.drained(), 5)
    live_id = engine.announced
    assert live_id > ids[-1]
    engine.resumer._resumed_at.clear()  # (5 s later)
    await ws.send_json({"action": "resume", "since": ids[999]})
    replayed, done = await replay_of(ws)
    assert replayed == [*ids[1000:], live_id]
    assert (done["last"], done["more"], done["complete"]) == (live_id, False, True)
    await ws.close()


async def test_a_resume_still_running_refuses_another(server, http, monkeypatch):
    user = await register(http, server)
    engine = server.app[ENGINE]
    entered, release = asyncio.Event(), asyncio.Event()
    read = engine.store.events_between

    async def slow(*args):
        entered.set()
        await release.wait()
        return await read(*args)

    monkeypatch.setattr(engine.store, "events_between", slow)
    ws = await http.ws_connect(
        server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
    )
    await ws.send_json({"action": "resume", "since": 0})
    await asyncio.wait_for(entered.wait(), 5)
    engine.resumer._resumed_at.clear()  # past the 5 s, and still running
    await ws.send_json({"action": "resume", "since": 0})
    while (msg := await next_message(ws))["type"] != "error":
        assert msg["type"] == "price", msg
    assert msg["detail"] == "A resume is still running on this connection."
    release.set()
    assert (await replay_of(ws)) == (
        [],
        {"type": "resumed", "since": 0, "last": 0, "more": False, "complete": True},
    )
    await ws.close()


async def test_a_closed_connection_told_more_is_forgotten_by_the_resumer(server, http):
    """Told "more", a connection's live events wait for its next resume; if it closes
    instead, the resumer keeps nothing of it (its socket, request and transport)."""
    user = await register(http, server)
    status, alert = await call(
        http,
        "POST",
        server.url + "/api/v1/alerts",
        user["access"],
        {"asset": "BTCUSDT", "price": 110.0, "direction": "above"},
    )
    assert status == 201
    ids = add_events(server.settings.db, alert["id"], user["id"], 1001)
    engine, hub = server.app[ENGINE], server.app[HUB]
    engine.announced = ids[-1]
    ws = await http.ws_connect(
        server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
    )
    await ws.send_json({"action": "resume", "since": 0})
    assert (await replay_of(ws))[1]["more"] is True
    (client,) = hub.by_user[user["id"]]
    assert engine.resumer._holds == {user["id"]: {client: None}}
    await ws.close()
    deadline = asyncio.get_running_loop().time() + 10
    while hub.clients:  # the server's handler ends: detach
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert engine.resumer._holds == {}
    assert client not in engine.resumer._resumed_at


async def scrape(http, server) -> dict[str, float]:
    """The unlabelled samples of /metrics."""
    async with http.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if not name.startswith("#") and "{" not in name
    }


async def test_metrics_count_resumes_and_purged_events(server, http):
    user = await register(http, server)
    status, alert = await call(
        http,
        "POST",
        server.url + "/api/v1/alerts",
        user["access"],
        {"asset": "BTCUSDT", "price": 110.0, "direction": "above"},
    )
    assert status == 201
    add_events(server.settings.db, alert["id"], user["id"], 3)  # long past the retention
    engine = server.app[ENGINE]
    await engine.purge()
    assert engine.purged_events >= 3
    ws = await http.ws_connect(
        server.ws_url("/live-feed/subscribe/"), headers=bearer(user["access"])
    )
    await ws.send_json({"action": "resume", "since": 0})
    await replay_of(ws)
    await ws.send_json({"action": "resume", "since": 0})
    await refused_without_replay(ws, engine.resumer)
    await ws.close()
    metrics = await scrape(http, server)
    assert metrics["pricewatch_events_purged_total"] == engine.purged_events
    assert metrics["pricewatch_resume_replays_total"] == 1
    assert metrics["pricewatch_resume_refused_total"] == 1
    assert metrics["pricewatch_resume_failed_total"] == 0


# -- resume: edges --------------------------------------------------------------------------


@needs_redis
async def test_resume_on_an_edge_has_the_same_limits(make_settings, fake, redis, http):  # noqa: F811
    async with cluster(make_settings, fake, redis, edges=1) as (core, [edge]):
        alice = await register(http, core, "alice")
        ws = await http.ws_connect(
            edge.ws_url("/live-feed/subscribe/"), headers=bearer(alice["access"])
        )
        await fake.send_trade("BTCUSDT", 1, 100.0, 1, CLUSTER_T0)
        await receive(ws, "price", price=100.0)
        for target in (101.0, 102.0, 103.0):
            status, _ = await call(
                http,
                "POST",
                core.url + "/api/v1/alerts",
                alice["access"],
                {"asset": "BTCUSDT", "price": target},
            )
            assert status == 201
        events = []
        for i, price in enumerate((101.5, 102.5, 103.5), 2):
            await fake.send_trade("BTCUSDT", i, price, 1, CLUSTER_T0 + i)
            events.append((await receive(ws, "alert"))["event"]["id"])
        resumer = edge.app[edge_module.EDGE].resumer
        resumer.limit = 2  # (1000 in production; a stream holds 1000)
        await ws.send_json({"action": "resume", "since": 0})
        assert await replay_of(ws) == (
            events[:2],
            {"type": "resumed", "since": 0, "last": events[1], "more": True, "complete": False},
        )
        await ws.send_json({"action": "resume", "since": events[1]})
        assert (await refused_without_replay(ws, resumer)).startswith("At most one resume")
        resumer._resumed_at.clear()  # (5 s later)
        await ws.send_json({"action": "resume", "since": events[1]})
        assert await replay_of(ws) == (
            events[2:],
            {
                "type": "resumed",
                "since": events[1],
                "last": events[2],
                "more": False,
                "complete": True,
            },
        )
        await ws.close()
        metrics = await scrape(http, edge)
        assert metrics["pricewatch_resume_replays_total"] == 2
        assert metrics["pricewatch_resume_refused_total"] == 1
        assert metrics["pricewatch_resume_failed_total"] == 0


# -- resume: the Resumer's own bounds -----------------------------------------------------


class Conn:
    """A live-feed connection as the Resumer sees it (the hub's Client has these)."""

    def __init__(self, user_id: int):
        self.user_id = user_id
        self.closed = False
        self.got: list[dict] = []


class Connections:
    """The three things of a Hub the Resumer uses, recording what each connection got."""

    def __init__(self, *conns: Conn):
        self.by_user: dict[int, set[Conn]] = {}
        self.on_detach: list = []  # the Resumer's `forget` (the hub calls it at detach)
        for conn in conns:
            self.by_user.setdefault(conn.user_id, set()).add(conn)
        self.sent = 0

    def send(self, conn: Conn, data: bytes) -> None:
        self.sent += 1
        conn.got.append(orjson.loads(data))

    def send_user(self, user_id: int, data: bytes) -> None:
        for conn in self.by_user.get(user_id, ()):
            self.send(conn, data)


def alert_msg(event_id: int) -> bytes:
    return orjson.dumps({"type": "alert", "event": {"id": event_id}})


def kinds(conn: Conn) -> list:
    return [m["event"]["id"] if m["type"] == "alert" else m["type"] for m in conn.got]


async def test_replays_run_a_few_at_a_time_and_the_rest_wait_their_turn():
    reading, release = [], asyncio.Event()

    def source(user_id: int, since: int):
        async def read():
            reading.append(user_id)
            await release.wait()
            return [(1, alert_msg(1))], True

        return read

    conns = [Conn(user_id) for user_id in range(1, 7)]
    hub = Connections(*conns)
    resumer = Resumer(hub, source)  # type: ignore[arg-type]
    for conn in conns:
        resumer.start(conn.user_id, 0, lambda d, c=conn: hub.send(c, d), conn)
    deadline = asyncio.get_running_loop().time() + 5
    while len(reading) < REPLAY_CONCURRENCY:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0)
    for _ in range(20):  # the others stay queued however long the first ones take
        await asyncio.sleep(0)
    assert reading == list(range(1, REPLAY_CONCURRENCY + 1)) and REPLAY_CONCURRENCY < 6
    release.set()
    while resumer._tasks:
        await asyncio.wait(resumer._tasks, timeout=5)
    assert sorted(reading) == [1, 2, 3, 4, 5, 6]
    assert all(kinds(conn) == [1, "resumed"] for conn in conns)


async def test_a_replay_yields_to_the_loop_between_chunks():
    def source(user_id: int, since: int):
        async def read():
            return [(i, alert_msg(i)) for i in range(1, 1001)], True

        return read

    conn = Conn(1)
    hub = Connections(conn)
    resumer = Resumer(hub, source)  # type: ignore[arg-type]
    seen: list[int] = []

    async def other_user():  # another user's work, queued on the loop meanwhile
        while resumer._tasks:
            seen.append(hub.sent)
            await asyncio.sleep(0)

    resumer.start(1, 0, lambda d: hub.send(conn, d), conn)
    await asyncio.wait_for(other_user(), 5)
    assert kinds(conn) == [*range(1, 1001), "resumed"]
    assert any(0 < n < 1000 for n in seen)  # it ran in the middle of the replay


async def test_live_events_wait_for_the_replay_and_too_many_become_more():
    gate = asyncio.Event()

    def source(user_id: int, since: int):
        async def read():
            await gate.wait()
            return [(i, alert_msg(i)) for i in (5, 6) if i > since], True

        return read

    resuming, other = Conn(1), Conn(1)
    hub = Connections(resuming, other)
    resumer = Resumer(hub, source, limit=3)  # type: ignore[arg-type]
    resumer.start(1, 4, lambda d: hub.send(resuming, d), resuming)
    for event_id in (6, 7):  # 6: read by the replay too; 7: after it
        resumer.deliver(1, event_id, alert_msg(event_id))
    assert kinds(other) == [6, 7] and kinds(resuming) == []
    gate.set()
    await asyncio.wait(resumer._tasks, timeout=5)
    assert kinds(resuming) == [5, 6, "resumed", 7]
    assert resuming.got[2]["more"] is False
    # Past `limit` held events: they are dropped and the answer says "more"; the live ones
    # after it too, until the connection resumes again.
    resumer._resumed_at.clear()
    gate.clear()
    resuming.got.clear()
    resumer.start(1, 7, lambda d: hub.send(resuming, d), resuming)
    for event_id in range(8, 12):
        resumer.deliver(1, event_id, alert_msg(event_id))
    gate.set()
    await asyncio.wait(resumer._tasks, timeout=5)
    resumer.deliver(1, 12, alert_msg(12))
    assert kinds(resuming) == ["resumed"] and resuming.got[0]["more"] is True
    assert kinds(other)[-1] == 12


async def test_a_failed_replay_says_so_and_live_events_go_on():
    gate = asyncio.Event()

    def source(user_id: int, since: int):
        async def read():
            await gate.wait()
            raise ConnectionError("no Redis")

        return read

    conn = Conn(1)
    hub = Connections(conn)
    resumer = Resumer(hub, source)  # type: ignore[arg-type]
    resumer.start(1, 0, lambda d: hub.send(conn, d), conn)
    resumer.deliver(1, 3, alert_msg(3))
    gate.set()
    await asyncio.wait(resumer._tasks, timeout=5)
    resumer.deliver(1, 4, alert_msg(4))
    assert kinds(conn) == ["error", 3, 4]
    assert conn.got[0]["detail"] == "Could not resume; try again."


async def test_a_stalled_read_answers_error_and_the_next_replay_is_served(monkeypatch):
    """A database or Redis read that never returns is given up after REPLAY_READ_TIMEOUT:
    its client is told, its live events flow again, and the replays queued behind it run."""
    monkeypatch.setattr(resume_module, "REPLAY_READ_TIMEOUT", 0.05)

    def source(user_id: int, since: int):
        async def read():
            if user_id == 1:
                await asyncio.Event().wait()  # never
            return [(1, alert_msg(1))], True

        return read

    stalled, next_one = Conn(1), Conn(2)
    hub = Connections(stalled, next_one)
    resumer = Resumer(hub, source)  # type: ignore[arg-type]
    assert REPLAY_CONCURRENCY == 1  # so the second replay waits for the first
    resumer.start(1, 0, lambda d: hub.send(stalled, d), stalled)
    resumer.start(2, 0, lambda d: hub.send(next_one, d), next_one)
    await asyncio.wait(resumer._tasks, timeout=5)
    assert stalled.got == [{"type": "error", "detail": "Could not resume; try again."}]
    assert kinds(next_one) == [1, "resumed"]
    assert resumer._holds == {} and resumer.failed == 1
    resumer.deliver(1, 2, alert_msg(2))
    assert kinds(stalled) == ["error", 2]
