"""The HTTP edge shared by every handler: the error type, JSON in and out, field checks.

Every 4xx/5xx body has the contract's shape `{"error", "detail", "fields"?}`; handlers raise
`ApiError` and the middleware in server.py renders it.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, overload

import orjson
from aiohttp import web

REQUIRED = "This field is required."

# Seconds a client has to send a request body once it is being read (408 `timeout` after).
# Read at each request, so tests may lower it.
BODY_TIMEOUT = 30.0


class ApiError(Exception):
    """An error answer: HTTP status, contract error code, human detail, optional fields."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        fields: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.fields = fields
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.fields is not None:
            body["fields"] = self.fields
        return body


def invalid(fields: dict[str, str]) -> ApiError:
    """A 400 validation error naming each bad field."""
    return ApiError(400, "validation", "Invalid input.", fields)


def not_found(what: str = "Not found.") -> ApiError:
    return ApiError(404, "not_found", what)


def conflict(detail: str) -> ApiError:
    return ApiError(409, "conflict", detail)


def not_authenticated() -> ApiError:
    return ApiError(
        401,
        "not_authenticated",
        "Invalid Authentication Credentials",
        headers={"WWW-Authenticate": 'Bearer realm="pricewatch"'},
    )


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


async def read_json(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object. Raises ApiError 400 `invalid_json` otherwise.

    The body size limit (64 KiB) is enforced by aiohttp while reading (413). A body that is
    not complete within `BODY_TIMEOUT` seconds is a 408 `timeout` (the connection then ends).
    Numbers JSON allows but a float cannot hold (1e309, an integer of 400 digits) and NaN or
    Infinity are returned as read, so that field validation can name the field.
    """
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()
    except TimeoutError:
        raise ApiError(
            408, "timeout", f"The request body did not arrive within {BODY_TIMEOUT:g} s."
        ) from None
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "invalid_json", "Request body must be a JSON object.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses NaN, Infinity, 1e309 and integers past 64 bits outright; the stdlib
        # parser reads them (as floats, or as a big int) so that validation can name the
        # field instead of rejecting the whole body.
        try:
            data = json.loads(raw)
            # What orjson refused for other reasons: strings that are not valid Unicode
            # (lone surrogates written as \ud800 escapes) cannot be encoded back to UTF-8.
            json.dumps(data, ensure_ascii=False).encode()
        except (ValueError, RecursionError, TypeError):  # UnicodeError is a ValueError
            raise ApiError(400, "invalid_json", "Request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "Request body must be a JSON object.")
    return data


def text_field(
    data: dict[str, Any], name: str, errors: dict[str, str], most: int | None = None
) -> str:
    """The non-empty string field `name` of a body; "" when it is missing or invalid, and
    then the reason is recorded in `errors` under its name."""
    raw = data.get(name)
    if raw is None or raw == "":
        errors[name] = REQUIRED
    elif not isinstance(raw, str):
        errors[name] = "Not a valid string."
    elif most is not None and len(raw) > most:
        errors[name] = f"Ensure this field has at most {most} characters."
    else:
        return raw
    return ""


def positive_number(value: Any) -> float | str:
    """A finite number > 0 as float, or the error message for the field."""
    # bool is an int subclass: True must not become a price of 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "A valid number is required."
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return "Ensure this value is a finite number."
    if not math.isfinite(number):
        return "Ensure this value is a finite number."
    if number <= 0:
        return "Ensure this value is greater than 0."
    return number


def strict_int(raw: str) -> int | None:
    """An integer written in ASCII digits with an optional minus sign, at most 18 of them;
    None otherwise (Python's int() also takes "1_0", " 5", full-width and Arabic digits)."""
    digits = raw[1:] if raw.startswith("-") else raw
    if not (0 < len(digits) <= 18 and digits.isascii() and digits.isdigit()):
        return None
    return int(raw)


@overload
def query_int(
    request: web.Request, name: str, default: int, lo: int, hi: int | None, errors: dict[str, str]
) -> int: ...


@overload
def query_int(
    request: web.Request,
    name: str,
    default: int | None,
    lo: int,
    hi: int | None,
    errors: dict[str, str],
) -> int | None: ...


def query_int(
    request: web.Request,
    name: str,
    default: int | None,
    lo: int,
    hi: int | None,
    errors: dict[str, str],
) -> int | None:
    """Parse an integer query parameter, recording a message in `errors` when it is bad."""
    raw = request.query.get(name)
    if raw is None:
        return default
    value = strict_int(raw)
    if value is None:
        errors[name] = "A valid integer is required."
        return default
    if value < lo or (hi is not None and value > hi):
        errors[name] = (
            f"Ensure this value is between {lo} and {hi}."
            if hi is not None
            else f"Ensure this value is at least {lo}."
        )
        return default
    return value
