"""Settings: one frozen dataclass built from the environment and `.env`.

The environment wins over `.env`. A malformed or unknown `PRICEWATCH_*` value raises
`ConfigError` naming the variable; `main()` turns that into one line and exit code 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

PREFIX = "PRICEWATCH_"
FUTURES_HOSTS = {  # the spot hosts are the fields' defaults
    "usdm": {
        "binance_ws_url": "wss://fstream.binance.com",
        "binance_rest_url": "https://fapi.binance.com",
    },
    "coinm": {
        "binance_ws_url": "wss://dstream.binance.com",
        "binance_rest_url": "https://dapi.binance.com",
    },
}
SYMBOL_RE = re.compile(r"[A-Z0-9]{2,20}(_[A-Z0-9]{1,10})?")  # futures: BTCUSD_PERP
CURRENCY_RE = re.compile(r"[A-Z0-9]{2,10}")


class ConfigError(ValueError):
    """A configuration variable is malformed; the message names it."""


def _str(name: str, raw: str) -> str:
    return raw


def _int(lo: int, hi: int):
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float):
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not lo <= value <= hi:  # also rejects nan
            raise ConfigError(f"{name} must be between {lo} and {hi}, got {raw!r}")
        return value

    return parse


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _symbols(name: str, raw: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(s.strip().upper() for s in raw.split(",") if s.strip()))
    if not items:
        raise ConfigError(f"{name} must list at least one symbol")
    for item in items:
        if not SYMBOL_RE.fullmatch(item):
            raise ConfigError(
                f"{name}: {item!r} is not a Binance symbol like BTCUSDT (or BTCUSD_PERP on futures)"
            )
    return items


def _pairs(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in raw.split(","):
        item = item.strip().upper()
        if not item:
            continue
        parts = item.split("/")
        if len(parts) != 2 or not all(CURRENCY_RE.fullmatch(p) for p in parts):
            raise ConfigError(f"{name}: {item!r} is not a FROM/TO pair like BTC/USD")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ConfigError(f"{name} must list at least one FROM/TO pair")
    return tuple(dict.fromkeys(pairs))


def _feed(name: str, raw: str) -> str:
    value = raw.strip()
    if value in ("binance", "demo", "off"):
        return value
    if value.startswith("replay:") and len(value) > len("replay:"):
        return value
    raise ConfigError(f"{name} must be binance, demo, off or replay:PATH, got {raw!r}")


def _ws_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not re.fullmatch(r"wss?://[^\s/]+(/\S*)?", value):
        raise ConfigError(f"{name} must be a ws:// or wss:// URL, got {raw!r}")
    return value


def _http_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ConfigError(f"{name} must be an http:// or https:// URL, got {raw!r}")
    return value


def _secret(name: str, raw: str) -> str:
    if len(raw.encode()) < 32:
        raise ConfigError(f"{name} must be at least 32 bytes long")
    return raw


def _choice(*allowed: str):
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _opt(parse):
    def parse_optional(name: str, raw: str):
        return None if raw.strip() == "" else parse(name, raw)

    return parse_optional


def _networks(name: str, raw: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """Comma-separated IPs or CIDRs (`10.0.0.0/8, ::1`)."""
    nets = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or CIDR") from None
    return tuple(nets)


def _public_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s?#]*)?", value):
        raise ConfigError(
            f"{name} must be an http(s) base URL like https://prices.example.com, got {raw!r}"
        )
    return value


def _redis_url(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"(rediss?|unix)://\S+", value):
        raise ConfigError(
            f"{name} must be a redis://, rediss:// or unix:// URL, got a "
            f"{value.partition(':')[0] or 'blank'} value"
        )
    return value


def _var(env: str, parse, default, help: str, secret: bool = False):
    """A settings field read from PRICEWATCH_<env> with `parse(name, raw)`; `help` feeds
    `--help` and the table in docs/configuration.md."""
    return field(
        default=default, metadata={"env": env, "parse": parse, "secret": secret, "help": help}
    )


@dataclass(frozen=True)
class Settings:
    # -- serving
    host: str = _var("HOST", _str, "127.0.0.1", "listen address")
    port: int = _var("PORT", _int(0, 65535), 8000, "listen port")
    db: str = _var(
        "DB", _str, "./pricewatch.db", "SQLite database file (created and migrated on start)"
    )
    public_url: str | None = _var(
        "PUBLIC_URL",
        _opt(_public_url),
        None,
        "base URL for absolute links (pagination, emails); unset: built from the request",
    )
    log_level: str = _var("LOG_LEVEL", _str, "INFO", "DEBUG, INFO, WARNING or ERROR")
    # -- auth
    jwt_secret: str | None = _var(
        "JWT_SECRET",
        _opt(_secret),
        None,
        "HS256 signing key, at least 32 bytes (unset: generated once, kept in the DB)",
        secret=True,
    )
    access_ttl: int = _var("ACCESS_TTL", _int(1, 10**8), 1800, "access token lifetime (s)")
    refresh_ttl: int = _var("REFRESH_TTL", _int(1, 10**9), 604800, "refresh token lifetime (s)")
    bcrypt_rounds: int = _var("BCRYPT_ROUNDS", _int(4, 16), 12, "bcrypt cost")
    login_max_failures: int = _var(
        "LOGIN_MAX_FAILURES",
        _int(1, 10**6),
        10,
        "failed logins per username or client address per window before 429",
    )
    login_window: float = _var(
        "LOGIN_WINDOW", _float(1, 86400), 300.0, "the failed-login window (s)"
    )
    # Read only by `createuser`; listed so that setting it is not an "unknown variable".
    password: str | None = _var(
        "PASSWORD",
        _opt(_str),
        None,
        "password for createuser (else prompted, or one line of standard input)",
        secret=True,
    )
    # -- limits: every client has a bounded cost
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = _var(
        "TRUSTED_PROXIES",
        _networks,
        (),
        "IPs/CIDRs of reverse proxies allowed to set the client address (X-Forwarded-For)",
    )
    max_ws_per_address: int = _var(
        "MAX_WS_PER_ADDRESS",
        _int(1, 10**6),
        64,
        "open websockets per client address (all endpoints)",
    )
    ws_max_queue_bytes: int = _var(
        "WS_MAX_QUEUE_BYTES",
        _int(1024, 2**31),
        1048576,
        "bytes of undelivered messages a websocket client may hold before 1008",
    )
    ws_max_rate: int = _var(
        "WS_MAX_RATE",
        _int(1, 1000),
        10,
        "price/candle messages per symbol (and timeframe) per second to a websocket client: "
        "newer values replace unsent ones; a subscription may ask for fewer (max_rate)",
    )
    register_limit: int = _var(
        "REGISTER_LIMIT", _int(1, 10**6), 10, "registrations per client address per hour"
    )
    quote_min_gap: float = _var(
        "QUOTE_MIN_GAP",
        _float(0, 86400),
        60.0,
        "seconds between upstream fetches of one pair through POST /api/v1/quotes; 0: off",
    )
    alert_create_rate: int = _var(
        "ALERT_CREATE_RATE", _int(1, 10**6), 60, "alert creations per user per minute"
    )
    max_alerts_per_user: int = _var(
        "MAX_ALERTS_PER_USER", _int(1, 10**7), 1000, "active (CREATED) alerts a user may hold"
    )
    # -- markets
    symbols: tuple[str, ...] = _var(
        "SYMBOLS",
        _symbols,
        ("BTCUSDT", "ETHUSDT"),
        "markets watched (comma-separated Binance symbols)",
    )
    feed: str = _var(
        "FEED", _feed, "binance", "binance, demo (offline random walk), off, or replay:PATH"
    )
    feed_stale_after: float = _var(
        "FEED_STALE_AFTER",
        _float(0.1, 86400),
        60.0,
        "seconds without a message before a live feed makes /healthz 503",
    )
    replay_speed: float = _var(
        "REPLAY_SPEED", _float(0, 1e6), 0.0, "replay:PATH speed factor; 0 = as fast as possible"
    )
    binance_ws_url: str = _var(
        "BINANCE_WS_URL", _ws_url, "wss://stream.binance.com:9443", "Binance websocket base"
    )
    binance_market: str = _var(
        "BINANCE_MARKET",
        _choice("spot", "usdm", "coinm"),
        "spot",
        "spot, usdm (USD-M futures) or coinm (COIN-M futures): default hosts, REST paths "
        "and trade stream",
    )
    binance_rest_url: str = _var(
        "BINANCE_REST_URL",
        _http_url,
        "https://api.binance.com",
        "Binance REST base for history and backfill",
    )
    binance_api_key: str | None = _var(
        "BINANCE_API_KEY",
        _opt(_str),
        None,
        "sent as X-MBX-APIKEY to Binance REST calls when set (never logged)",
        secret=True,
    )
    backfill_max_trades: int = _var(
        "BACKFILL_MAX_TRADES",
        _int(0, 10**8),
        100000,
        "missed trades fetched one by one per gap; a larger gap is not fetched trade by trade",
    )
    candle_history: bool = _var(
        "CANDLE_HISTORY",
        _bool,
        True,
        "fill the candle rings from Binance REST klines at start (binance feed)",
    )
    candle_retention: int = _var(
        "CANDLE_RETENTION",
        _int(1000, 10**7),
        50000,
        "candles kept in SQLite per symbol and timeframe (1s: ~14 h, 1m: ~35 days)",
    )
    allow_private_feeds: bool = _var(
        "ALLOW_PRIVATE_FEEDS",
        _bool,
        False,
        "let admins add feeds on loopback/private addresses (tests)",
    )
    max_clock_skew: float = _var(
        "MAX_CLOCK_SKEW",
        _float(0, 86400),
        10.0,
        "seconds a trade may be stamped ahead of the server clock; later ones are dropped",
    )
    max_id_jump: int = _var(
        "MAX_ID_JUMP",
        _int(1, 10**15),
        10_000_000,
        "a trade id this far past the last one (or far behind it) re-bases the sequence",
    )
    upstream_max_bytes: int = _var(
        "UPSTREAM_MAX_BYTES",
        _int(1024, 1 << 30),
        8 << 20,
        "bytes at most read from one upstream answer (REST, AlphaVantage, Telegram, webhooks)",
    )
    # -- quotes
    alphavantage_url: str = _var(
        "ALPHAVANTAGE_URL", _http_url, "https://www.alphavantage.co/query", "AlphaVantage quote API"
    )
    alphavantage_api_key: str | None = _var(
        "ALPHAVANTAGE_API_KEY",
        _opt(_str),
        None,
        "AlphaVantage key; unset: no polling, POST /api/v1/quotes answers 503",
        secret=True,
    )
    alphavantage_interval: float = _var(
        "ALPHAVANTAGE_INTERVAL", _float(0.01, 1e7), 3600.0, "seconds between AlphaVantage polls"
    )
    alphavantage_timeout: float = _var(
        "ALPHAVANTAGE_TIMEOUT", _float(0.1, 600), 10.0, "seconds per AlphaVantage call"
    )
    quote_pairs: tuple[tuple[str, str], ...] = _var(
        "QUOTE_PAIRS", _pairs, (("BTC", "USD"),), "AlphaVantage FROM/TO pairs polled"
    )
    quotes: str = _var(
        "QUOTES",
        _choice("auto", "alphavantage", "demo", "off"),
        "auto",
        "quote source: alphavantage (needs the key), demo (every ALPHAVANTAGE_INTERVAL s from "
        "the latest USDT price, offline), off; auto: alphavantage with a key, demo with the "
        "demo feed, else off",
    )
    # -- mail
    smtp_host: str | None = _var(
        "SMTP_HOST", _opt(_str), None, "SMTP server; unset: alert mail stays queued (pending)"
    )
    smtp_port: int = _var("SMTP_PORT", _int(1, 65535), 25, "SMTP port")
    smtp_user: str | None = _var("SMTP_USER", _opt(_str), None, "SMTP login user")
    smtp_password: str | None = _var(
        "SMTP_PASSWORD", _opt(_str), None, "SMTP login password", secret=True
    )
    smtp_starttls: bool = _var("SMTP_STARTTLS", _bool, False, "use STARTTLS")
    smtp_timeout: float = _var("SMTP_TIMEOUT", _float(0.1, 600), 30.0, "seconds per SMTP call")
    smtp_concurrency: int = _var("SMTP_CONCURRENCY", _int(1, 100), 8, "parallel SMTP connections")
    smtp_max_attempts: int = _var(
        "SMTP_MAX_ATTEMPTS", _int(1, 1000), 8, "attempts before an email is marked failed"
    )
    smtp_retry_base: float | None = _var(
        "SMTP_RETRY_BASE",
        _opt(_float(0.01, 3600)),
        None,
        "first email retry delay (s), doubling; unset: PRICEWATCH_DELIVERY_RETRY_BASE",
    )
    mail_from: str = _var("MAIL_FROM", _str, "pricewatch@localhost", "sender of alert mail")
    # -- notification channels (pricewatch/delivery)
    delivery_retry_base: float = _var(
        "DELIVERY_RETRY_BASE",
        _float(0.01, 3600),
        2.0,
        "first retry delay (s) of a failed delivery, doubling, capped at 1 h",
    )
    delivery_max_attempts: int = _var(
        "DELIVERY_MAX_ATTEMPTS",
        _int(1, 1000),
        8,
        "attempts before a webhook or Telegram delivery is marked failed",
    )
    delivery_timeout: float = _var(
        "DELIVERY_TIMEOUT", _float(0.1, 600), 10.0, "seconds per webhook or Telegram request"
    )
    notify_per_hour: int = _var(
        "NOTIFY_PER_HOUR",
        _int(1, 10**6),
        30,
        "deliveries per user and channel per hour; the rest of the hour's go out as one digest",
    )
    event_retention_days: int = _var(
        "EVENT_RETENTION_DAYS",
        _int(1, 100000),
        90,
        "alert events older than this are purged with their finished deliveries",
    )
    telegram_bot_token: str | None = _var(
        "TELEGRAM_BOT_TOKEN",
        _opt(_str),
        None,
        "Telegram bot token; unset: telegram channels cannot be added",
        secret=True,
    )
    telegram_api_url: str = _var(
        "TELEGRAM_API_URL", _http_url, "https://api.telegram.org", "Telegram Bot API base"
    )
    allow_private_webhooks: bool = _var(
        "ALLOW_PRIVATE_WEBHOOKS",
        _bool,
        False,
        "let webhooks point at loopback/private addresses (tests)",
    )
    # -- several machines (pricewatch/cluster)
    redis_url: str | None = _var(
        "REDIS_URL",
        _opt(_redis_url),
        None,
        "Redis of a cluster (redis://host:6379/0): prices, candles, quotes, alert events and "
        "token revocations travel between the core and the edges over it; unset: one process",
        secret=True,
    )
    role: str = _var(
        "ROLE",
        _choice("all", "core", "edge"),
        "all",
        "all (one process does everything), core (feeds, alerts, store, auth, "
        "REST) or edge (websockets and market REST only, no database)",
    )

    @property
    def quote_source(self) -> str | None:
        """Where stored quotes come from: "alphavantage", "demo", or None (no quotes)."""
        if self.quotes == "off":
            return None
        if self.quotes == "demo":
            return "demo"
        if self.alphavantage_api_key is not None:
            return "alphavantage"
        return "demo" if self.quotes == "auto" and self.feed == "demo" else None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, dotenv: str | Path | None = ".env"
    ) -> Settings:
        """Build settings from `environ` (default: os.environ) over the `.env` file.

        Raises ConfigError naming the first malformed or unknown variable.
        """
        merged: dict[str, str] = {}
        if dotenv is not None:
            merged.update(read_dotenv(Path(dotenv)))
        merged.update(os.environ if environ is None else environ)
        known = {PREFIX + f.metadata["env"] for f in fields(cls)}
        for name in sorted(merged):
            if name.startswith(PREFIX) and name not in known:
                raise ConfigError(f"{name} is not a pricewatch setting")
        values = {}
        for f in fields(cls):
            name = PREFIX + f.metadata["env"]
            if name in merged:
                values[f.name] = f.metadata["parse"](name, merged[name])
        settings = cls(**values)
        if settings.binance_market != "spot":
            # The market picks the default hosts; an explicit URL still wins.
            hosts = FUTURES_HOSTS[settings.binance_market]
            urls: dict[str, Any] = {
                key: url for key, url in hosts.items() if PREFIX + key.upper() not in merged
            }
            settings = replace(settings, **urls)
        if settings.role != "all" and settings.redis_url is None:
            raise ConfigError(f"{PREFIX}ROLE={settings.role} needs {PREFIX}REDIS_URL")
        if settings.redis_url is not None and settings.jwt_secret is None:
            # Edges verify the core's tokens: a secret kept in one core's DB would not do.
            raise ConfigError(
                f"{PREFIX}REDIS_URL (a cluster) needs {PREFIX}JWT_SECRET, the same on every process"
            )
        if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
        return settings

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = "'***'" if f.metadata["secret"] and value is not None else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"Settings({', '.join(parts)})"


def env_names() -> dict[str, str]:
    """Map settings field name -> its environment variable name."""
    return {f.name: PREFIX + f.metadata["env"] for f in fields(Settings)}


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a `.env` file: `KEY=VALUE` lines, `#` comments, optional quotes and `export`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    values = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values
