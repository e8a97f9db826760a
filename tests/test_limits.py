"""Rate primitives and client-address resolution behind trusted proxies."""

from __future__ import annotations

from ipaddress import ip_network

from aiohttp.test_utils import make_mocked_request

from pricewatch.addresses import ClientAddresses
from pricewatch.limits import SlidingWindow, TokenBucket


def test_token_bucket_allows_burst_then_rate():
    bucket = TokenBucket(rate=20, burst=40, now=0.0)
    assert sum(bucket.take(0.0) for _ in range(100)) == 40
    assert not bucket.take(0.0)
    assert sum(bucket.take(0.5) for _ in range(100)) == 10  # 0.5 s at 20/s
    assert sum(bucket.take(100.0) for _ in range(100)) == 40  # never more than the burst


def test_sliding_window_counts_per_key_and_reports_wait():
    window = SlidingWindow(limit=3, window=60)
    for t in (0.0, 1.0, 2.0):
        assert window.take("a", t) is None
    assert window.take("a", 3.0) == 57  # the first hit leaves the window at 60
    assert window.take("b", 3.0) is None  # other keys are independent
    assert window.take("a", 60.5) is None


def test_sliding_window_memory_is_bounded_and_keeps_active_keys():
    window = SlidingWindow(limit=2, window=60, max_keys=100)
    window.hit("attacker", 0.0)
    for i in range(1000):
        window.hit(f"spray{i}", 0.0)
        if i % 50 == 0:
            window.hit("attacker", 0.0)  # stays among the most recent
    assert len(window) <= 100
    assert window.check("attacker", 1.0) is not None


def _request(peer: str, xff: str | None = None):
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    req = make_mocked_request("GET", "/", headers=headers)
    req._transport_peername = (peer, 1234)  # what request.remote reads
    return req


def test_forwarded_for_ignored_from_untrusted_peer():
    resolve = ClientAddresses([ip_network("10.0.0.0/8")])
    assert resolve(_request("203.0.113.9", "1.2.3.4")) == "203.0.113.9"


def test_forwarded_for_rightmost_untrusted_entry_counts():
    resolve = ClientAddresses([ip_network("10.0.0.0/8"), ip_network("::1/128")])
    # the client forged "6.6.6.6"; the proxy appended the real peer 198.51.100.7
    assert resolve(_request("10.0.0.2", "6.6.6.6, 198.51.100.7")) == "198.51.100.7"
    assert resolve(_request("10.0.0.2", "6.6.6.6, 198.51.100.7, 10.0.0.3")) == "198.51.100.7"
    assert resolve(_request("::1", "198.51.100.8")) == "198.51.100.8"
    assert resolve(_request("10.0.0.2")) == "10.0.0.2"  # no header: the proxy itself
    assert resolve(_request("::ffff:10.0.0.2", "198.51.100.9")) == "198.51.100.9"


def test_a_request_the_parser_refused_is_still_given_an_address():
    """The access log asks for the address of every request, also of one aiohttp refused
    before routing (it has no app): that must not raise (a traceback per bad request)."""
    from pricewatch.addresses import client_address

    req = _request("203.0.113.9")
    req._match_info = None  # what aiohttp leaves on a request that never reached the router
    assert client_address(req) == "203.0.113.9"


def test_query_integers_are_plain_ascii_digits():
    from pricewatch.api import strict_int

    assert [strict_int(v) for v in ("5", "-3", "0", "123456789012345678")] == [
        5,
        -3,
        0,
        123456789012345678,
    ]
    for bad in ("1_0", " 5", "5 ", "+5", "\uff15", "\u0665", "", "-", "1e3", "1" * 19):
        assert strict_int(bad) is None, bad


def test_ipv6_clients_count_by_their_64():
    from pricewatch.addresses import limit_key

    assert (
        limit_key("2001:db8:1:2:aaaa::1")
        == limit_key("2001:db8:1:2:bbbb::9")
        == ("2001:db8:1:2::/64")
    )
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("203.0.113.9") == "203.0.113.9"
    assert limit_key("::ffff:203.0.113.9") == "203.0.113.9"
    assert limit_key("not-an-ip") == "not-an-ip"
