"""Benchmark the alert matching engine against a naive scan.

    python bench/alerts.py [--alerts 1000000] [--trades 1000000] [--seed 1]

Builds N alerts over BTCUSDT (~60000) and ETHUSDT (~3000) with targets spread -50%..+50%
around the start price, leaving a +-1% band with no targets; directions agree with the start
price, so nothing fires at load. Then measures:

* ``load_s``: ``AlertIndex.load`` of all rows (a list, as a DB ``fetchall`` would give);
* ``rss_mb``: VmRSS after load with the input rows freed (the server's steady state; the
  allocator keeps much of the rows' memory, so this is close to the peak);
  ``rss_peak_load_mb``: high-water mark (VmHWM) through the load, input rows included;
* ``trades_per_s_no_trigger``: ``match`` over a random walk kept inside the empty band;
* ``trades_per_s_trigger`` / ``triggered``: a walk drifting +-12% that crosses targets;
* ``naive_trades_per_s``: the seed's approach, per trade a Python scan of every alert of the
  symbol in a list of tuples, on the same no-trigger trades, cut off after a few seconds;
  ``speedup_vs_naive`` compares it with the no-trigger engine figure.

Percent alerts (``--percent-alerts``, default 100000, over both symbols, every window,
percents 2..50, directions up/down/any), each trade 10 ms after the last:

* ``percent_add_s``: adding them one by one (as the API does);
* ``percent_trades_per_s_no_trigger``: the quiet walk (moves stay under 2 %);
* ``percent_trades_per_s_trigger`` / ``percent_triggered``: the trending walk.

Prints one JSON line. The whole run stays well under 60 s for the defaults.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

# Benchmark the checkout this script sits in, whatever copy of pricewatch is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pricewatch.alert_index import ABOVE, BELOW, AlertIndex  # noqa: E402
from pricewatch.percent_index import WINDOWS, PercentIndex  # noqa: E402

START = {"BTCUSDT": 60000.0, "ETHUSDT": 3000.0}
GAP = 0.01  # no target within +-1% of the start price
SPREAD = 0.50  # targets up to +-50% away


def proc_status_mb(field: str) -> float:
    """Return a /proc/self/status memory field in MB (ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def iter_rows(n: int, rng: random.Random) -> Iterator[tuple[int, str, float, str]]:
    symbols = list(START)
    for alert_id in range(1, n + 1):
        symbol = symbols[alert_id % len(symbols)]
        base = START[symbol]
        if rng.random() < 0.5:
            target, direction = base * (1 + rng.uniform(GAP, SPREAD)), ABOVE
        else:
            target, direction = base * (1 - rng.uniform(GAP, SPREAD)), BELOW
        yield alert_id, symbol, round(target, 2), direction  # cents, so ties happen


def quiet_walk(n: int, rng: random.Random) -> list[tuple[str, float]]:
    """Trades alternating symbols, each a random walk reflected inside +-0.9% of start."""
    prices = dict(START)
    trades = []
    symbols = list(START)
    for i in range(n):
        symbol = symbols[i % len(symbols)]
        base = START[symbol]
        price = prices[symbol] * (1 + rng.gauss(0, 0.0005))
        lo, hi = base * (1 - 0.009), base * (1 + 0.009)
        if not lo <= price <= hi:
            price = min(max(2 * lo - price if price < lo else 2 * hi - price, lo), hi)
        prices[symbol] = price
        trades.append((symbol, round(price, 2)))
    return trades


def trending_walk(n: int, rng: random.Random) -> list[tuple[str, float]]:
    """BTC drifts up ~12%, ETH down ~12%, with noise: both cross many targets."""
    drift = {"BTCUSDT": 0.12 / (n / 2), "ETHUSDT": -0.12 / (n / 2)}
    prices = dict(START)
    symbols = list(START)
    trades = []
    for i in range(n):
        symbol = symbols[i % len(symbols)]
        prices[symbol] *= 1 + drift[symbol] + rng.gauss(0, 0.0003)
        trades.append((symbol, round(prices[symbol], 2)))
    return trades


def time_engine(index: AlertIndex, trades: list[tuple[str, float]]) -> tuple[float, int]:
    match = index.match
    fired = 0
    start = time.perf_counter()
    for symbol, price in trades:
        hits = match(symbol, price)
        if hits:
            fired += len(hits)
    return len(trades) / (time.perf_counter() - start), fired


def percent_index(n: int, rng: random.Random) -> tuple[PercentIndex, float]:
    index = PercentIndex()
    symbols, windows = list(START), list(WINDOWS)
    start = time.perf_counter()
    for alert_id in range(1, n + 1):
        index.add(
            alert_id,
            symbols[alert_id % 2],
            windows[alert_id % len(windows)],
            round(rng.uniform(2.0, 50.0), 2),
            ("up", "down", "any")[alert_id % 3],
        )
    return index, time.perf_counter() - start


def time_percent(
    index: PercentIndex, trades: list[tuple[str, float]], t0: int
) -> tuple[float, int]:
    on_trade = index.on_trade
    fired = 0
    start = time.perf_counter()
    for i, (symbol, price) in enumerate(trades):
        hits = on_trade(symbol, t0 + i * 10, price)
        if hits:
            fired += len(hits)
    return len(trades) / (time.perf_counter() - start), fired


def time_naive(
    rows: Iterable[tuple[int, str, float, str]],
    trades: list[tuple[str, float]],
    budget_s: float,
) -> float:
    """Per trade, compare the price with every alert of the symbol (the seed's approach)."""
    by_symbol: dict[str, list[tuple[int, float, str]]] = {s: [] for s in START}
    for alert_id, symbol, target, direction in rows:
        by_symbol[symbol].append((alert_id, target, direction))
    done = 0
    start = time.perf_counter()
    for symbol, price in trades:
        live = by_symbol[symbol]
        hits = [
            alert_id
            for alert_id, target, direction in live
            if (price >= target if direction == ABOVE else price <= target)
        ]
        if hits:
            gone = set(hits)
            by_symbol[symbol] = [a for a in live if a[0] not in gone]
        done += 1
        if time.perf_counter() - start > budget_s:
            break
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=1_000_000)
    parser.add_argument("--trades", type=int, default=1_000_000, help="no-trigger trades")
    parser.add_argument("--trigger-trades", type=int, default=200_000)
    parser.add_argument("--naive-seconds", type=float, default=3.0)
    parser.add_argument("--naive-trades", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--percent-alerts", type=int, default=100_000)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)

    rows = list(iter_rows(args.alerts, rng))  # as a DB fetchall() would hand them over
    index = AlertIndex()
    gc.collect()
    start = time.perf_counter()
    index.load(rows)
    load_s = time.perf_counter() - start
    assert len(index) == args.alerts, "ids are unique, every row must be live"
    rss_peak_mb = proc_status_mb("VmHWM")  # input rows + index + load's scratch
    del rows  # the server drops its fetchall() result too; measure the index alone
    gc.collect()
    rss_mb = proc_status_mb("VmRSS")

    quiet = quiet_walk(args.trades, rng)
    trending = trending_walk(args.trigger_trades, rng)
    quiet_tps, quiet_fired = time_engine(index, quiet)
    assert quiet_fired == 0, "the quiet walk must stay inside the empty band"
    trigger_tps, triggered = time_engine(index, trending)

    percents, percent_add_s = percent_index(args.percent_alerts, rng)
    p_quiet_tps, p_quiet_fired = time_percent(percents, quiet, 0)
    assert p_quiet_fired == 0, "the quiet walk moves less than the smallest percent"
    p_trigger_tps, p_triggered = time_percent(percents, trending, len(quiet) * 10)
    del percents

    # The naive baseline gets the same alerts (same seed) and the first quiet trades; the
    # engine's data goes first so the process as a whole stays small.
    naive_trades = quiet[: args.naive_trades]
    del index, quiet, trending
    gc.collect()
    naive_rows = iter_rows(args.alerts, random.Random(args.seed))
    naive_tps = time_naive(naive_rows, naive_trades, args.naive_seconds)

    print(
        json.dumps(
            {
                "alerts": args.alerts,
                "load_s": round(load_s, 3),
                "rss_mb": round(rss_mb, 1),
                "trades_per_s_no_trigger": round(quiet_tps),
                "trades_per_s_trigger": round(trigger_tps),
                "triggered": triggered,
                "naive_trades_per_s": round(naive_tps, 1),
                "speedup_vs_naive": round(quiet_tps / naive_tps),
                "rss_peak_load_mb": round(rss_peak_mb, 1),
                "percent_alerts": args.percent_alerts,
                "percent_add_s": round(percent_add_s, 3),
                "percent_trades_per_s_no_trigger": round(p_quiet_tps),
                "percent_trades_per_s_trigger": round(p_trigger_tps),
                "percent_triggered": p_triggered,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
