"""Supervised feeds: the runner every feed task lives in, and the admins' extra feeds.

`FeedRunner` runs one feed (or the quote poller) as a task, shows it in /healthz and stops
it cleanly. `ExtraFeeds` holds the upstream websocket feeds that admins add at run time
(`/api/v1/feeds`, seed-style `POST /save_quotes/`): stored in SQLite and restarted after a
restart, feeding the same tick pipeline as the main feed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import Any

from aiohttp import web

from .addresses import check_public_url
from .api import ApiError, invalid, json_response, not_found, read_json
from .auth import AUTH, require_identity
from .feeds import Feed, FeedConfigError, FeedRefused, redact_url
from .store import NotFound, Store
from .upstream.binance import BinanceFeed

log = logging.getLogger(__name__)

HEALTH = web.AppKey("health", dict)  # name -> callable returning that part's health dict
MAX_EXTRA_FEEDS = 16
MAX_URL = 2048


class FeedRunner:
    """Run `feed` as a task shown in /healthz; `stop()` cancels it and waits for it.

    A live market feed that delivered nothing for `stale_after` seconds is reported stale,
    and /healthz answers 503.
    """

    def __init__(self, app: web.Application, feed: Any, stale_after: float | None = None):
        self.app, self.feed = app, feed
        self.task: asyncio.Task | None = None
        self.stale_after = stale_after
        self.started = time.monotonic()

    def health(self) -> dict:
        health = self.feed.health()
        if self.stale_after is not None and health.get("state") not in ("finished", "stopped"):
            age = health.get("last_message_age")
            if age is None:
                age = time.monotonic() - self.started
            health["stale"] = age > self.stale_after
        return health

    def start(self) -> asyncio.Task:
        self.started = time.monotonic()
        self.app[HEALTH][self.feed.name] = self.health
        self.task = asyncio.create_task(self.feed.run(), name=f"feed-{self.feed.name}")
        log.info("feed %s started", self.feed.name)
        return self.task

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with suppress(asyncio.CancelledError):
                await self.task
        self.app[HEALTH].pop(self.feed.name, None)
        log.info("feed %s stopped", self.feed.name)

    async def __aenter__(self) -> asyncio.Task:
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class ExtraFeeds:
    """Admin-managed extra Binance-format feeds, by their stored id."""

    def __init__(
        self,
        app: web.Application,
        store: Store,
        make: Any,
        allow_private: bool,
        main: Feed | None = None,
    ):
        self.app = app
        self.store = store
        self._make = make  # (url, name) -> Feed feeding the tick pipeline
        self.allow_private = allow_private
        self.main = main  # the configured market feed: extra feeds may not duplicate it
        self.running: dict[int, tuple[str, FeedRunner]] = {}
        self._reserved = 0  # slots held by adds still between their checks and their start
        self._claims: list[Feed] = []  # feeds of adds between their checks and their start

    def duplicated(self, feed: Feed) -> str | None:
        """What `feed` would duplicate (`"main feed"`, `"extra-3"`: the same venue and a
        traded symbol in common), or None."""
        if feed.venue is None or feed.carries is None:
            return None  # a URL that does not say which trades it carries: not judged
        others = [("main feed", self.main)] if self.main is not None else []
        others += [(runner.feed.name, runner.feed) for _, runner in self.running.values()]
        others += [("a feed being added", claim) for claim in self._claims]
        for name, other in others:
            if other.venue == feed.venue and other.carries and other.carries & feed.carries:
                return name
        return None

    async def restore(self) -> None:
        """Start every stored feed (after a restart)."""
        for feed_id, url in await self.store.feeds():
            try:
                await check_url(url, self.allow_private)
                feed = self._make(url, f"extra-{feed_id}")
                if (twin := self.duplicated(feed)) is not None:
                    log.warning(
                        "stored feed %d (%s) not started: its trades would duplicate the %s's",
                        feed_id,
                        redact_url(url),
                        twin,
                    )
                    continue
                self._start(feed_id, url, feed)
            except (ApiError, FeedConfigError) as exc:
                log.warning(
                    "stored feed %d (%s) not started: %s",
                    feed_id,
                    redact_url(url),
                    getattr(exc, "fields", None) or exc,
                )

    def _start(self, feed_id: int, url: str, feed: Feed) -> None:
        runner = FeedRunner(self.app, feed, stale_after=None)
        runner.start()
        self.running[feed_id] = (url, runner)

    async def add(self, url: str, user_id: int) -> int:
        """Check, store and start a feed; its id. At most MAX_EXTRA_FEEDS even when adds run
        concurrently: a slot is reserved before the first await and released when the feed
        runs (then it counts in `running`) or the add fails."""
        if len(self.running) + self._reserved >= MAX_EXTRA_FEEDS:
            raise ApiError(409, "conflict", f"At most {MAX_EXTRA_FEEDS} extra feeds.")
        self._reserved += 1
        claim = None
        try:
            await check_url(url, self.allow_private)
            try:
                # Built once, before its id is known: named when stored, then started.
                claim = self._make(url, "extra-new")
            except FeedConfigError as exc:
                raise invalid({"url": str(exc)}) from None
            if (twin := self.duplicated(claim)) is not None:
                raise ApiError(
                    409,
                    "conflict",
                    f"This feed would duplicate the trades of the "
                    f"{twin} (same market, same symbols): one feed per market.",
                )
            self._claims.append(claim)  # held until started: a concurrent add sees it
            feed_id = await self.store.add_feed(url, user_id)  # Conflict (409): a duplicate
            claim.name = f"extra-{feed_id}"
            self._start(feed_id, url, claim)
        finally:
            self._reserved -= 1
            if claim is not None and claim in self._claims:
                self._claims.remove(claim)
        log.info("extra feed %d added: %s", feed_id, redact_url(url))
        return feed_id

    async def remove(self, feed_id: int) -> None:
        await self.store.remove_feed(feed_id)  # NotFound (404) when unknown
        entry = self.running.pop(feed_id, None)
        if entry is not None:
            await entry[1].stop()
        log.info("extra feed %d removed", feed_id)

    async def stop_all(self) -> None:
        for _, runner in self.running.values():
            await runner.stop()
        self.running.clear()

    def describe(self, feed_id: int) -> dict:
        url, runner = self.running[feed_id]
        return {"id": feed_id, "url": url, "name": runner.feed.name, "health": runner.health()}


EXTRA_FEEDS = web.AppKey("extra_feeds", ExtraFeeds)


async def check_url(url: str, allow_private: bool, field: str = "url") -> dict:
    """`addresses.check_public_url` for feed URLs: ws:// and wss:// only, public hosts unless
    PRICEWATCH_ALLOW_PRIVATE_FEEDS (returns the arguments pinning the connection)."""
    return await check_public_url(
        url,
        allow_private,
        schemes=("ws", "wss"),
        flag="PRICEWATCH_ALLOW_PRIVATE_FEEDS",
        field=field,
    )


async def require_admin(request: web.Request) -> int:
    """The caller's user id if they are an admin; 401 without a token, 403 otherwise."""
    identity = require_identity(request)
    user = await request.app[AUTH].store.user_by_id(identity.user_id)
    if user is None or not user.is_admin:
        raise ApiError(403, "forbidden", "Only admins may manage feeds.")
    return identity.user_id


def _url_from(data: dict, field: str) -> str:
    url = data.get(field)
    if url is None or url == "":
        raise invalid({field: "This field is required."})
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise invalid({field: f"A URL of at most {MAX_URL} characters is required."})
    return url.strip()


async def list_feeds(request: web.Request) -> web.Response:
    await require_admin(request)
    feeds = request.app[EXTRA_FEEDS]
    return json_response({"results": [feeds.describe(i) for i in sorted(feeds.running)]})


async def add_feed(request: web.Request) -> web.Response:
    user_id = await require_admin(request)
    field = "api_url" if request.path.rstrip("/") == "/save_quotes" else "url"
    url = _url_from(await read_json(request), field)
    feeds = request.app[EXTRA_FEEDS]
    try:
        feed_id = await feeds.add(url, user_id)
    except ApiError as exc:
        if exc.fields and "url" in exc.fields and field != "url":
            exc.fields = {field: exc.fields["url"]}
        raise
    return json_response(feeds.describe(feed_id), status=201)


async def delete_feed(request: web.Request) -> web.Response:
    await require_admin(request)
    feeds = request.app[EXTRA_FEEDS]
    raw = request.match_info.get("feed_id")
    if raw is None:  # DELETE /api/v1/feeds with {"id": N} or {"url": "..."}
        data = await read_json(request)
        if isinstance(data.get("id"), int) and not isinstance(data.get("id"), bool):
            feed_id = data["id"]
        elif isinstance(data.get("url"), str):
            matches = [i for i, (url, _) in feeds.running.items() if url == data["url"]]
            if not matches:
                raise not_found("Feed not found.")
            feed_id = matches[0]
        else:
            raise invalid({"id": "Give the feed's id or url."})
    else:
        try:
            feed_id = int(raw)
        except ValueError:
            raise not_found("Feed not found.") from None
    try:
        await feeds.remove(feed_id)
    except (NotFound, OverflowError):  # OverflowError: an id SQLite cannot hold
        raise not_found("Feed not found.") from None
    return web.Response(status=204)


def add_routes(app: web.Application, add_route) -> None:
    add_route(app, "GET", "/api/v1/feeds", list_feeds)
    add_route(app, "POST", "/api/v1/feeds", add_feed)
    add_route(app, "DELETE", "/api/v1/feeds", delete_feed)
    add_route(app, "DELETE", "/api/v1/feeds/{feed_id}", delete_feed)
    add_route(app, "POST", "/save_quotes", add_feed)


def binance_factory(
    symbols,
    on_tick,
    on_book,
    allow_private: bool,
    max_clock_skew: float = 10.0,
    max_id_jump: int = 10_000_000,
):
    """(url, name) -> a BinanceFeed for an extra upstream, feeding the given callbacks.

    Unless private addresses are allowed, the host is checked again before every
    connection attempt (its DNS answer may change after it was added) and redirects are
    refused (they could lead anywhere).
    """

    async def precheck(url: str) -> dict:
        try:
            return await check_url(url, allow_private)
        except ApiError as exc:
            raise FeedRefused(next(iter((exc.fields or {}).values()), exc.detail)) from None

    def make(url: str, name: str) -> BinanceFeed:
        return BinanceFeed(
            url,
            symbols,
            on_tick,
            on_book,
            name=name,
            precheck=None if allow_private else precheck,
            follow_redirects=allow_private,
            max_clock_skew=max_clock_skew,
            max_id_jump=max_id_jump,
        )

    return make
