"""The SQLite store: migrations, durability across reopen."""

from __future__ import annotations

import sqlite3

from pricewatch import store as store_mod
from pricewatch.store import Store


async def test_migrations_are_idempotent_and_keep_data(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    user = await store.create_user("alice", "a@example.com", "$2b$hash")
    version = await store.schema_version()
    assert version == len(store_mod.MIGRATIONS)
    await store.close()

    store = await Store.open(path)  # second start: nothing to apply, data intact
    try:
        assert await store.schema_version() == version
        assert (await store.user_by_name("alice")).id == user.id
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == version
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_new_migration_is_applied_once(tmp_path, monkeypatch):
    path = str(tmp_path / "pw.db")
    await (await Store.open(path)).close()
    monkeypatch.setattr(store_mod, "MIGRATIONS", [
        *store_mod.MIGRATIONS, "CREATE TABLE extra (id INTEGER PRIMARY KEY)"])
    for _ in range(2):
        store = await Store.open(path)
        assert await store.schema_version() == len(store_mod.MIGRATIONS)
        await store.close()
    with sqlite3.connect(path) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, len(store_mod.MIGRATIONS) + 1))


async def test_setting_is_generated_once(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    first = await store.setting("jwt_secret", "one")
    assert await store.setting("jwt_secret", "two") == first == "one"
    await store.close()


async def test_foreign_keys_are_enforced(tmp_path):
    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        try:
            await store.add_refresh_token("jti", 999, "fam", 0.0, 1.0)
        except sqlite3.IntegrityError:
            pass
        else:
            raise AssertionError("a refresh token for a missing user was accepted")
    finally:
        await store.close()


async def test_trigger_skips_an_alert_changed_since_it_matched(tmp_path):
    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        alert = await store.create_alert(user.id, "BTCUSDT", 100.0, "above", max_active=10)
        # Matched as a BTCUSDT alert, but moved to ETHUSDT (same target) before the commit.
        await store.update_alert(user.id, alert.id, "ETHUSDT", 100.0, "above")
        stale = [(alert.id, "BTCUSDT", 100.0, "above", 150.0, 1.0)]
        assert await store.trigger_alerts(stale) == []
        fresh = [(alert.id, "ETHUSDT", 100.0, "above", 101.0, 2.0)]
        (done,) = await store.trigger_alerts(fresh)
        assert done.status == "TRIGGERED" and done.triggered_price == 101.0
        assert await store.trigger_alerts(fresh) == []  # once only
        assert await store.outbox_counts() == {"pending": 1, "sent": 0, "failed": 0}
    finally:
        await store.close()
