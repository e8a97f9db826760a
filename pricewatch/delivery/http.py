"""What the HTTP sinks (webhook, Telegram) share about the other side's answers: how much of
the body is read (upstream_read.read_head), the wait it asks for, and the error text of a
failed request, with the secrets of the URL (a Discord webhook's token, the Telegram bot
token) taken out."""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from .base import Failed, Outcome, Retry

# Bytes of an answer read at most (upstream_read.read_head; the rest is never read): its
# status says whether the message was taken, so a larger body is no error.
RESPONSE_HEAD = 16 * 1024
MAX_WAIT = 3600.0  # a Retry-After beyond this is taken as this (retries are capped at 1 h)


def seconds(value: Any) -> float | None:
    """A wait in seconds from a number or a numeric string, within [0, MAX_WAIT]; None when
    it is not one."""
    try:
        wait = float(value)
    except (TypeError, ValueError):
        return None
    return min(max(wait, 0.0), MAX_WAIT) if math.isfinite(wait) else None


def json_head(head: bytes) -> dict:
    try:
        data = orjson.loads(head)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def retry_after(resp: aiohttp.ClientResponse, head: bytes) -> float | None:
    """The wait the answer asks for: its Retry-After header (seconds or an HTTP date), else
    a JSON `retry_after` (Discord); None when it names none."""
    header = resp.headers.get("Retry-After")
    if header is not None:
        wait = seconds(header)
        if wait is not None:
            return wait
        try:
            return seconds(parsedate_to_datetime(header).timestamp() - time.time())
        except (TypeError, ValueError):
            pass
    return seconds(json_head(head).get("retry_after"))


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def describe(exc: BaseException, secrets: tuple[str, ...] = ()) -> Outcome:
    """A request that got no answer: timeouts and connection errors are worth a retry
    (a DNS failure too: it is often temporary), a URL aiohttp cannot use and anything
    else unexpected is permanent. The error text never holds one of `secrets`."""
    error = redact(f"{type(exc).__name__}: {exc}", secrets)[:500]
    if isinstance(exc, aiohttp.InvalidURL):
        return Failed(error)
    if isinstance(exc, (TimeoutError, aiohttp.ClientError, OSError)):
        return Retry(error)
    return Failed(error)
