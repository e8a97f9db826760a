"""Benchmark trade ingestion: the in-process tick pipeline, then end to end from a fake Binance.

    python bench/ingest.py [--trades 500000] [--e2e-trades 300000] [--alerts 10000]

* ``pipeline_trades_per_s``: ``create_app(Settings(feed="off"))`` started in-process (store,
  alert engine with ``--alerts`` out-of-band alerts in its index, hub without subscribers),
  then ``app[MARKET].on_tick(Tick)`` in a tight loop over a pre-built random walk on BTCUSDT
  and ETHUSDT (candles for every timeframe + alert matching, no fan-out).
* ``decode_pipeline_trades_per_s``: the same, starting from the combined-stream JSON text of
  each trade: ``decode_event`` + ``BinanceFeed._deliver`` (trade-id tracking) + ``on_tick``,
  i.e. everything the server does per trade except reading the websocket.
* ``e2e_trades_per_s``: ``python -m pricewatch`` (PRICEWATCH_FEED=binance) as a subprocess,
  fed by a raw-socket fake Binance in a separate process that writes ``--e2e-trades``
  pre-serialised trade frames (one trade per frame) as fast as the socket takes them; the
  rate is trades / (first write -> the server's /healthz feed ``messages`` reaching the
  total), polled every 50 ms. ``e2e_server_cpu_pct`` / ``e2e_fake_cpu_pct`` over that window
  show which side was the bottleneck (100 = one core); ``e2e_server_runqueue_wait_pct``
  how long the server was runnable but starved of CPU by other processes.

Prints one JSON line; logs go to stderr. Bounded: the end-to-end wait stops after
``--e2e-timeout`` seconds (the rate is then computed from what arrived).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    ServerProcess,
    emit_run,
    loadavg,
    log,
    setup_logging,
    trade_frame,
)

SYMBOLS = ("BTCUSDT", "ETHUSDT")
START = {"BTCUSDT": 60000.0, "ETHUSDT": 3000.0}


def walk(n: int, seed: int, t0_ms: int) -> list[tuple[str, int, str, str, int]]:
    """n trades alternating symbols: (symbol, trade_id, price, qty, time_ms), prices as
    Binance-style strings, a random walk reflected inside +-2% of the start price (so the
    alerts 5% or more away never fire), ~4 trades per ms of trade time."""
    rng = random.Random(seed)
    prices = dict(START)
    ids = dict.fromkeys(SYMBOLS, 1_000_000)
    out = []
    for i in range(n):
        symbol = SYMBOLS[i & 1]
        lo, hi = START[symbol] * 0.98, START[symbol] * 1.02
        price = prices[symbol] * (1 + rng.gauss(0, 0.0002))
        if not lo <= price <= hi:
            price = 2 * lo - price if price < lo else 2 * hi - price
        prices[symbol] = price
        ids[symbol] += 1
        out.append(
            (
                symbol,
                ids[symbol],
                f"{prices[symbol]:.2f}",
                f"{rng.expovariate(20.0) + 0.00001:.8f}",
                t0_ms + i // 4,
            )
        )
    return out


# --------------------------------------------------------------------------- in-process


async def pipeline(args) -> dict:
    import logging

    from aiohttp import web

    from pricewatch.alerts import ENGINE
    from pricewatch.config import Settings
    from pricewatch.feeds import Tick, decode_event
    from pricewatch.market import MARKET
    from pricewatch.server import create_app
    from pricewatch.upstream.binance import BinanceFeed

    logging.getLogger("pricewatch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="pricewatch-bench-") as tmp:
        app = create_app(
            Settings(feed="off", db=str(Path(tmp) / "p.db"), bcrypt_rounds=4, log_level="WARNING")
        )
        runner = web.AppRunner(app)
        await runner.setup()  # runs the cleanup contexts: store, engine (hook), hub...
        try:
            market, engine = app[MARKET], app[ENGINE]
            assert engine.on_tick in market.trade_hooks
            rng = random.Random(args.seed + 1)
            for i in range(args.alerts):  # +-5..50% away: the walk never reaches them
                symbol = SYMBOLS[i & 1]
                if rng.random() < 0.5:
                    target, direction = START[symbol] * rng.uniform(1.05, 1.5), "above"
                else:
                    target, direction = START[symbol] * rng.uniform(0.5, 0.95), "below"
                engine.index.add(i + 1, symbol, round(target, 2), direction)
            # ~4 trades per ms: the walks end before now (future trades would be dropped).
            now_ms = int(time.time() * 1000) - 2 * args.trades
            trades = walk(args.trades, args.seed, now_ms)
            ticks = [Tick(s, float(p), float(q), t, tid) for s, tid, p, q, t in trades]
            gc.collect()
            on_tick = market.on_tick
            began = time.perf_counter()
            for tick in ticks:
                on_tick(tick)
            pipe_s = time.perf_counter() - began
            assert sum(market.ticks.values()) == len(ticks)
            assert engine.triggered == 0 and not engine._hits

            # Decode + deliver + pipeline, on text frames as websockets' recv() returns them
            # (a fresh walk later in time so the candles stay in order).
            feed = BinanceFeed("ws://127.0.0.1:9", SYMBOLS, market.on_tick, market.on_book)
            later = walk(args.trades, args.seed + 2, now_ms + args.trades)
            texts = [trade_frame(*t)[4:].decode() for t in later]  # strip the 4-byte header
            del ticks, trades, later
            gc.collect()
            deliver = feed._deliver
            began = time.perf_counter()
            for raw in texts:
                deliver(decode_event(raw))
            dec_s = time.perf_counter() - began
            assert feed.stats.callback_errors == 0
        finally:
            await runner.cleanup()
    return {
        "pipeline_trades_per_s": round(args.trades / pipe_s),
        "decode_pipeline_trades_per_s": round(args.trades / dec_s),
    }


# --------------------------------------------------------------------------- end to end


def fake_main(conn, n: int, seed: int, chunk: int) -> None:
    """Child process: serve a fake Binance; on "go", write n trade frames as fast as possible."""
    setup_logging()

    async def run() -> None:
        now_ms = int(time.time() * 1000) - n  # ~4 trades per ms: all in the past
        trades = walk(n, seed, now_ms)
        frames = [
            b"".join(trade_frame(*t) for t in trades[i : i + chunk]) for i in range(0, n, chunk)
        ]
        del trades
        fake = await FakeUpstream().start()
        conn.send(("port", fake.port))
        loop = asyncio.get_running_loop()
        await fake.wait_client(timeout=30.0)
        conn.send(("connected", fake.paths[0]))
        await loop.run_in_executor(None, conn.recv)  # "go"
        cpu = CpuMeter()
        cpu.start()
        t_first = time.monotonic()
        for data in frames:
            fake.write(data)
            await fake.drain()
        t_last = time.monotonic()
        conn.send(("sent", t_first, t_last, cpu.stop()))
        await loop.run_in_executor(None, conn.recv)  # "stop"
        await fake.close()

    asyncio.run(run())


def e2e(args) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=fake_main, args=(child, args.e2e_trades, args.seed, args.chunk), daemon=True
    )
    proc.start()
    server = None
    try:
        kind, port = parent.recv()
        server = ServerProcess(
            {"PRICEWATCH_FEED": "binance", "PRICEWATCH_BINANCE_WS_URL": f"ws://127.0.0.1:{port}"}
        ).start()
        if not parent.poll(30):
            raise RuntimeError("the server's feed never connected to the fake upstream")
        kind, path = parent.recv()
        log.info("server pid %d connected to fake upstream: %s", server.pid, path)
        feed_name = "binance"
        base = server.healthz()["feeds"][feed_name]["messages"]
        cpu = CpuMeter(server.pid)
        cpu.start()
        parent.send("go")
        target = base + args.e2e_trades
        deadline = time.monotonic() + args.e2e_timeout
        samples = []
        while True:
            messages = server.healthz()["feeds"][feed_name]["messages"]
            now = time.monotonic()
            samples.append((now, messages))
            if messages >= target or now > deadline:
                break
            time.sleep(0.05)
        server_cpu = cpu.stop()
        _, t_first, t_last, fake_cpu = parent.recv()
        parent.send("stop")
        t_done, got = samples[-1]
        got -= base
        health = server.healthz()["feeds"][feed_name]
        if got < args.e2e_trades:
            log.warning(
                "timed out: %d of %d trades arrived in %.1fs",
                got,
                args.e2e_trades,
                args.e2e_timeout,
            )
        # Steady state: the slope between 10% and 90% of the total.
        lo = next(((t, m) for t, m in samples if m - base >= 0.1 * got), samples[0])
        hi = next(((t, m) for t, m in samples if m - base >= 0.9 * got), samples[-1])
        steady = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else None
        return {
            "e2e_trades_per_s": round(got / (t_done - t_first)),
            "e2e_steady_trades_per_s": round(steady) if steady else None,
            "e2e_trades": got,
            "e2e_seconds": round(t_done - t_first, 2),
            "e2e_fake_write_s": round(t_last - t_first, 2),
            "e2e_server_cpu_pct": round(server_cpu, 1),
            "e2e_server_runqueue_wait_pct": cpu.wait_pct,
            "e2e_fake_cpu_pct": round(fake_cpu, 1),
            "e2e_parse_errors": health["parse_errors"],
            "e2e_callback_errors": health["callback_errors"],
        }
    finally:
        if server is not None:
            rc = server.stop()
            if rc not in (0, -15):
                log.warning("server exited with %s", rc)
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trades", type=int, default=500_000, help="in-process trades")
    parser.add_argument(
        "--alerts",
        type=int,
        default=10_000,
        help="out-of-band alerts in the engine index (in-process part)",
    )
    parser.add_argument("--e2e-trades", type=int, default=300_000)
    parser.add_argument("--e2e-timeout", type=float, default=40.0)
    parser.add_argument("--chunk", type=int, default=256, help="frames per socket write")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    began = time.monotonic()
    out: dict = {}
    load_before = loadavg()
    if not args.skip_pipeline:
        out.update(asyncio.run(pipeline(args)))
        log.info("pipeline: %s", out)
    out["trades"] = args.trades
    if not args.skip_e2e:
        out.update(e2e(args))
    out["alerts"] = args.alerts
    emit_run(out, load_before, began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
