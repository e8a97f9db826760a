"""Abuse benchmark: what hostile clients and a hostile upstream cost everybody else.

    python bench/abuse.py [--attack NAME ...] [--duration 8] [--quick] [--root CHECKOUT]

Each phase starts its own ``python -m pricewatch`` (a subprocess, PRICEWATCH_FEED=binance
pointed at a fake Binance served by this process: websocket trades and REST, loopback only,
default limits), measures ``--duration`` s, and stops it. ``baseline`` is a phase with no
attack, in the same run, so every attack's figures sit beside quiet ones. ``--root`` runs
another checkout's server (before/after figures from one copy of this script). Attacks:

* ``ping_flood`` / ``pong_flood`` / ``cont_flood``: ``--flooders`` (3) raw sockets upgraded on
  /ws/ohlc/ (no login) writing empty masked pings / unsolicited pongs / (after a text frame
  with FIN=0) empty non-final continuation frames as fast as they can. They read what they
  are sent (counting pongs and the close code); a closed socket reconnects, at most 5 times
  a second.
* ``resume_storm``: one user holds ``--events`` (1000) alert events (two real triggers, the
  first one's event row copied in the database file between them, see ``make_events``);
  ``--resume-sockets`` (8) of that user's /live-feed/subscribe/ sockets send
  ``{"action": "resume", "since": 0}`` 10 times a second each, reading the answers.
* ``future_trades``: the fake upstream sends trades stamped now, +1 day and in the year 4000
  (consecutive ids, a future trade at 10x the price): ``dropped`` is the feed's
  ``future_trades`` in /healthz (null where the server does not count them).
* ``id_reset``: trade ids 1000..1004, then from 1 again, one id 2**63, then small ids again;
  ``price_follows``: the latest price equals the last trade's within 1 s after each step.
* ``huge_rest``: gaps in the trade ids make the server fetch the missed trades over REST;
  the fake answers each request with ``--huge-mb`` (100) MB (valid JSON, generated).
* ``all``: every attack above at once (each upstream attack on its own symbol).
* ``resume_reconnect`` (only on request): ``resume_storm`` where each socket asks once, reads
  the answer, hangs up and reconnects (at most twice a second): per-connection limits do
  not hold it back.
* ``slow_readers`` (only on request): the first round's attack, ``--attackers`` never-reading
  sockets asking /ws/ohlc/ for 1000-candle snapshots ``--rate`` times a second each.

Client-side attackers run in a child process, so the probes' own loop stays responsive.
Figures per phase, measured the same way in every phase: other clients' ``p50_ms``,
``p99_ms``, ``max_ms`` (``GET /api/v1/prices`` every 20 ms, one at a time; ``failures``),
``push_p50_ms``/``push_p99_ms`` (another user's alert: trade sent -> ``{"type": "alert"}``
on its live socket, every 0.5 s; ``push_missed``: none within 2 s), server ``rss_mb`` (peak,
sampled every 0.1 s), ``rss_delta_mb`` (peak minus before the attack), ``rss_after_mb``
(``--after`` s later), ``recovered_s`` (from the attack's end until a GET answers within
50 ms again: work left queued; null: not within 5 s, or the phase's length if shorter),
``cpu_pct`` (100 = one core), ``runqueue_wait_pct`` (the server was runnable but had no
core: other load on the box), ``attacker_cpu_pct`` (the child process), ``bench_lag_p99_ms``
(how late the probes' own loop woke up: part of every latency above), ``ws_dropped`` (by
reason, /metrics), ``healthz`` (status and feed states after the attack), the attack's own
figures under ``attack``, and ``goal_met``. Goal: p99 < 100 ms and RSS delta < 50 MB.

Prints one JSON line; logs go to stderr. About 2 minutes for everything on an idle 2-core
box, every wait bounded (``--quick``: 3 s phases, 200 events, 30 MB answers: about half
that).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import re
import sqlite3
import sys
import time
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    ServerProcess,
    emit_run,
    loadavg,
    log,
    percentile,
    raise_nofile,
    setup_logging,
    status_mb,
    trade_frame,
)
from bench.fake_upstream import (  # noqa: E402
    FakeRest,
    PriceOf,
    Tape,
    feed_counter,
    future_figures,
    future_trades,
    huge_rest,
    id_reset,
)
from bench.hostile_clients import FLOODS, client_attacks  # noqa: E402

CLIENT_ATTACKS = (*FLOODS, "resume_storm", "resume_reconnect", "slow_readers")
ATTACKS = (*FLOODS, "resume_storm", "future_trades", "id_reset", "huge_rest")
PHASES = ("baseline", *ATTACKS, "all", "resume_reconnect", "slow_readers")
DEFAULT_PHASES = ("baseline", *ATTACKS, "all")
GOAL = {"p99_ms_lt": 100, "rss_mb_delta_lt": 50}

# One symbol per role, so that the attacks of ``all`` do not mix their trade ids.
QUIET, PROBE, EVENTS = "ADAUSDT", "BNBUSDT", "XRPUSDT"
FUTURE, RESET, GAP = "BTCUSDT", "ETHUSDT", "SOLUSDT"
START = {QUIET: 1.0, PROBE: 500.0, EVENTS: 2.0, FUTURE: 60000.0, RESET: 3000.0, GAP: 150.0}
FIRST_ID = {RESET: 999}  # the reset script starts at 1000
HISTORY = 1100  # slow_readers: one-second trades sent first, a full 1000-candle 1s ring
PASSWORD = "bench-password"

# --------------------------------------------------------------------------- probes


async def register(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, str]:
    async with http.post(
        url + "/auth/register",
        json={"username": name, "password": PASSWORD, "email": f"{name}@example.com"},
    ) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"register {name}: {resp.status} {body}")
    return {"Authorization": f"Bearer {body['access']}"}


async def create_alerts(
    http: aiohttp.ClientSession, url: str, headers: dict, symbol: str, targets: list[float]
) -> None:
    slots = asyncio.Semaphore(16)

    async def one(target: float) -> None:
        async with (
            slots,
            http.post(
                url + "/api/v1/alerts",
                headers=headers,
                json={"asset": symbol, "price": target, "direction": "above"},
            ) as resp,
        ):
            if resp.status != 201:
                raise RuntimeError(f"alert create: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(t) for t in targets))


async def triggered(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    m = re.search(r"^pricewatch_alerts_triggered_total (\S+)$", text, re.MULTILINE)
    return int(float(m.group(1))) if m else 0


async def ws_dropped(http: aiohttp.ClientSession, url: str) -> dict[str, int] | None:
    try:
        async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(
            r'^pricewatch_websocket_dropped_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE
        )
        if float(m.group(2))
    }


async def make_events(
    http: aiohttp.ClientSession, server: ServerProcess, tape: Tape, n: int
) -> str:
    """A user holding `n` alert events; returns its access token.

    Two one-shot alerts are crossed one after the other; between the two triggers the first
    event is copied `n - 2` times straight into the database file (a thousand alerts through
    the API take many seconds on a busy box). The second, real, event comes last, so that
    the server has announced every id and a resume replays them all."""
    headers = await register(http, server.url, "holder")
    await create_alerts(
        http,
        server.url,
        headers,
        tape.symbol,
        [round(tape.price + 0.01, 2), round(tape.price + 0.03, 2)],
    )
    base = await triggered(http, server.url)
    for k, price in enumerate((tape.price + 0.02, tape.price + 0.04)):
        tape.send(round(price, 2))
        async with asyncio.timeout(10):
            while await triggered(http, server.url) < base + k + 1:
                await asyncio.sleep(0.05)
        if k == 0:
            await asyncio.to_thread(copy_events, server.env["PRICEWATCH_DB"], n - 2)
    return headers["Authorization"].removeprefix("Bearer ")


def copy_events(db: str, n: int) -> None:
    """`n` copies of the newest event row (every column but the id, whatever they are)."""
    with closing(sqlite3.connect(db, timeout=10)) as conn, conn:
        cols = ", ".join(r[1] for r in conn.execute("PRAGMA table_info(events)") if r[1] != "id")
        conn.execute(
            f"INSERT INTO events ({cols}) SELECT {cols} FROM events, "  # noqa: S608
            "(WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k "
            "WHERE i < ?) SELECT i FROM k) "
            "WHERE events.id = (SELECT MAX(id) FROM events)",
            (n,),
        )


class AlertProbe:
    """Another user: `k` one-shot alerts just above each other on `tape`'s symbol; each probe
    sends the trade crossing the next one and times its alert on the user's live socket."""

    def __init__(self, tape: Tape):
        self.tape = tape
        self.samples: list[float] = []
        self.missed = 0
        self.seen = 0
        self.changed = asyncio.Event()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session: aiohttp.ClientSession | None = None  # no total timeout: a long socket
        self.k = 0

    async def setup(self, http: aiohttp.ClientSession, url: str, ws_url: str, k: int) -> None:
        headers = await register(http, url, "probe")
        self.k = k
        await create_alerts(
            http, url, headers, self.tape.symbol, [self.tape.price + i + 1 for i in range(k)]
        )
        self.session = aiohttp.ClientSession()
        async with asyncio.timeout(10):
            self.ws = await self.session.ws_connect(
                ws_url + "/live-feed/subscribe/", headers=headers
            )

    async def close(self) -> None:
        if self.ws is not None:
            async with asyncio.timeout(5):
                await self.ws.close()
        if self.session is not None:
            await self.session.close()

    async def read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT and msg.data.startswith('{"type":"alert"'):
                self.seen += 1
                self.changed.set()

    async def run(self, stop: asyncio.Event, period: float = 0.5) -> None:
        base = self.tape.price
        for i in range(self.k):
            if stop.is_set():
                return
            seen, began = self.seen, time.perf_counter()
            self.tape.send(base + i + 1.5)
            try:
                async with asyncio.timeout(2.0):
                    while self.seen == seen:
                        self.changed.clear()
                        await self.changed.wait()
                self.samples.append((time.perf_counter() - began) * 1000)
            except TimeoutError:
                self.missed += 1
            await asyncio.sleep(max(0.0, period - (time.perf_counter() - began)))


async def time_prices(
    http: aiohttp.ClientSession,
    url: str,
    stop: asyncio.Event,
    samples: list[float],
    failures: list[int],
) -> None:
    """GET /api/v1/prices every 20 ms until `stop`; latencies (ms) into `samples`, failures
    (errors, non-200, over 10 s) counted in failures[0]. Cancelled while waiting for an
    answer: the time waited so far is a sample too (a stalled server must show)."""
    while not stop.is_set():
        began = time.perf_counter()
        try:
            async with http.get(
                url + "/api/v1/prices", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        except asyncio.CancelledError:
            samples.append((time.perf_counter() - began) * 1000)
            raise
        samples.append((time.perf_counter() - began) * 1000)
        failures[0] += not ok
        await asyncio.sleep(max(0.0, 0.02 - (time.perf_counter() - began)))


async def recovery(http: aiohttp.ClientSession, url: str, limit: float = 5.0) -> float | None:
    """Seconds from now until GET /api/v1/prices answers within 50 ms again (work an attack
    left queued: frames still in the socket buffers); None: not within `limit`."""
    began = time.perf_counter()
    while (waited := time.perf_counter() - began) < limit:
        sent = time.perf_counter()
        try:
            async with http.get(
                url + "/api/v1/prices", timeout=aiohttp.ClientTimeout(total=limit - waited)
            ) as resp:
                await resp.read()
                if resp.status == 200 and time.perf_counter() - sent < 0.05:
                    return round(sent - began, 2)
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return None


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late this process's own loop wakes up (ms): the probes' figures include it."""
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append((time.perf_counter() - began - 0.01) * 1000)


async def sample_rss(pid: int, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], status_mb(pid, "VmRSS"))
        await asyncio.sleep(0.1)


async def quiet_market(tape: Tape, stop: asyncio.Event, rate: float = 20.0) -> None:
    """Ordinary trades on the quiet symbol all along: the server's everyday work."""
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while not stop.is_set():
        tape.send(round(START[QUIET] + (tape.next_id % 10) * 0.001, 3))
        next_at += 1.0 / rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))


# --------------------------------------------------------------------------- a phase


class Server:
    """The server of one phase, its fakes and the bench's HTTP session."""

    def __init__(self, args, phase: str):
        self.args, self.phase = args, phase
        self.fake = FakeUpstream()
        self.rest = FakeRest()
        self.process: ServerProcess | None = None
        self.tapes: dict[str, Tape] = {}

    async def start(self, http: aiohttp.ClientSession) -> ServerProcess:
        await self.fake.start()
        await self.rest.start()
        self.process = ServerProcess(
            {
                "PRICEWATCH_FEED": "binance",
                "PRICEWATCH_BINANCE_WS_URL": self.fake.url,
                "PRICEWATCH_BINANCE_REST_URL": self.rest.url,
                "PRICEWATCH_SYMBOLS": ",".join(START),
                "PRICEWATCH_BCRYPT_ROUNDS": "4",
                "PRICEWATCH_ALERT_CREATE_RATE": str(100 * self.args.events + 10000),
                "PRICEWATCH_MAX_ALERTS_PER_USER": str(self.args.events + 1000),
            },
            root=self.args.root,
        )
        await asyncio.to_thread(self.process.start)
        await self.fake.wait_client(timeout=20.0)
        self.tapes = {s: Tape(self.fake, s, p, FIRST_ID.get(s, 1)) for s, p in START.items()}
        if self.phase == "slow_readers":
            quiet, start_ms = self.tapes[QUIET], (int(time.time()) - HISTORY - 5) * 1000
            self.fake.write(
                b"".join(
                    trade_frame(
                        QUIET, i + 1, f"{1 + i % 100 / 1000:.3f}", "0.01", start_ms + i * 1000
                    )
                    for i in range(HISTORY)
                )
            )
            quiet.next_id = HISTORY + 1
        for tape in self.tapes.values():
            tape.send()
        async with asyncio.timeout(10):  # every symbol priced: the feed is through
            while len(await self.prices(http)) < len(START):
                await asyncio.sleep(0.05)
        return self.process

    async def prices(self, http: aiohttp.ClientSession) -> dict[str, float]:
        async with http.get(self.process.url + "/api/v1/prices") as resp:
            rows = (await resp.json())["results"]
        return {r["symbol"]: r["price"] for r in rows}

    async def stop(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        await self.fake.close()
        await self.rest.close()


async def healthz(http: aiohttp.ClientSession, url: str) -> dict:
    try:
        async with http.get(url + "/healthz", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            return await resp.json()  # 503 bodies too: a degraded feed is still a figure
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def run_phase(phase: str, args, pool: ProcessPoolExecutor) -> dict:
    attacks = {"baseline": (), "all": ATTACKS}.get(phase, (phase,))
    server = Server(args, phase)
    # Every request of the bench is bounded (the probes' own are tighter).
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        probe = None
        try:
            proc = await server.start(http)
            probe = AlertProbe(server.tapes[PROBE])
            await probe.setup(http, proc.url, proc.ws_url, int(args.duration / 0.5) + 2)
            token = None
            if "resume_storm" in attacks or "resume_reconnect" in attacks:
                token = await make_events(http, proc, server.tapes[EVENTS], args.events)
            log.info("%s: set up; measuring", phase)
            await asyncio.sleep(0.5)  # settle: let the setup's writes and deliveries finish
            out = await measure(server, http, probe, attacks, token, args, pool)
        finally:
            log.info("%s: stopping the server", phase)
            if probe is not None:
                with suppress(TimeoutError, aiohttp.ClientError):
                    await probe.close()
            await server.stop()
    if attacks:
        if len(out["attack"]) == 1:  # one attack: its figures without the extra level
            out["attack"] = next(iter(out["attack"].values()))
        out["goal_met"] = (
            out["p99_ms"] is not None
            and out["p99_ms"] < GOAL["p99_ms_lt"]
            and out["rss_delta_mb"] < GOAL["rss_mb_delta_lt"]
        )
    else:
        del out["attack"]
    return out


def start_attacks(
    server: Server,
    attacks: tuple[str, ...],
    token: str | None,
    args,
    pool: ProcessPoolExecutor,
    price_of: PriceOf,
) -> dict[str, Awaitable]:
    """The phase's attacks, started: client ones in the child process, upstream ones here."""
    loop = asyncio.get_running_loop()
    proc, tapes = server.process, server.tapes
    stop_at = loop.time() + args.duration
    jobs: dict[str, Awaitable] = {"time": asyncio.sleep(args.duration)}
    kinds = [a for a in attacks if a in CLIENT_ATTACKS]
    if kinds:
        jobs["clients"] = loop.run_in_executor(
            pool,
            client_attacks,
            proc.port,
            kinds,
            args.duration,
            token,
            {
                "flooders": args.flooders,
                "resume_sockets": args.resume_sockets,
                "attackers": args.attackers,
                "rate": args.rate,
                "symbol": QUIET,
            },
        )
    if "future_trades" in attacks:
        jobs["future_trades"] = future_trades(tapes[FUTURE], stop_at)
    if "id_reset" in attacks:
        jobs["id_reset"] = id_reset(tapes[RESET], price_of, stop_at)
    if "huge_rest" in attacks:
        jobs["huge_rest"] = huge_rest(tapes[GAP], server.rest, stop_at, args.huge_mb)
    return jobs


async def measure(
    server: Server,
    http: aiohttp.ClientSession,
    probe: AlertProbe,
    attacks: tuple[str, ...],
    token: str | None,
    args,
    pool: ProcessPoolExecutor,
) -> dict:
    """Run the attacks for the phase's duration while the probes time other clients."""
    proc = server.process
    url = proc.url

    async def price_of(symbol: str) -> float | None:
        try:
            async with asyncio.timeout(1.0):
                return (await server.prices(http)).get(symbol)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    rss_before = status_mb(proc.pid, "VmRSS")
    stop = asyncio.Event()
    peak = [rss_before]
    lat: list[float] = []
    failures = [0]
    lags: list[float] = []
    background = [
        asyncio.create_task(c)
        for c in (
            quiet_market(server.tapes[QUIET], stop),
            sample_rss(proc.pid, stop, peak),
            probe.read(),
            loop_lag(stop, lags),
        )
    ]
    measured = [
        asyncio.create_task(time_prices(http, url, stop, lat, failures)),
        asyncio.create_task(probe.run(stop)),
    ]
    cpu = CpuMeter(proc.pid)
    cpu.start()
    try:
        jobs = start_attacks(server, attacks, token, args, pool, price_of)
        async with asyncio.timeout(args.duration + 60):
            results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        cpu_pct = cpu.stop()
        rss_end = status_mb(proc.pid, "VmRSS")
        stop.set()
        recovered_s = await recovery(http, url, max(2.0, min(5.0, args.duration)))
        await asyncio.sleep(args.after)
        rss_after = status_mb(proc.pid, "VmRSS")
    finally:
        stop.set()
        log.info("attack over; waiting for the probes")
        await asyncio.wait(measured, timeout=2.0)  # then a stalled probe is cut short
        for task in measured + background:
            task.cancel()
        await asyncio.gather(*measured, *background, return_exceptions=True)

    done: dict = {}
    for name, result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            log.error("%s failed: %r", name, result)
            result = {"error": f"{type(result).__name__}: {result}"[:300]}
        done[name] = result
    done.pop("time")
    health = await healthz(http, url)
    attack: dict = done.pop("clients", None) or {}
    figures: dict = {}
    if "attacker_cpu_pct" in attack:
        figures["attacker_cpu_pct"] = attack.pop("attacker_cpu_pct")
    if "future_trades" in done and "error" not in done["future_trades"]:
        done["future_trades"] = await future_figures(
            http, url, FUTURE, done["future_trades"], health
        )
    if "id_reset" in done and "error" not in done["id_reset"]:
        done["id_reset"]["id_resets"] = feed_counter(health, "id_resets")
    attack.update(done)
    lat.sort()
    push = sorted(probe.samples)
    peak_mb = max(peak[0], rss_end)
    return {
        "p50_ms": _r(percentile(lat, 50)),
        "p99_ms": _r(percentile(lat, 99)),
        "max_ms": _r(lat[-1] if lat else None),
        "n": len(lat),
        "failures": failures[0],
        "push_p50_ms": _r(percentile(push, 50)),
        "push_p99_ms": _r(percentile(push, 99)),
        "push_missed": probe.missed,
        "rss_mb": round(peak_mb, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_delta_mb": round(peak_mb - rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "recovered_s": recovered_s,
        "cpu_pct": round(cpu_pct, 1),
        "runqueue_wait_pct": cpu.wait_pct,
        **figures,
        "bench_lag_p99_ms": _r(percentile(sorted(lags), 99)),
        "ws_dropped": await ws_dropped(http, url),
        "healthz": {
            "status": health.get("status"),
            "feeds": {
                name: feed.get("state")
                for name, feed in (health.get("feeds") or {}).items()
                if isinstance(feed, dict)
            },
        },
        "attack": attack,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


async def run(args) -> dict:
    out: dict = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        await asyncio.get_running_loop().run_in_executor(pool, raise_nofile)  # warm it up
        for phase in args.phases:
            log.info("phase %s: %.0f s", phase, args.duration)
            try:
                out[phase] = await run_phase(phase, args, pool)
            except (RuntimeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                log.exception("phase %s failed", phase)
                out[phase] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            log.info("%s: %s", phase, out[phase])
    out["goal"] = GOAL
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--attack",
        action="append",
        choices=PHASES,
        dest="phases",
        help="a phase to run (repeatable; default: baseline, every attack "
        "alone, then all at once); baseline always runs first",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument(
        "--quick", action="store_true", help="3 s phases, 200 events, 30 MB answers, no wait after"
    )
    parser.add_argument("--flooders", type=int, default=3, help="sockets per flood attack")
    parser.add_argument("--resume-sockets", type=int, default=8)
    parser.add_argument("--events", type=int, default=1000, help="events the resumer holds")
    parser.add_argument("--huge-mb", type=float, default=100.0, help="size of a REST answer")
    parser.add_argument(
        "--after", type=float, default=1.0, help="seconds after an attack to read RSS again"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="the checkout whose server runs (default: this one), e.g. "
        "another worktree for before/after figures",
    )
    parser.add_argument("--attackers", type=int, default=24, help="slow_readers: clients")
    parser.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="slow_readers: snapshot requests per second per client",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.events, args.huge_mb, args.after = 3.0, 200, 30.0, 0.0
    chosen = args.phases or DEFAULT_PHASES
    args.phases = ["baseline", *(p for p in dict.fromkeys(chosen) if p != "baseline")]
    if not (
        0 < args.duration <= 60
        and 0 < args.flooders <= 50
        and 0 < args.attackers <= 60
        and 0 < args.resume_sockets <= 50
        and 3 <= args.events <= 100_000
        and 0 < args.huge_mb <= 1024
        and args.rate > 0
    ):
        parser.error(
            "need 0 < duration <= 60, flooders <= 50, attackers <= 60, "
            "resume-sockets <= 50, 3 <= events <= 100000, huge-mb <= 1024, rate > 0"
        )
    setup_logging()
    raise_nofile()
    load_before = loadavg()
    began = time.monotonic()
    emit_run(asyncio.run(run(args)), load_before, began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
