"""AlphaVantage CURRENCY_EXCHANGE_RATE client and poller (split out of feeds.py, which
re-exports it). The API key never appears in an exception message or a log line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp

from ..feeds import FeedConfigError, ParseError, parse_price
from ..upstream_read import AnswerTooLarge, BadAnswer, parse_json, read_body

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """The quote upstream failed (HTTP error, timeout, bad payload). Never contains the key."""


class UpstreamRateLimited(UpstreamError):
    """AlphaVantage answered with its rate-limit ``Note``/``Information``. Catch it first."""


@dataclass(slots=True, frozen=True)
class Quote:
    from_currency: str
    to_currency: str
    rate: float
    bid: float | None
    ask: float | None
    source_time: str  # ISO-8601 UTC, "2021-05-01T02:58:06Z"


_RATE_KEY = "Realtime Currency Exchange Rate"


def _redact(text: str, secret: str) -> str:
    """`text` with every `secret` replaced by ``***``, then cut to 300 characters.

    Redact first: cutting first could split a key that straddles the cut, and the remaining
    head of the key would no longer match it, so it would leak.
    """
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= 300 else text[:300] + "..."


def _optional_price(rec: dict[str, Any], key: str) -> float | None:
    value = rec.get(key)
    if value is None or value in ("", "-"):
        return None
    return parse_price(value, key)


def parse_quote(body: object, from_currency: str, to_currency: str, *, secret: str = "") -> Quote:
    """Parse a CURRENCY_EXCHANGE_RATE answer.

    Sample::

        {"Realtime Currency Exchange Rate": {"1. From_Currency Code": "BTC",
         "2. From_Currency Name": "Bitcoin", "3. To_Currency Code": "USD",
         "4. To_Currency Name": "United States Dollar", "5. Exchange Rate": "58073.74000000",
         "6. Last Refreshed": "2021-05-01 02:58:06", "7. Time Zone": "UTC",
         "8. Bid Price": "58073.73000000", "9. Ask Price": "58073.74000000"}}

    Raises UpstreamRateLimited for ``Note``/``Information``, UpstreamError for ``Error Message``
    or any missing/invalid field. ``secret`` (the API key) is replaced by ``***`` in messages.
    """
    try:
        return _parse_quote(body, from_currency, to_currency)
    except UpstreamError as exc:
        error = type(exc)(_redact(f"{from_currency}/{to_currency}: {exc}", secret))
    raise error  # outside the except block: the unredacted original is not chained


def _parse_quote(body: object, from_currency: str, to_currency: str) -> Quote:
    if not isinstance(body, dict):
        raise UpstreamError("AlphaVantage answered JSON that is not an object")
    for key in ("Note", "Information"):
        if key in body:
            raise UpstreamRateLimited(f"AlphaVantage rate limit: {body[key]}")
    if "Error Message" in body:
        raise UpstreamError(f"AlphaVantage error: {body['Error Message']}")
    rec = body.get(_RATE_KEY)
    if not isinstance(rec, dict):
        raise UpstreamError(f"AlphaVantage answer has no {_RATE_KEY!r}")
    try:
        rate = parse_price(rec.get("5. Exchange Rate"), "5. Exchange Rate")
        bid = _optional_price(rec, "8. Bid Price")
        ask = _optional_price(rec, "9. Ask Price")
        stamp = datetime.strptime(str(rec.get("6. Last Refreshed")), "%Y-%m-%d %H:%M:%S")
        tz_name = rec.get("7. Time Zone")
        tz = UTC if tz_name == "UTC" else ZoneInfo(str(tz_name))
        when = stamp.replace(tzinfo=tz).astimezone(UTC)  # OverflowError near year 1 / 9999
    except (ParseError, ValueError, ZoneInfoNotFoundError, OverflowError) as exc:
        raise UpstreamError(f"AlphaVantage answer has an invalid field: {exc}") from None
    code_from = rec.get("1. From_Currency Code")
    code_to = rec.get("3. To_Currency Code")
    return Quote(
        code_from.upper() if isinstance(code_from, str) and code_from else from_currency.upper(),
        code_to.upper() if isinstance(code_to, str) and code_to else to_currency.upper(),
        rate,
        bid,
        ask,
        when.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


async def fetch_rate(
    session: aiohttp.ClientSession,
    base_url: str,
    api_key: str,
    from_currency: str,
    to_currency: str,
    *,
    timeout: float = 10.0,
    max_bytes: int = 8 << 20,
) -> Quote:
    """GET one CURRENCY_EXCHANGE_RATE quote.

    An answer larger than `max_bytes` (PRICEWATCH_UPSTREAM_MAX_BYTES) is an UpstreamError,
    like a 5xx; it is abandoned there, never read whole.

    Returns a fully parsed Quote or raises UpstreamRateLimited / UpstreamError. Exceptions carry
    no URL and no API key (aiohttp's own errors embed the URL, so they are replaced, unchained).
    """
    params = {
        "function": "CURRENCY_EXCHANGE_RATE",
        "from_currency": from_currency,
        "to_currency": to_currency,
        "apikey": api_key,
    }
    pair = f"{from_currency}/{to_currency}"
    error: UpstreamError | None = None
    try:
        async with session.get(
            base_url, params=params, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            status = resp.status
            # An error answer's body is not used: never read (the connection is closed).
            body = await read_body(resp, max_bytes) if status < 400 else b""
    except AnswerTooLarge as exc:
        error = UpstreamError(f"AlphaVantage {pair}: {exc}")
    except TimeoutError:
        error = UpstreamError(f"AlphaVantage {pair}: no answer within {timeout:g} s")
    except aiohttp.ClientError as exc:
        error = UpstreamError(f"AlphaVantage {pair}: request failed ({type(exc).__name__})")
    if error is not None:
        raise error  # raised outside the except block: no chained aiohttp exception (URL)
    if status == 429:
        raise UpstreamRateLimited(f"AlphaVantage {pair}: HTTP 429")
    if status >= 400:
        raise UpstreamError(f"AlphaVantage {pair}: HTTP {status}")
    try:
        data = await parse_json(body)
    except BadAnswer:
        raise UpstreamError(f"AlphaVantage {pair}: answer is not JSON") from None
    return parse_quote(data, from_currency, to_currency, secret=api_key)


class QuotePoller:
    """Poll AlphaVantage every ``interval`` s (first poll at start) and await ``on_quote``.

    A rate-limit answer skips the rest of the slot (logged once per streak); other errors are
    logged without the key and the poller carries on. ``run()`` returns only when cancelled.
    """

    kind = "alphavantage"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        pairs: list[tuple[str, str]],
        interval: float,
        on_quote: Callable[[Quote], Awaitable[object]],
        *,
        timeout: float = 10.0,
        name: str = "alphavantage",
        max_bytes: int = 8 << 20,
    ) -> None:
        if interval <= 0 or not pairs:
            raise FeedConfigError("QuotePoller needs pairs and an interval > 0")
        self.name = name
        self._session = session
        self._base_url = base_url
        self._api_key = api_key
        self.pairs = [(a.upper(), b.upper()) for a, b in pairs]
        self.interval = interval
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._on_quote = on_quote
        self.state = "waiting"
        self.quotes = 0
        self.errors = 0
        self.rate_limited = 0
        self.last_error: str | None = None
        self.last_quote_at: float | None = None
        self._limited_logged = False

    def health(self) -> dict[str, Any]:
        age = (
            None if self.last_quote_at is None else round(time.monotonic() - self.last_quote_at, 3)
        )
        return {
            "kind": self.kind,
            "state": self.state,
            "last_message_age": age,
            "messages": self.quotes,
            "errors": self.errors,
            "rate_limited": self.rate_limited,
            "last_error": self.last_error,
        }

    async def poll_once(self) -> None:
        """Fetch every pair once (stopping at a rate limit), awaiting on_quote for each."""
        for a, b in self.pairs:
            try:
                quote = await fetch_rate(
                    self._session,
                    self._base_url,
                    self._api_key,
                    a,
                    b,
                    timeout=self.timeout,
                    max_bytes=self.max_bytes,
                )
            except UpstreamRateLimited as exc:
                self.rate_limited += 1
                self.last_error = str(exc)
                if not self._limited_logged:
                    self._limited_logged = True
                    log.warning("%s: rate limited, skipping to the next poll (%s)", self.name, exc)
                return
            except UpstreamError as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("%s: %s", self.name, exc)
                continue
            except Exception as exc:  # a bug must not end polling silently
                self.errors += 1
                self.last_error = type(exc).__name__
                log.error("%s: unexpected %s for %s/%s", self.name, type(exc).__name__, a, b)
                continue
            self._limited_logged = False
            self.quotes += 1
            self.last_quote_at = time.monotonic()
            try:
                await self._on_quote(quote)
            except Exception:
                self.errors += 1
                log.exception("%s: on_quote failed for %s/%s", self.name, a, b)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                self.state = "polling"
                await self.poll_once()
                self.state = "waiting"
                next_at += self.interval
                now = loop.time()
                if next_at < now:  # a poll overran its slot: skip missed slots, never burst
                    next_at += math.ceil((now - next_at) / self.interval) * self.interval
                await asyncio.sleep(next_at - now)
        except asyncio.CancelledError:
            self.state = "stopped"
            raise
