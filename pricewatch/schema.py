"""The database schema, as ordered migrations, and `migrate()`, which store.py runs at startup.

Index + 1 is the schema version recorded in `schema_version`. Append only: never edit a
migration that has shipped; add a new one.
"""

from __future__ import annotations

import logging
import unicodedata

import aiosqlite

log = logging.getLogger(__name__)


class SchemaError(Exception):
    """The database cannot be brought to this pricewatch's schema."""


def username_key(username: str) -> str:
    """The form under which usernames are unique: NFKC, case folded, NFKC again.

    `Alice`, `ALICE` and `ａｌｉｃｅ` share the key `alice`. The second NFKC is needed
    because case folding can leave a string that is no longer normalised. Keys are stored
    (users.username_key); the exact registered spelling always finds its user, even if a
    later Python's Unicode tables would compute another key for it.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())


MIGRATIONS: list[str] = [
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE users (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        username TEXT NOT NULL UNIQUE,
        email TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        is_admin INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL
    );
    CREATE TABLE refresh_tokens (
        jti TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        family TEXT NOT NULL,
        issued_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        spent_at REAL,
        revoked_at REAL
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
    CREATE TABLE quotes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        from_currency TEXT NOT NULL,
        to_currency TEXT NOT NULL,
        rate REAL NOT NULL,
        bid REAL,
        ask REAL,
        source_time TEXT NOT NULL,
        fetched_at REAL NOT NULL
    );
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        asset TEXT NOT NULL,
        price REAL NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('above', 'below')),
        status TEXT NOT NULL DEFAULT 'CREATED'
            CHECK (status IN ('CREATED', 'TRIGGERED', 'DELETED')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        triggered_at REAL,
        triggered_price REAL,
        notified TEXT CHECK (notified IN ('pending', 'sent', 'failed'))
    );
    CREATE INDEX alerts_user_status ON alerts(user_id, status, id);
    CREATE INDEX alerts_status ON alerts(status);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id INTEGER NOT NULL UNIQUE REFERENCES alerts(id) ON DELETE CASCADE,
        recipient TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        sent_at REAL
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE TABLE feeds (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        url TEXT NOT NULL UNIQUE,
        created_by INTEGER REFERENCES users(id) ON DELETE SET NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: usernames unique after normalisation, and where each user logged in from.
    # Existing names that collide after normalisation: the oldest row (lowest id) owns the
    # key; later ones keep a NULL key (SQLite's UNIQUE admits any number of NULLs, so it can
    # never collide) and log in by their exact name only. MIGRATION_WARNINGS names them.
    """
    ALTER TABLE users ADD COLUMN username_key TEXT;
    UPDATE users SET username_key = pw_username_key(username);
    UPDATE users SET username_key = NULL
        WHERE id NOT IN (SELECT MIN(id) FROM users GROUP BY username_key);
    CREATE UNIQUE INDEX users_username_key ON users(username_key);
    CREATE TABLE login_addresses (
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        last_login REAL NOT NULL,
        PRIMARY KEY (user_id, address)
    ) WITHOUT ROWID;
    CREATE INDEX login_addresses_last_login ON login_addresses(last_login);
    """,
    # 3: closed (and open) candles of every timeframe, so charts survive restarts.
    """
    CREATE TABLE candles (
        symbol TEXT NOT NULL,
        timeframe TEXT NOT NULL,
        start INTEGER NOT NULL,
        open REAL NOT NULL,
        high REAL NOT NULL,
        low REAL NOT NULL,
        close REAL NOT NULL,
        volume REAL NOT NULL,
        trades INTEGER NOT NULL,
        first_ts INTEGER NOT NULL,
        last_ts INTEGER NOT NULL,
        PRIMARY KEY (symbol, timeframe, start)
    ) WITHOUT ROWID;
    """,
    # 4: seed 002's alerts are named by their purpose (compat.py), kept in `note`.
    # Nullable: alerts made through /api/v1/alerts have none.
    """
    ALTER TABLE alerts ADD COLUMN note TEXT;
    CREATE INDEX alerts_user_note ON alerts(user_id, note) WHERE note IS NOT NULL;
    """,
    # 5: which recovered data triggered an alert ("trade" or "kline"), if any.
    """
    ALTER TABLE alerts ADD COLUMN triggered_backfill TEXT
        CHECK (triggered_backfill IN ('trade', 'kline'));
    """,
    # 6: alert kinds (price, percent), repeat with cooldown, expiry (status EXPIRED), and an
    # event per trigger. SQLite cannot change a CHECK in place, so `alerts` is rebuilt (ids,
    # and the AUTOINCREMENT high-water mark, kept); `outbox` gets one row per event instead
    # of one per alert. Every alert triggered so far gets its one event.
    """
    CREATE TABLE alerts_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        asset TEXT NOT NULL,
        price REAL,
        direction TEXT NOT NULL CHECK (direction IN ('above', 'below', 'up', 'down', 'any')),
        status TEXT NOT NULL DEFAULT 'CREATED'
            CHECK (status IN ('CREATED', 'TRIGGERED', 'DELETED', 'EXPIRED')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        triggered_at REAL,
        triggered_price REAL,
        notified TEXT CHECK (notified IN ('pending', 'sent', 'failed')),
        note TEXT,
        triggered_backfill TEXT CHECK (triggered_backfill IN ('trade', 'kline')),
        kind TEXT NOT NULL DEFAULT 'price' CHECK (kind IN ('price', 'percent')),
        percent REAL,
        win TEXT,
        repeat INTEGER NOT NULL DEFAULT 0,
        cooldown REAL NOT NULL DEFAULT 3600,
        expires_at REAL,
        trigger_count INTEGER NOT NULL DEFAULT 0,
        rearm_at REAL,
        armed INTEGER NOT NULL DEFAULT 1
    );
    INSERT INTO alerts_new(id, user_id, asset, price, direction, status, created_at,
        updated_at, triggered_at, triggered_price, notified, note, triggered_backfill,
        trigger_count)
        SELECT id, user_id, asset, price, direction, status, created_at, updated_at,
            triggered_at, triggered_price, notified, note, triggered_backfill,
            triggered_at IS NOT NULL FROM alerts;
    DELETE FROM sqlite_sequence WHERE name = 'alerts_new';
    INSERT INTO sqlite_sequence(name, seq)
        SELECT 'alerts_new', seq FROM sqlite_sequence WHERE name = 'alerts';
    CREATE TABLE outbox_old AS SELECT * FROM outbox;
    DROP TABLE outbox;
    DROP TABLE alerts;
    ALTER TABLE alerts_new RENAME TO alerts;
    CREATE INDEX alerts_user_status ON alerts(user_id, status, id);
    CREATE INDEX alerts_status ON alerts(status);
    CREATE INDEX alerts_user_note ON alerts(user_id, note) WHERE note IS NOT NULL;
    CREATE INDEX alerts_expiring ON alerts(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id INTEGER NOT NULL REFERENCES alerts(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL,
        time REAL NOT NULL,
        price REAL NOT NULL,
        backfill TEXT CHECK (backfill IN ('trade', 'kline'))
    );
    CREATE INDEX events_alert ON events(alert_id, id);
    CREATE INDEX events_user ON events(user_id, id);
    INSERT INTO events(alert_id, user_id, time, price, backfill)
        SELECT id, user_id, triggered_at, triggered_price, triggered_backfill FROM alerts
        WHERE triggered_at IS NOT NULL ORDER BY triggered_at, id;
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        alert_id INTEGER NOT NULL REFERENCES alerts(id) ON DELETE CASCADE,
        event_id INTEGER UNIQUE REFERENCES events(id) ON DELETE CASCADE,
        recipient TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        sent_at REAL
    );
    CREATE INDEX outbox_due ON outbox(status, next_attempt_at);
    CREATE INDEX outbox_alert ON outbox(alert_id);
    INSERT INTO outbox(id, alert_id, event_id, recipient, status, attempts, next_attempt_at,
        last_error, created_at, sent_at)
        SELECT o.id, o.alert_id, (SELECT e.id FROM events e WHERE e.alert_id = o.alert_id),
            o.recipient, o.status, o.attempts, o.next_attempt_at, o.last_error, o.created_at,
            o.sent_at FROM outbox_old o WHERE o.alert_id IN (SELECT id FROM alerts);
    DROP TABLE outbox_old;
    """,
    # 7: notification channels (webhook, telegram) beside the user's email; one delivery row
    # per (event, channel) instead of one outbox row per event; verified email addresses.
    # Users who registered before verification existed keep receiving mail (verified = 1).
    """
    ALTER TABLE users ADD COLUMN email_verified INTEGER NOT NULL DEFAULT 0;
    UPDATE users SET email_verified = 1;
    CREATE TABLE email_codes (
        user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
        email TEXT NOT NULL,
        code_hash TEXT NOT NULL,
        expires_at REAL NOT NULL,
        tries_left INTEGER NOT NULL,
        sent_at REAL NOT NULL
    );
    CREATE TABLE channels (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        type TEXT NOT NULL CHECK (type IN ('webhook', 'telegram')),
        url TEXT,
        format TEXT CHECK (format IN ('json', 'discord', 'slack')),
        secret TEXT,
        chat_id TEXT,
        created_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE INDEX channels_user ON channels(user_id, id) WHERE deleted_at IS NULL;
    ALTER TABLE alerts ADD COLUMN channels TEXT;
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        alert_id INTEGER NOT NULL REFERENCES alerts(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL,
        channel TEXT NOT NULL CHECK (channel IN ('email', 'webhook', 'telegram')),
        channel_id INTEGER REFERENCES channels(id),
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'sent', 'failed', 'skipped')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        held INTEGER NOT NULL DEFAULT 0,
        digest INTEGER,
        last_error TEXT,
        recipient TEXT,
        created_at REAL NOT NULL,
        sent_at REAL
    );
    CREATE UNIQUE INDEX deliveries_event_channel
        ON deliveries(event_id, channel, COALESCE(channel_id, 0));
    CREATE INDEX deliveries_due ON deliveries(next_attempt_at, id) WHERE status = 'pending';
    CREATE INDEX deliveries_budget ON deliveries(user_id, channel, channel_id, sent_at)
        WHERE status = 'sent';
    CREATE INDEX deliveries_alert ON deliveries(alert_id);
    INSERT INTO deliveries(id, event_id, alert_id, user_id, channel, status, attempts,
        next_attempt_at, last_error, recipient, created_at, sent_at)
        SELECT o.id, o.event_id, o.alert_id, a.user_id, 'email', o.status, o.attempts,
            o.next_attempt_at, o.last_error, o.recipient, o.created_at, o.sent_at
        FROM outbox o JOIN alerts a ON a.id = o.alert_id WHERE o.event_id IS NOT NULL;
    DROP TABLE outbox;
    """,
]

# Version -> (query, message): after that migration is applied, each row of the query is
# logged as a warning with the message (%-style, one argument per column).
MIGRATION_WARNINGS: dict[int, tuple[str, str]] = {
    2: (
        "SELECT d.username, d.id, o.username, o.id FROM users d JOIN users o"
        " ON o.username_key = pw_username_key(d.username) WHERE d.username_key IS NULL"
        " ORDER BY d.id",
        "user %r (id %d) has the same normalised name as the older %r (id %d), which owns "
        "that name from now on; the newer user logs in by its exact name only",
    ),
}


async def migrate(db: aiosqlite.Connection) -> None:
    """Apply the migrations `db` lacks, each in its own transaction. Raises SchemaError for a
    database newer than this code."""
    # Migrations may call username_key() as pw_username_key().
    await db.create_function("pw_username_key", 1, username_key, deterministic=True)
    await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    async with db.execute("SELECT MAX(version) FROM schema_version") as cur:
        row = await cur.fetchone()
        assert row is not None  # an aggregate: always one row
        current = row[0] or 0
    if current > len(MIGRATIONS):
        raise SchemaError(
            f"database schema version {current} is newer than this pricewatch ({len(MIGRATIONS)})"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version - 1]):
                await db.execute(statement)
            await db.execute("INSERT INTO schema_version(version) VALUES (?)", (version,))
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        await db.execute("COMMIT")
        log.info("database migrated to schema version %d", version)
        if version in MIGRATION_WARNINGS:
            query, message = MIGRATION_WARNINGS[version]
            for row in await db.execute_fetchall(query):
                log.warning(message, *row)


def _statements(script: str) -> list[str]:
    """Split a migration script on `;` (migrations hold no semicolons inside literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]
