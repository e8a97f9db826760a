"""Row shapes and SQL shared by alerts.py and deliveries.py: the alert columns and their
parser, a user's channel ids, an event's deliveries. A leaf: it imports neither."""

from __future__ import annotations

import sqlite3

import orjson

from ..records import EMAIL, Alert

ALERT_COLS = (
    "id, user_id, asset, price, direction, status, created_at, triggered_at, "
    "triggered_price, notified, note, triggered_backfill, kind, percent, win, "
    "repeat, cooldown, expires_at, trigger_count, rearm_at, armed, channels"
)


def parse_alert(row) -> Alert:
    # channels NULL: an alert from before channels existed, which only ever mailed.
    channels = tuple(orjson.loads(row[21])) if row[21] is not None else (EMAIL,)
    return Alert(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
        row[13],
        row[14],
        bool(row[15]),
        row[16],
        row[17],
        row[18],
        row[19],
        bool(row[20]),
        channels=channels,
    )


# The event's deliveries as JSON [[channel id or "email", type, state], ...], by delivery id.
EVENT_DELIVERIES = (
    "(SELECT json_group_array(json_array(COALESCE(x.channel_id, 'email'), x.channel,"
    " x.status)) FROM (SELECT * FROM deliveries d WHERE d.event_id = e.id ORDER BY d.id) x)"
)


def insert_deliveries(
    db: sqlite3.Connection, event_id: int, alert_id: int, now: float
) -> tuple[tuple[int | str, str, str], ...]:
    """Inside a trigger's transaction (on the writer's thread): one pending delivery per
    channel the alert chose (the email only while the user has an address; deleted channels
    never). Returns the event's deliveries as ((channel id, type, state), ...)."""
    db.execute(
        "INSERT INTO deliveries(event_id, alert_id, user_id, channel, channel_id,"
        " next_attempt_at, created_at)"
        " SELECT ?, a.id, a.user_id, 'email', NULL, ?, ? FROM alerts a"
        " JOIN users u ON u.id = a.user_id WHERE a.id = ? AND u.email <> ''"
        " AND (a.channels IS NULL"
        " OR EXISTS (SELECT 1 FROM json_each(a.channels) j WHERE j.value = 'email'))",
        (event_id, now, now, alert_id),
    )
    db.execute(
        "INSERT INTO deliveries(event_id, alert_id, user_id, channel, channel_id,"
        " next_attempt_at, created_at)"
        " SELECT ?, a.id, a.user_id, c.type, c.id, ?, ? FROM alerts a"
        " JOIN channels c ON c.user_id = a.user_id AND c.deleted_at IS NULL"
        " WHERE a.id = ?"
        " AND EXISTS (SELECT 1 FROM json_each(a.channels) j WHERE j.value = c.id)"
        " ORDER BY c.id",
        (event_id, now, now, alert_id),
    )
    return tuple(
        tuple(r)
        for r in db.execute(
            "SELECT COALESCE(channel_id, 'email'), channel, status FROM deliveries"
            " WHERE event_id = ? ORDER BY id",
            (event_id,),
        )
    )


# A user's channel ids, params (user id, user id): "email" while they have an address, then
# the other channels by id.
CHANNEL_IDS = (
    "SELECT 'email' FROM users WHERE id = ? AND email <> '' UNION ALL"
    " SELECT * FROM (SELECT id FROM channels WHERE user_id = ?"
    " AND deleted_at IS NULL ORDER BY id)"
)
