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
    env_file.write_text(
        "# comment\nexport PRICEWATCH_PORT=9001\n"
        "PRICEWATCH_SYMBOLS='btcusdt, solusdt'\nPRICEWATCH_FEED=demo\n"
    )
    s = Settings.from_env({"PRICEWATCH_FEED": "off"}, dotenv=env_file)
    assert s.port == 9001 and s.symbols == ("BTCUSDT", "SOLUSDT") and s.feed == "off"


@pytest.mark.parametrize(
    "name, value",
    [
        ("PRICEWATCH_PORT", "abc"),
        ("PRICEWATCH_PORT", "70000"),
        ("PRICEWATCH_ACCESS_TTL", "0"),
        ("PRICEWATCH_SMTP_STARTTLS", "maybe"),
        ("PRICEWATCH_SYMBOLS", "BTC-USDT"),
        ("PRICEWATCH_SYMBOLS", ","),
        ("PRICEWATCH_FEED", "kraken"),
        ("PRICEWATCH_BINANCE_WS_URL", "http://x"),
        ("PRICEWATCH_QUOTE_PAIRS", "BTCUSD"),
        ("PRICEWATCH_ALPHAVANTAGE_INTERVAL", "nan"),
        ("PRICEWATCH_JWT_SECRET", "short"),
        ("PRICEWATCH_PROT", "8000"),
    ],
)
def test_malformed_or_unknown_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value}, dotenv=None)


def test_secrets_are_masked_in_repr():
    s = Settings.from_env(
        {"PRICEWATCH_JWT_SECRET": "s" * 40, "PRICEWATCH_SMTP_PASSWORD": "hunter22"}, dotenv=None
    )
    assert "s" * 40 not in repr(s) and "hunter22" not in repr(s) and "'***'" in repr(s)


def run_cli(*args, env=None, cwd=None, input=None):
    """`python -m pricewatch ARGS` with no PRICEWATCH_* but `env`; standard input is `input`
    (none: empty, never a terminal)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pricewatch", *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        input=input or "",
    )


def test_bad_value_stops_startup_with_one_line_and_exit_2(tmp_path):
    result = run_cli(env={"PRICEWATCH_PORT": "abc"}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PRICEWATCH_PORT" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_bad_option_names_the_option_not_the_variable(tmp_path):
    for args in (["--port", "abc"], ["serve", "--port", "abc"], ["--log-level", "loud"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and args[-2] in lines[0] and "PRICEWATCH_" not in lines[0], lines


def test_serve_takes_the_same_options_as_the_bare_command():
    from pricewatch.__main__ import _option_values, _parser

    parser = _parser()
    for argv in (
        ["serve", "--port", "9001", "--feed", "demo"],
        ["--port", "9001", "--feed", "demo"],
        ["--port", "1", "serve", "--port", "9001", "--feed", "demo"],
    ):
        values = _option_values(parser.parse_args(argv))
        assert values == {"PRICEWATCH_PORT": "9001", "PRICEWATCH_FEED": "demo"}, argv
    # An option given before `serve` survives the subcommand's own (absent) default.
    assert _option_values(parser.parse_args(["--db", "x.db", "serve"])) == {"PRICEWATCH_DB": "x.db"}


def test_help_lists_options_with_their_variables(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "--port" in result.stdout and "PRICEWATCH_PORT" in result.stdout
    assert "createuser" in result.stdout


def test_help_describes_options_shows_choices_and_names_the_secrets(tmp_path):
    text = run_cli("--help", cwd=tmp_path).stdout
    assert "listen port (PRICEWATCH_PORT, default: 8000)" in " ".join(text.split())
    assert "--feed {binance,demo,off,replay:PATH}" in text
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in text
    for secret in (
        "PRICEWATCH_JWT_SECRET",
        "PRICEWATCH_ALPHAVANTAGE_API_KEY",
        "PRICEWATCH_SMTP_PASSWORD",
        "PRICEWATCH_PASSWORD",
    ):
        assert secret in text, secret
        assert "--" + secret[len("PRICEWATCH_") :].lower().replace("_", "-") not in text
    serve = run_cli("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0 and "--port" in serve.stdout


def test_createuser_reads_one_line_of_standard_input(tmp_path):
    db = str(tmp_path / "pw.db")
    env = {"PRICEWATCH_DB": db, "PRICEWATCH_BCRYPT_ROUNDS": "4"}
    result = run_cli(
        "createuser",
        "bob",
        "--email",
        "b@x.io",
        env=env,
        cwd=tmp_path,
        input="piped pass 1\nignored second line\n",
    )
    assert result.returncode == 0, result.stderr
    assert "created user bob" in result.stdout

    import asyncio

    import bcrypt

    from pricewatch.store import Store

    async def stored_hash() -> bytes:
        store = await Store.open(db)
        try:
            return (await store.user_by_name("bob")).password_hash.encode()
        finally:
            await store.close()

    assert bcrypt.checkpw(b"piped pass 1", asyncio.run(stored_hash()))


def test_createuser_without_a_password_anywhere_is_one_line(tmp_path):
    env = {"PRICEWATCH_DB": str(tmp_path / "pw.db")}
    result = run_cli("createuser", "bob", "--email", "b@x.io", env=env, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PRICEWATCH_PASSWORD" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_createuser_makes_an_admin_that_can_log_in(tmp_path):
    db = str(tmp_path / "pw.db")
    env = {
        "PRICEWATCH_DB": db,
        "PRICEWATCH_PASSWORD": "admin pass 1",
        "PRICEWATCH_BCRYPT_ROUNDS": "4",
    }
    result = run_cli(
        "createuser", "root", "--email", "root@example.com", "--admin", env=env, cwd=tmp_path
    )
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


def test_configuration_table_lists_every_setting_with_its_default():
    """docs/configuration.md's table is the one place a user reads about settings: every
    variable is in it with its real default, and it names no variable that does not exist."""
    from dataclasses import fields as dc_fields
    from pathlib import Path

    from pricewatch.config import env_names

    table = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| PRICEWATCH_") and len(cells) >= 3:
            rows[cells[0]] = cells[1]
    names = env_names()

    def shown(value) -> str:
        if value is None or value == ():
            return "unset"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return ",".join("/".join(v) if isinstance(v, tuple) else str(v) for v in value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    for f in dc_fields(Settings):
        assert names[f.name] in rows, f"{names[f.name]} is missing from docs/configuration.md"
        assert rows[names[f.name]] == shown(f.default), names[f.name]
    assert set(rows) <= set(names.values()), set(rows) - set(names.values())
