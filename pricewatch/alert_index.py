"""In-memory matching engine for price alerts (the tick path's alert step).

An alert ``(id, symbol, target, direction)`` triggers on the first trade of ``symbol`` with
``price >= target`` (``"above"``) or ``price <= target`` (``"below"``). It triggers exactly
once: :meth:`AlertIndex.match` removes what it returns. Everything here is synchronous,
pure Python standard library, and knows nothing of users, SQLite or email; ``alerts.py``
keeps the index in step with the database (DB first, then memory).

Layout, per symbol (one ``_Book``):

* ``keys``: ``dict[id, key]`` where ``key = -target`` for "above" and ``+target`` for
  "below" (targets are > 0, so the sign is the direction). It answers remove/get/contains.
* two sorted sides, each a pair of parallel arrays ``array('d')`` keys and ``array('q')`` ids,
  ordered by ``(key, id)`` ascending. For "above" the key is ``-target``, so the alerts a
  trade at ``price`` crosses (``target <= price``, i.e. ``key >= -price``) are a suffix;
  for "below" (``target >= price``, i.e. ``key >= price``) likewise. Matching is therefore
  one ``bisect`` plus slicing the suffix off: O(log n + k), and the arrays never reallocate
  on the hot path.
* ``min_above`` / ``max_below``: plain floats read from the arrays' ends, so a trade that
  crosses nothing (nearly all of them) costs a dict lookup and two float comparisons.

Memory is roughly 110 bytes per alert (16 in the arrays, ~40 dict slot, 32 int id, 24 float),
about 110 MB for a million alerts, instead of a tuple-per-alert index.
"""

from __future__ import annotations

import math
import operator
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

__all__ = ["ABOVE", "BELOW", "DIRECTIONS", "AlertIndex"]

ABOVE = "above"
BELOW = "below"
DIRECTIONS = (ABOVE, BELOW)

_INF = math.inf
_ID_MIN = -(1 << 63)
_ID_MAX = (1 << 63) - 1


def _check_id(alert_id: object) -> int:
    """Return ``alert_id`` as an int that fits the ids array; raise ValueError if it can't."""
    try:  # any object: the TypeError is the check
        value = operator.index(alert_id)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"alert id must be an integer, not {alert_id!r}") from None
    if isinstance(alert_id, bool) or not _ID_MIN <= value <= _ID_MAX:
        raise ValueError(f"alert id out of range: {alert_id!r}")
    return value


def _encode(target: object, direction: object) -> float:
    """Return the signed key for a target/direction; raise ValueError if either is invalid."""
    try:  # any object: the TypeError/ValueError is the check
        value = float(target)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"target must be a number, not {target!r}") from None
    if not 0.0 < value < _INF:  # also rejects NaN
        raise ValueError(f"target must be a finite number > 0, not {target!r}")
    if direction == ABOVE:
        return -value
    if direction == BELOW:
        return value
    raise ValueError(f"direction must be 'above' or 'below', not {direction!r}")


def _decode(key: float) -> tuple[float, str]:
    return (-key, ABOVE) if key < 0 else (key, BELOW)


def _take_suffix(keys: array, ids: array, bound: float) -> array:
    """Cut every entry with ``key >= bound`` off the end of both arrays; return their ids."""
    cut = bisect_left(keys, bound)
    taken = ids[cut:]
    del keys[cut:]
    del ids[cut:]
    return taken


class _Book:
    """The live alerts of one symbol. See the module docstring for the layout."""

    __slots__ = (
        "keys",
        "above_keys",
        "above_ids",
        "below_keys",
        "below_ids",
        "min_above",
        "max_below",
    )

    def __init__(self) -> None:
        self.keys: dict[int, float] = {}
        self.above_keys = array("d")
        self.above_ids = array("q")
        self.below_keys = array("d")
        self.below_ids = array("q")
        self.min_above = _INF
        self.max_below = -_INF

    def _refresh(self) -> None:
        self.min_above = -self.above_keys[-1] if self.above_keys else _INF
        self.max_below = self.below_keys[-1] if self.below_keys else -_INF

    def _side(self, key: float) -> tuple[array, array]:
        if key < 0:
            return self.above_keys, self.above_ids
        return self.below_keys, self.below_ids

    def insert(self, alert_id: int, key: float) -> None:
        """Insert an id known to be absent from every book. O(log n) search + memmove."""
        keys, ids = self._side(key)
        lo = bisect_left(keys, key)
        pos = bisect_left(ids, alert_id, lo, bisect_right(keys, key, lo))
        keys.insert(pos, key)
        ids.insert(pos, alert_id)
        self.keys[alert_id] = key
        self._refresh()

    def delete(self, alert_id: int) -> bool:
        """Remove ``alert_id`` if present here; return whether it was."""
        key = self.keys.pop(alert_id, None)
        if key is None:
            return False
        keys, ids = self._side(key)
        lo = bisect_left(keys, key)
        pos = bisect_left(ids, alert_id, lo, bisect_right(keys, key, lo))
        if pos >= len(ids) or ids[pos] != alert_id:  # pragma: no cover - invariant broken
            raise AssertionError(f"alert {alert_id} in keys but not in its side array")
        del keys[pos]
        del ids[pos]
        self._refresh()
        return True

    def rebuild(self) -> None:
        """Rebuild both sides from ``keys`` with one sort (bulk load)."""
        keys = self.keys
        order = sorted(keys)  # ids ascending; linear when rows come in id order
        order.sort(key=keys.__getitem__)  # stable, so equal targets stay in id order
        # The same keys sorted on their own are exactly the keys in `order`'s order (equal
        # keys are equal floats), and sorting beats a random-access gather through the dict.
        values = array("d", sorted(keys.values()))
        cut = bisect_left(values, 0.0)  # negative keys (above) sort first
        self.above_keys = values[:cut]
        self.below_keys = values[cut:]
        ids = array("q", order)
        del order, values
        self.above_ids = ids[:cut]
        self.below_ids = ids[cut:]
        self._refresh()


def _stage(rows: Iterable[tuple[int, str, float, str]]) -> dict[str, dict[int, float]]:
    """Validated ``(id, symbol, target, direction)`` rows as ``symbol -> {id: key}`` (the
    last row of an id wins, under its symbol); raises ValueError on the first bad row."""
    staged: dict[str, dict[int, float]] = {}
    # Locals: this loop runs once per alert at startup.
    int_, float_, id_min, id_max, inf = int, float, _ID_MIN, _ID_MAX, _INF
    for alert_id, symbol, target, direction in rows:
        if type(alert_id) is not int_ or not id_min <= alert_id <= id_max:
            alert_id = _check_id(alert_id)
        if type(target) is not float_:
            target = _encode(target, BELOW)
        if not 0.0 < target < inf:
            target = _encode(target, direction)  # raises with the right message
        if direction == ABOVE:
            key = -target
        elif direction == BELOW:
            key = target
        else:
            raise ValueError(f"direction must be 'above' or 'below', not {direction!r}")
        bucket = staged.get(symbol)
        if bucket is None:
            if not isinstance(symbol, str):
                raise ValueError(f"symbol must be a str, not {symbol!r}")
            bucket = staged[symbol] = {}
        if len(staged) > 1 and alert_id not in bucket:
            # The same id may have appeared under another symbol earlier in rows.
            for other in staged.values():
                if other is not bucket and other.pop(alert_id, None) is not None:
                    break
        bucket[alert_id] = key
    return staged


class AlertIndex:
    """Live (not yet triggered) alerts, matched against trades in O(log n + k).

    Not thread-safe; meant to be owned by the single asyncio loop and called from the
    synchronous tick path. ``add``/``remove`` cost an O(log n) search plus an array
    insert/delete (a C memmove, ~0.1 ms per million alerts of the symbol); for many alerts
    at once use :meth:`load`.
    """

    __slots__ = ("_books",)

    def __init__(self) -> None:
        self._books: dict[str, _Book] = {}

    # -- hot path -------------------------------------------------------------------------

    def match(self, symbol: str, price: float) -> list[int]:
        """Return the ids of the alerts this trade triggers and remove them from the index.

        Order: the "above" alerts first, then the "below" ones; within each, the target
        nearest to ``price`` first, equal targets by ascending id. A NaN price or an
        unknown symbol triggers nothing. Never raises for a numeric price.
        """
        return [hit[0] for hit in self.match_targets(symbol, price)]

    def match_targets(self, symbol: str, price: float) -> list[tuple[int, float, str]]:
        """Like :meth:`match`, as ``(id, target, direction)`` of each alert as indexed."""
        book = self._books.get(symbol)
        if book is None or book.min_above > price > book.max_below:
            return []
        ids: list[int] = []
        if price >= book.min_above:
            ids.extend(_take_suffix(book.above_keys, book.above_ids, -price).tolist())
        if price <= book.max_below:
            ids.extend(_take_suffix(book.below_keys, book.below_ids, price).tolist())
        keys = book.keys
        hits = []
        for alert_id in ids:
            key = keys.pop(alert_id)
            hits.append((alert_id, -key, ABOVE) if key < 0 else (alert_id, key, BELOW))
        book._refresh()
        return hits

    # -- maintenance ----------------------------------------------------------------------

    def add(self, alert_id: int, symbol: str, target: float, direction: str) -> None:
        """Add an alert, replacing any alert with the same id (update semantics).

        Raises ValueError for a direction other than "above"/"below", a target that is not
        a finite number > 0, an id that is not a 64-bit integer, or a non-str symbol. The
        index is unchanged when it raises.
        """
        alert_id = _check_id(alert_id)
        key = _encode(target, direction)
        if not isinstance(symbol, str):
            raise ValueError(f"symbol must be a str, not {symbol!r}")
        self.remove(alert_id)
        book = self._books.get(symbol)
        if book is None:
            book = self._books[symbol] = _Book()
        book.insert(alert_id, key)

    def remove(self, alert_id: int) -> bool:
        """Remove an alert (deleted or about to be re-added); return whether it was live."""
        return any(book.delete(alert_id) for book in self._books.values())

    def load(self, rows: Iterable[tuple[int, str, float, str]]) -> None:
        """Add many ``(id, symbol, target, direction)`` rows, sorting each symbol once.

        Same semantics as calling :meth:`add` per row (a later row or an existing alert with
        the same id is replaced), in O(n log n) overall. ``rows`` is consumed once and may be
        a cursor or generator. All-or-nothing: on ValueError the index is unchanged.
        """
        self._merge(_stage(rows))

    def _merge(self, staged: dict[str, dict[int, float]]) -> None:
        """Put validated ``symbol -> {id: key}`` buckets in (see `load`); never raises."""
        books = self._books
        dirty: set[str] = set()
        for symbol, bucket in staged.items():
            for other_symbol, other_book in books.items():
                if other_symbol == symbol or not other_book.keys:
                    continue
                moved = other_book.keys.keys() & bucket.keys()
                if moved:
                    for alert_id in moved:
                        del other_book.keys[alert_id]
                    dirty.add(other_symbol)
            book = books.get(symbol)
            if book is None:
                book = books[symbol] = _Book()
            if book.keys:
                book.keys.update(bucket)
            else:
                book.keys = bucket
            dirty.add(symbol)
        for symbol in dirty:
            books[symbol].rebuild()

    def clear(self) -> None:
        """Forget every alert."""
        self._books.clear()

    # -- inspection -----------------------------------------------------------------------

    def get(self, alert_id: int) -> tuple[str, float, str] | None:
        """Return ``(symbol, target, direction)`` of a live alert, or None."""
        for symbol, book in self._books.items():
            key = book.keys.get(alert_id)
            if key is not None:
                target, direction = _decode(key)
                return symbol, target, direction
        return None

    def count(self, symbol: str | None = None) -> int:
        """Number of live alerts, of one symbol or (None) of all."""
        if symbol is None:
            return len(self)
        book = self._books.get(symbol)
        return 0 if book is None else len(book.keys)

    def __len__(self) -> int:
        return sum(len(book.keys) for book in self._books.values())

    def __contains__(self, alert_id: object) -> bool:
        return any(alert_id in book.keys for book in self._books.values())

    def __repr__(self) -> str:
        return f"<AlertIndex alerts={len(self)} symbols={len(self._books)}>"


class CreationLog:
    """When alerts were created, to answer "which alerts existed at trade time t?".

    An alert created at time T never triggers on a trade older than T: a backfilled trade
    from before its creation is history, not news. Alert ids grow with creation (SQLite
    AUTOINCREMENT, assigned under the write lock), so the alerts that existed at time t are
    exactly those with id <= `last_id_at(t)`. Kept as two parallel arrays (16 bytes per
    creation); times are made non-decreasing (a wall clock stepping back cannot unsort them).
    Entries older than a horizon can be folded into `floor_id` by `prune`.
    """

    def __init__(self) -> None:
        self.times = array("d")
        self.ids = array("q")
        self.floor_id = 0  # every alert with an id up to this one existed before any entry

    @property
    def newest(self) -> float:
        """The newest creation time logged (-inf when none)."""
        return self.times[-1] if self.times else -_INF

    def add(self, alert_id: int, created_ms: float) -> None:
        if self.ids and alert_id <= self.ids[-1]:
            return  # known already (an update), or older than what is logged
        if alert_id <= self.floor_id:
            return
        self.times.append(max(created_ms, self.newest))
        self.ids.append(alert_id)

    def last_id_at(self, t_ms: float) -> int:
        """The highest id of the alerts created at or before `t_ms`."""
        i = bisect_right(self.times, t_ms)
        return self.ids[i - 1] if i else self.floor_id

    def prune(self, before_ms: float) -> None:
        """Forget entries created before `before_ms` (trades older than that are judged as
        if those alerts had always existed)."""
        i = bisect_left(self.times, before_ms)
        if i:
            self.floor_id = self.ids[i - 1]
            del self.times[:i]
            del self.ids[:i]

    def __len__(self) -> int:
        return len(self.ids)
