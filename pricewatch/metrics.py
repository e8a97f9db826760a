"""Prometheus text exposition, written by hand (format 0.0.4): no client library needed.

HTTP requests are counted by a middleware; everything else is read from the parts that
own it (market, feeds, hub, alert engine, deliverer, store) when `/metrics` is scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict

from aiohttp import web

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    """Requests by (method, route, status) and a latency histogram by route."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, method: str, route: str, status: int, seconds: float | None) -> None:
        self.requests[(method, route, status)] += 1
        if seconds is None:  # websocket sessions: their length is no request latency
            return
        counts = self.buckets.get(route)
        if counts is None:
            counts = self.buckets[route] = [0] * (len(BUCKETS) + 1)
        counts[bisect_left(BUCKETS, seconds)] += 1
        self.sums[route] += seconds


HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)


def route_name(request: web.Request) -> str:
    """The route's template (`/api/v1/alerts/{alert_id}`): bounded label values."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical.rstrip("/") or "/"


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    began = time.perf_counter()
    status = 500
    websocket = False
    try:
        response = await handler(request)
        status = response.status
        websocket = isinstance(response, web.WebSocketResponse)
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[HTTP_METRICS].observe(
            request.method,
            route_name(request),
            status,
            None if websocket else time.perf_counter() - began,
        )


def _labels(**labels: object) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """Builds the text: `metric(name, type, help)` then `sample(...)` lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: object) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render_http(out: Exposition, http: HttpMetrics) -> None:
    out.metric("pricewatch_http_requests_total", "counter", "HTTP requests by route and status.")
    for (method, route, status), count in sorted(http.requests.items()):
        out.sample(
            "pricewatch_http_requests_total", count, method=method, route=route, status=status
        )
    name = "pricewatch_http_request_duration_seconds"
    out.metric(name, "histogram", "HTTP request latency (websocket sessions excluded).")
    for route, counts in sorted(http.buckets.items()):
        running = 0
        for bound, count in zip((*BUCKETS, float("inf")), counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.sample(name + "_bucket", running, route=route, le=le)
        out.sample(name + "_sum", http.sums[route], route=route)
        out.sample(name + "_count", running, route=route)


def render_websockets(out: Exposition, hub) -> None:
    """Open websockets by endpoint, and limit closes (1008, 1009) by reason."""
    from .hub import DROP_REASONS

    out.metric("pricewatch_websocket_clients", "gauge", "Open websocket clients by endpoint.")
    counts = hub.counts()
    for endpoint in sorted({"live", "ohlc", "rates", *counts}):
        out.sample("pricewatch_websocket_clients", counts.get(endpoint, 0), endpoint=endpoint)
    out.metric(
        "pricewatch_websocket_dropped_total",
        "counter",
        "Websocket clients closed for a limit (1008, or 1009 too_big), by reason.",
    )
    for reason in DROP_REASONS:
        out.sample(
            "pricewatch_websocket_dropped_total", hub.drops[reason.reason], reason=reason.reason
        )
