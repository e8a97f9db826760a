"""HTTP handlers for `/api/v1/alerts`: validate, write the DB, then update the engine.

A user only ever sees their own alerts: every query is scoped by user id, so another
user's alert answers 404, never 403.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from . import clock
from .alerts import ENGINE
from .api import (
    REQUIRED,
    ApiError,
    conflict,
    invalid,
    json_response,
    not_found,
    positive_number,
    query_int,
    read_json,
    strict_int,
)
from .auth import require_identity
from .links import base_url, page_url
from .market import MARKET
from .percent_index import MIN_PERCENT, PERCENT_DIRECTIONS, WINDOWS
from .storage.alerts import MIN_COOLDOWN
from .store import Alert

STATUSES = ("CREATED", "TRIGGERED", "DELETED", "EXPIRED")
KINDS = ("price", "percent")
DIRECTIONS = ("above", "below")
MAX_COOLDOWN = 30 * 86400
DEFAULT_COOLDOWN = 3600
MAX_NOTE = 200
CHANNELS_TEXT = 'A non-empty list of channel ids from GET /api/v1/channels: "email" and integers.'


def _alert_id(request: web.Request) -> int:
    value = strict_int(request.match_info["alert_id"])  # int() takes " 5", "1_0", "١٢٣"
    if value is None or not 0 < value < 2**63:
        raise not_found("Alert not found.")
    return value


MAX_EXPIRY = 221_845_392_000.0  # 9000-01-01T00:00:00Z


def _expiry(raw: Any) -> float | str:
    """An ISO-8601 time in the future as epoch seconds, or the error message."""
    if not isinstance(raw, str):
        return "An ISO-8601 UTC time, e.g. 2030-01-01T00:00:00Z."
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        return "An ISO-8601 UTC time, e.g. 2030-01-01T00:00:00Z."
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        at = when.timestamp()
    except (OverflowError, OSError, ValueError):
        return "An ISO-8601 UTC time, e.g. 2030-01-01T00:00:00Z."
    if at <= clock.now():
        return "Must be in the future."
    if at >= MAX_EXPIRY:  # beyond it a time cannot be written back as ISO-8601
        return "Must be before the year 9000."
    return at


def _number(raw: Any, lo: float, hi: float, lo_open: bool, text: str) -> float | str:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return text
    try:
        if not math.isfinite(raw):
            return text
    except OverflowError:  # an integer too large for a float (10**400)
        return text
    if raw < lo or (lo_open and raw == lo) or raw > hi:
        return text
    return float(raw)


def _channel_list(raw: Any) -> list[int | str] | str:
    """Channel ids as given ("email", integers, or integers as text), without repeats, or
    the error message. Whether they are the user's is `_check_channels`' business."""
    if not isinstance(raw, list) or not raw or len(raw) > 64:
        return CHANNELS_TEXT
    ids: list[int | str] = []
    for item in raw:
        if isinstance(item, str) and item != "email":
            item = strict_int(item) or item  # ASCII digits only: not " 5", "1_0", "١٢٣"
        if item != "email" and (
            isinstance(item, bool) or not isinstance(item, int) or not 0 < item < 2**63
        ):
            return CHANNELS_TEXT
        if item not in ids:
            ids.append(item)
    return ids


async def _check_channels(
    request: web.Request, user_id: int, data: dict[str, Any], fields: dict[str, Any]
) -> None:
    """400 naming the channel ids the request gave (`data`) that are not the user's (those
    a PATCH keeps are not judged again: an address removed since must not block it)."""
    wanted = fields.get("channels")
    if wanted is None or data.get("channels") is None:
        return
    have = set(await request.app[ENGINE].store.channel_ids(user_id))
    unknown = [str(c) for c in wanted if c not in have]
    if unknown:
        raise invalid(
            {
                "channels": "Not one of your channels: "
                + ", ".join(unknown)
                + " (GET /api/v1/channels lists them)."
            }
        )


def _given(data: dict[str, Any], name: str) -> bool:
    return data.get(name) is not None


def _keep(current: Alert | None, name: str, default: Any) -> Any:
    """A PATCH keeps what it does not name: `current`'s field, else `default`."""
    return getattr(current, name) if current is not None else default


def _validate(request: web.Request, data: dict[str, Any], current: Alert | None) -> dict[str, Any]:
    """The alert's fields (asset, price, direction, kind, percent, window, repeat,
    cooldown, expires_at, note) from a POST/PUT body, or a PATCH over `current`.

    Raises ApiError 400 naming each bad field, 409 when a price alert's direction must be
    derived from a price that is not known yet.
    """
    market = request.app[MARKET]
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}

    if "asset" in data or current is None:
        raw = data.get("asset")
        if raw is None or raw == "":
            errors["asset"] = REQUIRED
        elif not isinstance(raw, str) or raw.strip().upper() not in market.latest:
            errors["asset"] = "Not a watched symbol; one of: " + ", ".join(market.symbols)
        else:
            out["asset"] = raw.strip().upper()
    else:
        out["asset"] = current.asset
    kind = _keep(current, "kind", "price")
    if _given(data, "kind"):
        if data["kind"] not in KINDS:
            errors["kind"] = 'Must be "price" or "percent".'
            kind = None
        else:
            kind = data["kind"]
    out["kind"] = kind
    # The alert being changed when it keeps its kind: its fields are the defaults.
    same = current if current is not None and current.kind == kind else None
    if kind == "price":
        _price_fields(data, same, errors, out)
    elif kind == "percent":
        _percent_fields(data, same, errors, out)
    _common_fields(data, current, errors, out)
    if errors:
        raise invalid(errors)
    if "direction" not in out:  # a price alert without one: from the latest price
        latest = market.price(out["asset"])
        if latest is None:
            raise conflict(f"No price known yet for {out['asset']}; give a direction.")
        out["direction"] = "above" if out["price"] > latest else "below"
    return out


def _price_fields(
    data: dict[str, Any], same: Alert | None, errors: dict[str, str], out: dict[str, Any]
) -> None:
    """A price alert's price and direction (percent and window: none)."""
    if "price" in data or same is None:
        raw = data.get("price")
        checked = REQUIRED if raw is None else positive_number(raw)
        if isinstance(checked, str):
            errors["price"] = checked
        else:
            out["price"] = checked
    else:
        out["price"] = same.price
    for name in ("percent", "window"):
        if _given(data, name):
            errors[name] = "Only for percent alerts."
    out["percent"] = out["window"] = None
    if _given(data, "direction"):
        raw = data["direction"]
        if not isinstance(raw, str) or raw.lower() not in DIRECTIONS:
            errors["direction"] = 'Must be "above" or "below".'
        else:
            out["direction"] = raw.lower()
    elif same is not None:
        out["direction"] = same.direction


def _percent_fields(
    data: dict[str, Any], same: Alert | None, errors: dict[str, str], out: dict[str, Any]
) -> None:
    """A percent alert's percent, window and direction (price: none)."""
    if _given(data, "price"):
        errors["price"] = "Only for price alerts."
    out["price"] = None
    if "percent" in data or same is None:
        # A move of 1e-9 % is every trade: at least MIN_PERCENT (docs/limits.md).
        checked = _number(
            data.get("percent"), MIN_PERCENT, 100, False, f"A number from {MIN_PERCENT:g} to 100."
        )
        if isinstance(checked, str):
            errors["percent"] = REQUIRED if data.get("percent") is None else checked
        else:
            out["percent"] = checked
    else:
        out["percent"] = same.percent
    if "window" in data or same is None:
        raw = data.get("window")
        if not isinstance(raw, str) or raw not in WINDOWS:
            errors["window"] = REQUIRED if raw is None else "One of " + ", ".join(WINDOWS) + "."
        else:
            out["window"] = raw
    else:
        out["window"] = same.window
    raw = data.get("direction")
    if raw is None:
        out["direction"] = same.direction if same is not None else "any"
    elif not isinstance(raw, str) or raw.lower() not in PERCENT_DIRECTIONS:
        errors["direction"] = 'Must be "up", "down" or "any".'
    else:
        out["direction"] = raw.lower()


def _common_fields(
    data: dict[str, Any], current: Alert | None, errors: dict[str, str], out: dict[str, Any]
) -> None:
    """Repeat, cooldown, expiry, note and channels, for either kind."""
    out["repeat"] = _keep(current, "repeat", False)
    if "repeat" in data:
        if not isinstance(data["repeat"], bool):
            errors["repeat"] = "true or false."
        else:
            out["repeat"] = data["repeat"]
    out["cooldown"] = _keep(current, "cooldown", DEFAULT_COOLDOWN)
    if "cooldown" in data:
        checked = _number(
            data["cooldown"],
            MIN_COOLDOWN,
            MAX_COOLDOWN,
            False,
            f"Seconds, at least {MIN_COOLDOWN} and at most {MAX_COOLDOWN}.",
        )
        if isinstance(checked, str):
            errors["cooldown"] = checked
        else:
            out["cooldown"] = checked
    out["expires_at"] = _keep(current, "expires_at", None)
    if "expires_at" in data:
        expiry = None if data["expires_at"] is None else _expiry(data["expires_at"])
        if isinstance(expiry, str):
            errors["expires_at"] = expiry
        else:
            out["expires_at"] = expiry
    out["note"] = _keep(current, "note", None)
    if "note" in data:
        raw = data["note"]
        if raw is not None and (not isinstance(raw, str) or len(raw) > MAX_NOTE):
            errors["note"] = f"Text of at most {MAX_NOTE} characters."
        else:
            out["note"] = raw
    out["channels"] = _keep(current, "channels", None)  # None: every channel the user has
    if "channels" in data and data["channels"] is not None:
        channels = _channel_list(data["channels"])
        if isinstance(channels, str):
            errors["channels"] = channels
        else:
            out["channels"] = channels


def _store_fields(fields: dict[str, Any]) -> tuple[str, float | None, str, dict[str, Any]]:
    extra = {k: v for k, v in fields.items() if k not in ("asset", "price", "direction")}
    return fields["asset"], fields["price"], fields["direction"], extra


async def create_alert(request: web.Request) -> web.Response:
    """201 with the new alert; 429 `rate_limited` past the user's creations per minute
    (counted when a valid creation reaches the database, checked with no await between)."""
    identity = require_identity(request)
    data = await read_json(request)
    asset, price, direction, extra = _store_fields(_validate(request, data, None))
    await _check_channels(request, identity.user_id, data, extra)
    app = request.app
    engine = app[ENGINE]
    creations = request.app[ENGINE].creations
    wait = creations.take(str(identity.user_id))
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"At most {creations.limit} alerts may be created per minute.",
            headers={"Retry-After": str(wait)},
        )
    alert = await engine.store.create_alert(
        identity.user_id, asset, price, direction, max_active=engine.max_active, **extra
    )
    engine.track(alert)
    return json_response(alert.public(), status=201)


def _page_params(request: web.Request, errors: dict[str, str]) -> tuple[int, int]:
    page = query_int(request, "page", 1, 1, 2**31 - 1, errors)  # offset fits SQLite
    page_size = query_int(request, "page_size", 10, 1, 100, errors)
    return page or 1, page_size or 10


_PAGE_URLS: dict[tuple, str] = {}  # (base, path and query, page) -> its URL


def _link(base: str, request: web.Request, page: int) -> str:
    # Made once per distinct request (yarl's URL building is a tenth of a list request).
    # Bounded in bytes too: only ordinary query strings are kept (a client could send
    # kilobytes of junk parameters per request), at most 1024 of them.
    key = (base, request.path_qs, page)
    url = _PAGE_URLS.get(key)
    if url is None:
        url = page_url(base, request, page)
        if len(request.path_qs) <= 256:
            if len(_PAGE_URLS) >= 1024:
                _PAGE_URLS.clear()
            _PAGE_URLS[key] = url
    return url


def _page(
    request: web.Request,
    base: str,
    page: int,
    page_size: int,
    count: int,
    rows: list,
    results: list[dict] | None = None,
) -> web.Response:
    """`{count, next, previous, results}`; 404 for a page past the last."""
    if page > 1 and not rows:
        raise ApiError(404, "not_found", "Invalid page.")
    last_page = max(1, -(-count // page_size))
    return json_response(
        {
            "count": count,
            "next": _link(base, request, page + 1) if page < last_page else None,
            "previous": _link(base, request, page - 1) if page > 1 else None,
            "results": results if results is not None else [row.public() for row in rows],
        }
    )


async def list_alerts(request: web.Request) -> web.Response:
    identity = require_identity(request)
    errors: dict[str, str] = {}
    status = request.query.get("status")
    if status is not None and status.upper() not in STATUSES:
        errors["status"] = "Must be one of " + ", ".join(STATUSES) + "."
    page, page_size = _page_params(request, errors)
    if errors:
        raise invalid(errors)
    base = base_url(request)  # 400 for a malformed Host
    page_read = await request.app[ENGINE].store.list_alerts(
        identity.user_id, status.upper() if status else None, (page - 1) * page_size, page_size
    )
    count, alerts = page_read
    return _page(request, base, page, page_size, count, alerts, _public_page(page_read))


async def list_events(request: web.Request) -> web.Response:
    """`GET /api/v1/events` and `GET /api/v1/alerts/{id}/events`: triggers, newest first."""
    identity = require_identity(request)
    store = request.app[ENGINE].store
    alert_id = None
    if "alert_id" in request.match_info:
        alert_id = _alert_id(request)
        await store.get_alert(identity.user_id, alert_id)  # 404 unless the user's
    errors: dict[str, str] = {}
    page, page_size = _page_params(request, errors)
    if errors:
        raise invalid(errors)
    base = base_url(request)
    count, events = await store.list_events(
        identity.user_id, alert_id, (page - 1) * page_size, page_size
    )
    return _page(request, base, page, page_size, count, events)


# The store hands back the same page object until a commit changes the database: its wire
# form is made once per such page, not per request (polling clients; see bench/http.py).
_PUBLIC_PAGES: dict[int, tuple[tuple, list[dict]]] = {}  # id(page) -> (page, public form)


def _public_page(page_read: tuple[int, list[Alert]]) -> list[dict]:
    cached = _PUBLIC_PAGES.get(id(page_read))
    if cached is not None and cached[0] is page_read:  # held, so its id is not reused
        return cached[1]
    if len(_PUBLIC_PAGES) >= 256:  # up to 100 alerts each
        _PUBLIC_PAGES.clear()
    public = [a.public() for a in page_read[1]]
    _PUBLIC_PAGES[id(page_read)] = (page_read, public)
    return public


async def get_alert(request: web.Request) -> web.Response:
    identity = require_identity(request)
    alert = await request.app[ENGINE].store.get_alert(identity.user_id, _alert_id(request))
    return json_response(alert.public())


async def update_alert(request: web.Request) -> web.Response:
    identity = require_identity(request)
    alert_id = _alert_id(request)
    engine = request.app[ENGINE]
    data = await read_json(request)
    current = await engine.store.get_alert(identity.user_id, alert_id)
    if current.status != "CREATED":
        raise conflict(f"Alert is {current.status}; only CREATED alerts can change.")
    asset, price, direction, extra = _store_fields(
        _validate(request, data, current if request.method == "PATCH" else None)
    )
    await _check_channels(request, identity.user_id, data, extra)
    alert = await engine.store.update_alert(
        identity.user_id, alert_id, asset, price, direction, **extra
    )
    engine.track(alert)
    return json_response(alert.public())


async def delete_alert(request: web.Request) -> web.Response:
    identity = require_identity(request)
    engine = request.app[ENGINE]
    alert = await engine.store.delete_alert(identity.user_id, _alert_id(request))
    engine.untrack(alert.id)
    return json_response(alert.public())


def add_routes(app: web.Application, add_route) -> None:
    add_route(app, "POST", "/api/v1/alerts", create_alert)
    add_route(app, "GET", "/api/v1/alerts", list_alerts)
    add_route(app, "GET", "/api/v1/alerts/{alert_id}", get_alert)
    add_route(app, "PUT", "/api/v1/alerts/{alert_id}", update_alert)
    add_route(app, "PATCH", "/api/v1/alerts/{alert_id}", update_alert)
    add_route(app, "DELETE", "/api/v1/alerts/{alert_id}", delete_alert)
    add_route(app, "GET", "/api/v1/alerts/{alert_id}/events", list_events)
    add_route(app, "GET", "/api/v1/events", list_events)
