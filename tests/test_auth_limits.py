"""Registration limit per client address, and logins that guesses cannot lock out."""

from __future__ import annotations

import asyncio
from ipaddress import ip_network

from conftest import LiveServer
from test_auth import post

LOOPBACK = (ip_network("127.0.0.1/32"),)  # the test client is a trusted proxy: XFF counts


def sign_up(name: str, password: str = "correct horse") -> dict:
    return {"username": name, "password": password, "email": f"{name}@example.com"}


def login(name: str, password: str = "correct horse") -> dict:
    return {"username": name, "password": password}


def frm(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_registrations_per_address_are_limited_even_in_parallel(make_settings, http):
    async with LiveServer(make_settings(register_limit=3, trusted_proxies=LOOPBACK)) as server:
        # Invalid bodies and taken names never reach bcrypt: they do not count.
        status, _, _ = await post(
            http, server, "/auth/register", {"username": "x"}, headers=frm("10.0.0.1")
        )
        assert status == 400
        results = await asyncio.gather(
            *(
                post(http, server, "/auth/register", sign_up(f"user{i}"), headers=frm("10.0.0.1"))
                for i in range(8)
            )
        )
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [201] * 3 + [429] * 5, statuses
        status, err, headers = next(r for r in results if r[0] == 429)
        assert err["error"] == "rate_limited"
        assert 3000 < int(headers["Retry-After"]) <= 3600
        # Past the limit a taken name is 429 too; another address is not affected.
        status, _, _ = await post(
            http, server, "/auth/register", sign_up("user0"), headers=frm("10.0.0.1")
        )
        assert status == 429
        status, _, _ = await post(
            http, server, "/auth/register", sign_up("user0"), headers=frm("10.0.0.2")
        )
        assert status == 409
        status, _, _ = await post(
            http, server, "/auth/register", sign_up("other"), headers=frm("10.0.0.2")
        )
        assert status == 201


async def test_guesses_from_elsewhere_never_lock_out_a_known_address(make_settings, http):
    async with LiveServer(make_settings(trusted_proxies=LOOPBACK)) as server:
        status, _, _ = await post(
            http, server, "/auth/register", sign_up("alice"), headers=frm("192.0.2.10")
        )
        assert status == 201
        status, _, _ = await post(
            http, server, "/auth/token", login("alice"), headers=frm("198.51.100.7")
        )  # alice, on the road
        assert status == 200
        # Ten wrong guesses from ten addresses lock the username (no address is limited).
        for i in range(10):
            status, _, _ = await post(
                http, server, "/auth/token", login("ALICE", "guess"), headers=frm(f"203.0.113.{i}")
            )
            assert status == 401
        for address in ("203.0.113.50", "203.0.113.0"):  # unknown addresses: refused
            status, err, _ = await post(
                http, server, "/auth/token", login("alice"), headers=frm(address)
            )
            assert status == 429 and err["error"] == "rate_limited"
        # Both addresses alice logged in from still get in, in any spelling of her name.
        for address, name in (("192.0.2.10", "alice"), ("198.51.100.7", "Alice")):
            status, pair, _ = await post(
                http, server, "/auth/token", login(name), headers=frm(address)
            )
            assert status == 200 and pair["access"], (address, status)
        # Her logins did not clear the guesses: an unknown address is still refused.
        status, _, _ = await post(
            http, server, "/auth/token", login("alice"), headers=frm("203.0.113.51")
        )
        assert status == 429


async def test_a_known_address_is_still_bound_by_its_own_limit(make_settings, http):
    async with LiveServer(make_settings(trusted_proxies=LOOPBACK)) as server:
        status, _, _ = await post(
            http, server, "/auth/register", sign_up("bob"), headers=frm("192.0.2.20")
        )
        assert status == 201
        for i in range(10):  # the username is locked by guesses from elsewhere
            status, _, _ = await post(
                http, server, "/auth/token", login("bob", "guess"), headers=frm(f"203.0.113.{i}")
            )
            assert status == 401
        # The known address's wrong passwords go through bcrypt (401) and count against that
        # address: parallel ones too, so at most ten per window.
        results = await asyncio.gather(
            *(
                post(
                    http,
                    server,
                    "/auth/token",
                    login("bob", f"wrong {i}"),
                    headers=frm("192.0.2.20"),
                )
                for i in range(20)
            )
        )
        codes = sorted(status for status, _, _ in results)
        assert codes.count(401) == 10 and codes.count(429) == 10, codes
        status, _, _ = await post(
            http, server, "/auth/token", login("bob"), headers=frm("192.0.2.20")
        )
        assert status == 429  # now its own limit refuses even the right password
