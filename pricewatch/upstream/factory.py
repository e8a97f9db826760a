"""The feed named by PRICEWATCH_FEED: `binance`, `demo`, `replay:PATH` or `off`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..feeds import BarCallback, BookCallback, Feed, FeedConfigError, TickCallback
from .binance import BinanceFeed
from .binance_rest import BinanceRest
from .history import KlineFill
from .offline import DemoFeed, ReplayFeed


def make_feed(
    spec: str,
    *,
    symbols: Iterable[str],
    binance_url: str,
    on_tick: TickCallback,
    on_book: BookCallback,
    replay_speed: float = 0.0,
    rest: BinanceRest | None = None,
    backfill_max_trades: int = 100_000,
    history: Mapping[str, tuple[int, int]] | None = None,
    on_history: Callable[[KlineFill], object] | None = None,
    on_bar: BarCallback | None = None,
    max_clock_skew: float = 10.0,
    max_id_jump: int = 10_000_000,
) -> Feed | None:
    """Build the feed named by PRICEWATCH_FEED: ``binance``, ``demo``, ``replay:PATH`` or ``off``.

    Returns None for ``off``. Raises FeedConfigError (a ValueError) for anything else.
    `max_clock_skew` and `max_id_jump`: PRICEWATCH_MAX_CLOCK_SKEW, PRICEWATCH_MAX_ID_JUMP.
    """
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "binance" and not sep:
        return BinanceFeed(
            binance_url,
            symbols,
            on_tick,
            on_book,
            rest=rest,
            backfill_max_trades=backfill_max_trades,
            history=history,
            on_history=on_history,
            on_bar=on_bar,
            max_clock_skew=max_clock_skew,
            max_id_jump=max_id_jump,
        )
    if kind == "demo" and not sep:
        return DemoFeed(symbols, on_tick, on_book, max_clock_skew=max_clock_skew)
    if kind == "replay" and sep and arg.strip():
        return ReplayFeed(
            arg.strip(),
            symbols,
            on_tick,
            on_book,
            speed=replay_speed,
            max_clock_skew=max_clock_skew,
            max_id_jump=max_id_jump,
        )
    if kind == "off" and not sep:
        return None
    raise FeedConfigError(
        f"PRICEWATCH_FEED={spec!r} is not one of: binance, demo, replay:PATH, off"
    )
