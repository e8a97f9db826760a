"""HTTP handlers for `/api/v1/alerts`: validate, write the DB, then update the engine.

A user only ever sees their own alerts: every query is scoped by user id, so another
user's alert answers 404, never 403.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .alerts import AlertEngine
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
)
from .auth import require_identity
from .market import MARKET
from .store import Alert

ENGINE = web.AppKey("engine", AlertEngine)
STATUSES = ("CREATED", "TRIGGERED", "DELETED")
DIRECTIONS = ("above", "below")


def _alert_id(request: web.Request) -> int:
    try:
        value = int(request.match_info["alert_id"])
    except ValueError:
        raise not_found("Alert not found.") from None
    if not 0 < value < 2**63:
        raise not_found("Alert not found.")
    return value


def _validate(request: web.Request, data: dict[str, Any], current: Alert | None
              ) -> tuple[str, float, str]:
    """(asset, price, direction) from a POST/PUT body, or a PATCH over `current`.

    Raises ApiError 400 naming each bad field, 409 when the direction must be derived
    from a price that is not known yet.
    """
    market = request.app[MARKET]
    errors: dict[str, str] = {}
    asset = price = direction = None
    if "asset" in data or current is None:
        raw = data.get("asset")
        if raw is None or raw == "":
            errors["asset"] = REQUIRED
        elif not isinstance(raw, str) or raw.strip().upper() not in market.latest:
            errors["asset"] = "Not a watched symbol; one of: " + ", ".join(market.symbols)
        else:
            asset = raw.strip().upper()
    else:
        asset = current.asset
    if "price" in data or current is None:
        raw = data.get("price")
        checked = REQUIRED if raw is None else positive_number(raw)
        if isinstance(checked, str):
            errors["price"] = checked
        else:
            price = checked
    else:
        price = current.price
    if data.get("direction") is not None:
        raw = data["direction"]
        if not isinstance(raw, str) or raw.lower() not in DIRECTIONS:
            errors["direction"] = 'Must be "above" or "below".'
        else:
            direction = raw.lower()
    if errors:
        raise invalid(errors)
    if direction is None:
        if current is not None:  # PATCH keeps what it does not name
            direction = current.direction
        else:
            latest = market.price(asset)
            if latest is None:
                raise conflict(f"No price known yet for {asset}; give a direction.")
            direction = "above" if price > latest else "below"
    return asset, price, direction  # type: ignore[return-value]


async def create_alert(request: web.Request) -> web.Response:
    identity = require_identity(request)
    data = await read_json(request)
    asset, price, direction = _validate(request, data, None)
    app = request.app
    engine = app[ENGINE]
    alert = await engine.store.create_alert(identity.user_id, asset, price, direction,
                                            max_active=engine.max_active)
    engine.track(alert)
    return json_response(alert.public(), status=201)


_PAGE_URLS: dict[tuple, str] = {}  # (scheme, host, path and query, page) -> its URL


def _page_url(request: web.Request, page: int | None) -> str | None:
    if page is None:
        return None
    # Made once per distinct request (yarl's URL building is a tenth of a list request).
    key = (request.scheme, request.host, request.path_qs, page)
    url = _PAGE_URLS.get(key)
    if url is None:
        query = dict(request.query)
        query["page"] = str(page)
        url = str(request.url.with_query(query))
        if len(_PAGE_URLS) >= 4096:
            _PAGE_URLS.clear()
        _PAGE_URLS[key] = url
    return url


async def list_alerts(request: web.Request) -> web.Response:
    identity = require_identity(request)
    errors: dict[str, str] = {}
    status = request.query.get("status")
    if status is not None and status.upper() not in STATUSES:
        errors["status"] = "Must be one of " + ", ".join(STATUSES) + "."
    page = query_int(request, "page", 1, 1, 2**31 - 1, errors)  # offset fits SQLite
    page_size = query_int(request, "page_size", 10, 1, 100, errors)
    if errors:
        raise invalid(errors)
    page_read = await request.app[ENGINE].store.list_alerts(
        identity.user_id, status.upper() if status else None, (page - 1) * page_size,
        page_size)
    count, alerts = page_read
    if page > 1 and not alerts:
        raise ApiError(404, "not_found", "Invalid page.")
    last_page = max(1, -(-count // page_size))
    return json_response({
        "count": count,
        "next": _page_url(request, page + 1 if page < last_page else None),
        "previous": _page_url(request, page - 1 if page > 1 else None),
        "results": _public_page(page_read),
    })


# The store hands back the same page object until a commit changes the database: its wire
# form is made once per such page, not per request (polling clients; see bench/http.py).
_PUBLIC_PAGES: dict[int, tuple[tuple, list[dict]]] = {}  # id(page) -> (page, public form)


def _public_page(page_read: tuple[int, list[Alert]]) -> list[dict]:
    cached = _PUBLIC_PAGES.get(id(page_read))
    if cached is not None and cached[0] is page_read:  # held, so its id is not reused
        return cached[1]
    if len(_PUBLIC_PAGES) >= 1024:
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
    asset, price, direction = _validate(
        request, data, current if request.method == "PATCH" else None)
    alert = await engine.store.update_alert(identity.user_id, alert_id, asset, price,
                                            direction)
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

