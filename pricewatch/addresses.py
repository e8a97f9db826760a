"""Who is asking: the client address of a request, behind trusted reverse proxies or not.

Every per-address limit (logins, registrations, websockets) keys on `client_address()`,
grouped by `limit_key` (an IPv6 client counts by its /64).
Only a peer listed in `PRICEWATCH_TRUSTED_PROXIES` may name the client through
`X-Forwarded-For`; the right-most entry that is not itself a trusted proxy counts (entries to
its left were written by whoever talked to that proxy, so anyone could have forged them).
Like uvicorn's `proxy_headers._TrustedHosts`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from urllib.parse import urlsplit

from aiohttp import web

from .api import invalid

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
        hops = [
            h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")
        ]
        hops = [h for h in hops if h]
        for hop in reversed(hops):
            if not self.is_trusted(hop):
                return hop[:64]  # a key for limits, not something to trust further
        return hops[0][:64] if hops else peer


CLIENT_ADDRESSES = web.AppKey("client_addresses", ClientAddresses)


def client_address(request: web.BaseRequest) -> str:
    """The client address of `request` (the app's trusted proxies applied)."""
    try:
        resolve = request.app.get(CLIENT_ADDRESSES) if isinstance(request, web.Request) else None
    except AssertionError:  # a request the parser refused never reached the app
        resolve = None
    return resolve(request) if resolve is not None else (request.remote or "?")


def limit_key(address: str) -> str:
    """The key per-address limits count under: the address itself, but for IPv6 its /64
    (one subscriber usually holds a whole /64, so 2**64 addresses would be 2**64 budgets)."""
    try:
        ip = ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip_network(f"{ip}/64", strict=False))


def is_public_address(address: str) -> bool:
    """Whether the IP address `address` is globally routable, i.e. safe for the server to
    connect to on a user's or admin's word (feeds, webhooks): Python's `is_global`, and not
    multicast (which `is_global` lets through: 224.0.0.1 is "global").

    An IPv6 address that carries an IPv4 one is judged by that IPv4 address alone, since that
    is where it leads: IPv4-mapped (`::ffff:127.0.0.1`), 6to4 (`2002:7f00:1::`), Teredo
    (`2001:0::/32`: its server and its client must both be public) and NAT64
    (`64:ff9b::a9fe:a9fe`). Brackets and a zone suffix (`fe80::1%eth0`) are ignored.
    Raises ValueError when `address` is not an IP address.
    """
    addr = ip_address(address.strip().strip("[]").split("%")[0])
    candidates: tuple[IPv4Address | IPv6Address, ...] = (addr,)
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            candidates = (addr.ipv4_mapped,)
        elif addr.sixtofour is not None:
            candidates = (addr.sixtofour,)
        elif addr.teredo is not None:
            candidates = addr.teredo
        elif addr in IPv6Network("64:ff9b::/96"):  # RFC 6052: the last 32 bits are IPv4
            candidates = (ip_address(int(addr) & 0xFFFFFFFF),)
    # Beyond is_global, the other flags guard against Python versions whose tables differ.
    return all(
        a.is_global
        and not (
            a.is_multicast
            or a.is_private
            or a.is_reserved
            or a.is_loopback
            or a.is_link_local
            or a.is_unspecified
        )
        for a in candidates
    )


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


async def check_public_url(
    url: str, allow_private: bool, *, schemes: tuple[str, ...], flag: str, field: str = "url"
) -> dict:
    """Refuse URLs whose scheme is not one of `schemes` or that have no host, and, unless
    `allow_private`, hosts with any address that is not globally routable
    (`is_public_address`): a user or admin must not be able to point the server at its own
    network or a cloud metadata service. `flag` is the setting that allows it (named in the
    error). Raises ApiError 400 naming `field`.

    Returns the connection arguments that pin a connection to the address just checked
    (`host`, `port`, and `server_hostname` for TLS): resolving again when connecting would
    let a DNS answer change in between. Empty when private addresses are allowed.
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 80)
    except ValueError:  # "ws://[::1", a port out of range...
        raise invalid({field: "The URL is not valid."}) from None
    if parts.scheme not in schemes or not hostname:
        names = " and ".join(f"{s}://" for s in schemes)
        raise invalid({field: f"Only {names} URLs with a host are allowed."})
    if allow_private:
        return {}
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            hostname, port, type=socket.SOCK_STREAM
        )
    except (OSError, UnicodeError):  # UnicodeError: "a..b", a label over 63 characters
        raise invalid({field: f"Cannot resolve host {hostname!r}."}) from None
    for info in infos:
        address = str(info[4][0])  # the host, as a str (an int only for AF_PACKET et al.)
        if not is_public_address(address):
            raise invalid(
                {
                    field: f"{hostname} resolves to a non-public address "
                    f"({address}); set {flag}=true to allow it."
                }
            )
    pinned = {"host": infos[0][4][0], "port": port}
    if parts.scheme in ("https", "wss"):
        pinned["server_hostname"] = hostname
    return pinned
