"""Tests for the in-memory alert matching engine (pricewatch.alert_index)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricewatch.alert_index import ABOVE, BELOW, AlertIndex
from pricewatch.percent_index import PercentIndex


def index_with(*alerts: tuple[int, str, float, str]) -> AlertIndex:
    index = AlertIndex()
    for alert in alerts:
        index.add(*alert)
    return index


# -- crossing semantics -----------------------------------------------------------------------


def test_above_fires_at_exact_target():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE))
    assert index.match("BTCUSDT", 99.99) == []
    assert index.match("BTCUSDT", 100.0) == [1]


def test_below_fires_at_exact_target():
    index = index_with((1, "BTCUSDT", 100.0, BELOW))
    assert index.match("BTCUSDT", 100.01) == []
    assert index.match("BTCUSDT", 100.0) == [1]


def test_gap_jump_over_target_fires():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE), (2, "BTCUSDT", 50.0, BELOW))
    assert index.match("BTCUSDT", 75.0) == []
    assert index.match("BTCUSDT", 250.0) == [1]
    assert index.match("BTCUSDT", 10.0) == [2]


def test_price_moving_away_does_not_fire():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE), (2, "BTCUSDT", 50.0, BELOW))
    for price in (90.0, 80.0, 70.0, 60.0, 51.0, 60.0, 99.0):
        assert index.match("BTCUSDT", price) == []
    assert len(index) == 2


def test_alert_fires_once_when_price_crosses():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE))
    assert index.match("BTCUSDT", 101.0) == [1]
    assert index.match("BTCUSDT", 102.0) == []
    assert index.match("BTCUSDT", 99.0) == []
    assert index.match("BTCUSDT", 101.0) == []
    assert 1 not in index
    assert index.get(1) is None


def test_one_trade_fires_many_alerts_and_leaves_the_rest():
    index = AlertIndex()
    for i in range(1, 101):
        index.add(i, "BTCUSDT", float(i), ABOVE)
    fired = index.match("BTCUSDT", 40.5)
    assert sorted(fired) == list(range(1, 41))
    assert len(index) == 60
    assert index.match("BTCUSDT", 40.9) == []
    assert index.match("BTCUSDT", 41.0) == [41]


def test_equal_targets_fire_together():
    index = index_with(
        (3, "BTCUSDT", 10.0, BELOW), (1, "BTCUSDT", 10.0, BELOW), (2, "BTCUSDT", 10.0, BELOW)
    )
    assert index.match("BTCUSDT", 10.0) == [1, 2, 3]
    assert len(index) == 0


def test_match_order_is_above_then_below_nearest_target_first():
    index = index_with(
        (1, "X", 5.0, ABOVE),
        (2, "X", 8.0, ABOVE),
        (3, "X", 8.0, ABOVE),
        (4, "X", 12.0, BELOW),
        (5, "X", 9.0, BELOW),
        (6, "X", 20.0, ABOVE),
    )
    assert index.match("X", 9.0) == [2, 3, 1, 5, 4]
    assert index.get(6) == ("X", 20.0, ABOVE)


def test_unknown_symbol_and_nan_price_fire_nothing():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE), (2, "BTCUSDT", 100.0, BELOW))
    assert index.match("ETHUSDT", 100.0) == []
    assert index.match("BTCUSDT", math.nan) == []
    assert len(index) == 2


def test_symbols_are_independent():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE), (2, "ETHUSDT", 100.0, ABOVE))
    assert index.match("ETHUSDT", 150.0) == [2]
    assert index.count("BTCUSDT") == 1
    assert index.count("ETHUSDT") == 0
    assert index.match("BTCUSDT", 150.0) == [1]


# -- maintenance --------------------------------------------------------------------------------


def test_removed_alert_never_fires():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE), (2, "BTCUSDT", 100.0, ABOVE))
    assert index.remove(1) is True
    assert index.remove(1) is False
    assert index.remove(999) is False
    assert index.match("BTCUSDT", 100.0) == [2]


def test_readded_alert_fires_only_at_new_target():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE))
    index.add(1, "BTCUSDT", 200.0, ABOVE)
    assert len(index) == 1
    assert index.get(1) == ("BTCUSDT", 200.0, ABOVE)
    assert index.match("BTCUSDT", 150.0) == []
    assert index.match("BTCUSDT", 200.0) == [1]


def test_readd_may_change_symbol_and_direction():
    index = index_with((1, "BTCUSDT", 100.0, ABOVE))
    index.add(1, "ETHUSDT", 50.0, BELOW)
    assert index.count("BTCUSDT") == 0
    assert index.match("BTCUSDT", 1000.0) == []
    assert index.match("ETHUSDT", 60.0) == []
    assert index.match("ETHUSDT", 50.0) == [1]


def test_len_contains_count_get():
    index = index_with((1, "A", 1.5, ABOVE), (2, "A", 2.5, BELOW), (3, "B", 3, ABOVE))
    assert len(index) == 3 and index.count() == 3
    assert index.count("A") == 2 and index.count("B") == 1 and index.count("C") == 0
    assert 2 in index and 4 not in index
    assert index.get(3) == ("B", 3.0, ABOVE)
    assert index.get(2) == ("A", 2.5, BELOW)
    assert index.get(4) is None
    index.clear()
    assert len(index) == 0


@pytest.mark.parametrize(
    ("alert_id", "symbol", "target", "direction"),
    [
        (1, "A", 10.0, "up"),
        (1, "A", 10.0, "ABOVE"),
        (1, "A", 0.0, ABOVE),
        (1, "A", -5.0, BELOW),
        (1, "A", math.nan, ABOVE),
        (1, "A", math.inf, ABOVE),
        (1, "A", "ten", ABOVE),
        ("1", "A", 10.0, ABOVE),
        (1.5, "A", 10.0, ABOVE),
        (True, "A", 10.0, ABOVE),
        (1 << 63, "A", 10.0, ABOVE),
        (1, None, 10.0, ABOVE),
    ],
)
def test_invalid_alert_is_rejected_and_index_unchanged(alert_id, symbol, target, direction):
    index = index_with((1, "A", 5.0, ABOVE))
    with pytest.raises(ValueError):
        index.add(alert_id, symbol, target, direction)
    assert index.get(1) == ("A", 5.0, ABOVE)
    with pytest.raises(ValueError):
        index.load([(2, "A", 6.0, ABOVE), (alert_id, symbol, target, direction)])
    assert len(index) == 1 and index.get(1) == ("A", 5.0, ABOVE)


def test_load_accepts_a_generator_and_replaces_existing_ids():
    index = index_with((1, "A", 5.0, ABOVE), (2, "B", 5.0, ABOVE))
    index.load((i, "A", float(i), BELOW) for i in range(2, 6))
    assert index.count("A") == 5 and index.count("B") == 0
    assert index.get(2) == ("A", 2.0, BELOW)
    assert index.match("A", 4.0) == [4, 5]
    assert index.match("A", 5.0) == [1]


def test_load_equals_incremental_add_example():
    rows = [
        (5, "A", 3.0, ABOVE),
        (2, "B", 1.0, BELOW),
        (9, "A", 3.0, ABOVE),
        (5, "B", 7.0, BELOW),
        (1, "A", 1.0, BELOW),
        (9, "A", 2.0, BELOW),
    ]
    loaded, added = AlertIndex(), index_with(*rows)
    loaded.load(rows)
    assert_same_state(loaded, added, ids=range(12))


# -- properties against a brute-force model -----------------------------------------------------

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
TARGETS = [1.0, 2.0, 2.5, 3.0, 4.0]  # few values, so ties are common
PRICES = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]

ids = st.integers(min_value=0, max_value=25)
symbols = st.sampled_from(SYMBOLS)
rows = st.tuples(ids, symbols, st.sampled_from(TARGETS), st.sampled_from([ABOVE, BELOW]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), rows),
        st.tuples(st.just("remove"), ids),
        st.tuples(st.just("trade"), st.tuples(symbols, st.sampled_from(PRICES))),
        st.tuples(st.just("trade"), st.tuples(symbols, st.sampled_from(PRICES))),
        st.tuples(st.just("load"), st.lists(rows, max_size=8)),
    ),
    max_size=60,
)


def brute_force_match(model: dict, symbol: str, price: float) -> list[int]:
    """Scan every live alert; return hits in the documented order and drop them."""
    above = [(-t, i) for i, (s, t, d) in model.items() if s == symbol and d == ABOVE and price >= t]
    below = [(t, i) for i, (s, t, d) in model.items() if s == symbol and d == BELOW and price <= t]
    hits = [i for _, i in sorted(above)] + [i for _, i in sorted(below)]
    for i in hits:
        del model[i]
    return hits


def assert_same_state(a: AlertIndex, b: AlertIndex, ids) -> None:
    assert len(a) == len(b)
    for symbol in SYMBOLS + ["A", "B"]:
        assert a.count(symbol) == b.count(symbol)
    for i in ids:
        assert a.get(i) == b.get(i)
        assert (i in a) == (i in b)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_matches_equal_brute_force_model(operations):
    index, model = AlertIndex(), {}
    got, want = [], []
    for n, (op, arg) in enumerate(operations):
        if op == "add":
            alert_id, symbol, target, direction = arg
            index.add(alert_id, symbol, target, direction)
            model[alert_id] = (symbol, target, direction)
        elif op == "remove":
            assert index.remove(arg) == (model.pop(arg, None) is not None)
        elif op == "load":
            index.load(arg)
            for alert_id, symbol, target, direction in arg:
                model[alert_id] = (symbol, target, direction)
        else:
            symbol, price = arg
            got.append((n, index.match(symbol, price)))
            want.append((n, brute_force_match(model, symbol, price)))
        assert len(index) == len(model)
    assert got == want
    for alert_id in range(26):
        assert index.get(alert_id) == model.get(alert_id)


@settings(max_examples=150, deadline=None)
@given(st.lists(rows, max_size=40), st.lists(rows, max_size=10))
def test_load_equals_incremental_add(preexisting, bulk):
    loaded, added = index_with(*preexisting), index_with(*preexisting)
    loaded.load(bulk)
    for row in bulk:
        added.add(*row)
    assert_same_state(loaded, added, ids=range(26))
    for price in PRICES + PRICES[::-1]:
        for symbol in SYMBOLS:
            assert loaded.match(symbol, price) == added.match(symbol, price)
    assert len(loaded) == len(added) == 0


def test_creation_log_answers_which_alerts_existed_at_a_time():
    from pricewatch.alert_index import CreationLog

    log = CreationLog()
    assert log.last_id_at(0) == 0 and log.newest == -math.inf
    for alert_id, created in ((3, 1000.0), (5, 2000.0), (9, 1500.0), (12, 3000.0)):
        log.add(alert_id, created)  # 9 came with a clock that stepped back: kept sorted
    log.add(5, 9999.0)  # an update of a known alert changes nothing
    assert [log.last_id_at(t) for t in (999, 1000, 1999, 2000, 2999, 3000, 10**9)] == [
        0,
        3,
        3,
        9,
        9,
        12,
        12,
    ]
    log.prune(2500.0)
    assert len(log) == 1 and log.floor_id == 9
    assert log.last_id_at(1000) == 9  # pruned: judged as if they had always existed
    log.add(4, 5000.0)  # below the floor: ignored
    assert log.last_id_at(10**9) == 12


# -- percent alerts (pricewatch.percent_index) ------------------------------------------------


def test_percent_window_holds_exactly_the_last_w_seconds():
    index = PercentIndex()
    index.add(1, "BTC", "1m", 5.0, "up")
    index.on_trade("BTC", 0, 100.0)  # second 0
    index.on_trade("BTC", 59_999, 101.0)  # second 59: 0 is still inside (59..0)
    assert index.window_range("BTC", "1m") == (100.0, 101.0)
    index.on_trade("BTC", 60_000, 102.0)  # second 60: the window is seconds 1..60
    assert index.window_range("BTC", "1m") == (101.0, 102.0)
    assert index.on_trade("BTC", 60_500, 105.0) == []  # 3.96 % above 101
    assert index.on_trade("BTC", 60_600, 106.05) == [(1, 5.0, "up", "1m")]
    assert len(index) == 0


def test_percent_deques_keep_at_most_one_entry_per_second():
    index = PercentIndex()
    index.add(1, "BTC", "1m", 50.0, "any")
    for i in range(20_000):  # falling prices: the worst case for the highs deque
        index.on_trade("BTC", i * 10, 1000.0 - i * 0.01)
    group = index._where[1]
    assert len(group.highs) <= 60 and len(group.lows) <= 60


def test_percent_any_leaves_both_sides_when_it_fires():
    index = PercentIndex()
    index.add(1, "BTC", "5m", 2.0, "any")
    index.add(2, "BTC", "5m", 2.0, "up")
    index.on_trade("BTC", 0, 100.0)
    assert index.on_trade("BTC", 1000, 97.0) == [(1, 2.0, "any", "5m")]
    assert index.on_trade("BTC", 2000, 110.0) == [(2, 2.0, "up", "5m")]  # 1 is gone
    group = index.groups["BTC"][0][1]
    assert len(group.up_ids) == len(group.down_ids) == 0


def test_percent_add_rejects_bad_values_and_remove_forgets():
    index = PercentIndex()
    for window, percent, direction in [
        ("2m", 1.0, "up"),
        ("1m", 0.0, "up"),
        ("1m", 101.0, "up"),
        ("1m", 1.0, "above"),
    ]:
        with pytest.raises(ValueError):
            index.add(1, "BTC", window, percent, direction)
    index.add(1, "BTC", "1m", 1.0, "down")
    assert index.remove(1) and not index.remove(1)
    index.on_trade("BTC", 0, 100.0)
    assert index.on_trade("BTC", 1000, 50.0) == []


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(90, 110)), min_size=1, max_size=60),
    st.lists(
        st.tuples(st.sampled_from([1, 2, 5, 10]), st.sampled_from(["up", "down", "any"])),
        min_size=1,
        max_size=12,
    ),
)
def test_percent_index_matches_a_brute_force_model(steps, alerts):
    """Random trades (second steps, prices) against the definition, trade by trade."""
    index = PercentIndex()
    for alert_id, (percent, direction) in enumerate(alerts):
        index.add(alert_id, "BTC", "1m", float(percent), direction)
    live = dict(enumerate(alerts))
    seen: list[tuple[int, float]] = []
    second = 0
    for step, price in steps:
        second += step
        seen.append((second, float(price)))
        window = [p for s, p in seen if s > second - 60]
        low, high = min(window), max(window)
        expected = set()
        for alert_id, (percent, direction) in live.items():
            up = (price / low - 1) * 100 >= percent - 1e-9
            down = (1 - price / high) * 100 >= percent - 1e-9
            if (direction in ("up", "any") and up) or (direction in ("down", "any") and down):
                expected.add(alert_id)
        got = {hit[0] for hit in index.on_trade("BTC", second * 1000 + 1, float(price))}
        assert got == expected
        for alert_id in got:
            del live[alert_id]


def test_a_new_window_starts_from_the_symbols_last_trade():
    index = PercentIndex()
    index.last["BTC"] = SimpleNamespace(time=5_000, price=100.0)  # as the tick path keeps it
    index.add(1, "BTC", "1m", 5.0, "up")
    assert index.window_range("BTC", "1m") == (100.0, 100.0)
    index.on_trade("BTC", 6_000, 90.0)
    index.add(2, "BTC", "5m", 5.0, "down")  # the symbol has a group: its newest trade counts
    assert index.window_range("BTC", "5m") == (90.0, 90.0)
