"""OpenAPI 3.1 description of every HTTP route, and an offline HTML rendering of it.

`OPERATIONS` is the one table of what each route takes and answers, keyed by
(METHOD, canonical path without trailing slash); the schemas it names are in
openapi_schemas.py. tests/test_openapi.py compares it with
the router both ways, so a route cannot ship undocumented nor a documented one vanish.
Schemas are JSON Schema 2020-12 (OpenAPI 3.1). Response objects forbid unknown
properties on purpose: the schemathesis run in the tests then catches a body drifting
from the contract.
"""

from __future__ import annotations

import re

from aiohttp import web

from . import compat
from .alerts_api import STATUSES
from .api import json_response
from .channels_api import ADDS_PER_HOUR, MAX_CHANNELS
from .market import MARKET
from .ohlc import TIMEFRAMES
from .openapi_schemas import STR, Schema, enum, ref, schemas

JSON = "application/json"

# -- error responses: (status, error codes, description, headers) ----------------------------

RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer"},
        "description": "Seconds to wait before trying again.",
    }
}
ERRORS: dict[str, tuple[int, tuple[str, ...], str, dict]] = {
    "BadBody": (
        400,
        ("invalid_json", "validation"),
        "The body is not a JSON object, or fields are invalid (see `fields`).",
        {},
    ),
    "BadQuery": (400, ("validation",), "A query parameter is invalid (see `fields`).", {}),
    "NotAnUpgrade": (
        400,
        ("invalid_request",),
        "A plain GET without a websocket upgrade handshake.",
        {},
    ),
    "NotAuthenticated": (
        401,
        ("not_authenticated",),
        "Missing, invalid, expired or revoked token.",
        {"WWW-Authenticate": {"schema": STR}},
    ),
    "BadCredentials": (401, ("bad_credentials",), "Wrong username or password.", {}),
    "Forbidden": (403, ("forbidden",), "The caller is not an admin.", {}),
    "NotYourUser": (403, ("forbidden",), "`username` is not the user the token was issued to.", {}),
    "NotFound": (404, ("not_found",), "No such resource (or it belongs to someone else).", {}),
    "Conflict": (409, ("conflict",), "Conflicts with the current state.", {}),
    "TooLarge": (413, ("payload_too_large",), "The body is over 64 KiB.", {}),
    "Timeout": (
        408,
        ("timeout",),
        "The body did not arrive within 30 s; the connection ends after this answer.",
        {},
    ),
    "RateLimited": (429, ("rate_limited",), "Too many failed logins.", RETRY_AFTER),
    "UpstreamError": (502, ("upstream_error",), "AlphaVantage failed or answered garbage.", {}),
    "Unavailable": (
        503,
        ("unavailable",),
        "No AlphaVantage key configured, or its rate limit was hit (then with Retry-After).",
        RETRY_AFTER,
    ),
}


def _error_response(status: int, codes: tuple[str, ...], text: str, headers: dict) -> dict:
    schema = {"allOf": [ref("Error"), {"properties": {"error": enum(*codes)}}]}
    response: dict = {"description": text, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


# -- the table ------------------------------------------------------------------------------

PATH_PARAMS: dict[str, Schema] = {
    "alert_id": {"type": "integer", "minimum": 1},
    "feed_id": {"type": "integer", "minimum": 1},
    "channel_id": {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "email"}]},
    "symbol": ref("Symbol"),
}


def query(name: str, schema: Schema, text: str, required: bool = False) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "schema": schema,
        "description": text,
    }


def json_ok(schema: str | Schema, text: str = "OK") -> dict:
    return {
        "description": text,
        "content": {JSON: {"schema": ref(schema) if isinstance(schema, str) else schema}},
    }


def media_ok(media: str, text: str) -> dict:
    return {"description": text, "content": {media: {"schema": STR}}}


NO_CONTENT = {"description": "Done; no body."}
SWITCHING = {"description": "Switching Protocols: the websocket is open."}


def op(
    tag: str,
    summary: str,
    ok: dict[int, dict],
    *errors: str,
    auth: str | None = None,
    request: str | None = None,
    body_required: bool = True,
    params: tuple = (),
    text: str = "",
) -> dict:
    """One operation. auth: None (public), "user", "admin" or "user+query" (also `?token=`).

    The errors an auth mode or a JSON body implies (401, 403, 400, 408, 413) are added here.
    """
    implied = {
        "user": ("NotAuthenticated",),
        "user+query": ("NotAuthenticated",),
        "admin": ("NotAuthenticated", "Forbidden"),
        None: (),
    }[auth]
    if request is not None:
        implied += ("BadBody", "TooLarge", "Timeout")
    return {
        "tag": tag,
        "summary": summary,
        "ok": ok,
        "errors": implied + errors,
        "auth": auth,
        "request": request,
        "body_required": body_required,
        "params": params,
        "text": text,
    }


WS_NOTE = (
    "Open with a websocket handshake (`ws://HOST/...`); a slow reader is closed with "
    "1008, every client with 1001 on shutdown. A plain GET is answered 400; a client "
    "address that already holds PRICEWATCH_MAX_WS_PER_ADDRESS websockets, 429. A client "
    "may send 20 messages/s (bursts of 40), else 1008; it holds at most 64 "
    "subscriptions. "
)
HOST_NOTE = (
    "`next`/`previous` start with PRICEWATCH_PUBLIC_URL when it is set, else with "
    "the request's Host, and a malformed Host is a 400 (field `Host`)."
)
PAGE_PARAMS = (
    query("page", {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}, "Page number, from 1."),
)

EVENT_PAGE_PARAMS = (
    *PAGE_PARAMS,
    query(
        "page_size",
        {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        "Events per page.",
    ),
)

VERIFY_NOTE = (
    "With SMTP configured a 6-digit code (24 h, 5 tries; `fields.code` of a 400 "
    "says how many are left) is mailed at most once a minute (else 429); without "
    "SMTP, resend is 503. 409: already verified, or no email."
)

OPERATIONS: dict[tuple[str, str], dict] = {
    ("GET", "/healthz"): op(
        "ops",
        "Health of the database and the feeds",
        {200: json_ok("Health"), 503: json_ok("Health", "Not healthy")},
        text="503 (same body) when the database does not answer, a live feed is stale, or "
        "a feed's trades are being dropped out of order (degraded).",
    ),
    ("GET", "/metrics"): op(
        "ops",
        "Prometheus metrics",
        {200: media_ok("text/plain", "Prometheus text exposition 0.0.4")},
    ),
    ("GET", "/openapi.json"): op(
        "ops", "This OpenAPI 3.1 document", {200: json_ok({"type": "object"})}
    ),
    ("GET", "/docs"): op("ops", "This document as HTML", {200: media_ok("text/html", "Page")}),
    ("GET", "/"): op("pages", "The live page", {200: media_ok("text/html", "Page")}),
    ("GET", "/rates/live"): op(
        "pages", "The live page (same as /)", {200: media_ok("text/html", "Page")}
    ),
    ("GET", "/favicon.ico"): op(
        "pages", "The page icon (SVG)", {200: media_ok("image/svg+xml", "Icon")}
    ),
    ("GET", "/static/vendor/lightweight-charts.standalone.production.js"): op(
        "pages",
        "The charting library the live page loads (TradingView Lightweight Charts, "
        "Apache-2.0; vendored, no CDN)",
        {200: media_ok("text/javascript", "Script")},
    ),
    ("POST", "/auth/register"): op(
        "auth",
        "Create a user and log in",
        {201: json_ok("Registered", "Created")},
        "Conflict",
        "RateLimited",
        request="Register",
        text="409 when the username is taken (after NFKC normalisation and case folding); "
        "429 past PRICEWATCH_REGISTER_LIMIT registrations per client address per hour.",
    ),
    ("POST", "/auth/token"): op(
        "auth",
        "Log in: a token pair",
        {200: json_ok("TokenPair")},
        "BadCredentials",
        "RateLimited",
        request="Login",
        text="Repeated failures for one username or client address answer 429.",
    ),
    ("POST", "/auth/token/refresh"): op(
        "auth",
        "Spend a refresh token for a new pair",
        {200: json_ok("TokenPair")},
        "NotAuthenticated",
        request="Refresh",
        text="A spent refresh token answers 401 and revokes every token of that login.",
    ),
    ("POST", "/auth/logout"): op(
        "auth", "Revoke a login", {204: NO_CONTENT}, "NotAuthenticated", request="Refresh"
    ),
    ("GET", "/auth/me"): op("auth", "The caller", {200: json_ok("User")}, auth="user"),
    ("PATCH", "/auth/me"): op(
        "auth",
        "Change the caller's email (unverified; a code is mailed)",
        {200: json_ok("User")},
        "RateLimited",
        auth="user",
        request="EmailIn",
        text=VERIFY_NOTE,
    ),
    ("POST", "/auth/verify-email"): op(
        "auth",
        "Verify the caller's email with the mailed code",
        {200: json_ok("Verified")},
        "Conflict",
        auth="user",
        request="VerifyIn",
        text=VERIFY_NOTE,
    ),
    ("POST", "/auth/verify-email/resend"): op(
        "auth",
        "Mail a new verification code",
        {202: json_ok("CodeSent", "Mail on its way")},
        "Conflict",
        "RateLimited",
        "Unavailable",
        auth="user",
        text=VERIFY_NOTE,
    ),
    ("GET", "/api/v1/prices"): op(
        "market", "Latest price of every symbol seen", {200: json_ok("PriceList")}
    ),
    ("GET", "/api/v1/prices/{symbol}"): op(
        "market",
        "Latest price of one symbol",
        {200: json_ok("Price")},
        "NotFound",
        text="404 for a symbol never seen.",
    ),
    ("GET", "/api/v1/ohlc"): op(
        "market",
        "Candles of a symbol",
        {200: json_ok("Ohlc")},
        "BadQuery",
        params=(
            query("symbol", ref("Symbol"), "Watched symbol.", required=True),
            query("timeframe", {**enum(*TIMEFRAMES), "default": "1m"}, "Candle width."),
            query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                "Newest candles to return.",
            ),
            query(
                "start",
                {"type": "string"},
                "Oldest candle start to include (ISO-8601 or "
                "ms); with `start` or `end` stored history beyond memory is read.",
            ),
            query(
                "end",
                {"type": "string"},
                "Newest candle start to include (ISO-8601 or "
                "ms); page back with the oldest start seen minus one.",
            ),
        ),
    ),
    ("GET", "/live-feed/subscribe"): op(
        "websockets",
        "Websocket: live prices and the caller's alert events",
        {101: SWITCHING},
        "NotAnUpgrade",
        "BadQuery",
        "RateLimited",
        auth="user+query",
        params=(
            query(
                "format",
                enum(*compat.PRICE_FORMATS),
                'finrise-assignment\'s messages: each price as `{"message": "<Binance trade '
                'event JSON as a string>"}`, and no alert events.',
            ),
        ),
        text=WS_NOTE + "Needs an access token (header, or `?token=` for browsers); "
        "without one the upgrade is refused with 401.\n\nClient sends "
        '`{"action": "subscribe"|"unsubscribe", "symbols": [...], "max_rate"?: N}` '
        "(default: all watched; `max_rate` 1..PRICEWATCH_WS_MAX_RATE price messages per "
        "symbol per second, 0 = every update, default PRICEWATCH_WS_MAX_RATE). "
        'Server sends `{"type": "price", symbol, price, bid, ask, time}` (conflated: '
        "the newest price, at most `max_rate` a second), "
        '`{"type": "subscribed"|"unsubscribed", "symbols": [...]}`, '
        '`{"type": "alert", "alert": Alert, "event": {id, time, price}}` for the caller\'s '
        'alerts and `{"type": "error", "detail"}` for a bad message. '
        '`{"action": "resume", "since": EVENT_ID}` re-sends the later events of the '
        'caller\'s alerts in order (at most 1000), then `{"type": "resumed", since, last, '
        "more, complete}`, then live ones; `more: true`: resume again from `last` (no live "
        "alert events until then). One resume per connection per 5 s, else `error`.",
    ),
    ("GET", "/ws/ohlc"): op(
        "websockets",
        "Websocket: candles of one symbol and timeframe",
        {101: SWITCHING},
        "NotAnUpgrade",
        "RateLimited",
        text=WS_NOTE + 'Client sends `{"symbol": "BTCUSDT", "timeframe": "1m", "limit"?, '
        '"max_rate"?, "action"?: "unsubscribe"}`. Server answers `{"type": "snapshot", '
        'symbol, timeframe, data: [Candle]}`, then `{"type": "candle", symbol, timeframe, '
        "candle}` with the newest state of each changed candle, at most `max_rate` a "
        'second (as on the live feed); a bad message gets `{"type": "error", "detail", '
        '"fields"}`.',
    ),
    ("GET", "/ws/rates"): op(
        "websockets",
        "Websocket: AlphaVantage quotes",
        {101: SWITCHING},
        "NotAnUpgrade",
        "RateLimited",
        text=WS_NOTE + "Server sends the latest stored quote on connect, then every new "
        'one, as `{"type": "quote", ...Quote}`. Client messages get `{"type": "error"}`.',
    ),
    ("POST", "/api/v1/alerts"): op(
        "alerts",
        "Create an alert",
        {201: json_ok("Alert", "Created")},
        "Conflict",
        "RateLimited",
        auth="user",
        request="AlertIn",
        text="409 when no price is known yet and no direction is given, or the user has "
        "reached the active alert cap; 429 past PRICEWATCH_ALERT_CREATE_RATE a minute.",
    ),
    ("GET", "/api/v1/alerts"): op(
        "alerts",
        "The caller's alerts, newest first",
        {200: json_ok("AlertPage")},
        "BadQuery",
        "NotFound",
        auth="user",
        params=(
            query("status", enum(*STATUSES), "Only alerts with this status (any case)."),
            *PAGE_PARAMS,
            query(
                "page_size",
                {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
                "Alerts per page.",
            ),
        ),
        text="404 for a page past the last. " + HOST_NOTE,
    ),
    ("GET", "/api/v1/alerts/{alert_id}"): op(
        "alerts", "One alert", {200: json_ok("Alert")}, "NotFound", auth="user"
    ),
    ("PUT", "/api/v1/alerts/{alert_id}"): op(
        "alerts",
        "Replace an alert",
        {200: json_ok("Alert")},
        "NotFound",
        "Conflict",
        auth="user",
        request="AlertIn",
        text="409 unless the alert is CREATED.",
    ),
    ("PATCH", "/api/v1/alerts/{alert_id}"): op(
        "alerts",
        "Change some fields of an alert",
        {200: json_ok("Alert")},
        "NotFound",
        "Conflict",
        auth="user",
        request="AlertPatch",
        text="409 unless the alert is CREATED.",
    ),
    ("GET", "/api/v1/alerts/{alert_id}/events"): op(
        "alerts",
        "One alert's triggers, newest first",
        {200: json_ok("EventPage")},
        "NotFound",
        "BadQuery",
        auth="user",
        params=EVENT_PAGE_PARAMS,
        text="404 for a page past the last. " + HOST_NOTE,
    ),
    ("GET", "/api/v1/events"): op(
        "alerts",
        "The triggers of all the caller's alerts, newest first",
        {200: json_ok("EventPage")},
        "NotFound",
        "BadQuery",
        auth="user",
        params=EVENT_PAGE_PARAMS,
        text="404 for a page past the last. " + HOST_NOTE,
    ),
    ("DELETE", "/api/v1/alerts/{alert_id}"): op(
        "alerts",
        "Delete an alert (kept with status DELETED)",
        {200: json_ok("Alert")},
        "NotFound",
        auth="user",
    ),
    ("GET", "/api/v1/quotes"): op(
        "quotes",
        "Stored AlphaVantage quotes, newest first",
        {
            200: json_ok(
                {"anyOf": [ref("QuotePage"), ref("QuoteAll")]},
                "Paged with per_page; otherwise every row",
            )
        },
        "BadQuery",
        auth="user",
        text=HOST_NOTE,
        params=(
            *PAGE_PARAMS,
            query(
                "per_page", {"type": "integer", "minimum": 1, "maximum": 1000}, "Quotes per page."
            ),
        ),
    ),
    ("POST", "/api/v1/quotes"): op(
        "quotes",
        "Fetch a quote now and store it",
        {201: json_ok("Quote", "Created")},
        "UpstreamError",
        "Unavailable",
        "RateLimited",
        auth="user",
        request="QuoteIn",
        body_required=False,
        text="429 inside PRICEWATCH_QUOTE_MIN_GAP since the last fetch of the same pair.",
    ),
    ("GET", "/api/v1/feeds"): op(
        "feeds", "Extra upstream feeds", {200: json_ok("FeedList")}, auth="admin"
    ),
    ("POST", "/api/v1/feeds"): op(
        "feeds",
        "Add an extra upstream websocket feed",
        {201: json_ok("Feed", "Created")},
        "Conflict",
        auth="admin",
        request="FeedIn",
        text="Only ws:// and wss:// URLs of public hosts (unless "
        "PRICEWATCH_ALLOW_PRIVATE_FEEDS); 409 for a duplicate or past 16 feeds.",
    ),
    ("DELETE", "/api/v1/feeds"): op(
        "feeds",
        "Stop an extra feed by id or url",
        {204: NO_CONTENT},
        "NotFound",
        auth="admin",
        request="FeedDelete",
    ),
    ("DELETE", "/api/v1/feeds/{feed_id}"): op(
        "feeds", "Stop an extra feed", {204: NO_CONTENT}, "NotFound", auth="admin"
    ),
    ("GET", "/api/v1/channels"): op(
        "channels",
        "The caller's notification channels, email first",
        {200: json_ok("ChannelList")},
        auth="user",
    ),
    ("POST", "/api/v1/channels"): op(
        "channels",
        "Add a webhook or a Telegram chat",
        {201: json_ok("Channel", "Created")},
        "Conflict",
        "RateLimited",
        auth="user",
        request="ChannelIn",
        text="A webhook's generated `secret` is in this answer only. Webhook URLs: http(s) "
        "of public hosts (unless PRICEWATCH_ALLOW_PRIVATE_WEBHOOKS); telegram needs "
        f"PRICEWATCH_TELEGRAM_BOT_TOKEN (else 400). 409 past {MAX_CHANNELS} channels "
        f"(the email counts as one); 429 past {ADDS_PER_HOUR} attempts an hour.",
    ),
    ("DELETE", "/api/v1/channels/{channel_id}"): op(
        "channels",
        "Delete a channel",
        {204: NO_CONTENT},
        "NotFound",
        "Conflict",
        auth="user",
        text="409 for `email` (change the address with PATCH /auth/me).",
    ),
    ("POST", "/save_quotes"): op(
        "feeds",
        "Add an extra feed (the ots-capital-dj alias)",
        {201: json_ok("Feed", "Created")},
        "Conflict",
        auth="admin",
        request="SaveQuotesIn",
    ),
}


# -- seed-compatible routes (compat.py): aliases copy their operation, adapters are below ---

SEED = "compat"  # the routes of the five systems pricewatch replaces
# Adapter -> (its entry, the operation whose errors it also answers with, as it calls it).
SEED_ADAPTERS: dict[tuple[str, str], tuple[dict, tuple[str, str] | None]] = {
    ("POST", "/feed/user/register"): (
        op(
            SEED,
            "finrise-assignment: register (email optional) and get an access token",
            {201: json_ok("SeedAccessToken", "Created")},
            request="SeedRegister",
            text="As POST /auth/register; without an email none is ever sent.",
        ),
        ("POST", "/auth/register"),
    ),
    ("POST", "/alerts/create"): (
        op(
            SEED,
            "tanX.fi price alert: create a price alert named by its purpose",
            {201: json_ok("SeedAlertCreated", "Created")},
            "NotYourUser",
            auth="user",
            request="SeedAlertIn",
            text="As POST /api/v1/alerts with price = alert_price, the "
            "direction derived from the latest price; 403 when username is not the caller.",
        ),
        ("POST", "/api/v1/alerts"),
    ),
    ("DELETE", "/alerts/delete"): (
        op(
            SEED,
            "tanX.fi price alert: delete the caller's active alerts with this purpose",
            {200: json_ok("SeedAlertList")},
            "NotYourUser",
            "NotFound",
            auth="user",
            request="SeedAlertDelete",
            text="Every CREATED alert with that alert_purpose becomes "
            "DELETED; 404 when there is none.",
        ),
        None,
    ),
    ("POST", "/alerts/fetch"): (
        op(
            SEED,
            "tanX.fi price alert: the caller's alerts, newest first",
            {200: json_ok("SeedAlertList")},
            "NotYourUser",
            auth="user",
            request="SeedAlertFetch",
            text=f"At most {compat.FETCH_LIMIT}; GET /api/v1/alerts pages through all.",
        ),
        None,
    ),
}


def _seed_operations() -> dict[tuple[str, str], dict]:
    out = {}
    for route in compat.ROUTES:
        if route.same_as is not None:
            entry = OPERATIONS[route.same_as]
            out[(route.method, route.path)] = {
                **entry,
                "tag": SEED,
                "summary": f"{entry['summary']} (as {' '.join(route.same_as)})",
            }
            continue
        entry, calls = SEED_ADAPTERS[(route.method, route.path)]
        inherited = OPERATIONS[calls]["errors"] if calls is not None else ()
        out[(route.method, route.path)] = {
            **entry,
            "errors": tuple(dict.fromkeys(entry["errors"] + inherited)),
        }
    return out


OPERATIONS.update(_seed_operations())

SECURITY: dict[str | None, list[dict[str, list[str]]]] = {
    None: [],
    "user": [{"bearerAuth": []}],
    "admin": [{"bearerAuth": []}],
    "user+query": [{"bearerAuth": []}, {"tokenQuery": []}],
}


# -- building the document ------------------------------------------------------------------


def _operation(method: str, path: str, entry: dict) -> dict:
    operation: dict = {
        "operationId": method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_"),
        "summary": entry["summary"],
        "tags": [entry["tag"]],
        "security": SECURITY[entry["auth"]],
    }
    if entry["text"]:
        operation["description"] = entry["text"]
    params = [
        {"name": name, "in": "path", "required": True, "schema": PATH_PARAMS[name]}
        for name in re.findall(r"{(\w+)}", path)
    ]
    params += list(entry["params"])
    if params:
        operation["parameters"] = params
    if entry["request"] is not None:
        operation["requestBody"] = {
            "required": entry["body_required"],
            "content": {JSON: {"schema": ref(entry["request"])}},
        }
    responses = {str(status): answer for status, answer in entry["ok"].items()}
    for name in entry["errors"]:
        status = ERRORS[name][0]
        if str(status) in responses:  # two causes of one status: list the codes together
            responses[str(status)] = _merged(responses[str(status)], name)
        else:
            responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
    operation["responses"] = dict(sorted(responses.items()))
    return operation


def _merged(current: dict, name: str) -> dict:
    """One response for two error kinds of the same status (e.g. 400 body and query)."""
    first = current["$ref"].rsplit("/", 1)[1]
    status, codes, text, headers = ERRORS[first]
    _, more, more_text, more_headers = ERRORS[name]
    return _error_response(
        status,
        tuple(dict.fromkeys(codes + more)),
        f"{text} {more_text}",
        {**headers, **more_headers},
    )


def build_spec(app: web.Application) -> dict:
    """The OpenAPI 3.1 document of every operation in `OPERATIONS`."""
    market = app.get(MARKET)
    paths: dict[str, dict] = {}
    for (method, path), entry in OPERATIONS.items():
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, entry)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "pricewatch",
            "version": "0.1.0",
            "description": "Self-hosted crypto prices, candles, quotes and price alerts. "
            "Every path also answers with a trailing slash. Every 4xx/5xx body is "
            '`{"error": CODE, "detail": "...", "fields"?: {...}}`.',
        },
        "tags": [{"name": t} for t in dict.fromkeys(e["tag"] for e in OPERATIONS.values())],
        "paths": paths,
        "components": {
            "schemas": schemas(market.symbols if market is not None else None),
            "responses": {
                name: _error_response(status, codes, text, headers)
                for name, (status, codes, text, headers) in ERRORS.items()
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from /auth/token.",
                },
                "tokenQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "The access token, for browser websockets.",
                },
            },
        },
    }


async def spec_handler(request: web.Request) -> web.Response:
    return json_response(build_spec(request.app))
