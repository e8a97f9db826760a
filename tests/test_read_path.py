"""The authenticated read path: `GET /api/v1/alerts` reuses what it read until a commit.

Polling clients ask for the same page over and over; the store answers from memory while
SQLite's data version is unchanged, so a request costs no trip to the reader thread. Any
commit, by this server or by an operator's sqlite3 shell, changes the version: the next
request reads again. Writes are untouched (a 2xx still means committed).
"""

from __future__ import annotations

import sqlite3

from conftest import bearer, register

from pricewatch.store import Store


class CountingReader:
    """Counts the queries that reach the store's reader connection."""

    def __init__(self, store: Store):
        self.queries = 0
        inner = store._r.execute_fetchall

        async def counted(sql, params=()):
            self.queries += 1
            return await inner(sql, params)

        store._r.execute_fetchall = counted  # type: ignore[method-assign]


async def test_a_page_and_a_user_are_read_again_only_after_a_commit(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        alert = await store.create_alert(user.id, "BTCUSDT", 1.0, "above", max_active=10)
        reader = CountingReader(store)
        first = await store.list_alerts(user.id, None, 0, 10)
        assert await store.user_exists(user.id)
        assert reader.queries == 2
        for _ in range(5):  # nothing committed: nothing read
            assert await store.list_alerts(user.id, None, 0, 10) is first
            assert await store.user_exists(user.id)
        assert reader.queries == 2
        # Another connection commits (as an operator would): seen at once.
        with sqlite3.connect(path) as db:
            db.execute("UPDATE alerts SET price = 2.0 WHERE id = ?", (alert.id,))
        count, alerts = await store.list_alerts(user.id, None, 0, 10)
        assert (count, [a.price for a in alerts]) == (1, [2.0])
        # This store's own writes too.
        await store.create_alert(user.id, "BTCUSDT", 3.0, "above", max_active=10)
        count, alerts = await store.list_alerts(user.id, None, 0, 10)
        assert (count, [a.price for a in alerts]) == (2, [3.0, 2.0])
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM users WHERE id = ?", (user.id,))
        assert not await store.user_exists(user.id)
    finally:
        await store.close()
    assert store.version() is None  # closed: nothing may be reused


async def test_the_list_endpoint_shows_every_write_on_the_next_request(server, http):
    user = await register(http, server)
    headers = bearer(user["access"])
    url = server.url + "/api/v1/alerts"

    async def listed() -> list[tuple[float, str]]:
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 200
            return [(a["price"], a["status"]) for a in (await resp.json())["results"]]

    assert await listed() == []
    async with http.post(
        url, headers=headers, json={"asset": "BTCUSDT", "price": 5.0, "direction": "above"}
    ) as resp:
        assert resp.status == 201
        created = await resp.json()
    assert await listed() == await listed() == [(5.0, "CREATED")]
    async with http.delete(f"{url}/{created['id']}", headers=headers) as resp:
        assert resp.status in (200, 204)
    assert await listed() == [(5.0, "DELETED")]
    with sqlite3.connect(server.settings.db) as db:
        db.execute("UPDATE alerts SET price = 6.0")
    assert await listed() == [(6.0, "DELETED")]
