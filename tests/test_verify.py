"""Verified email end to end: a real server, aiosmtpd catching the code mails, real SQLite.

Time is moved by editing the stored code (`sent_at`, `expires_at`), never by sleeping.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time

import pytest
from conftest import LiveServer, bearer, register
from fake_binance import free_port
from smtp_sink import SmtpSink
from test_alerts import Trader, market_settings

from pricewatch.delivery.outbox import WAIT_VERIFIED
from pricewatch.server import DELIVERER, STORE
from pricewatch.verify_api import CODE_MAIL, SUBJECT

CODE_RE = re.compile(r"\b(\d{6})\b")


@pytest.fixture
async def smtp():
    async with SmtpSink() as sink:
        yield sink


def mail_settings(make_settings, smtp_port: int | None, **overrides):
    return make_settings(
        smtp_host="127.0.0.1" if smtp_port else None, smtp_port=smtp_port or 25, **overrides
    )


def code_of(message) -> str:
    match = CODE_RE.search(message.get_content())
    assert match, message.get_content()
    return match.group(1)


def other(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


async def post(http, server, path, token, body=None):
    async with http.post(server.url + path, json=body, headers=bearer(token)) as resp:
        return resp.status, await resp.json(), resp.headers


async def me(http, server, token) -> dict:
    async with http.get(server.url + "/auth/me", headers=bearer(token)) as resp:
        assert resp.status == 200
        return await resp.json()


async def patch_email(http, server, token, email):
    async with http.patch(
        server.url + "/auth/me/", json={"email": email}, headers=bearer(token)
    ) as resp:
        return resp.status, await resp.json(), resp.headers


async def age_code(server, user_id: int, seconds: float, column: str = "sent_at") -> None:
    """Move the user's code `seconds` into the past (when it was sent, or when it expires)."""
    assert column in ("sent_at", "expires_at")
    async with server.app[STORE]._tx() as db:
        cur = await db.execute(
            f"UPDATE email_codes SET {column} = {column} - ? WHERE user_id = ?", (seconds, user_id)
        )
        assert cur.rowcount == 1


async def code_row(server, user_id: int):
    return await server.app[STORE]._one(
        "SELECT email, code_hash, tries_left FROM email_codes WHERE user_id = ?", (user_id,)
    )


async def test_register_mails_a_code_that_verifies_the_address(make_settings, http, smtp):
    async with LiveServer(mail_settings(make_settings, smtp.port)) as server:
        user = await register(http, server, "alice", email="alice@example.com", verified=False)
        token = user["access"]
        [message] = await smtp.wait_codes(1)
        assert message["To"] == "alice@example.com"
        assert message["Subject"] == SUBJECT
        assert "24 hours" in message.get_content()
        # Built as alert mail is: some providers refuse mail without Message-ID or Date.
        assert re.fullmatch(r"<pricewatch\.code\.[0-9a-f]{24}@[^<>@\s]+>", message["Message-ID"]), (
            message["Message-ID"]
        )
        assert message["Date"].datetime.timestamp() == pytest.approx(time.time(), abs=300)
        assert message["From"] == server.settings.mail_from
        code = code_of(message)
        assert (await me(http, server, token))["email_verified"] is False
        email, stored, tries = await code_row(server, user["id"])
        assert (email, tries) == ("alice@example.com", 5)
        assert code not in stored and len(stored) == 64  # only a keyed hash is kept

        status, body, _ = await post(
            http, server, "/auth/verify-email", token, {"code": other(code)}
        )
        assert status == 400 and body["error"] == "validation"
        assert "4 tries left" in body["fields"]["code"]
        for bad in ("12345", "1234567", "abcdef", "１２３４５６", 123456):
            status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": bad})
            assert status == 400 and "code" in body["fields"], bad
        assert (await code_row(server, user["id"]))[2] == 4  # malformed codes cost no try

        status, body, _ = await post(http, server, "/auth/verify-email/", token, {"code": code})
        assert (status, body) == (200, {"email_verified": True})
        assert (await me(http, server, token))["email_verified"] is True
        assert await code_row(server, user["id"]) is None
        # Verified already: the same answer; no resend.
        status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": code})
        assert (status, body) == (200, {"email_verified": True})
        status, body, _ = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 409 and body["error"] == "conflict"
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 1


async def test_five_wrong_tries_spend_the_code_until_a_resend(make_settings, http, smtp):
    async with LiveServer(mail_settings(make_settings, smtp.port)) as server:
        user = await register(http, server, "bob", verified=False)
        token = user["access"]
        code = code_of((await smtp.wait_codes(1))[0])
        for left in (4, 3, 2, 1):
            status, body, _ = await post(
                http, server, "/auth/verify-email", token, {"code": other(code)}
            )
            assert status == 400 and f"{left} tr" in body["fields"]["code"]
        status, body, _ = await post(
            http, server, "/auth/verify-email", token, {"code": other(code)}
        )
        assert status == 400 and "new one" in body["fields"]["code"]
        # The right code is refused now, however often it is tried.
        for _ in range(3):
            status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": code})
            assert status == 400 and "new one" in body["fields"]["code"]
        # A new code only a minute after the last: at most 5 guesses a minute.
        status, body, headers = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 429 and body["error"] == "rate_limited"
        assert 1 <= int(headers["Retry-After"]) <= 60
        await age_code(server, user["id"], 61)
        status, body, _ = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 202 and body["email"] == "bob@example.com"
        new = code_of((await smtp.wait_codes(2))[1])
        if new != code:  # the old code is dead (unless chance drew it again)
            status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": code})
            assert status == 400 and "4 tries left" in body["fields"]["code"]
        status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": new})
        assert (status, body) == (200, {"email_verified": True})


async def test_resend_twice_within_a_minute_is_rate_limited(make_settings, http, smtp):
    async with LiveServer(mail_settings(make_settings, smtp.port)) as server:
        user = await register(http, server, "carol", verified=False)
        token = user["access"]
        await smtp.wait_codes(1)
        await age_code(server, user["id"], 61)
        status, _, _ = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 202
        status, body, headers = await post(http, server, "/auth/verify-email/resend/", token)
        assert status == 429 and body["error"] == "rate_limited"
        assert 59 <= int(headers["Retry-After"]) <= 60
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 2


async def test_changing_the_email_unverifies_it_and_mails_the_new_address(
    make_settings, http, smtp
):
    async with LiveServer(mail_settings(make_settings, smtp.port)) as server:
        user = await register(http, server, "dave", email="dave@example.com", verified=False)
        token = user["access"]
        code = code_of((await smtp.wait_codes(1))[0])
        assert (await post(http, server, "/auth/verify-email", token, {"code": code}))[0] == 200

        for bad in ("not an email", "a@b", "", None, 5, "x" * 250 + "@example.com"):
            status, body, _ = await patch_email(http, server, token, bad)
            assert status == 400 and "email" in body["fields"], bad
        status, body, _ = await patch_email(http, server, token, "dave@example.com")
        assert status == 200 and body["email_verified"] is True  # the same: nothing changes

        status, body, _ = await patch_email(http, server, token, "dave@example.org")
        assert status == 200
        assert body == {
            "id": user["id"],
            "username": "dave",
            "email": "dave@example.org",
            "is_admin": False,
            "email_verified": False,
        }
        assert await me(http, server, token) == body
        message = (await smtp.wait_codes(2))[1]
        assert message["To"] == "dave@example.org"
        new = code_of(message)
        # Another change within the minute would mail a third code: refused, nothing changed.
        status, body, headers = await patch_email(http, server, token, "dave@example.net")
        assert status == 429 and "Retry-After" in headers
        assert (await me(http, server, token))["email"] == "dave@example.org"

        status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": new})
        assert (status, body) == (200, {"email_verified": True})
        assert (await me(http, server, token))["email_verified"] is True
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 2


async def test_an_expired_code_is_refused(make_settings, http, smtp):
    async with LiveServer(mail_settings(make_settings, smtp.port)) as server:
        user = await register(http, server, "erin", verified=False)
        token = user["access"]
        code = code_of((await smtp.wait_codes(1))[0])
        await age_code(server, user["id"], 24 * 3600, column="expires_at")
        status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": code})
        assert status == 400 and "new one" in body["fields"]["code"]
        assert (await me(http, server, token))["email_verified"] is False


async def test_without_smtp_no_code_is_sent_and_resend_is_unavailable(make_settings, http):
    async with LiveServer(mail_settings(make_settings, None)) as server:
        user = await register(http, server, "frank", verified=False)
        token = user["access"]
        assert (await me(http, server, token))["email_verified"] is False
        assert await code_row(server, user["id"]) is None
        status, body, _ = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 503 and body["error"] == "unavailable"
        status, body, _ = await post(http, server, "/auth/verify-email", token, {"code": "123456"})
        assert status == 400 and "No code" in body["fields"]["code"]
        status, body, _ = await patch_email(http, server, token, "frank@example.org")
        assert status == 200 and body["email_verified"] is False
        assert await code_row(server, user["id"]) is None


async def test_register_answers_at_once_when_smtp_is_down(make_settings, http):
    port = free_port()  # nothing listens yet
    async with LiveServer(mail_settings(make_settings, port, smtp_timeout=2.0)) as server:
        user = await register(http, server, "gina", verified=False)
        mail = server.app[CODE_MAIL]
        await mail.drained()
        assert (mail.sent, mail.failed) == (0, 1)
        async with SmtpSink(port=port) as smtp:
            await age_code(server, user["id"], 61)
            status, _, _ = await post(http, server, "/auth/verify-email/resend", user["access"])
            assert status == 202
            code = code_of((await smtp.wait_codes(1))[0])
        status, body, _ = await post(
            http, server, "/auth/verify-email", user["access"], {"code": code}
        )
        assert (status, body) == (200, {"email_verified": True})


async def test_seed_registrations_send_a_code_too(make_settings, http, smtp):
    async with LiveServer(mail_settings(make_settings, smtp.port)) as server:
        async with http.post(
            server.url + "/users/auth/register/",
            json={"username": "henry", "password": "correct horse", "email": "henry@example.com"},
        ) as resp:
            assert resp.status == 201
        [message] = await smtp.wait_codes(1)
        assert message["To"] == "henry@example.com"
        # Seed 000 may leave the email out: nothing to verify, nothing sent.
        async with http.post(
            server.url + "/feed/user/register/",
            json={"username": "ivan", "password": "correct horse"},
        ) as resp:
            assert resp.status == 201
            token = (await resp.json())["access_token"]
        body = await me(http, server, token)
        assert (body["email"], body["email_verified"]) == ("", False)
        assert await code_row(server, body["id"]) is None
        status, answer, _ = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 409
        status, answer, _ = await post(
            http, server, "/auth/verify-email", token, {"code": "123456"}
        )
        assert status == 409
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 1


async def test_verification_routes_need_a_token(server, http):
    for method, path, body in [
        ("POST", "/auth/verify-email", {"code": "123456"}),
        ("POST", "/auth/verify-email/resend", None),
        ("PATCH", "/auth/me", {"email": "x@example.com"}),
    ]:
        async with http.request(method, server.url + path, json=body) as resp:
            assert resp.status == 401, path
            assert (await resp.json())["error"] == "not_authenticated"


async def test_createuser_users_are_verified(make_settings, tmp_path, http, smtp):
    import subprocess

    settings = mail_settings(make_settings, smtp.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env.update(
        PRICEWATCH_DB=settings.db, PRICEWATCH_PASSWORD="admin pass 1", PRICEWATCH_BCRYPT_ROUNDS="4"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pricewatch", "createuser", "root", "--email", "root@example.com"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    async with LiveServer(settings) as server:
        async with http.post(
            server.url + "/auth/token", json={"username": "root", "password": "admin pass 1"}
        ) as resp:
            token = (await resp.json())["access"]
        assert (await me(http, server, token))["email_verified"] is True
        status, _, _ = await post(http, server, "/auth/verify-email/resend", token)
        assert status == 409
    assert smtp.codes == []


# -- alert mail and verification (the Deliverer) ---------------------------------------------


async def email_delivery(server, alert_id: int) -> dict:
    row = await server.app[STORE]._one(
        "SELECT id, status, next_attempt_at, created_at, last_error FROM deliveries"
        " WHERE alert_id = ? AND channel = 'email'",
        (alert_id,),
    )
    assert row is not None
    return dict(zip(("id", "status", "next_attempt_at", "created_at", "last_error"), row))


async def set_aside(server, alert_id: int, timeout: float = 10.0) -> dict:
    """Wait until the Deliverer has looked at the alert's email delivery and set it aside
    for the unverified address (due again only when its 24 h are up)."""
    deadline = time.monotonic() + timeout
    while True:
        row = await email_delivery(server, alert_id)
        if row["next_attempt_at"] >= row["created_at"] + WAIT_VERIFIED:
            return row
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.02)


async def test_alert_mail_waits_for_verification_then_goes_once(make_settings, http, fake, smtp):
    async with LiveServer(market_settings(make_settings, fake, smtp.port)) as server:
        user = await register(http, server, "kim", verified=False)
        tok = user["access"]
        code = code_of((await smtp.wait_codes(1))[0])
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            alert = await market.cross_new_alert()
            assert (await market.alert_event(alert["id"]))["status"] == "TRIGGERED"
            row = await set_aside(server, alert["id"])
            assert row["status"] == "pending" and deliverer.sent == 0
            assert smtp.messages == []  # no alert mail to an unverified address

            status, body, _ = await post(http, server, "/auth/verify-email", tok, {"code": code})
            assert (status, body) == (200, {"email_verified": True})
            await deliverer.wait_until(lambda: deliverer.sent >= 1, timeout=10)
            [message] = await smtp.wait_messages(1)
            assert message["To"] == "kim@example.com"
            assert (await email_delivery(server, alert["id"]))["status"] == "sent"
            # A second verification (already verified) sends nothing again.
            await post(http, server, "/auth/verify-email", tok, {"code": code})
        await server.app[CODE_MAIL].drained()
    assert len(smtp.messages) == 1 and deliverer.sent == 1


async def test_alert_mail_unverified_for_24_hours_is_skipped(make_settings, http, fake, smtp):
    async with LiveServer(market_settings(make_settings, fake, smtp.port)) as server:
        user = await register(http, server, "lea", verified=False)
        tok = user["access"]
        code = code_of((await smtp.wait_codes(1))[0])
        deliverer = server.app[DELIVERER]
        async with Trader(fake, server, http, tok) as market:
            alert = await market.cross_new_alert()
            row = await set_aside(server, alert["id"])
            async with server.app[STORE]._tx() as db:  # queued 25 h ago, due now
                await db.execute(
                    "UPDATE deliveries SET created_at = created_at - ?,"
                    " next_attempt_at = created_at - ? WHERE id = ?",
                    (25 * 3600, 25 * 3600, row["id"]),
                )
            deliverer.wake()
            await deliverer.wait_until(lambda: deliverer.skipped >= 1, timeout=10)
            row = await email_delivery(server, alert["id"])
            assert row["status"] == "skipped" and "24 h" in row["last_error"]
            # Verifying now does not bring it back.
            status, _, _ = await post(http, server, "/auth/verify-email", tok, {"code": code})
            assert status == 200
            deliverer.wake()
            assert (await email_delivery(server, alert["id"]))["status"] == "skipped"
        await server.app[CODE_MAIL].drained()
    assert smtp.messages == [] and deliverer.sent == 0


async def test_no_address_gets_more_than_three_codes_an_hour_whoever_asks(
    make_settings, http, smtp
):
    settings = mail_settings(make_settings, smtp.port, register_limit=100)
    async with LiveServer(settings) as server:
        victim = "victim@example.com"
        users = [
            await register(http, server, f"bomber{i}", email=victim, verified=False)
            for i in range(5)
        ]
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 3  # five registrations, three code mails
        for user in users:
            if await code_row(server, user["id"]) is not None:
                await age_code(server, user["id"], 61)  # the per-account minute is over
            status, body, headers = await post(
                http, server, "/auth/verify-email/resend", user["access"]
            )
            assert status == 429 and body["error"] == "rate_limited", body
            assert int(headers["Retry-After"]) > 60
        status, body, _ = await patch_email(http, server, users[4]["access"], "VICTIM@example.com")
        assert status == 429, body  # the same address in another case is the same address
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 3


async def test_wrong_codes_are_limited_per_client_address(make_settings, http, smtp):
    settings = mail_settings(make_settings, smtp.port, register_limit=100)
    async with LiveServer(settings) as server:
        from pricewatch.verify_api import VERIFY_FAILURES

        tokens = [
            (await register(http, server, f"guess{i}", verified=False))["access"]
            for i in range(VERIFY_FAILURES // 5 + 1)
        ]
        guesses = 0
        for token in tokens:  # five wrong tries per account, from one client address
            for _ in range(5):
                status, body, headers = await post(
                    http, server, "/auth/verify-email", token, {"code": "000000"}
                )
                if status == 429:
                    assert body["error"] == "rate_limited" and int(headers["Retry-After"]) > 0
                    assert guesses == VERIFY_FAILURES
                    return
                assert status == 400
                guesses += 1
        raise AssertionError(f"{guesses} wrong codes were judged")


def test_a_mailbox_is_the_address_without_case_or_plus_tag():
    from pricewatch.verify_api import mailbox

    assert mailbox("Victim+1@Example.com") == "victim@example.com"
    assert mailbox(" victim+a+b@example.com ") == "victim@example.com"
    assert mailbox("victim@example.com") == "victim@example.com"
    assert mailbox("+only@example.com") == "+only@example.com"  # no local part left: kept


async def test_plus_tags_and_case_do_not_make_another_mailbox(make_settings, http, smtp):
    settings = mail_settings(make_settings, smtp.port, register_limit=100)
    async with LiveServer(settings) as server:
        users = [
            await register(
                http, server, f"bomber{i}", email=f"Victim+{i}@Example.com", verified=False
            )
            for i in range(5)
        ]
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 3  # five registrations, one mailbox, three code mails
        status, body, _ = await patch_email(
            http, server, users[4]["access"], "VICTIM+other@example.COM"
        )
        assert status == 429, body
        status, body, _ = await patch_email(http, server, users[4]["access"], "victim@example.com")
        assert status == 429, body
        await server.app[CODE_MAIL].drained()
        assert len(smtp.codes) == 3
