from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricewatch.ohlc import TIMEFRAMES, CandleBook, parse_timeframe

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN = 60_000


def ms(text: str) -> int:
    """'2024-01-01T00:01:00.500' (UTC) -> ms since the epoch."""
    return (datetime.fromisoformat(text).replace(tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)


def iso(ms_: int) -> str:
    return (EPOCH + timedelta(milliseconds=ms_)).strftime("%Y-%m-%dT%H:%M:%SZ")


def candle(ts, o, h, low, c, v, n):
    return {"timestamp": ts, "open": o, "high": h, "low": low, "close": c, "volume": v, "trades": n}


def minute_book(size: int = 1000) -> CandleBook:
    return CandleBook({"1m": MIN}, size=size)


T0 = ms("2024-01-01T00:00:00")


def test_timeframes_are_the_contract_list_in_order():
    assert list(TIMEFRAMES) == ["1s", "1m", "5m", "15m", "1h", "4h", "1d"]
    assert TIMEFRAMES["4h"] == 4 * 3_600_000


def test_parse_timeframe_knows_names_and_rejects_others():
    assert parse_timeframe("15m") == 900_000
    for bad in ("2m", "", "1M", None):
        with pytest.raises(ValueError):
            parse_timeframe(bad)


def test_trades_across_a_minute_boundary_make_two_candles():
    book = minute_book()
    book.add("BTCUSDT", 100.0, 1.0, ms("2024-01-01T00:00:05"))
    book.add("BTCUSDT", 105.0, 0.5, ms("2024-01-01T00:00:20"))
    book.add("BTCUSDT", 95.0, 0.25, ms("2024-01-01T00:00:40"))
    book.add("BTCUSDT", 101.0, 2.0, ms("2024-01-01T00:00:59.999"))
    book.add("BTCUSDT", 102.0, 1.5, ms("2024-01-01T00:01:00.001"))
    book.add("BTCUSDT", 99.5, 0.5, ms("2024-01-01T00:01:30"))
    assert book.candles("BTCUSDT", "1m") == [
        candle("2024-01-01T00:00:00Z", 100.0, 105.0, 95.0, 101.0, 3.75, 4),
        candle("2024-01-01T00:01:00Z", 102.0, 102.0, 99.5, 99.5, 2.0, 2),
    ]


@pytest.mark.parametrize(
    ("timeframe", "start"),
    [
        ("1s", "2024-03-05T05:59:59Z"),
        ("1m", "2024-03-05T05:59:00Z"),
        ("5m", "2024-03-05T05:55:00Z"),
        ("15m", "2024-03-05T05:45:00Z"),
        ("1h", "2024-03-05T05:00:00Z"),
        ("4h", "2024-03-05T04:00:00Z"),
        ("1d", "2024-03-05T00:00:00Z"),
    ],
)
def test_candles_align_to_utc_boundaries_of_the_trade_time(timeframe, start):
    book = CandleBook()
    book.add("BTCUSDT", 1.0, 1.0, ms("2024-03-05T05:59:59.999"))
    [only] = book.candles("BTCUSDT", timeframe)
    assert only["timestamp"] == start


def test_trade_exactly_on_a_boundary_opens_the_new_candle():
    book = CandleBook()
    book.add("X", 1.0, 1.0, ms("2024-03-05T03:59:59.999"))
    book.add("X", 2.0, 1.0, ms("2024-03-05T04:00:00"))
    for timeframe in ("1s", "1m", "5m", "15m", "1h", "4h"):
        first, second = book.candles("X", timeframe)
        assert second["timestamp"] == "2024-03-05T04:00:00Z"
        assert (first["close"], second["open"], second["trades"]) == (1.0, 2.0, 1)
    [day] = book.candles("X", "1d")
    assert (day["open"], day["close"], day["trades"]) == (1.0, 2.0, 2)


def test_late_trade_updates_its_already_closed_candle():
    book = minute_book()
    book.add("X", 100.0, 1.0, T0 + 10_000)
    book.add("X", 101.0, 1.0, T0 + 50_000)
    book.add("X", 200.0, 1.0, T0 + MIN + 5_000)  # the next minute is open now
    book.add("X", 110.0, 0.5, T0 + 30_000)  # late: new high, between first and last trade
    book.add("X", 90.0, 0.25, T0 + 40_000)  # late: new low
    assert book.candles("X", "1m") == [
        candle(iso(T0), 100.0, 110.0, 90.0, 101.0, 2.75, 4),
        candle(iso(T0 + MIN), 200.0, 200.0, 200.0, 200.0, 1.0, 1),
    ]


def test_late_trade_earlier_than_the_open_becomes_the_open():
    book = minute_book()
    book.add("X", 100.0, 1.0, T0 + 10_000)
    book.add("X", 101.0, 1.0, T0 + 50_000)
    book.add("X", 200.0, 1.0, T0 + MIN)
    book.add("X", 99.0, 1.0, T0 + 1_000)
    assert book.candles("X", "1m")[0] == candle(iso(T0), 99.0, 101.0, 99.0, 101.0, 3.0, 3)


def test_late_trade_later_than_the_close_becomes_the_close():
    book = minute_book()
    book.add("X", 100.0, 1.0, T0 + 10_000)
    book.add("X", 200.0, 1.0, T0 + MIN)
    book.add("X", 103.0, 1.0, T0 + 59_000)
    assert book.candles("X", "1m")[0] == candle(iso(T0), 100.0, 103.0, 100.0, 103.0, 2.0, 2)


def test_out_of_order_trades_in_the_open_candle_keep_time_order():
    book = minute_book()
    book.add("X", 100.0, 1.0, T0 + 30_000)
    book.add("X", 90.0, 1.0, T0 + 10_000)  # earlier: new open, close unchanged
    book.add("X", 95.0, 1.0, T0 + 20_000)  # in between: neither
    assert book.candles("X", "1m") == [candle(iso(T0), 90.0, 100.0, 90.0, 100.0, 3.0, 3)]


def test_equal_trade_times_first_arrival_opens_last_arrival_closes():
    book = minute_book()
    book.add("X", 1.0, 1.0, T0 + 5_000)
    book.add("X", 2.0, 1.0, T0 + 5_000)
    book.add("X", 3.0, 1.0, T0 + 5_000)
    assert book.candles("X", "1m") == [candle(iso(T0), 1.0, 3.0, 1.0, 3.0, 3.0, 3)]


def test_late_trade_into_an_empty_interval_inserts_a_candle_in_order():
    book = minute_book()
    book.add("X", 1.0, 1.0, T0)
    book.add("X", 3.0, 1.0, T0 + 3 * MIN)
    book.add("X", 2.0, 0.5, T0 + 2 * MIN + 7)
    assert book.candles("X", "1m") == [
        candle(iso(T0), 1.0, 1.0, 1.0, 1.0, 1.0, 1),
        candle(iso(T0 + 2 * MIN), 2.0, 2.0, 2.0, 2.0, 0.5, 1),
        candle(iso(T0 + 3 * MIN), 3.0, 3.0, 3.0, 3.0, 1.0, 1),
    ]
    assert book.candle_at("X", "1m", T0 + 2 * MIN)["volume"] == 0.5


def test_empty_intervals_make_no_candle():
    book = minute_book()
    book.add("X", 1.0, 1.0, T0)
    book.add("X", 2.0, 1.0, T0 + 10 * MIN)
    assert [c["timestamp"] for c in book.candles("X", "1m")] == [iso(T0), iso(T0 + 10 * MIN)]
    assert book.candle_at("X", "1m", T0 + 5 * MIN) is None


def test_ring_keeps_only_the_newest_size_candles():
    book = minute_book(size=5)
    for i in range(8):
        book.add("X", float(i), 1.0, T0 + i * MIN)
    got = book.candles("X", "1m", limit=1000)
    assert [c["open"] for c in got] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert book.candle_at("X", "1m", T0) is None  # evicted


def test_trade_older_than_a_full_ring_is_dropped_and_counted():
    book = minute_book(size=5)
    for i in range(2, 7):
        book.add("X", float(i), 1.0, T0 + i * MIN)
    before = book.candles("X", "1m")
    book.add("X", 99.0, 1.0, T0 + MIN + 59_999)  # just before the oldest candle
    book.add("X", 99.0, 1.0, T0)
    assert book.candles("X", "1m") == before
    assert book.stats()["dropped"] == {"X": 2}
    book.add("X", 99.0, 1.0, T0 + 2 * MIN + 1)  # inside the oldest candle: lands
    assert book.candles("X", "1m")[0]["high"] == 99.0
    assert book.stats()["dropped"] == {"X": 2}


def test_dropped_counts_trades_once_and_per_timeframe():
    book = CandleBook({"1m": MIN, "1h": 60 * MIN}, size=2)
    book.add("X", 1.0, 1.0, T0 + 10 * MIN)
    book.add("X", 1.0, 1.0, T0 + 20 * MIN)
    book.add("X", 1.0, 1.0, T0 + 5 * MIN)  # too old for the full 1m ring, fine for 1h
    book.add("Y", 1.0, 1.0, T0)
    assert book.stats() == {
        "dropped": {"X": 1, "Y": 0},
        "dropped_by_timeframe": {"X": {"1m": 1, "1h": 0}, "Y": {"1m": 0, "1h": 0}},
    }
    assert book.candles("X", "1h")[0]["trades"] == 3


def test_late_trade_into_a_gap_of_a_full_ring_evicts_the_oldest():
    book = minute_book(size=3)
    for i in (0, 1, 5):
        book.add("X", float(i), 1.0, T0 + i * MIN)
    book.add("X", 3.0, 1.0, T0 + 3 * MIN)
    assert [c["open"] for c in book.candles("X", "1m")] == [1.0, 3.0, 5.0]
    assert book.stats()["dropped"] == {"X": 0}


def test_ring_not_yet_full_accepts_an_older_trade_at_the_front():
    book = minute_book(size=3)
    book.add("X", 5.0, 1.0, T0 + 5 * MIN)
    book.add("X", 1.0, 1.0, T0 + MIN)
    assert [c["open"] for c in book.candles("X", "1m")] == [1.0, 5.0]


def test_limit_returns_the_newest_candles_oldest_first():
    book = minute_book()
    for i in range(10):
        book.add("X", float(i), 1.0, T0 + i * MIN)
    assert [c["open"] for c in book.candles("X", "1m", limit=3)] == [7.0, 8.0, 9.0]
    assert len(book.candles("X", "1m", limit=1000)) == 10
    assert len(book.candles("X", "1m")) == 10
    assert book.candles("X", "1m", limit=0) == []


def test_candle_at_returns_the_candle_containing_the_time():
    book = CandleBook()
    book.add("X", 1.0, 1.0, T0 + 5_000)
    book.add("X", 2.0, 3.0, T0 + MIN + 5_000)
    assert book.candle_at("X", "1m", T0 + 59_999) == candle(iso(T0), 1.0, 1.0, 1.0, 1.0, 1.0, 1)
    assert book.candle_at("X", "1m", T0 + MIN + 5_000) == book.candles("X", "1m")[-1]
    assert book.candle_at("X", "1h", T0 + MIN)["trades"] == 2
    assert book.candle_at("X", "1s", T0 + 6_000) is None


def test_returned_dicts_are_copies():
    book = minute_book()
    book.add("X", 1.0, 1.0, T0)
    book.candles("X", "1m")[0]["open"] = 42.0
    book.candle_at("X", "1m", T0)["close"] = 42.0
    assert book.candles("X", "1m")[0]["open"] == book.candles("X", "1m")[0]["close"] == 1.0


def test_unknown_symbol_is_empty_and_unknown_timeframe_raises():
    book = CandleBook()
    book.add("BTCUSDT", 1.0, 1.0, T0)
    assert book.candles("ETHUSDT", "1m") == []
    assert book.candle_at("ETHUSDT", "1m", T0) is None
    assert book.stats()["dropped"] == {"BTCUSDT": 0}
    with pytest.raises(ValueError):
        book.candles("BTCUSDT", "2m")
    with pytest.raises(ValueError):
        book.candle_at("BTCUSDT", "2m", T0)


def test_symbols_are_independent():
    book = minute_book()
    book.add("A", 1.0, 1.0, T0)
    book.add("B", 2.0, 1.0, T0)
    assert book.candles("A", "1m")[0]["open"] == 1.0
    assert book.candles("B", "1m")[0]["open"] == 2.0


def test_custom_timeframes_below_a_second_show_milliseconds():
    book = CandleBook({"250ms": 250})
    book.add("X", 1.0, 1.0, T0 + 1_600)
    assert book.candles("X", "250ms")[0]["timestamp"] == "2024-01-01T00:00:01.500Z"


@pytest.mark.parametrize(
    ("timeframes", "size"),
    [({"1m": MIN}, 0), ({"1m": MIN}, 2.5), ({}, 10), ({"x": 0}, 10), ({"x": 1.5}, 10)],
)
def test_bad_configuration_is_rejected(timeframes, size):
    with pytest.raises(ValueError):
        CandleBook(timeframes, size=size)


# -- property: the book equals a brute-force reference -----------------------------------

# A UTC midnight, so trades around it cross a boundary of every timeframe.
MIDNIGHT = ms("2024-02-29T00:00:00")

prices = st.floats(min_value=0.01, max_value=1e6, allow_nan=False, allow_infinity=False)
qtys = st.floats(min_value=1e-8, max_value=1e3, allow_nan=False, allow_infinity=False)
# Narrow windows give many equal times and late trades; the wide one many candles. Even the
# wide one spans fewer 1s intervals (801) than the ring holds (1000), so nothing is evicted.
offsets = st.one_of(st.integers(-3, 3), st.integers(-2_500, 2_500), st.integers(-400_000, 400_000))
trades_strategy = st.lists(st.tuples(offsets, prices, qtys), min_size=1, max_size=200)


def reference(trades: list[tuple[int, float, float]], tf: int) -> list[dict]:
    """Group by floor(ts / tf); open/close are the first/last trade sorted by (time, arrival)
    — the book's rule for equal times. Volume is summed in arrival order, as the book does."""
    groups: dict[int, list[tuple[int, int, float, float]]] = {}
    for arrival, (ts, price, qty) in enumerate(trades):
        groups.setdefault(ts // tf, []).append((ts, arrival, price, qty))
    out = []
    for key in sorted(groups):
        group = groups[key]  # arrival order
        volume = 0.0
        for _, _, _, qty in group:
            volume += qty
        by_time = sorted(group)
        out.append(
            candle(
                iso(key * tf),
                by_time[0][2],
                max(p for _, _, p, _ in group),
                min(p for _, _, p, _ in group),
                by_time[-1][2],
                round(volume, 8),  # the book shows volume to Binance's 8 decimals
                len(group),
            )
        )
    return out


@settings(database=None, max_examples=300)
@given(trades_strategy)
def test_book_matches_brute_force_reference(raw):
    trades = [(MIDNIGHT + off, price, qty) for off, price, qty in raw]
    book = CandleBook()
    for ts, price, qty in trades:
        book.add("X", price, qty, ts)
    for name, tf in TIMEFRAMES.items():
        expected = reference(trades, tf)
        assert book.candles("X", name, limit=1000) == expected
        by_start = {c["timestamp"]: c for c in expected}
        for ts, _, _ in trades[:5]:
            assert book.candle_at("X", name, ts) == by_start[iso(ts - ts % tf)]
    assert book.stats()["dropped"] == {"X": 0}
