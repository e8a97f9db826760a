"""Gap-free trades: live Binance trades in trade-id order, missed ids fetched over REST.

A `Sequencer` stands between the Binance websocket and the tick pipeline. Trade ids grow by
one per trade and symbol, so a jump means trades were missed (a reconnect, a network blip).
On a jump the sequencer holds that symbol's newer live trades, fetches the missing ids over
REST (`historicalTrades` from the first missing id; `aggTrades` by time where that endpoint is
refused; on futures markets, whose stream carries aggregate trades, `aggTrades` from the first
missing aggregate id), hands them to the *same* callback in id order, then releases the held
trades. The callback sees every trade exactly once, in id order, as if nothing had been missed.

Bounds: live trades are held at most `hold_limit` seconds (and `max_held` trades); a gap REST
cannot fill in that time (trades no longer served, errors, a long Retry-After) is given up,
its remaining ids are counted in `missed_trades`, and the held trades go on. A gap of more than
`max_trades` ids is not fetched trade by trade: its whole minutes come from 1m klines, handed
on as `Bar`s (see `_fetch_bars`), and the trades no kline covers count as missed.
Duplicates (an id at or below the last delivered one, e.g. replayed after a reconnect) are
dropped and counted as `out_of_order`.

Id resets: a venue restart starts its ids again (from 1, or anywhere), and one bogus id (2^63)
would otherwise turn every later trade into a "duplicate". An id at or behind the last one
with a time newer than the last trade's (however close the ids), or a jump of more than
`max_id_jump` ids, is a *candidate*: held, not delivered. RESET_CONFIRM candidates in a row,
each following the one before (ids and times increasing), or the first of them held
RESET_WAIT seconds with no trade of the old sequence meanwhile (a slow market), re-base the
sequence there (`id_resets`, logged): they are delivered and the ids go on from them; nothing
is missed or fetched. A trade of the old sequence arriving first proves the candidates were
outliers: they are dropped. A late duplicate (a time not newer) is never a candidate.

Future trades: a trade stamped more than `max_skew_ms` ahead of the server clock is dropped
and counted (`future_trades`) before anything else. Its id counts as seen when it is the
next one (the trade after it is no gap, nothing is fetched); any other id of it is ignored
(no gap, no backfill, no reset); it never moves time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from .. import clock
from ..feeds import REORDER_WINDOW, Bar, FeedStats, Tick
from .binance_rest import BinanceRest, RestError, RestLimited

log = logging.getLogger(__name__)

MINUTE = 60_000
MAX_BAR_MINUTES = 1440  # a gap filled from klines spans at most a day of them
RESET_CONFIRM = 3  # candidates in a row that re-base a symbol's trade ids
RESET_WAIT = 0.8  # seconds a lone candidate waits for the old sequence before it re-bases


class _Symbol:
    __slots__ = (
        "last_id",
        "last_time",
        "held",
        "task",
        "state",
        "minute",
        "minute_volume",
        "minute_trades",
        "candidates",
        "timer",
    )

    def __init__(self) -> None:
        self.last_id: int | None = None
        self.last_time: int | None = None
        # What was delivered of the last trade's minute: a kline filling a gap from that
        # minute on adds only the rest.
        self.minute = -1
        self.minute_volume = 0.0
        self.minute_trades = 0
        self.held: deque[Tick] = deque()
        self.candidates: list[Tick] = []  # held for an id reset to be confirmed
        self.timer: asyncio.TimerHandle | None = None  # confirms them after RESET_WAIT
        self.task: asyncio.Task | None = None
        self.state = "idle"  # idle | filling | gave_up (the last gap could not be filled)


class Sequencer:
    """Delivers each symbol's trades exactly once in trade-id order, filling gaps over REST."""

    def __init__(
        self,
        deliver: Callable[[Tick], Any],
        stats: FeedStats,
        rest: BinanceRest | None,
        *,
        max_trades: int = 100_000,
        hold_limit: float = 5.0,
        max_held: int = 200_000,
        deliver_bar: Callable[[Bar], Any] | None = None,
    ):
        self._deliver = deliver
        self._deliver_bar = deliver_bar  # gaps past max_trades are filled from klines
        self.stats = stats
        self.rest = rest
        self.max_trades = max_trades
        self.hold_limit = hold_limit
        self.max_held = max_held
        self._symbols: dict[str, _Symbol] = {}
        self.backfilled: dict[str, int] = {s: 0 for s in stats.symbols}
        self.kline_filled: dict[str, int] = {s: 0 for s in stats.symbols}
        self._agg_only = False  # historicalTrades was refused: use aggTrades from now on
        self._stopping = False
        self.changed = asyncio.Event()  # set whenever a gap is closed or given up (tests)

    # ---- the live path (synchronous, called for every streamed trade)

    def on_trade(self, tick: Tick) -> None:
        sym = self._symbols.get(tick.symbol)
        if sym is None:
            sym = self._symbols[tick.symbol] = _Symbol()
        if sym.task is not None:
            sym.held.append(tick)
            if len(sym.held) == self.max_held:  # a flood while filling: stop holding now
                sym.task.cancel()
            return
        self._accept(tick.symbol, sym, tick)
        if sym.held and sym.task is None:  # an id reset was confirmed: its trades go on
            self._release(tick.symbol, sym)

    def _accept(self, symbol: str, sym: _Symbol, tick: Tick) -> bool:
        """Deliver `tick` or start filling the gap before it (then False: it is held)."""
        trade_id = tick.trade_id
        last = sym.last_id
        stats = self.stats
        if tick.time > stats.future_bound and stats.ahead_of_clock(tick.time):
            # Dropped, counted; the next id counts as seen (a trade of the old sequence).
            if trade_id is not None and last is not None and trade_id == last + 1:
                if sym.candidates:
                    self._outliers(sym)
                sym.last_id = trade_id
            return True
        if trade_id is None or last is None or trade_id == last + 1:
            if sym.candidates:
                self._outliers(sym)
            self._emit(sym, tick)
            return True
        if trade_id <= last:
            if (
                tick.time > sym.last_time
                if sym.last_time is not None
                else last - trade_id > REORDER_WINDOW
            ):
                self._candidate(symbol, sym, tick)
            else:
                self.stats.dropped_out_of_order()
            return True
        if trade_id - last > self.stats.max_id_jump:
            self._candidate(symbol, sym, tick)
            return True
        if sym.candidates:
            self._outliers(sym)
        self.stats.gaps[symbol] = self.stats.gaps.get(symbol, 0) + 1
        missing = trade_id - last - 1
        too_many = missing > self.max_trades
        if self.rest is None or (too_many and (self._deliver_bar is None or sym.last_time is None)):
            # Not fetched at all: counted as missed at once, nothing is held.
            self._missed(symbol, missing)
            sym.state = "gave_up" if self.rest is not None else "idle"
            self._emit(sym, tick)
            return True
        sym.held.appendleft(tick)
        sym.state = "filling"
        fetch = self._fetch_bars if too_many else self._fetch
        sym.task = asyncio.get_running_loop().create_task(
            self._fill(symbol, sym, last + 1, trade_id - 1, fetch), name=f"backfill-{symbol}"
        )
        return False

    def _candidate(self, symbol: str, sym: _Symbol, tick: Tick) -> None:
        """Hold a trade out of line with the sequence; re-base on RESET_CONFIRM in a row."""
        run = sym.candidates
        if run:
            prev = run[-1]
            assert tick.trade_id is not None and prev.trade_id is not None  # sequenced trades
            step = tick.trade_id - prev.trade_id
            if not (0 < step <= self.stats.max_id_jump and tick.time >= prev.time):
                if step <= 0 and tick.time <= prev.time:
                    self.stats.dropped_out_of_order()  # a duplicate of a candidate
                    return
                self._outliers(sym)  # no run: start a new one with this trade
        run.append(tick)
        if len(run) >= RESET_CONFIRM:
            self._rebase(symbol, sym)
        elif sym.timer is None:
            sym.timer = asyncio.get_running_loop().call_later(RESET_WAIT, self._waited, symbol, sym)

    def _rebase(self, symbol: str, sym: _Symbol) -> None:
        """The held candidates start the new sequence: delivered next, in order."""
        run = sym.candidates
        self._cancel_timer(sym)
        first = run[0].trade_id
        assert first is not None  # a candidate is a sequenced trade
        self.stats.id_reset(symbol, sym.last_id if sym.last_id is not None else 0, first)
        sym.last_id = first - 1
        sym.candidates = []
        sym.held.extendleft(reversed(run))  # delivered next, in order, by _release

    def _waited(self, symbol: str, sym: _Symbol) -> None:
        """RESET_WAIT passed with no trade of the old sequence: the candidates re-base."""
        sym.timer = None
        if sym.candidates and not self._stopping:
            self._rebase(symbol, sym)
            if sym.task is None:
                self._release(symbol, sym)

    @staticmethod
    def _cancel_timer(sym: _Symbol) -> None:
        if sym.timer is not None:
            sym.timer.cancel()
            sym.timer = None

    def _outliers(self, sym: _Symbol) -> None:
        """The held candidates were not an id reset: dropped."""
        self.stats.dropped_out_of_order(len(sym.candidates))
        sym.candidates.clear()  # the same list: a run starting now goes on in it
        self._cancel_timer(sym)

    def _emit(self, sym: _Symbol, tick: Tick) -> None:
        if tick.trade_id is not None:
            sym.last_id = tick.trade_id
        stats = self.stats
        if tick.time > stats.future_bound and stats.ahead_of_clock(tick.time):
            return  # a backfilled trade from the future: dropped, counted; its id is seen
        stats.drop_streak = 0
        sym.last_time = tick.time
        minute = tick.time - tick.time % MINUTE
        if minute != sym.minute:
            sym.minute, sym.minute_volume, sym.minute_trades = minute, 0.0, 0
        sym.minute_volume += tick.qty
        sym.minute_trades += tick.count
        try:
            self._deliver(tick)
        except Exception as exc:  # a downstream bug must not stop market data
            self.stats.callback_error(self.stats.kind, exc)

    def resume(self, symbol: str, last_id: int, last_time: int) -> None:
        """The trades up to `last_id` are accounted for elsewhere (candle history): the next
        streamed trade continues from there, any trades in between are backfilled."""
        sym = self._symbols.setdefault(symbol, _Symbol())
        if sym.last_id is None:
            sym.last_id, sym.last_time = last_id, last_time

    # ---- filling a gap

    async def _fill(
        self,
        symbol: str,
        sym: _Symbol,
        first: int,
        last: int,
        fetch: Callable[[str, _Symbol, int], Awaitable[None]],
    ) -> None:
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.hold_limit):
                await fetch(symbol, sym, last)
        except TimeoutError:
            log.warning(
                "%s: backfill of trades %d..%d not done within %.1f s; giving up",
                symbol,
                sym.last_id + 1 if sym.last_id is not None else first,
                last,
                self.hold_limit,
            )
        except asyncio.CancelledError:
            if self._stopping:
                raise  # the feed stops
            task = asyncio.current_task()
            assert task is not None  # a coroutine of this loop runs in a task
            task.uncancel()
            log.warning(
                "%s: %d live trades held during a backfill; giving up", symbol, self.max_held
            )
        except RestError as exc:
            log.warning("%s: backfill failed: %s", symbol, exc)
        except Exception:  # an answer nobody foresaw must not leave the gap held open
            log.exception("%s: backfill failed", symbol)
        finally:
            filled_to = sym.last_id if sym.last_id is not None else first - 1
            missed = max(0, last - max(filled_to, first - 1))
            if missed:
                self._missed(symbol, missed)
                sym.state = "gave_up"
                sym.last_id = last  # what follows the gap is live again
            else:
                sym.state = "idle"
            sym.task = None
            log.info(
                "%s: gap closed in %.2f s (%d missed)", symbol, time.monotonic() - began, missed
            )
            self._release(symbol, sym)
            self.changed.set()

    async def _fetch(self, symbol: str, sym: _Symbol, last: int) -> None:
        """Deliver trades sym.last_id+1 .. last from REST, in id order."""
        rest = self.rest
        assert rest is not None
        held_time = sym.held[0].time if sym.held else None
        by_aggregate = rest.market.by_aggregate  # futures: ids are aggregate ids
        while sym.last_id is not None and sym.last_id < last:
            try:
                if by_aggregate:
                    batch = await rest.agg_trades(
                        symbol, from_id=sym.last_id + 1, limit=min(1000, last - sym.last_id)
                    )
                elif self._agg_only:
                    start = sym.last_time or 0
                    end = min(held_time or int(time.time() * 1000), start + 3_600_000 - 1)
                    batch = await rest.agg_trades(symbol, start, end)
                else:
                    batch = await rest.trades(
                        symbol, sym.last_id + 1, min(1000, last - sym.last_id)
                    )
            except RestLimited as exc:
                await asyncio.sleep(exc.retry_after)  # bounded by hold_limit's timeout
                continue
            except RestError as exc:
                if exc.refused and not self._agg_only:
                    log.info("historicalTrades refused (%s); backfilling from aggTrades", exc)
                    self._agg_only = True
                    continue
                raise
            progressed = False
            for tick in batch:
                tid = tick.trade_id
                if tid is None or tid <= sym.last_id:
                    continue  # already delivered
                first_id = tid if by_aggregate else tid - tick.count + 1
                if first_id > last:
                    break  # live trades take it from here
                if tid > last:  # an aggregate straddling the gap's end: cannot be split
                    continue
                if first_id <= sym.last_id:
                    # An aggregate partly delivered live: its other trades cannot be told
                    # apart (one qty for all), so they count as missed, never twice.
                    self._missed(symbol, tid - sym.last_id)
                    sym.last_id, sym.last_time = tid, tick.time
                    progressed = True
                    continue
                self._missed(symbol, first_id - sym.last_id - 1)  # ids REST no longer serves
                self._emit(sym, tick)
                self.backfilled[symbol] = self.backfilled.get(symbol, 0) + tick.count
                progressed = True
            if not progressed:
                return  # REST has nothing more for this gap (no longer served)

    async def _fetch_bars(self, symbol: str, sym: _Symbol, last: int) -> None:
        """A gap too large for trades: the whole minutes it spans come from 1m klines.

        The minute of the last delivered trade gets what its kline adds to what was
        delivered of it; every later minute before the first held trade's minute gets its
        kline whole. The held trade's own minute cannot be: its kline, fetched now, already
        counts trades that are still to be delivered live. The trades no kline covers are
        counted as missed."""
        rest = self.rest
        assert rest is not None and sym.last_id is not None and sym.last_time is not None
        first_minute = sym.last_time - sym.last_time % MINUTE
        held_minute = sym.held[0].time - sym.held[0].time % MINUTE if sym.held else first_minute
        # A held trade from the future (dropped when its turn comes) fetches no kline past now.
        latest = int(clock.now() * 1000) + self.stats.max_skew_ms
        held_minute = min(held_minute, latest - latest % MINUTE)
        missing = last - sym.last_id
        covered = 0
        bars: list[Bar] = []
        start = first_minute
        while start < held_minute and len(bars) < MAX_BAR_MINUTES:
            try:
                page = await rest.klines(
                    symbol, "1m", limit=1000, start_ms=start, end_ms=held_minute - 1
                )
            except RestLimited as exc:
                await asyncio.sleep(exc.retry_after)  # bounded by the fill's timeout
                continue
            page = [k for k in page if start <= k.open_time < held_minute]
            if not page:
                break
            for k in page:
                volume, trades, open_ = k.volume, k.trades, k.open
                if k.open_time == sym.minute:  # partly delivered already
                    volume = max(0.0, volume - sym.minute_volume)
                    trades = max(0, trades - sym.minute_trades)
                if trades:
                    bars.append(
                        Bar(
                            symbol,
                            k.open_time,
                            k.close_time,
                            open_,
                            k.high,
                            k.low,
                            k.close,
                            volume,
                            trades,
                        )
                    )
                    covered += trades
            start = page[-1].open_time + MINUTE
        for bar in bars:
            try:
                assert self._deliver_bar is not None  # a gap is filled from klines only with one
                self._deliver_bar(bar)
            except Exception as exc:  # a downstream bug must not stop market data
                self.stats.callback_error(self.stats.kind, exc)
        self.kline_filled[symbol] = self.kline_filled.get(symbol, 0) + covered
        self._missed(symbol, max(0, missing - covered))
        log.info(
            "%s: a gap of %d trades filled from %d one-minute klines (%d trades), %d missed",
            symbol,
            missing,
            len(bars),
            covered,
            max(0, missing - covered),
        )
        sym.last_id = last
        sym.last_time = max(sym.last_time, held_minute - 1)
        sym.minute = -1  # what was delivered of a minute is no longer known

    def _missed(self, symbol: str, count: int) -> None:
        if count > 0:
            self.stats.missed_trades[symbol] = self.stats.missed_trades.get(symbol, 0) + count

    def _release(self, symbol: str, sym: _Symbol) -> None:
        """Hand on held live trades until none is left or another gap starts."""
        held = sym.held
        while held and sym.task is None:
            self._accept(symbol, sym, held.popleft())  # a new gap puts it back in front

    # ---- reporting and lifetime

    def health(self) -> dict[str, Any]:
        return {
            "backfilled_trades": dict(self.backfilled),
            "kline_filled_trades": dict(self.kline_filled),
            "backfill_state": {s: sym.state for s, sym in self._symbols.items()},
        }

    async def stop(self) -> None:
        self._stopping = True
        for sym in self._symbols.values():
            self._cancel_timer(sym)
        tasks = [s.task for s in self._symbols.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
