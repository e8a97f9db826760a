"""Resume storm: sockets replaying 1,000 alert events over and over beside another user.

    python bench/resume.py [--sockets 60] [--every 5] [--tries 10] [--duration 30]

``python -m pricewatch`` runs as a subprocess fed by a fake Binance (raw asyncio). User
"storm" has one alert with 1,500 events in the database (written between two starts of the
server, so the second start announces them); ``--sockets`` of its live-feed connections each
send ``{"action": "resume", "since": 0}`` ``--tries`` times per ``--every`` seconds (the first
of each burst may be answered with 1,000 events and ``"more": true``; the rest get an
``error``) and read everything. Meanwhile user "victim" has 40 price alerts 1 apart; a trade
crossing one of them goes out every 0.5 s and the time from writing that trade to the
victim's socket receiving the alert is measured.

Figures: ``push_ms`` p50/p99/max of the victim's trigger-to-push latency (and the same with
no storm, ``push_ms_quiet``), ``replayed_events`` and ``resumed`` / ``refused`` answers the
storm sockets got, server ``rss_mb`` peak, ``server_cpu_pct`` over the storm and
``server_runqueue_wait_pct`` (runnable without a core: other load skews the figures). The
storm runs in a child process, so reading its replays does not delay the victim's client.
``--root`` runs another checkout's server (before/after figures).
Goal (docs/limits.md, "Websockets"): push p99 under 100 ms during the storm.

Prints one JSON line; logs go to stderr. Takes about 2 × duration + 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    ServerProcess,
    emit_run,
    loadavg,
    log,
    percentile,
    setup_logging,
    status_mb,
    trade_frame,
)

TARGETS = 40  # the victim's alerts, at 1001, 1002, ...
HISTORY = 1500  # the storm user's events


async def register(http: aiohttp.ClientSession, url: str, name: str) -> dict:
    async with http.post(
        url + "/auth/register",
        json={
            "username": name,
            "password": "correct horse battery",
            "email": f"{name}@example.com",
        },
    ) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def token(http: aiohttp.ClientSession, url: str, name: str) -> str:
    async with http.post(
        url + "/auth/token", json={"username": name, "password": "correct horse battery"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["access"]


async def create(http: aiohttp.ClientSession, url: str, access: str, price: float) -> None:
    async with http.post(
        url + "/api/v1/alerts",
        headers={"Authorization": f"Bearer {access}"},
        json={"asset": "BTCUSDT", "price": price, "direction": "above"},
    ) as resp:
        assert resp.status == 201, await resp.text()


class Storm:
    """The storm user's sockets, each resuming `tries` times per `every` seconds."""

    def __init__(self, http, ws_url: str, access: str, sockets: int, every: float, tries: int):
        self.http, self.ws_url, self.access = http, ws_url, access
        self.sockets, self.every, self.tries = sockets, every, tries
        self.replayed = self.resumed = self.refused = 0

    async def one(self, stop_at: float) -> None:
        ws = await self.http.ws_connect(
            self.ws_url + "/live-feed/subscribe/",
            headers={"Authorization": f"Bearer {self.access}"},
        )
        reader = asyncio.create_task(self.read(ws))
        loop = asyncio.get_running_loop()
        try:
            while loop.time() < stop_at:
                for _ in range(self.tries):
                    await ws.send_str('{"action": "resume", "since": 0}')
                    await asyncio.sleep(self.every / self.tries)
        finally:
            await ws.close()
            reader.cancel()

    async def read(self, ws) -> None:
        async for msg in ws:
            kind = orjson.loads(msg.data).get("type")
            if kind == "alert":
                self.replayed += 1
            elif kind == "resumed":
                self.resumed += 1
            elif kind == "error":
                self.refused += 1

    async def run(self, duration: float) -> None:
        stop_at = asyncio.get_running_loop().time() + duration
        await asyncio.gather(*(self.one(stop_at) for _ in range(self.sockets)))


def storm_process(ws_url: str, access: str, args, out) -> None:
    """The storm in its own process: reading its replays must not delay the victim's
    client, whose latency is measured here."""

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            storm = Storm(http, ws_url, access, args.sockets, args.every, args.tries)
            await storm.run(args.duration)
            out.put((storm.replayed, storm.resumed, storm.refused))

    asyncio.run(run())


async def victim_pushes(
    http, ws_url: str, access: str, fake: FakeUpstream, first: int, count: int, trade_id: int
) -> list[float]:
    """Cross `count` of the victim's alerts, one trade every 0.5 s: ms to each push."""
    ws = await http.ws_connect(
        ws_url + "/live-feed/subscribe/", headers={"Authorization": f"Bearer {access}"}
    )
    latencies = []
    try:
        for i in range(count):
            price = 1001.5 + first + i  # crosses the target first + i, and only it
            fake.write(
                trade_frame("BTCUSDT", trade_id + i, f"{price}", "1", int(time.time() * 1000))
            )
            sent = time.perf_counter()
            while True:
                msg = orjson.loads((await asyncio.wait_for(ws.receive(), 30)).data)
                if msg.get("type") == "alert":
                    latencies.append((time.perf_counter() - sent) * 1000)
                    break
            await asyncio.sleep(0.5)
    finally:
        await ws.close()
    return latencies


def summary(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "p50": round(percentile(values, 50) or 0, 1),
        "p99": round(percentile(values, 99) or 0, 1),
        "max": round(values[-1], 1) if values else None,
        "n": len(values),
    }


async def main(args) -> None:
    began, load_before = time.monotonic(), loadavg()
    fake = await FakeUpstream().start()
    env = {
        "PRICEWATCH_FEED": "binance",
        "PRICEWATCH_BINANCE_WS_URL": fake.url,
        "PRICEWATCH_SYMBOLS": "BTCUSDT",
    }
    tmp = tempfile.TemporaryDirectory(prefix="pricewatch-bench-")
    server = ServerProcess(env, tmpdir=tmp.name, root=args.root)
    server.start()
    figures: dict = {"sockets": args.sockets, "every_s": args.every, "tries": args.tries}
    try:
        async with aiohttp.ClientSession() as http:
            storm = await register(http, server.url, "storm")
            await register(http, server.url, "victim")
            await fake.wait_client()
            fake.write(trade_frame("BTCUSDT", 1, "1000.0", "1", int(time.time() * 1000)))
            await fake.drain()
            await asyncio.sleep(0.5)
            await create(http, server.url, storm["access"], 10**6)
        # The storm user's history, written while the server is down.
        connections = len(fake.paths)
        server.stop()
        with sqlite3.connect(Path(tmp.name) / "pricewatch.db") as db:
            db.executemany(
                "INSERT INTO events(alert_id, user_id, time, price) VALUES (1, ?, ?, 1.0)",
                [(storm["id"], 1.7e9 + i) for i in range(HISTORY)],
            )
        db.close()
        server = ServerProcess(env, tmpdir=tmp.name, root=args.root)
        server.start()
        async with aiohttp.ClientSession() as http:
            storm_access = await token(http, server.url, "storm")
            victim_access = await token(http, server.url, "victim")
            deadline = time.monotonic() + 20
            while len(fake.paths) == connections:  # the restarted server's feed connection
                assert time.monotonic() < deadline, "the server did not connect"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            fake.write(trade_frame("BTCUSDT", 2, "1000.0", "1", int(time.time() * 1000)))
            for i in range(TARGETS):
                await create(http, server.url, victim_access, 1001.0 + i)
            quiet = await victim_pushes(http, server.ws_url, victim_access, fake, 0, 10, 10)
            results: multiprocessing.Queue = multiprocessing.Queue()
            attack = multiprocessing.Process(
                target=storm_process, args=(server.ws_url, storm_access, args, results)
            )
            meter = CpuMeter(server.pid)
            meter.start()
            peak = status_mb(server.pid, "VmRSS")
            attack.start()
            await asyncio.sleep(args.every)  # the storm under way
            count = min(TARGETS - 10, int((args.duration - args.every) / 0.5) - 2)
            during = asyncio.create_task(
                victim_pushes(http, server.ws_url, victim_access, fake, 10, count, 100)
            )
            while not during.done():
                peak = max(peak, status_mb(server.pid, "VmRSS"))
                await asyncio.sleep(0.25)
            figures["server_cpu_pct"] = round(meter.stop(), 1)
            figures["server_runqueue_wait_pct"] = meter.wait_pct  # other load on the box
            replayed, resumed, refused = await asyncio.to_thread(results.get, True, 60)
            await asyncio.to_thread(attack.join, 10)
            figures.update(
                {
                    "push_ms_quiet": summary(quiet),
                    "push_ms": summary(await during),
                    "replayed_events": replayed,
                    "resumed": resumed,
                    "refused": refused,
                    "rss_mb_peak": round(peak, 1),
                }
            )
    finally:
        server.stop()
        await fake.close()
        tmp.cleanup()
    emit_run(figures, load_before, began)


if __name__ == "__main__":
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=60)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument(
        "--root",
        default=None,
        help="the checkout whose server runs (another worktree: before/after)",
    )
    log.info("resume storm bench")
    asyncio.run(main(parser.parse_args()))
