"""Benchmark the HTTP API: authenticated alert listing and password logins.

    python bench/http.py [--concurrency 50] [--seconds 10] [--login-seconds 5] [--no-wrk]

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

With ``wrk`` installed (Debian's package, /usr/bin/wrk) and without ``--no-wrk``, the alerts
and baseline phases are run by wrk (``--wrk-threads`` threads, ``--concurrency``
connections), alternating ``--rounds`` times in the same run; ``list_vs_prices`` is the
ratio of the two medians (the read-path goal: >= 0.6). wrk is much cheaper per request than
the Python client, so on a small machine it leaves the server more of the cores.

Each phase reports errors (non-2xx or exceptions) and the server's CPU% (100 = one core);
``client_cpu_pct`` is this process's, to tell when the load generator is the limit, and
``server_runqueue_wait_pct`` how long the server was starved of CPU by other processes.
Prints one JSON line; logs go to stderr. Takes ~seconds + baseline + login + ~5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
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
    emit_run,
    loadavg,
    log,
    percentile,
    setup_logging,
)

USERNAME, PASSWORD = "httpbench", "http-bench-password"
WRK = shutil.which("wrk")


async def setup(session: aiohttp.ClientSession, base: str, n_alerts: int) -> str:
    async with session.post(
        base + "/auth/register",
        json={"username": USERNAME, "password": PASSWORD, "email": "h@example.com"},
    ) as resp:
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
        async with session.post(
            base + "/api/v1/alerts",
            headers=headers,
            json={"asset": asset, "price": round(price, 2), "direction": direction},
        ) as resp:
            if resp.status != 201:
                raise RuntimeError(f"create alert failed: {resp.status} {await resp.text()}")
    return token


async def load(
    session: aiohttp.ClientSession,
    concurrency: int,
    seconds: float,
    pid: int,
    method: str,
    url: str,
    **kw,
) -> dict:
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


async def wrk_load(
    url: str,
    connections: int,
    threads: int,
    seconds: float,
    pid: int,
    headers: dict[str, str] | None = None,
) -> dict:
    """One wrk run against `url`: requests/s, latency, non-2xx count, server CPU."""
    cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    server_cpu = CpuMeter(pid)
    server_cpu.start()
    proc = await asyncio.create_subprocess_exec(
        *cmd, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out = (await proc.communicate())[0].decode()
    cpu = server_cpu.stop()
    found = {
        "rps": re.search(r"Requests/sec:\s+([\d.]+)", out),
        "p50_ms": re.search(r"\s50%\s+([\d.]+\w+)", out),
        "p99_ms": re.search(r"\s99%\s+([\d.]+\w+)", out),
        "non2xx": re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out),
    }
    if found["rps"] is None:
        raise RuntimeError("wrk failed:\n" + out)
    return {
        "rps": float(found["rps"].group(1)),
        "p50_ms": _ms(found["p50_ms"]),
        "p99_ms": _ms(found["p99_ms"]),
        "errors": int(found["non2xx"].group(1)) if found["non2xx"] else 0,
        "server_cpu_pct": round(cpu, 1),
        "server_runqueue_wait_pct": server_cpu.wait_pct,
    }


def _ms(match: re.Match | None) -> float | None:
    """wrk's "1.23ms" / "850.00us" / "1.02s" in ms."""
    if match is None:
        return None
    text = match.group(1)
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return round(float(text[: -len(unit)]) * scale, 3)
    return None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


async def run(args) -> dict:
    server = ServerProcess(
        {"PRICEWATCH_FEED": "off"},  # bcrypt: the default cost
        root=args.server_root,
    )
    await asyncio.to_thread(server.start)
    try:
        connector = aiohttp.TCPConnector(limit=max(args.concurrency, args.login_concurrency))
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            began = time.monotonic()
            token = await setup(session, server.url, args.alerts)
            setup_s = time.monotonic() - began
            log.info(
                "server pid %d: user and %d alerts created in %.1fs",
                server.pid,
                args.alerts,
                setup_s,
            )
            headers = {"Authorization": f"Bearer {token}"}
            out: dict = {}
            if WRK and not args.no_wrk:
                list_url = server.url + "/api/v1/alerts"
                prices_url = server.url + "/api/v1/prices"
                rounds: dict[str, list[dict]] = {"alerts": [], "baseline_prices": []}
                for _ in range(args.rounds):  # alternating: both see the same machine
                    for name, url, hdrs in (
                        ("alerts", list_url, headers),
                        ("baseline_prices", prices_url, None),
                    ):
                        got = await wrk_load(
                            url, args.concurrency, args.wrk_threads, args.seconds, server.pid, hdrs
                        )
                        log.info("wrk %s: %s", name, got)
                        rounds[name].append(got)
                for name, runs in rounds.items():
                    runs.sort(key=lambda r: r["rps"])
                    out[name] = {**runs[len(runs) // 2], "rps_runs": [r["rps"] for r in runs]}
                out["client"] = "wrk"
                out["list_vs_prices"] = round(
                    out["alerts"]["rps"] / out["baseline_prices"]["rps"], 3
                )
                log.info("list vs prices: %.3f", out["list_vs_prices"])
            else:
                # Warm up: open the keep-alive connections first.
                await load(
                    session,
                    args.concurrency,
                    0.5,
                    server.pid,
                    "GET",
                    server.url + "/api/v1/alerts",
                    headers=headers,
                )
                out["alerts"] = await load(
                    session,
                    args.concurrency,
                    args.seconds,
                    server.pid,
                    "GET",
                    server.url + "/api/v1/alerts",
                    headers=headers,
                )
                log.info("alerts: %s", out["alerts"])
                out["client"] = "aiohttp"
            if "baseline_prices" not in out and args.baseline_seconds > 0:
                out["baseline_prices"] = await load(
                    session,
                    args.concurrency,
                    args.baseline_seconds,
                    server.pid,
                    "GET",
                    server.url + "/api/v1/prices",
                )
                log.info("baseline: %s", out["baseline_prices"])
                out["list_vs_prices"] = round(
                    out["alerts"]["rps"] / out["baseline_prices"]["rps"], 3
                )
            if args.login_seconds > 0:
                out["login"] = await load(
                    session,
                    args.login_concurrency,
                    args.login_seconds,
                    server.pid,
                    "POST",
                    server.url + "/auth/token",
                    json={"username": USERNAME, "password": PASSWORD},
                )
                log.info("login: %s", out["login"])
    finally:
        rc = await asyncio.to_thread(server.stop)
        if rc not in (0, None):
            log.warning("server exited with %s", rc)
    out.update(
        concurrency=args.concurrency,
        login_concurrency=args.login_concurrency,
        alerts_created=args.alerts,
        bcrypt_rounds=12,
        setup_s=round(setup_s, 2),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument("--login-concurrency", type=int, default=8)
    parser.add_argument("--login-seconds", type=float, default=5.0)
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument("--no-wrk", action="store_true", help="use the Python client only")
    parser.add_argument(
        "--server-root",
        type=Path,
        default=None,
        help="run the server from this checkout instead (old figures)",
    )
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="wrk: alternating list/prices runs (the median is reported)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    load_before = loadavg()
    began = time.monotonic()
    out = asyncio.run(run(args))
    emit_run(out, load_before, began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
