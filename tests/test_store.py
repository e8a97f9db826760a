"""The SQLite store: migrations, durability across reopen."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from pricewatch import schema
from pricewatch.store import Conflict, Store, UnknownUser


async def test_migrations_are_idempotent_and_keep_data(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    user = await store.create_user("alice", "a@example.com", "$2b$hash")
    version = await store.schema_version()
    assert version == len(schema.MIGRATIONS)
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
    monkeypatch.setattr(
        schema, "MIGRATIONS", [*schema.MIGRATIONS, "CREATE TABLE extra (id INTEGER PRIMARY KEY)"]
    )
    for _ in range(2):
        store = await Store.open(path)
        assert await store.schema_version() == len(schema.MIGRATIONS)
        await store.close()
    with sqlite3.connect(path) as db:
        versions = [r[0] for r in db.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, len(schema.MIGRATIONS) + 1))


async def test_setting_is_generated_once(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    first = await store.setting("jwt_secret", "one")
    assert await store.setting("jwt_secret", "two") == first == "one"
    await store.close()


async def test_foreign_keys_are_enforced(tmp_path):
    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        with pytest.raises(UnknownUser):  # raised from the FK's IntegrityError
            await store.add_refresh_token("jti", 999, "fam", 0.0, 1.0)
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
        assert (await store.delivery_counts())["email"] == {
            "pending": 1,
            "sent": 0,
            "failed": 0,
            "skipped": 0,
        }
    finally:
        await store.close()


async def test_usernames_are_unique_after_nfkc_and_case_folding(tmp_path):
    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        alice = await store.create_user("Alice", "a@example.com", "$2b$hash")
        for twin in ("alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45"):  # fullwidth
            with pytest.raises(Conflict):
                await store.create_user(twin, "b@example.com", "$2b$hash")
            assert (await store.user_by_name(twin)).id == alice.id
        assert (await store.user_by_id(alice.id)).username == "Alice"  # as registered
    finally:
        await store.close()


async def test_colliding_names_from_before_the_key_migration_keep_working(
    tmp_path, monkeypatch, caplog
):
    """Names unique only by exact spelling before migration 2: it must not fail. The oldest
    owns the normalised name; the later ones log in by their exact spelling."""
    path = str(tmp_path / "pw.db")
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    await (await Store.open(path)).close()
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO users(username, email, password_hash, created_at)"
            " VALUES (?, 'x@example.com', '$2b$hash', 0)",
            [("alice",), ("ALICE",), ("bob",), ("\uff21lice",)],
        )
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="pricewatch.schema"):
        store = await Store.open(path)
    try:
        assert await store.schema_version() == len(schema.MIGRATIONS)
        assert (await store.user_by_name("Alice")).id == 1  # any other form: the oldest
        assert (await store.user_by_name("ALICE")).id == 2  # the exact spelling wins
        assert (await store.user_by_name("\uff21lice")).id == 4
        assert (await store.user_by_name("BOB")).id == 3
        with pytest.raises(Conflict):
            await store.create_user("aLiCe", "x@example.com", "$2b$hash")
    finally:
        await store.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "'ALICE' (id 2)" in warned[0] and "'alice' (id 1)" in warned[0]


async def test_login_addresses_are_known_for_a_while_and_bounded(tmp_path):
    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")

        async def login(jti: str, address: str, at: float) -> None:
            await store.add_refresh_token(
                jti,
                user.id,
                "fam",
                at,
                at + 1,
                address=address,
                forget_before=at - 100,
                max_addresses=3,
            )

        await login("j1", "10.0.0.1", 1000.0)
        assert await store.user_for_login("ALICE", "10.0.0.1", 900.0) == (user, True)
        assert await store.user_for_login("alice", "10.0.0.1", 1001.0) == (user, False)
        assert await store.user_for_login("alice", "10.0.0.2", 0.0) == (user, False)
        assert await store.user_for_login("nobody", "10.0.0.1", 0.0) == (None, False)
        for i, address in enumerate(("10.0.0.2", "10.0.0.3", "10.0.0.4")):
            await login(f"k{i}", address, 1050.0 + i)
        # At most three per user, the most recent: 10.0.0.1 was forgotten first.
        assert not (await store.user_for_login("alice", "10.0.0.1", 0.0))[1]
        assert (await store.user_for_login("alice", "10.0.0.2", 0.0))[1]
        await login("j2", "10.0.0.5", 1200.0)  # forgets what is older than 1100
        known = [(await store.user_for_login("alice", f"10.0.0.{i}", 0.0))[1] for i in range(2, 6)]
        assert known == [False, False, False, True]
        assert await store.purge_login_addresses(1201.0) == 1
    finally:
        await store.close()


async def test_writes_for_a_deleted_user_raise_unknown_user(tmp_path):
    path = str(tmp_path / "pw.db")
    store = await Store.open(path)
    try:
        user = await store.create_user("alice", "a@example.com", "$2b$hash")
        await store.add_refresh_token("jti", user.id, "fam", 0.0, 1e12)
        with sqlite3.connect(path) as db:  # as an operator would: no FK cascade here
            db.execute("DELETE FROM users WHERE id = ?", (user.id,))
        assert not await store.user_exists(user.id)
        with pytest.raises(UnknownUser):
            await store.create_alert(user.id, "BTCUSDT", 1.0, "above", max_active=10)
        with pytest.raises(UnknownUser):
            await store.add_refresh_token("jti2", user.id, "fam2", 0.0, 1e12, address="a")
        assert (await store.rotate_refresh_token("jti", "new", 1.0, 2.0)).status == "unknown"
        assert (await store.revoke_token_family("jti")).status == "unknown"
    finally:
        await store.close()


async def test_password_costs_are_counted_and_hashes_replaced_only_if_unchanged(tmp_path):
    store = await Store.open(str(tmp_path / "pw.db"))
    try:
        a = await store.create_user("alice", "a@example.com", "$2b$04$" + "a" * 53)
        await store.create_user("bob", "b@example.com", "$2b$05$" + "b" * 53)
        await store.create_user("carol", "c@example.com", "$2b$05$" + "c" * 53)
        await store.create_user("root", "r@example.com", "-")  # not bcrypt: not counted
        assert await store.password_costs() == {4: 1, 5: 2}
        assert not await store.set_password_hash(a.id, "stale", "$2b$05$" + "d" * 53)
        assert await store.set_password_hash(a.id, a.password_hash, "$2b$05$" + "d" * 53)
        assert await store.password_costs() == {5: 3}
    finally:
        await store.close()
