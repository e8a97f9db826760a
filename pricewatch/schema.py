"""The database schema, as ordered migrations (applied by store.py at startup).

Index + 1 is the schema version recorded in `schema_version`. Append only: never edit a
migration that has shipped; add a new one.
"""

from __future__ import annotations

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
    # 2: closed (and open) candles of every timeframe, so charts survive restarts.
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
    # 3 (compat.py, issue 15): seed 002's alerts are named by their purpose; kept in `note`.
    # Nullable: alerts made through /api/v1/alerts have none. (Appended by the seed-compat
    # work while the schema is being changed elsewhere too: renumber at merge if needed.)
    """
    ALTER TABLE alerts ADD COLUMN note TEXT;
    CREATE INDEX alerts_user_note ON alerts(user_id, note) WHERE note IS NOT NULL;
    """,
]
