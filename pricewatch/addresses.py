"""Who is asking: the client address of a request, behind trusted reverse proxies or not.

Every per-address limit (logins, registrations, websockets) keys on `client_address()`.
Only a peer listed in `PRICEWATCH_TRUSTED_PROXIES` may name the client through
`X-Forwarded-For`; the right-most entry that is not itself a trusted proxy counts (entries to
its left were written by whoever talked to that proxy, so anyone could have forged them).
Like uvicorn's `proxy_headers._TrustedHosts`.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_address

from aiohttp import web

Network = IPv4Network | IPv6Network


class ClientAddresses:
    """Resolves the client address of requests for one app (see the module docstring)."""

    def __init__(self, trusted: Iterable[Network] = ()):
        self.trusted = tuple(trusted)

    def is_trusted(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            addr = ip_address(host.strip().strip("[]"))
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:  # ::ffff:10.0.0.1
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.trusted)

    def __call__(self, request: web.BaseRequest) -> str:
        peer = request.remote or "?"
        if not self.is_trusted(peer):
            return peer
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ())
                for h in v.split(",")]
        hops = [h for h in hops if h]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop[:64]  # a key for limits, not something to trust further
        return hops[0][:64] if hops else peer


CLIENT_ADDRESSES = web.AppKey("client_addresses", ClientAddresses)


def client_address(request: web.BaseRequest) -> str:
    """The client address of `request` (the app's trusted proxies applied)."""
    resolve = request.app.get(CLIENT_ADDRESSES) if isinstance(request, web.Request) else None
    return resolve(request) if resolve is not None else (request.remote or "?")
