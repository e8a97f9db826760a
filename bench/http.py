"""Benchmark the HTTP API: authenticated alert listing and password logins.

    python bench/http.py [--concurrency 50] [--seconds 10] [--login-seconds 5]

``python -m pricewatch`` runs as a subprocess with PRICEWATCH_FEED=off and the default bcrypt
cost (PRICEWATCH_BCRYPT_ROUNDS unset: 12, reported as ``bcrypt_rounds``). One user is
registered and ``--alerts`` alerts created (assets and directions explicit). Then, with one
keep-alive aiohttp ClientSession in this process:

* ``alerts``: ``--concurrency`` workers loop ``GET /api/v1/alerts`` (Bearer token, default
  page: 10 newest of the user's alerts, total count) for ``--seconds`` s: requests/s and
  p50/p99 latency;
* ``baseline``: the same load on ``GET /api/v1/prices`` (public, no DB, no JWT: the cost of
  aiohttp + middleware alone) for ``--baseline-seconds`` s (0 skips it);
* ``login``: ``--login-concurrency`` workers loop ``POST /auth/token`` for ``--login-seconds``.

Each phase reports errors (non-2xx or exceptions) and the server's CPU% (100 = one core);
``client_cpu_pct`` is this process's, to tell when the load generator is the limit, and
``server_runqueue_wait_pct`` how long the server was starved of CPU by other processes.
Prints one JSON line; logs go to stderr. Takes ~seconds + baseline + login + ~5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

# This file is named http.py: drop its directory from the path so the stdlib `http` (used by
# aiohttp and urllib) is not shadowed by it.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    ServerProcess,
    emit,
    loadavg,
    log,
    percentile,
    setup_logging,
)

USERNAME, PASSWORD = "httpbench", "http-bench-password"


async def setup(session: aiohttp.ClientSession, base: str, n_alerts: int) -> str:
    async with session.post(base + "/auth/register", json={
            "username": USERNAME, "password": PASSWORD, "email": "h@example.com"}) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"register failed: {resp.status} {body}")
    token = body["access"]
    headers = {"Authorization": f"Bearer {token}"}
    for i in range(n_alerts):
        asset = ("BTCUSDT", "ETHUSDT")[i % 2]
        base_price = 60000.0 if asset == "BTCUSDT" else 3000.0
        direction = ("above", "below")[(i // 2) % 2]
        price = base_price * (1.1 + i / 1000 if direction == "above" else 0.9 - i / 1000)
        async with session.post(base + "/api/v1/alerts", headers=headers, json={
                "asset": asset, "price": round(price, 2), "direction": direction}) as resp:
            if resp.status != 201:
                raise RuntimeError(f"create alert failed: {resp.status} {await resp.text()}")
    return token


async def load(session: aiohttp.ClientSession, concurrency: int, seconds: float, pid: int,
               method: str, url: str, **kw) -> dict:
    """`concurrency` workers repeat one request for `seconds`; rate, latency, CPU."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    clock = time.perf_counter

    async def worker() -> None:
        while time.monotonic() < deadline:
            t = clock()
            try:
                async with session.request(method, url, **kw) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if 200 <= status < 300:
                latencies.append((clock() - t) * 1000.0)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

    server_cpu, client_cpu = CpuMeter(pid), CpuMeter()
    server_cpu.start()
    client_cpu.start()
    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - began  # includes the requests in flight at the deadline
    lat = sorted(latencies)
    return {
        "rps": round(len(lat) / elapsed, 1),
        "requests": len(lat),
        "p50_ms": _r(percentile(lat, 50)),
        "p99_ms": _r(percentile(lat, 99)),
        "max_ms": _r(lat[-1] if lat else None),
        "errors": errors,
        "server_cpu_pct": round(server_cpu.stop(), 1),
        "client_cpu_pct": round(client_cpu.stop(), 1),
        "server_runqueue_wait_pct": server_cpu.wait_pct,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


async def run(args) -> dict:
    server = ServerProcess({"PRICEWATCH_FEED": "off"})  # bcrypt: the default cost
    await asyncio.to_thread(server.start)
    try:
        connector = aiohttp.TCPConnector(limit=max(args.concurrency, args.login_concurrency))
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            began = time.monotonic()
            token = await setup(session, server.url, args.alerts)
            setup_s = time.monotonic() - began
            log.info("server pid %d: user and %d alerts created in %.1fs", server.pid,
                     args.alerts, setup_s)
            headers = {"Authorization": f"Bearer {token}"}
            # Warm up: open the keep-alive connections first.
            await load(session, args.concurrency, 0.5, server.pid, "GET",
                       server.url + "/api/v1/alerts", headers=headers)
            alerts = await load(session, args.concurrency, args.seconds, server.pid, "GET",
                                server.url + "/api/v1/alerts", headers=headers)
            log.info("alerts: %s", alerts)
            out = {"alerts": alerts}
            if args.baseline_seconds > 0:
                out["baseline_prices"] = await load(
                    session, args.concurrency, args.baseline_seconds, server.pid, "GET",
                    server.url + "/api/v1/prices")
                log.info("baseline: %s", out["baseline_prices"])
            out["login"] = await load(session, args.login_concurrency, args.login_seconds,
                                      server.pid, "POST", server.url + "/auth/token",
                                      json={"username": USERNAME, "password": PASSWORD})
            log.info("login: %s", out["login"])
    finally:
        rc = await asyncio.to_thread(server.stop)
        if rc not in (0, None):
            log.warning("server exited with %s", rc)
    out.update(concurrency=args.concurrency, login_concurrency=args.login_concurrency,
               alerts_created=args.alerts, bcrypt_rounds=12, setup_s=round(setup_s, 2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--login-concurrency", type=int, default=8)
    parser.add_argument("--login-seconds", type=float, default=5.0)
    parser.add_argument("--alerts", type=int, default=50)
    args = parser.parse_args(argv)
    setup_logging()
    load_before = loadavg()
    began = time.monotonic()
    out = asyncio.run(run(args))
    out["cores"] = os.cpu_count()
    out["loadavg_1m_before"] = load_before
    out["elapsed_s"] = round(time.monotonic() - began, 1)
    emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
