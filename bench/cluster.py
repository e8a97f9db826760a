"""Benchmark a cluster on one machine: clients spread over K edges behind one core.

    python bench/cluster.py [--edges 1,2,4] [--clients 2000] [--rate 20] [--duration 10]

Starts a ``redis-server`` (free loopback port, no persistence), a fake Binance (raw asyncio
sockets, bench/_common.FakeUpstream) and one core (``PRICEWATCH_ROLE=core``, the feed); then,
for each K of ``--edges`` in turn, K edges (``python -m pricewatch edge``), ``--clients``
websockets on ``/live-feed/subscribe/`` spread round-robin over them (one user, one token,
every symbol at the default max_rate), ``--rate`` trades/s for ``--duration`` s, and the
edges are stopped again. The clients run in ``--procs`` processes of their own (this one
sends the trades and measures). Every trade has a unique price and the fake records when it wrote
it: a client's price message gives the latency upstream write -> client parsed (prices are
conflated state: a client gets at most max_rate per symbol, so not every trade).

Figures per K: ``delivered_per_s`` (price messages received by all clients per second of the
window), ``latency_ms`` p50/p99, ``core_cpu_pct`` and ``edges_cpu_pct`` (sum over the edges;
100 = one core), ``clients_cpu_pct`` (the client processes, the load generator), the run-queue wait
of each (CPU contention: the figures are skewed when it is high), drops (1008 closes).
One JSON line on stdout; logs on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
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
    emit,
    free_port,
    loadavg,
    log,
    percentile,
    raise_nofile,
    setup_logging,
    trade_frame,
)

SYMBOLS = ("BTCUSDT", "ETHUSDT")


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed (Debian package redis-server)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


class Clients:
    """Websocket clients in this process: price messages counted, every `sample`-th one's
    (price, arrival time) kept (perf_counter is CLOCK_MONOTONIC: comparable between the
    processes of one machine)."""

    def __init__(self, sample: int = 1):
        self.sample = sample
        self.samples: list[tuple[float, float]] = []
        self.recording = False
        self.messages = 0
        self.drops = 0
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.tasks: list[asyncio.Task] = []

    async def connect(
        self, session, urls: list[str], token: str, n: int, batch: int, offset: int = 0
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        for start in range(0, n, batch):
            opened = await asyncio.gather(
                *(
                    session.ws_connect(
                        urls[(offset + i) % len(urls)], headers=headers, heartbeat=None, compress=0
                    )
                    for i in range(start, min(n, start + batch))
                )
            )
            for ws in opened:
                self.sockets.append(ws)
                self.tasks.append(asyncio.create_task(self._read(ws)))

    async def _read(self, ws) -> None:
        clock = time.perf_counter
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT or not self.recording:
                continue
            now = clock()
            data = orjson.loads(msg.data)
            if data.get("type") == "price":
                self.messages += 1
                if self.messages % self.sample == 0:
                    self.samples.append((data["price"], now))
        if self.recording and ws.close_code == 1008:
            self.drops += 1

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def worker(args) -> None:
    """`--worker N`: N clients; "ready" on stdout once connected; records from "go" on
    stdin until "stop"; then one JSON line (messages, drops, samples)."""
    clients = Clients(args.sample)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await clients.connect(
            session, args.urls.split(","), args.token, args.worker, args.batch, args.offset
        )
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.readline()
        clients.recording = True
        await reader.readline()
        clients.recording = False
        print(
            orjson.dumps(
                {"messages": clients.messages, "drops": clients.drops, "samples": clients.samples}
            ).decode(),
            flush=True,
        )
        await clients.close()


async def ticks(
    fake: FakeUpstream, sent: dict[float, float], rate: float, duration: float, first_id: int
) -> int:
    """`rate` trades/s, alternating symbols, each symbol's trade ids consecutive (a gap
    would start a backfill), every price unique in the whole benchmark."""
    loop = asyncio.get_running_loop()
    n = round(rate * duration)
    next_at = loop.time()
    for i in range(n):
        symbol = SYMBOLS[i % 2]
        trade_id = first_id + i // 2
        price = round((60000.0 if i % 2 == 0 else 3000.0) + trade_id * 0.01, 2)
        sent[price] = time.perf_counter()
        fake.write(
            trade_frame(symbol, trade_id, f"{price:.2f}", "0.01000000", int(time.time() * 1000))
        )
        next_at += 1.0 / rate
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    return n


async def one_run(
    args,
    k: int,
    core: ServerProcess,
    redis: Redis,
    fake: FakeUpstream,
    session: aiohttp.ClientSession,
    token: str,
    first_id: int,
) -> dict:
    tmp = tempfile.mkdtemp(prefix="pricewatch-edge-")
    # An edge's /healthz is 200 once it has read the snapshot: ServerProcess.start waits.
    edges = [
        ServerProcess(
            {
                "PRICEWATCH_ROLE": "edge",
                "PRICEWATCH_REDIS_URL": redis.url,
                "PRICEWATCH_MAX_WS_PER_ADDRESS": str(args.clients),
            },
            tmpdir=os.path.join(tmp, str(i)),
        )
        for i in range(k)
    ]
    for edge in edges:
        os.makedirs(edge.tmpdir, exist_ok=True)
    await asyncio.gather(*(asyncio.to_thread(edge.start) for edge in edges))
    try:
        sent: dict[float, float] = {}
        urls = ",".join(e.ws_url + "/live-feed/subscribe/" for e in edges)
        shares = [
            args.clients // args.procs + (i < args.clients % args.procs) for i in range(args.procs)
        ]
        procs = []
        for i, n in enumerate(shares):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                str(n),
                "--urls",
                urls,
                "--token",
                token,
                "--batch",
                str(args.batch),
                "--offset",
                str(sum(shares[:i])),
                "--sample",
                str(args.sample),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 26,
            )
            procs.append(proc)
        for proc in procs:
            assert (await proc.stdout.readline()).strip() == b"ready"
        log.info("K=%d: %d clients connected in %d processes", k, args.clients, args.procs)
        await asyncio.sleep(0.5)
        meters = {"core": CpuMeter(core.pid)}
        edge_meters = [CpuMeter(e.pid) for e in edges]
        client_meters = [CpuMeter(p.pid) for p in procs]
        for meter in [*meters.values(), *edge_meters, *client_meters]:
            meter.start()
        for proc in procs:
            proc.stdin.write(b"go\n")
        began = time.monotonic()
        trades = await ticks(fake, sent, args.rate, args.duration, first_id)
        await asyncio.sleep(0.5)  # the last conflated flush
        for proc in procs:
            proc.stdin.write(b"stop\n")
        window = time.monotonic() - began
        cpu = {name: round(m.stop(), 1) for name, m in meters.items()}
        edge_cpu = [m.stop() for m in edge_meters]
        client_cpu = [m.stop() for m in client_meters]
        reports = [orjson.loads(await proc.stdout.readline()) for proc in procs]
        await asyncio.gather(*(proc.wait() for proc in procs))
        lat = sorted(
            (at - sent[price]) * 1000.0
            for r in reports
            for price, at in r["samples"]
            if price in sent
        )
        messages = sum(r["messages"] for r in reports)
        result = {
            "edges": k,
            "clients": args.clients,
            "trades": trades,
            "delivered_per_s": round(messages / window),
            "latency_ms": {"p50": _r(percentile(lat, 50)), "p99": _r(percentile(lat, 99))},
            "core_cpu_pct": cpu["core"],
            "core_wait_pct": meters["core"].wait_pct,
            "edges_cpu_pct": round(sum(edge_cpu), 1),
            "edges_wait_pct": [m.wait_pct for m in edge_meters],
            "clients_cpu_pct": round(sum(client_cpu), 1),
            "drops": sum(r["drops"] for r in reports),
        }
        log.info("K=%d: %s", k, result)
        return result
    finally:
        await asyncio.gather(*(asyncio.to_thread(edge.stop) for edge in edges))
        shutil.rmtree(tmp, ignore_errors=True)


async def run(args) -> dict:
    redis = Redis()
    redis.start()
    fake = await FakeUpstream().start()
    core = ServerProcess(
        {
            "PRICEWATCH_ROLE": "core",
            "PRICEWATCH_REDIS_URL": redis.url,
            "PRICEWATCH_FEED": "binance",
            "PRICEWATCH_BINANCE_WS_URL": fake.url,
            "PRICEWATCH_BCRYPT_ROUNDS": "4",
        }
    )
    runs = []
    try:
        await asyncio.to_thread(core.start)
        await fake.wait_client(timeout=20.0)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async with session.post(
                core.url + "/auth/register",
                json={
                    "username": "cluster",
                    "password": "cluster-password",
                    "email": "c@example.com",
                },
            ) as resp:
                token = (await resp.json())["access"]
            first_id = 1_000_000
            for k in args.edges:
                runs.append(await one_run(args, k, core, redis, fake, session, token, first_id))
                first_id += round(args.rate * args.duration) // 2
    finally:
        await asyncio.to_thread(core.stop)
        await fake.close()
        redis.stop()
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m": loadavg(),
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "runs": runs,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", default="1,2,4", type=lambda s: [int(k) for k in s.split(",")])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0, help="trades per second (total)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of trades")
    parser.add_argument("--batch", type=int, default=100, help="clients connecting at once")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument(
        "--sample",
        type=int,
        default=10,
        help="keep every Nth message's arrival time for the latency",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_nofile()
    if args.worker is not None:
        asyncio.run(worker(args))
        return 0
    setup_logging()
    emit(asyncio.run(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
