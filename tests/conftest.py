"""Shared fixtures: settings on a temp SQLite file, a real server on a free loopback port."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from fake_binance import FakeBinance

from pricewatch import clock
from pricewatch.config import Settings
from pricewatch.httpd import make_runner
from pricewatch.server import create_app


class LiveServer:
    """`create_app(settings)` served on 127.0.0.1 on a free port, as an async context, by the
    same runner as `python -m pricewatch` (slow-client limits included)."""

    def __init__(self, settings: Settings, port: int = 0):
        self.settings = settings
        self.port = port  # 0: any free port; fixed to restart a server where clients wait
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> LiveServer:
        self.app = create_app(self.settings)
        self._runner = make_runner(self.app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    def ws_url(self, path: str) -> str:
        return "ws" + self.url[len("http") :] + path


@pytest.fixture
def make_settings(tmp_path):
    """Settings for a test: temp DB, cheap bcrypt, no feed; override any field.

    Binance REST points at a closed loopback port unless a test passes its fake's
    `rest_url`: no test may reach the internet (backfill after a gap then gives up at once).
    """

    base = Settings(
        db=str(tmp_path / "pricewatch.db"),
        bcrypt_rounds=4,
        feed="off",
        binance_rest_url="http://127.0.0.1:9",
    )

    def make(**overrides) -> Settings:
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
async def server(make_settings) -> AsyncIterator[LiveServer]:
    async with LiveServer(make_settings()) as live:
        yield live


@pytest.fixture
async def fake() -> AsyncIterator[FakeBinance]:
    """A fake Binance (websocket streams and REST market data) on a free loopback port."""
    async with FakeBinance() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def register(
    http: aiohttp.ClientSession,
    server: LiveServer,
    username: str = "alice",
    password: str = "correct horse",
    email: str | None = None,
    verified: bool = True,
) -> dict:
    """Register a user through the API; returns the 201 body (id, tokens...). `verified`:
    mark the email address verified, as the code mailed to it would (no alert mail goes to
    an unverified address; tests of the verification itself pass False)."""
    async with http.post(
        server.url + "/auth/register",
        json={
            "username": username,
            "password": password,
            "email": email or f"{username}@example.com",
        },
    ) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
    if verified:
        mark_verified(server.settings.db, body["id"])
    return body


def mark_verified(db_path: str, user_id: int) -> None:
    """Set the user's email_verified in the database file, beside the running server (a
    test shortcut for the verification code round trip, which tests/test_verify.py covers)."""
    with sqlite3.connect(db_path, timeout=10) as db:
        db.execute("UPDATE users SET email_verified = 1 WHERE id = ?", (user_id,))
    db.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def later(monkeypatch):
    """Move pricewatch's wall clock forward: `later(3601)` (budgets, digests, expiries)."""
    offset = [0.0]
    real = clock.now
    monkeypatch.setattr(clock, "now", lambda: real() + offset[0])

    def advance(seconds: float) -> None:
        offset[0] += seconds

    return advance
