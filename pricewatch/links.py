"""Absolute links to this service (pagination `next`/`previous`, emails).

With `PRICEWATCH_PUBLIC_URL` set, every link starts with it and the request's `Host` is never
looked at. Unset, links are built from the request's scheme and `Host`, which must then be a
well-formed `host[:port]`: anything else (`x:99999`, `a:b:c`, a raw non-ASCII byte) is a 400,
never a 500 and never reflected into a link.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web
from yarl import URL

from .api import ApiError

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_RE = re.compile(
    rf"(?P<name>(?:{_LABEL}\.)*{_LABEL}\.?|\[(?P<ip6>[0-9A-Fa-f:.]+)\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def _well_formed(host: str) -> bool:
    m = _HOST_RE.fullmatch(host)
    if m is None or len(m["name"]) > 255:
        return False
    if m["port"] is not None and not 0 < int(m["port"]) <= 65535:
        return False
    if m["ip6"] is not None:
        try:
            ipaddress.IPv6Address(m["ip6"])
        except ValueError:
            return False
    return True


PUBLIC_URL = web.AppKey("public_url", str)  # PRICEWATCH_PUBLIC_URL, set by create_app when given


def base_url(request: web.Request) -> str:
    """The base of absolute links: PRICEWATCH_PUBLIC_URL, else `scheme://host` from the
    request.

    Raises ApiError 400 `validation` (field `Host`) when the base would come from a
    malformed Host header.
    """
    public_url = request.app.get(PUBLIC_URL)
    if public_url is not None:
        return public_url
    host = request.headers.get("Host", "")
    if not _well_formed(host):
        raise ApiError(
            400,
            "validation",
            "Malformed Host header.",
            {"Host": "A host name or IP address with an optional port (1-65535)."},
        )
    return f"{request.scheme}://{host}"


def page_url(base: str, request: web.Request, page: int) -> str:
    """This request's path and query under `base`, with `page` set."""
    return str(
        URL(base + request.rel_url.raw_path, encoded=True).with_query(
            {**request.query, "page": str(page)}
        )
    )
