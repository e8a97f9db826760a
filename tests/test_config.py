"""Settings from env and .env; the command line's config errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pricewatch.config import ConfigError, Settings


def test_defaults_match_the_contract():
    s = Settings.from_env({}, dotenv=None)
    assert (s.host, s.port, s.db) == ("127.0.0.1", 8000, "./pricewatch.db")
    assert (s.access_ttl, s.refresh_ttl) == (1800, 604800)
    assert s.symbols == ("BTCUSDT", "ETHUSDT") and s.feed == "binance"
    assert s.binance_ws_url == "wss://stream.binance.com:9443"
    assert s.alphavantage_url == "https://www.alphavantage.co/query"
    assert s.alphavantage_api_key is None and s.alphavantage_interval == 3600
    assert s.quote_pairs == (("BTC", "USD"),)
    assert (s.smtp_host, s.smtp_port, s.smtp_starttls) == (None, 25, False)
    assert s.mail_from == "pricewatch@localhost"


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nexport PRICEWATCH_PORT=9001\n"
                        "PRICEWATCH_SYMBOLS='btcusdt, solusdt'\nPRICEWATCH_FEED=demo\n")
    s = Settings.from_env({"PRICEWATCH_FEED": "off"}, dotenv=env_file)
    assert s.port == 9001 and s.symbols == ("BTCUSDT", "SOLUSDT") and s.feed == "off"


@pytest.mark.parametrize("name, value", [
    ("PRICEWATCH_PORT", "abc"), ("PRICEWATCH_PORT", "70000"),
    ("PRICEWATCH_ACCESS_TTL", "0"), ("PRICEWATCH_SMTP_STARTTLS", "maybe"),
    ("PRICEWATCH_SYMBOLS", "BTC-USDT"), ("PRICEWATCH_SYMBOLS", ","),
    ("PRICEWATCH_FEED", "kraken"), ("PRICEWATCH_BINANCE_WS_URL", "http://x"),
    ("PRICEWATCH_QUOTE_PAIRS", "BTCUSD"), ("PRICEWATCH_ALPHAVANTAGE_INTERVAL", "nan"),
    ("PRICEWATCH_JWT_SECRET", "short"), ("PRICEWATCH_PROT", "8000"),
])
def test_malformed_or_unknown_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value}, dotenv=None)


def test_secrets_are_masked_in_repr():
    s = Settings.from_env({"PRICEWATCH_JWT_SECRET": "s" * 40,
                           "PRICEWATCH_SMTP_PASSWORD": "hunter22"}, dotenv=None)
    assert "s" * 40 not in repr(s) and "hunter22" not in repr(s) and "'***'" in repr(s)


def run_cli(*args, env=None, cwd=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "pricewatch", *args], env=full_env,
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_bad_value_stops_startup_with_one_line_and_exit_2(tmp_path):
    result = run_cli(env={"PRICEWATCH_PORT": "abc"}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PRICEWATCH_PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_options_with_their_variables(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--port" in result.stdout and "PRICEWATCH_PORT" in result.stdout
    assert "createuser" in result.stdout


def test_createuser_makes_an_admin_that_can_log_in(tmp_path):
    db = str(tmp_path / "pw.db")
    env = {"PRICEWATCH_DB": db, "PRICEWATCH_PASSWORD": "admin pass 1",
           "PRICEWATCH_BCRYPT_ROUNDS": "4"}
    result = run_cli("createuser", "root", "--email", "root@example.com", "--admin",
                     env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "created admin user root" in result.stdout
    again = run_cli("createuser", "root", "--email", "root@example.com", env=env, cwd=tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr

    import asyncio

    from pricewatch.store import Store

    async def check():
        store = await Store.open(db)
        try:
            user = await store.user_by_name("root")
        finally:
            await store.close()
        return user

    user = asyncio.run(check())
    assert user.is_admin and user.email == "root@example.com"
    assert user.password_hash.startswith("$2b$04$")
