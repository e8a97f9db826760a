"""Reading an upstream's answer (Binance REST, AlphaVantage, Telegram, webhooks) without
letting it cost more than a bound: in bytes, and in event-loop time to parse it.

Bytes: the body is read in chunks with a running total and abandoned past the limit
(`PRICEWATCH_UPSTREAM_MAX_BYTES`); Content-Length only lets it be refused early, a chunked
answer has none. An abandoned body is never drained: leaving the response unread makes
aiohttp close that connection instead of reusing it.

Time: a small body (PARSE_INLINE) is parsed by orjson at once, in a millisecond or two. A
larger one is parsed in slices that give the event loop back every SLICE seconds. Not in a
thread: orjson (like the stdlib's C scanner) holds the GIL for a whole parse, so a thread
blocks the loop just as long (measured: 10 MB of klines, 110 ms in the loop, 138 ms of loop
lag from a thread). The sliced parser walks arrays and objects itself and lets the C
scanner read each scalar; a single scalar is at most the byte limit (an 8 MiB string:
~20 ms). Its total work is bounded by MAX_VALUES, counted before parsing.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any, cast

import aiohttp
import orjson

PARSE_INLINE = 256 * 1024  # bytes parsed in one go; larger bodies are parsed in slices
SLICE = 0.005  # seconds of parsing between two yields to the event loop
MAX_VALUES = 250_000  # values in one answer at most (a full Binance page: ~13,000)
MAX_DEPTH = 1024  # containers open at once at most (orjson's own bound for small bodies)
CHUNK = 64 * 1024


class AnswerTooLarge(Exception):
    """The answer is larger than the limit: nothing of it is used."""

    def __init__(self, limit: int, length: int | None = None):
        said = f" (Content-Length {length})" if length is not None else ""
        super().__init__(
            f"answer larger than {limit} bytes{said}; PRICEWATCH_UPSTREAM_MAX_BYTES bounds it"
        )
        self.limit = limit


class BadAnswer(ValueError):
    """The answer is not JSON, or holds more than MAX_VALUES values."""


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, at most `limit` bytes; raises AnswerTooLarge past it (having read
    `limit` + one chunk at most)."""
    length = resp.content_length
    if length is not None and length > limit:
        raise AnswerTooLarge(limit, length)
    parts: list[bytes] = []
    total = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > limit:
            raise AnswerTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


async def read_head(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body, the rest never read (all of a small one: the
    connection can then be reused). For answers whose status says it all (webhooks)."""
    head = b""
    while len(head) < limit:
        part = await resp.content.read(limit - len(head))
        if not part:
            break
        head += part
    return head


async def read_json(resp: aiohttp.ClientResponse, limit: int) -> Any:
    """read_body, then parse_json."""
    return await parse_json(await read_body(resp, limit))


async def parse_json(body: bytes) -> Any:
    """The decoded JSON `body` without holding the event loop more than a few milliseconds
    at a time (see the module docstring). Raises BadAnswer."""
    if len(body) <= PARSE_INLINE:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadAnswer(f"not JSON: {exc}") from None
    # Every value after the first in a container follows a comma, and every container opens
    # with a bracket (those in strings only make the count higher): a cheap upper bound on
    # the work, and on the containers held open at once (`[[[[...`), before doing any of it.
    if body.count(b",") + body.count(b"[") + body.count(b"{") + 1 > MAX_VALUES:
        raise BadAnswer(f"more than {MAX_VALUES} values")
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise BadAnswer(f"not UTF-8: {exc}") from None
    await asyncio.sleep(0)
    try:
        return await _parse_sliced(text)
    except (ValueError, StopIteration, RecursionError) as exc:
        raise BadAnswer(f"not JSON: {exc}") from None


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# `_ws(text, i).end()`: the index past the whitespace at `i` (the pattern matches the empty
# string, so there is always a match).
_ws = cast(Callable[[str, int], re.Match[str]], re.compile(r"[ \t\n\r]*").match)
# One scalar at an index; the stubs omit both attributes (set in JSONDecoder.__init__ and
# json.decoder at import).
_scan = json.JSONDecoder(parse_constant=_refuse).scan_once  # type: ignore[attr-defined]
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


def _key(text: str, i: int) -> tuple[str, int]:
    """An object key and its colon at `i`: (key, index of its value)."""
    if text[i : i + 1] != '"':
        raise ValueError(f"expected a key at {i}")
    key, i = _scanstring(text, i + 1)
    i = _ws(text, i).end()
    if text[i : i + 1] != ":":
        raise ValueError(f"expected ':' at {i}")
    return key, _ws(text, i + 1).end()


async def _parse_sliced(text: str) -> Any:  # noqa: C901 (one state machine, kept whole)
    """JSON `text` parsed as json.loads would (NaN and Infinity refused), yielding to the
    loop every SLICE seconds. Containers are walked here, without recursion: `stack` holds
    the open ones as [container, key of the value being read (objects)]."""
    ws = _ws
    stack: list[list[Any]] = []
    i = ws(text, 0).end()
    steps = 0
    until = time.perf_counter() + SLICE
    while True:
        c = text[i : i + 1]
        if c == "[":
            i = ws(text, i + 1).end()
            if text[i : i + 1] != "]":
                stack.append([[], None])
                if len(stack) > MAX_DEPTH:
                    raise ValueError(f"nested deeper than {MAX_DEPTH}")
                continue
            value: Any = []
            i += 1
        elif c == "{":
            i = ws(text, i + 1).end()
            if text[i : i + 1] != "}":
                key, i = _key(text, i)
                stack.append([{}, key])
                if len(stack) > MAX_DEPTH:
                    raise ValueError(f"nested deeper than {MAX_DEPTH}")
                continue
            value = {}
            i += 1
        else:
            try:
                value, i = _scan(text, i)
            except StopIteration:
                raise ValueError(f"expected a value at {i}") from None
        while True:  # a value is complete: put it in its container, close finished ones
            i = ws(text, i).end()
            if not stack:
                if i != len(text):
                    raise ValueError(f"extra data at {i}")
                return value
            top = stack[-1]
            container = top[0]
            if type(container) is list:
                container.append(value)
            else:
                container[top[1]] = value
            c = text[i : i + 1]
            if c == ",":
                i = ws(text, i + 1).end()
                if type(container) is dict:
                    top[1], i = _key(text, i)
                break
            if c != ("]" if type(container) is list else "}"):
                raise ValueError(f"expected ',' or a closing bracket at {i}")
            i += 1
            value = stack.pop()[0]
        steps += 1
        if steps & 255 == 0 and time.perf_counter() > until:
            await asyncio.sleep(0)
            until = time.perf_counter() + SLICE
