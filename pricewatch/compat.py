"""Seed-compatible routes: the documented routes of the five systems pricewatch replaces.

`ROUTES` is the one table: seed route -> the pricewatch handler that serves it. Most are plain
aliases of a handler in auth.py or alerts_api.py (`same_as` names the operation, and the
OpenAPI document copies its description). Where a seed's request or response differs, an
adapter below reshapes the request, calls the same handler and reshapes its answer; it never
re-implements what the handler does (validation, limits, direction, the engine).

- Seed 000 (live feed): `POST /feed/user/register/` answers `{"access_token"}` and needs no
  email; `?format=binance` on `/live-feed/subscribe/` sends each price as
  `{"message": "<Binance trade JSON as a string>"}` (a price format the market offers).
- The `/users/auth/` seed: simplejwt's register / token / refresh under other paths.
- Seed 002 (alerts by purpose): the user is named in the body and must be the token's user
  (403 otherwise: a body never chooses whose alerts are touched); the purpose is the alert's
  `note`.
- Seed 004: `/alert/` and `/alert/{id}/` are `/api/v1/alerts[/{id}]` (`page_size` included).
- Seed 003 (`/ws/ohlc/`) needs nothing: its snapshot `data` is already what it reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import alerts_api, auth
from .alerts import ENGINE
from .alerts_api import STATUSES
from .api import (
    REQUIRED,
    ApiError,
    invalid,
    json_response,
    not_authenticated,
    not_found,
    read_json,
    text_field,
)
from .market import MARKET, Latest
from .schema import username_key
from .store import Alert

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_PURPOSE = 200  # characters; the limit the contract sets for an alert's note
FETCH_LIMIT = 1000  # alerts in one /alerts/fetch/ answer, newest first (the seed had no pages)


@dataclass(frozen=True, slots=True)
class SeedRoute:
    """One seed route. `same_as` is the pricewatch operation it aliases unchanged (METHOD,
    path); None for an adapter, documented on its own in openapi.py."""

    method: str
    path: str
    handler: Handler
    same_as: tuple[str, str] | None = None


# -- requests and answers in other shapes ---------------------------------------------------


def _copy(request: web.Request) -> web.Request:
    """A copy of `request` for a handler that reads its body itself, to be given its body
    with `_carrying`. Made before `request`'s body is read (aiohttp clones only unread
    requests); it keeps the request's state (the caller's identity) and match info."""
    return request.clone()


def _carrying(copy: web.Request, data: dict[str, Any]) -> web.Request:
    """`copy` (from `_copy`) with `data` as its JSON body."""
    # aiohttp's read() returns the body already read, if any: the copy has "read" this one.
    # json, not orjson: a number past 64 bits (10**400) must reach field validation.
    copy._read_bytes = json.dumps(data).encode()
    return copy


def _answer(response: web.StreamResponse) -> Any:
    """The JSON body of a handler's answer (handlers answer with `json_response`)."""
    body = response.body if isinstance(response, web.Response) else None
    assert isinstance(body, bytes | bytearray)
    return orjson.loads(body)


def _renamed_fields(error: ApiError, names: dict[str, str]) -> ApiError:
    """`error` with its validation fields named as the seed's body names them."""
    if error.fields:
        error.fields = {names.get(k, k): v for k, v in error.fields.items()}
    return error


async def _check_user(request: web.Request, identity: auth.Identity, name: str) -> str:
    """The caller's username. Raises 403 when the body named another user: the token says
    whose alerts these are, never the body."""
    user = await request.app[ENGINE].store.user_by_id(identity.user_id)
    if user is None:  # deleted since the token was issued
        raise not_authenticated()
    # One user, as logins see it: the exact name, or any form with the same key.
    if name != user.username and username_key(name) != username_key(user.username):
        raise ApiError(403, "forbidden", "username must be the user the token was issued to.")
    return user.username


# The seed's decimal as text: ASCII digits, one optional point (Python's float() also takes
# "1_000", " 5 ", "١٢٣", "1e3", "inf"). No sign (a price is > 0) and no exponent: the seed's
# clients wrote prices as they read them ("65000.50"). Sizes as its DecimalField had them.
SEED_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,8})?")
SEED_DECIMAL_TEXT = (
    "A number, or a decimal as text: ASCII digits with at most one point "
    '(e.g. "65000.50"; at most 15 digits before it and 8 after).'
)


def _seed_price(raw: Any, errors: dict[str, str]) -> Any:
    """The seed took a decimal (`"65000.50"` or `65000.5`); pricewatch takes a number. Text
    must be a plain decimal (SEED_DECIMAL), else its error goes in `errors`; a number goes
    on as it is, for the alerts API's own validation."""
    if raw is None:
        errors["alert_price"] = REQUIRED
    elif isinstance(raw, str):
        if SEED_DECIMAL.fullmatch(raw) is None:
            errors["alert_price"] = SEED_DECIMAL_TEXT
            return raw
        return float(raw)
    return raw


def seed_alert(alert: Alert) -> dict[str, Any]:
    """An alert as seed 002's clients read it (its field names), plus pricewatch's fields."""
    return {
        **alert.public(),
        "alert_purpose": alert.note,
        "alert_price": alert.price,
        "alert_status": alert.status,
    }


# -- seed 000 ------------------------------------------------------------------------------


async def feed_register(request: web.Request) -> web.Response:
    """`POST /feed/user/register/` `{username, password, email?}` -> 201 `{"access_token"}`.

    `/auth/register` with the email optional (a user without one is stored with "" and is
    never mailed)."""
    request[auth.EMAIL_OPTIONAL] = True
    response = await auth.register(request)
    return json_response({"access_token": _answer(response)["access"]}, status=201)


def binance_trade(latest: Latest) -> bytes:
    """Seed 000's live message: `{"message": "<Binance trade event JSON>"}`, the event built
    from the latest trade with the fields known for it (event type, event and trade time in
    ms, symbol, price as Binance's 8-decimal string)."""
    event = {
        "e": "trade",
        "E": latest.time,
        "s": latest.symbol,
        "p": f"{latest.price:.8f}",
        "T": latest.time,
    }
    return orjson.dumps({"message": orjson.dumps(event).decode()})


# -- seed 002 ------------------------------------------------------------------------------


async def create_by_purpose(request: web.Request) -> web.Response:
    """`POST /alerts/create/` `{username, alert_purpose, alert_price, asset?}` -> 201.

    `POST /api/v1/alerts` with `asset` defaulting to the first watched symbol (the seed knew
    BTC only) and the direction derived from the latest price; then the purpose is stored as
    the alert's note. Answers the alert in seed 002's names plus `username`.
    """
    identity = auth.require_identity(request)
    copy = _copy(request)
    data = await read_json(request)
    errors: dict[str, str] = {}
    name = text_field(data, "username", errors)
    purpose = text_field(data, "alert_purpose", errors, MAX_PURPOSE)
    price = _seed_price(data.get("alert_price"), errors)
    if errors:
        raise invalid(errors)
    username = await _check_user(request, identity, name)
    body = {"asset": data.get("asset", request.app[MARKET].symbols[0]), "price": price}
    try:
        created = _answer(await alerts_api.create_alert(_carrying(copy, body)))
    except ApiError as exc:
        raise _renamed_fields(exc, {"price": "alert_price"}) from None
    # A second small write: a failure here leaves an alert without its purpose (still listed
    # by /alerts/fetch/ and /api/v1/alerts), never a purpose without an alert.
    alert = await request.app[ENGINE].store.set_alert_note(identity.user_id, created["id"], purpose)
    return json_response({"username": username, **seed_alert(alert)}, status=201)


async def delete_by_purpose(request: web.Request) -> web.Response:
    """`DELETE /alerts/delete/` `{username, alert_purpose}` -> 200 `{"username", "alert
    details": [...]}`: every CREATED alert of the caller with that purpose is soft-deleted
    (status DELETED, as `DELETE /api/v1/alerts/{id}`). 404 when there is none."""
    identity = auth.require_identity(request)
    data = await read_json(request)
    errors: dict[str, str] = {}
    name = text_field(data, "username", errors)
    purpose = text_field(data, "alert_purpose", errors, MAX_PURPOSE)
    if errors:
        raise invalid(errors)
    username = await _check_user(request, identity, name)
    engine = request.app[ENGINE]
    deleted = await engine.store.delete_alerts_by_note(identity.user_id, purpose)
    if not deleted:
        raise not_found("No active alert with that alert_purpose.")
    for alert in deleted:
        engine.untrack(alert.id)
    return json_response({"username": username, "alert details": [seed_alert(a) for a in deleted]})


async def fetch_by_user(request: web.Request) -> web.Response:
    """`POST /alerts/fetch/` `{username, alert_status?}` -> 200 `{"username", "alert
    details": [...]}`: the caller's alerts, newest first (at most FETCH_LIMIT; the paged
    list is `GET /api/v1/alerts`)."""
    identity = auth.require_identity(request)
    data = await read_json(request)
    errors: dict[str, str] = {}
    name = text_field(data, "username", errors)
    status = data.get("alert_status")
    if status is not None and (not isinstance(status, str) or status.upper() not in STATUSES):
        errors["alert_status"] = "Must be one of " + ", ".join(STATUSES) + "."
    if errors:
        raise invalid(errors)
    username = await _check_user(request, identity, name)
    _, alerts = await request.app[ENGINE].store.list_alerts(
        identity.user_id, status.upper() if status else None, 0, FETCH_LIMIT
    )
    return json_response({"username": username, "alert details": [seed_alert(a) for a in alerts]})


# -- the table -----------------------------------------------------------------------------

ROUTES: tuple[SeedRoute, ...] = (
    # seed 000
    SeedRoute("POST", "/feed/user/register", feed_register),
    SeedRoute("POST", "/feed/user/login", auth.token, ("POST", "/auth/token")),
    # the /users/auth/ seed
    SeedRoute("POST", "/users/auth/register", auth.register, ("POST", "/auth/register")),
    SeedRoute("POST", "/users/auth/token", auth.token, ("POST", "/auth/token")),
    SeedRoute("POST", "/users/auth/refresh", auth.refresh, ("POST", "/auth/token/refresh")),
    # seed 002
    SeedRoute("POST", "/alerts/signup", auth.register, ("POST", "/auth/register")),
    SeedRoute("POST", "/alerts/login", auth.token, ("POST", "/auth/token")),
    SeedRoute("POST", "/alerts/create", create_by_purpose),
    SeedRoute("DELETE", "/alerts/delete", delete_by_purpose),
    SeedRoute("POST", "/alerts/fetch", fetch_by_user),
    # seed 004
    SeedRoute("GET", "/alert", alerts_api.list_alerts, ("GET", "/api/v1/alerts")),
    SeedRoute("POST", "/alert", alerts_api.create_alert, ("POST", "/api/v1/alerts")),
    SeedRoute(
        "GET", "/alert/{alert_id}", alerts_api.get_alert, ("GET", "/api/v1/alerts/{alert_id}")
    ),
    SeedRoute(
        "PUT", "/alert/{alert_id}", alerts_api.update_alert, ("PUT", "/api/v1/alerts/{alert_id}")
    ),
    SeedRoute(
        "PATCH",
        "/alert/{alert_id}",
        alerts_api.update_alert,
        ("PATCH", "/api/v1/alerts/{alert_id}"),
    ),
    SeedRoute(
        "DELETE",
        "/alert/{alert_id}",
        alerts_api.delete_alert,
        ("DELETE", "/api/v1/alerts/{alert_id}"),
    ),
)

# Live-feed price formats (`/live-feed/subscribe/?format=NAME`).
PRICE_FORMATS = {"binance": binance_trade}


def add_routes(app: web.Application, add_route) -> None:
    """Register every seed route (with and without its trailing slash) and price format."""
    for route in ROUTES:
        add_route(app, route.method, route.path, route.handler)
    for name, render in PRICE_FORMATS.items():
        app[MARKET].add_price_format(name, render)
