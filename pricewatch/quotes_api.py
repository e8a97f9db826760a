"""AlphaVantage quotes: the poller's lifetime, `/api/v1/quotes` and the `/ws/rates/` push.

Every stored quote is broadcast on `/ws/rates/`, whether the poller or a POST fetched it.
"""

from __future__ import annotations

import logging
import re

import aiohttp
import orjson
from aiohttp import web

from .api import ApiError, invalid, json_response, query_int, read_json
from .auth import require_identity
from .config import Settings
from .limits import SlidingWindow
from .links import base_url, page_url
from .market import HUB, serve_ws
from .store import Store
from .upstream.alphavantage import (
    Quote,
    QuotePoller,
    UpstreamError,
    UpstreamRateLimited,
    fetch_rate,
)

log = logging.getLogger(__name__)

CURRENCY_RE = re.compile(r"[A-Z0-9]{2,10}")
RATES_TOPIC = "rates"
RATE_LIMIT_RETRY = 60  # seconds suggested to a client after AlphaVantage's rate limit


class Quotes:
    """Fetch, store and broadcast quotes; owns the shared HTTP session and the poller."""

    def __init__(self, settings: Settings, store: Store, hub, session: aiohttp.ClientSession):
        self.settings = settings
        self.store = store
        self.hub = hub
        self.session = session
        self.poller: QuotePoller | None = None
        # PRICEWATCH_QUOTE_MIN_GAP: one upstream fetch per pair and gap, all users together
        # (a free AlphaVantage key allows 25 calls a day). None: the gap is off.
        self.gaps = SlidingWindow(1, settings.quote_min_gap) if settings.quote_min_gap > 0 else None

    def claim(self, from_currency: str, to_currency: str) -> None:
        """Mark an upstream fetch of the pair as starting now, or raise 429 `rate_limited`
        (with Retry-After) inside the gap since the last one.

        Synchronous on purpose: check and mark happen with no await in between, so
        concurrent requests for one pair cannot all pass the check. A failed fetch keeps its
        mark: it spent an upstream call just the same.
        """
        if self.gaps is None:
            return
        wait = self.gaps.take(f"{from_currency}/{to_currency}")
        if wait is not None:
            raise ApiError(
                429,
                "rate_limited",
                f"{from_currency}/{to_currency} was fetched less than "
                f"{self.settings.quote_min_gap:g} s ago; the stored quote is in "
                "GET /api/v1/quotes.",
                headers={"Retry-After": str(wait)},
            )

    async def save(self, quote: Quote):
        """Store a fully parsed quote, then push it to `/ws/rates/` subscribers."""
        stored = await self.store.add_quote(
            quote.from_currency,
            quote.to_currency,
            quote.rate,
            quote.bid,
            quote.ask,
            quote.source_time,
        )
        self.hub.publish_event(RATES_TOPIC, orjson.dumps({"type": "quote", **stored.public()}))
        return stored

    async def fetch(self, from_currency: str, to_currency: str) -> Quote:
        s = self.settings
        assert s.alphavantage_api_key is not None  # create_quote answers 503 without one
        return await fetch_rate(
            self.session,
            s.alphavantage_url,
            s.alphavantage_api_key,
            from_currency,
            to_currency,
            timeout=s.alphavantage_timeout,
            max_bytes=s.upstream_max_bytes,
        )


QUOTES = web.AppKey("quotes", Quotes)


def _pair(data: dict, settings: Settings) -> tuple[str, str]:
    default_from, default_to = settings.quote_pairs[0]
    errors, values = {}, {}
    for name, default in (("from_currency", default_from), ("to_currency", default_to)):
        raw = data.get(name, default)
        if not isinstance(raw, str) or not CURRENCY_RE.fullmatch(raw.strip().upper()):
            errors[name] = "A currency code like BTC or USD is required."
        else:
            values[name] = raw.strip().upper()
    if errors:
        raise invalid(errors)
    pair = (values["from_currency"], values["to_currency"])
    if pair not in settings.quote_pairs:
        # Each pair has its own gap, so an open list of pairs would let anyone spend the
        # key's daily calls by naming new ones: only the operator's pairs are fetched.
        allowed = ", ".join("/".join(p) for p in settings.quote_pairs)
        message = f"Not a configured pair (PRICEWATCH_QUOTE_PAIRS: {allowed})."
        raise invalid({"from_currency": message, "to_currency": message})
    return pair


async def create_quote(request: web.Request) -> web.Response:
    require_identity(request)
    quotes = request.app[QUOTES]
    data = await read_json(request, optional=True)
    from_currency, to_currency = _pair(data, quotes.settings)
    if quotes.settings.alphavantage_api_key is None:
        raise ApiError(503, "unavailable", "No AlphaVantage API key is configured.")
    quotes.claim(from_currency, to_currency)
    try:
        quote = await quotes.fetch(from_currency, to_currency)
    except UpstreamRateLimited as exc:
        raise ApiError(
            503,
            "unavailable",
            f"AlphaVantage rate limit: {exc}",
            headers={"Retry-After": str(RATE_LIMIT_RETRY)},
        ) from None
    except UpstreamError as exc:
        raise ApiError(502, "upstream_error", str(exc)) from None
    stored = await quotes.save(quote)
    return json_response(stored.public(), status=201)


async def list_quotes(request: web.Request) -> web.StreamResponse:
    require_identity(request)
    quotes = request.app[QUOTES]
    store = quotes.store
    errors: dict[str, str] = {}
    page = query_int(request, "page", 1, 1, 2**31 - 1, errors)  # offset fits SQLite
    per_page = query_int(request, "per_page", None, 1, 1000, errors)
    if errors:
        raise invalid(errors)
    if per_page is not None:
        base = base_url(request)  # 400 for a malformed Host
        count, _ = await store.quote_span()
        pages = -(-count // per_page)
        rows = await store.list_quotes((page - 1) * per_page, per_page) if page <= pages else []

        def link(to: int) -> str | None:
            return page_url(base, request, to) if 1 <= to <= pages else None

        return json_response(
            {
                "count": count,
                "page": page,
                "per_page": per_page,
                "pages": pages,
                "next": link(page + 1),
                "previous": link(min(page - 1, pages)),
                "results": [q.public() for q in rows],
            }
        )
    # Every row: streamed in batches so a million rows never sit in memory at once.
    count, top = await store.quote_span()
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"count":%d,"results":[' % count)
    sep = b""
    async for batch in store.iter_quotes(top):
        await resp.write(sep + b",".join(orjson.dumps(q.public()) for q in batch))
        sep = b","
    await resp.write(b"]}")
    await resp.write_eof()
    return resp


async def ws_rates(request: web.Request) -> web.StreamResponse:
    """`/ws/rates/`: the latest stored quote on connect, then every new one."""
    hub, store = request.app[HUB], request.app[QUOTES].store
    latest = await store.latest_quote()

    def on_open(client) -> None:
        if latest is not None:
            hub.send(client, orjson.dumps({"type": "quote", **latest.public()}))
        hub.subscribe(client, RATES_TOPIC)

    def on_message(client, data: dict) -> None:
        hub.send(
            client, orjson.dumps({"type": "error", "detail": "This stream takes no messages."})
        )

    return await serve_ws(request, "rates", None, on_open, on_message)


def add_routes(app: web.Application, add_route) -> None:
    add_route(app, "GET", "/api/v1/quotes", list_quotes)
    add_route(app, "POST", "/api/v1/quotes", create_quote)
    add_route(app, "GET", "/ws/rates", ws_rates)
