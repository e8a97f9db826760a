"""Tokens that are signed but unusable, tokens of deleted users, and secrets in the log."""

from __future__ import annotations

import logging
import re
import sqlite3

import aiohttp
import jwt
import pytest
from conftest import LiveServer, bearer, register
from test_auth import INVALID, get, post

from pricewatch.openapi import OPERATIONS

SECRET = "test-secret-" + "s" * 40
BODIES = {
    "/api/v1/alerts": {"asset": "BTCUSDT", "price": 1.0, "direction": "above"},
    "/api/v1/quotes": {"from_currency": "BTC", "to_currency": "USD"},
    "/api/v1/feeds": {"url": "wss://example.com/ws"},
    "/save_quotes": {"url": "wss://example.com/ws"},
}


def authenticated_routes() -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document that needs a token, path ids filled in."""
    return [
        (method, re.sub(r"\{\w+\}", "1", path))
        for (method, path), entry in OPERATIONS.items()
        if entry["auth"] is not None
    ]


async def refusals(http, server: LiveServer, token: str) -> list[str]:
    """Each authenticated route (and the websocket upgrade, token in the query) that does
    not answer `token` with 401 not_authenticated; empty when all do."""
    wrong = []
    for method, path in authenticated_routes():
        body = BODIES.get(path) if method in ("POST", "PUT", "PATCH") else None
        async with http.request(
            method, server.url + path, json=body, headers=bearer(token)
        ) as resp:
            answer = (resp.status, await resp.text())
        if answer[0] != 401 or '"not_authenticated"' not in answer[1]:
            wrong.append(f"{method} {path}: {answer}")
    try:
        async with http.ws_connect(server.ws_url(f"/live-feed/subscribe/?token={token}")):
            wrong.append("websocket upgrade accepted")
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status != 401:
            wrong.append(f"websocket upgrade: {exc.status}")
    return wrong


def forge(token: str, **changes) -> str:
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    return jwt.encode({**claims, **changes}, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "changes",
    [
        {"user_id": 2**70},
        {"user_id": True},
        {"user_id": "1"},
        {"user_id": 0},
        {"user_id": 1.0},
        {"exp": "9999999999"},
        {"exp": float("inf")},
        {"iat": "1"},
        {"fam": 5},
        {"jti": ["x"]},
        {"exp": 10**400},
        {"iat": -(10**400)},
    ],
    ids=lambda changes: repr(changes)[:40],
)
async def test_signed_tokens_with_malformed_claims_are_401_everywhere(make_settings, http, changes):
    async with LiveServer(make_settings(jwt_secret=SECRET)) as server:
        reg = await register(http, server)  # user 1 exists: `true` must not reach it
        assert await refusals(http, server, forge(reg["access"], **changes)) == []
        refresh = forge(reg["refresh"], **changes)
        for path in ("/auth/token/refresh", "/auth/logout"):
            status, body, _ = await post(http, server, path, {"refresh": refresh})
            assert (status, body) == (401, INVALID), path
        assert (await get(http, server, "/auth/me", reg["access"]))[0] == 200  # still fine


async def test_tokens_of_a_deleted_user_are_401_everywhere(make_settings, http):
    async with LiveServer(make_settings()) as server:
        alice = await register(http, server, "alice")
        bob = await register(http, server, "bob")
        status, _, _ = await post(
            http,
            server,
            "/api/v1/alerts",
            BODIES["/api/v1/alerts"],
            headers=bearer(alice["access"]),
        )
        assert status == 201
        # As an operator would, while the server runs (sqlite3's default: no FK cascade,
        # so her refresh tokens and alerts stay behind).
        with sqlite3.connect(server.settings.db) as db:
            db.execute("DELETE FROM users WHERE username = 'alice'")
        assert await refusals(http, server, alice["access"]) == []
        for path in ("/auth/token/refresh", "/auth/logout"):
            status, body, _ = await post(http, server, path, {"refresh": alice["refresh"]})
            assert (status, body) == (401, INVALID), path
        assert (await get(http, server, "/auth/me", bob["access"]))[0] == 200


async def test_no_secret_reaches_the_log_at_debug(make_settings, http, caplog):
    caplog.set_level(logging.DEBUG)  # the root logger: every library's records
    async with LiveServer(make_settings()) as server:
        reg = await register(http, server, "alice", password="hunter2 but longer")
        status, pair, _ = await post(
            http, server, "/auth/token", {"username": "alice", "password": "hunter2 but longer"}
        )
        assert status == 200
        status, rotated, _ = await post(
            http, server, "/auth/token/refresh", {"refresh": pair["refresh"]}
        )
        assert status == 200
        assert (await get(http, server, "/auth/me", rotated["access"]))[0] == 200
        status, _, _ = await post(http, server, "/auth/logout", {"refresh": rotated["refresh"]})
        assert status == 204
        with sqlite3.connect(server.settings.db) as db:
            (jwt_secret,) = db.execute(
                "SELECT value FROM settings WHERE key = 'jwt_secret'"
            ).fetchone()
            (password_hash,) = db.execute("SELECT password_hash FROM users").fetchone()
            jtis = [r[0] for r in db.execute("SELECT jti FROM refresh_tokens")]
    tokens = [reg["access"], reg["refresh"], *pair.values(), *rotated.values()]
    secrets = {
        "jwt secret": jwt_secret,
        "password": "hunter2 but longer",
        "hash": password_hash,
        "hash salt": password_hash[7:29],
        **{f"jti {i}": jti for i, jti in enumerate(jtis)},
        **{f"token {i}": t for i, t in enumerate(tokens)},
        **{f"token {i} signature": t.rsplit(".", 1)[1] for i, t in enumerate(tokens)},
    }
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s %(exc_text)s")
    text = "\n".join(formatter.format(record) for record in caplog.records)
    assert len(caplog.records) > 5  # the log was really captured
    leaked = [name for name, secret in secrets.items() if secret in text]
    assert leaked == [], leaked
