"""Binance's public REST market data: trades by id, aggregate trades by time, klines.

One client per process on the shared aiohttp session. Every call has a timeout; a 429 or 418
answer (rate limited / IP banned) raises `RestLimited` with the server's `Retry-After`, and
no call is made again before that time has passed (Binance escalates bans for clients that
ignore it). The used weight (`X-MBX-USED-WEIGHT-1M`) is kept for `/healthz`. The optional API
key goes only into the `X-MBX-APIKEY` header and is never logged. An answer larger than
`max_bytes` is a RestError like a 5xx (read and parsed by upstream_read: bounded in bytes and
in event-loop time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..feeds import ParseError, Tick, parse_number, parse_trade_time
from ..upstream_read import AnswerTooLarge, BadAnswer, parse_json, read_body

log = logging.getLogger(__name__)

MAX_LIMIT = 1000  # Binance's cap for trades, aggTrades and klines per call


class RestError(Exception):
    """A REST call failed: HTTP error, Binance error code, timeout, or a malformed answer."""

    def __init__(self, detail: str, status: int | None = None, code: int | None = None):
        super().__init__(detail)
        self.status = status
        self.code = code

    @property
    def refused(self) -> bool:
        """The endpoint will not serve us (needs a key, forbidden): try another way."""
        return self.status in (401, 403) or self.code in (-2014, -2015)


class RestLimited(RestError):
    """429/418: no call may be made for `retry_after` seconds."""

    def __init__(self, retry_after: float, status: int):
        super().__init__(
            f"rate limited by Binance (HTTP {status}), retry after {retry_after:.0f}s", status
        )
        self.retry_after = retry_after


@dataclass(slots=True, frozen=True)
class Kline:
    """One REST kline: `[openTime, "o", "h", "l", "c", "v", closeTime, "qv", trades, ...]`."""

    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    close_time: int
    trades: int


@dataclass(slots=True, frozen=True)
class BinanceMarket:
    """What differs between Binance's spot and futures markets (cryptofeed keeps the same
    facts as class data per exchange): hosts, REST paths, and which stream carries trades.
    On futures the trade stream is `@aggTrade`, so trades are sequenced by aggregate id."""

    ws: str
    rest: str
    prefix: str  # REST path prefix
    trade_stream: str  # "trade" or "aggTrade"

    @property
    def kline_intervals(self) -> frozenset[str]:
        """The candle timeframes this market serves as klines (futures have no 1s)."""
        return _INTERVALS if self.trade_stream == "trade" else _INTERVALS - {"1s"}

    @property
    def by_aggregate(self) -> bool:
        return self.trade_stream == "aggTrade"

    def paths(self) -> dict[str, str]:
        p = self.prefix
        return {
            "trades": f"{p}/historicalTrades",
            "agg_trades": f"{p}/aggTrades",
            "klines": f"{p}/klines",
            "recent": f"{p}/trades",
        }


_INTERVALS = frozenset({"1s", "1m", "5m", "15m", "1h", "4h", "1d"})

MARKETS = {
    "spot": BinanceMarket(
        "wss://stream.binance.com:9443", "https://api.binance.com", "/api/v3", "trade"
    ),
    "usdm": BinanceMarket(
        "wss://fstream.binance.com", "https://fapi.binance.com", "/fapi/v1", "aggTrade"
    ),
    "coinm": BinanceMarket(
        "wss://dstream.binance.com", "https://dapi.binance.com", "/dapi/v1", "aggTrade"
    ),
}


class BinanceRest:
    """Calls `base_url` (e.g. https://api.binance.com) on a session set by the app."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        market: BinanceMarket = MARKETS["spot"],
        max_bytes: int = 8 << 20,
    ):
        self.base_url = base_url.rstrip("/")
        self.max_bytes = max_bytes  # an answer's size at most (PRICEWATCH_UPSTREAM_MAX_BYTES)
        self._headers = {"X-MBX-APIKEY": api_key} if api_key else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.market = market
        self.paths = market.paths()
        self.session: aiohttp.ClientSession | None = None
        self.used_weight: int | None = None
        self.calls = 0
        self._blocked_until = 0.0  # monotonic time before which no call is made

    def blocked_for(self) -> float:
        """Seconds left of the last Retry-After (0 when calls may be made)."""
        return max(0.0, self._blocked_until - time.monotonic())

    async def get(self, name: str, params: dict[str, Any]) -> Any:
        """GET one endpoint (`trades`, `agg_trades`, `klines`); the decoded JSON answer.

        Raises RestLimited while a Retry-After runs or on 429/418, RestError otherwise.
        """
        if self.session is None:
            raise RestError("no HTTP session (the app has not started)")
        wait = self.blocked_for()
        if wait > 0:
            raise RestLimited(wait, 429)
        self.calls += 1
        url = self.base_url + self.paths[name]
        status: int | None = None
        try:
            async with self.session.get(
                url,
                params=params,
                headers=self._headers,
                timeout=self.timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                weight = resp.headers.get("X-MBX-USED-WEIGHT-1M")
                if weight is not None and weight.isdigit():
                    self.used_weight = int(weight)
                if resp.status in (418, 429):
                    retry = _retry_after(resp.headers.get("Retry-After"))
                    self._blocked_until = time.monotonic() + retry
                    log.warning(
                        "Binance REST answered %d: no REST call for %.0f s", resp.status, retry
                    )
                    raise RestLimited(retry, resp.status)
                data = await _json(await read_body(resp, self.max_bytes))
                if resp.status != 200:
                    code = data.get("code") if isinstance(data, dict) else None
                    msg = data.get("msg") if isinstance(data, dict) else None
                    said = msg[:200] if isinstance(msg, str) and msg else "no message"
                    raise RestError(
                        f"HTTP {resp.status} from {self.paths[name]}: {said}",
                        resp.status,
                        code if isinstance(code, int) else None,
                    )
                return data
        except AnswerTooLarge as exc:  # an upstream error like a 5xx: no weight for it
            raise RestError(f"{self.paths[name]}: {exc}", status) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RestError(f"{self.paths[name]}: {type(exc).__name__}") from None

    async def trades(self, symbol: str, from_id: int, limit: int = MAX_LIMIT) -> list[Tick]:
        """Trades with id >= `from_id`, ascending (`historicalTrades`)."""
        rows = await self.get(
            "trades", {"symbol": symbol, "fromId": from_id, "limit": min(limit, MAX_LIMIT)}
        )
        try:
            return [
                Tick(
                    symbol,
                    parse_number(r["price"], "price"),
                    parse_number(r["qty"], "qty", zero_ok=True),
                    parse_trade_time(r["time"]),
                    _id(r["id"]),
                    backfill="trade",
                )
                for r in _list(rows)
            ]
        except (KeyError, TypeError, ParseError) as exc:
            raise RestError(f"malformed historicalTrades answer: {exc}") from None

    async def agg_trades(
        self,
        symbol: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = MAX_LIMIT,
        from_id: int | None = None,
    ) -> list[Tick]:
        """Aggregate trades by time (`start_ms <= T <= end_ms`, at most one hour apart) or
        from aggregate id `from_id`, as Ticks with `count` = the trades each holds. Their
        `trade_id` is the aggregate id on a futures market (trades are sequenced by it),
        else the aggregate's last trade id."""
        params: dict[str, Any] = {"symbol": symbol, "limit": min(limit, MAX_LIMIT)}
        if from_id is not None:
            params["fromId"] = from_id
        if start_ms is not None:
            params["startTime"] = start_ms
        if end_ms is not None:
            params["endTime"] = end_ms
        rows = await self.get("agg_trades", params)
        by_aggregate = self.market.by_aggregate
        try:
            out = []
            for r in _list(rows):
                first, last = _id(r["f"]), _id(r["l"])
                out.append(
                    Tick(
                        symbol,
                        parse_number(r["p"], "p"),
                        parse_number(r["q"], "q", zero_ok=True),
                        parse_trade_time(r["T"]),
                        _id(r["a"]) if by_aggregate else last,
                        max(1, last - first + 1),
                        backfill="trade",
                    )
                )
            return out
        except (KeyError, TypeError, ParseError) as exc:
            raise RestError(f"malformed aggTrades answer: {exc}") from None

    async def last_trade(self, symbol: str) -> Tick | None:
        """The most recent trade (`/api/v3/trades?limit=1`), or None when there is none."""
        rows = await self.get("recent", {"symbol": symbol, "limit": 1})
        try:
            return next(
                (
                    Tick(
                        symbol,
                        parse_number(r["price"], "price"),
                        parse_number(r["qty"], "qty", zero_ok=True),
                        parse_trade_time(r["time"]),
                        _id(r["id"]),
                    )
                    for r in _list(rows)
                ),
                None,
            )
        except (KeyError, TypeError, ParseError) as exc:
            raise RestError(f"malformed trades answer: {exc}") from None

    async def klines(
        self,
        symbol: str,
        interval: str,
        limit: int = MAX_LIMIT,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[Kline]:
        """Klines oldest first; the last one may be the still open candle."""
        params: dict[str, Any] = {
            "symbol": symbol,
            "interval": interval,
            "limit": min(limit, MAX_LIMIT),
        }
        if start_ms is not None:
            params["startTime"] = start_ms
        if end_ms is not None:
            params["endTime"] = end_ms
        rows = await self.get("klines", params)
        try:
            return [
                Kline(
                    _id(k[0]),
                    parse_number(k[1], "open"),
                    parse_number(k[2], "high"),
                    parse_number(k[3], "low"),
                    parse_number(k[4], "close"),
                    parse_number(k[5], "volume", zero_ok=True),
                    _id(k[6]),
                    _id(k[8]),
                )
                for k in _list(rows)
            ]
        except (IndexError, TypeError, ParseError) as exc:
            raise RestError(f"malformed klines answer: {exc}") from None


async def _json(body: bytes) -> Any:
    try:
        return await parse_json(body)
    except BadAnswer:
        return None


def _list(rows: Any) -> list:
    if not isinstance(rows, list):
        raise TypeError("expected a JSON array")
    return rows


def _id(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _retry_after(raw: str | None) -> float:
    """Seconds from a Retry-After header; 60 when it is missing or unreadable."""
    try:
        value = float(raw) if raw is not None else 60.0
    except ValueError:
        return 60.0
    return min(max(value, 1.0), 3 * 86400.0)
