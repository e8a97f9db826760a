"""Benchmark alert delivery: one trade crosses N alerts of one user; how soon are they out?

    python bench/deliveries.py [--alerts 1000] [--skip-baseline] [--skip-webhook]

``python -m pricewatch`` runs as a subprocess (PRICEWATCH_FEED=binance pointed at a fake
Binance served by this process; PRICEWATCH_NOTIFY_PER_HOUR high: one user holds every
alert, and the hourly budget would otherwise fold them into a digest). One user registers
(its address marked verified in the database file), creates ``--alerts`` alerts "above"
just over the current price, and the fake sends ONE trade that crosses them all. Cases:

* ``email``: alerts with channels ["email"]; an aiosmtpd server in this process (its own
  thread) timestamps every accepted message and counts the SMTP connections opened.
* ``email_baseline``: the same, with the server started with the SMTP pool's reuse off
  (``MESSAGES_PER_CONNECTION = 1``: a new connection per message, the old behaviour).
* ``webhook``: a webhook channel (``POST /api/v1/channels``, format json) pointing at an
  aiohttp receiver in this process that answers 204 and timestamps every POST.

Figures per case (seconds from the trade's send, monotonic clock of this process):
``triggered_first_s``/``triggered_last_s``: the owner's live socket got the first/last
``{"type": "alert"}`` event (the trigger committed); ``first_s``, ``p50_s``, ``last_s``:
acceptance of the first, median and last delivery; ``per_s``: deliveries / ``last_s``;
``after_trigger_s``: from the last alert event to the last delivery (the delivery share);
``connections``: SMTP sessions (or TCP connections) the receiver saw; ``distinct``:
distinct Message-IDs / X-Pricewatch-Event values (must equal ``--alerts``). Goal: last
delivery < 1 s after the trade. Prints one JSON line; loopback only; bounded (every wait
has a timeout; the whole run takes well under 2 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from aiohttp import web  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import SMTP  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    FakeUpstream,
    ServerProcess,
    emit_run,
    free_port,
    loadavg,
    log,
    setup_logging,
    trade_frame,
)

SYMBOL = "BTCUSDT"
START_PRICE = 100.0
CROSS_PRICE = 1000.0  # above every target
# Reuse off: each message on a connection of its own (connect, EHLO, send, QUIT).
NO_REUSE = (
    "import sys, pricewatch.delivery.email as e; e.MESSAGES_PER_CONNECTION = 1; "
    "from pricewatch.__main__ import main; sys.exit(main())"
)


class Arrivals:
    """Acceptance times (time.monotonic) of deliveries, from any thread; `done` is set (in
    the bench's loop) once `expected` arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expected: int):
        self.loop, self.expected = loop, expected
        self.times: list[float] = []
        self.keys: set[str] = set()
        self.connections = 0
        self.done = asyncio.Event()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.times.append(now)
            self.keys.add(key)
            if len(self.times) == self.expected:
                self.loop.call_soon_threadsafe(self.done.set)

    def connected(self) -> None:
        with self._lock:
            self.connections += 1


class SmtpReceiver(Controller):
    """aiosmtpd on 127.0.0.1 (its own thread): every message accepted, counted per session."""

    def __init__(self, arrivals: Arrivals):
        self.arrivals = arrivals
        super().__init__(self, hostname="127.0.0.1", port=free_port())

    def factory(self) -> SMTP:
        arrivals = self.arrivals

        class Counted(SMTP):
            def connection_made(self, transport):
                arrivals.connected()
                super().connection_made(transport)

        return Counted(self.handler, **self.SMTP_kwargs)

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        lines = envelope.content.split(b"\r\n")
        if b"Subject: pricewatch: your verification code" in lines:
            return "250 OK"  # registration's code mail: not an alert delivery
        message_id = next((line for line in lines if line.lower().startswith(b"message-id:")), b"")
        self.arrivals.add(message_id.decode(errors="replace"))
        return "250 OK"


class HookReceiver:
    """An aiohttp webhook endpoint answering 204, timestamping each POST."""

    def __init__(self, arrivals: Arrivals):
        self.arrivals = arrivals
        self.peers: set[tuple] = set()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        peer = request.transport.get_extra_info("peername")[:2]
        if peer not in self.peers:
            self.peers.add(peer)
            self.arrivals.connected()
        self.arrivals.add(request.headers.get("X-Pricewatch-Event", ""))
        return web.Response(status=204)

    async def start(self) -> HookReceiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class LiveAlerts:
    """The owner's live socket: price acknowledgements and alert-event times."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.last_price: float | None = None
        self.alert_times: list[float] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = orjson.loads(msg.data)
            if data.get("type") == "price" and data.get("symbol") == SYMBOL:
                self.last_price = float(data["price"])
            elif data.get("type") == "alert":
                self.alert_times.append(time.monotonic())
            self.changed.set()

    async def wait_price(self, price: float, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while self.last_price != price:
                self.changed.clear()
                await self.changed.wait()


def mark_verified(db: str, user_id: int) -> None:
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute("UPDATE users SET email_verified = 1 WHERE id = ?", (user_id,))
    conn.close()


async def create_alerts(
    http: aiohttp.ClientSession, base: str, headers: dict, n: int, channels: list
) -> None:
    slots = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        target = round(START_PRICE + 1 + i / 100, 2)
        async with (
            slots,
            http.post(
                base + "/api/v1/alerts",
                headers=headers,
                json={"asset": SYMBOL, "price": target, "direction": "above", "channels": channels},
            ) as resp,
        ):
            if resp.status != 201:
                raise RuntimeError(f"alert create: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(i) for i in range(n)))


def _at(times: list[float], t0: float, p: float) -> float | None:
    if not times:
        return None
    k = min(len(times) - 1, round(p / 100 * (len(times) - 1)))
    return round(times[k] - t0, 3)


async def run_case(case: str, n: int, timeout: float) -> dict:
    loop = asyncio.get_running_loop()
    arrivals = Arrivals(loop, n)
    smtp: SmtpReceiver | None = None
    hook: HookReceiver | None = None
    fake = await FakeUpstream().start()
    env = {
        "PRICEWATCH_FEED": "binance",
        "PRICEWATCH_BINANCE_WS_URL": fake.url,
        "PRICEWATCH_SYMBOLS": SYMBOL,
        "PRICEWATCH_BCRYPT_ROUNDS": "4",
        "PRICEWATCH_NOTIFY_PER_HOUR": str(10 * n + 1000),
        "PRICEWATCH_ALERT_CREATE_RATE": str(100 * n + 1000),
        "PRICEWATCH_MAX_ALERTS_PER_USER": str(n + 100),
        "PRICEWATCH_ALLOW_PRIVATE_WEBHOOKS": "true",
    }
    if case.startswith("email"):
        smtp = SmtpReceiver(arrivals)
        await asyncio.to_thread(smtp.start)
        env.update({"PRICEWATCH_SMTP_HOST": "127.0.0.1", "PRICEWATCH_SMTP_PORT": str(smtp.port)})
    else:
        hook = await HookReceiver(arrivals).start()
    server = ServerProcess(env, command=["-c", NO_REUSE] if case == "email_baseline" else None)
    live = None
    try:
        await asyncio.to_thread(server.start)
        await fake.wait_client(timeout=20.0)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                server.url + "/auth/register",
                json={
                    "username": "bench",
                    "password": "bench-password",
                    "email": "bench@example.com",
                },
            ) as resp:
                user = await resp.json()
                if resp.status != 201:
                    raise RuntimeError(f"register: {resp.status} {user}")
            mark_verified(server.env["PRICEWATCH_DB"], user["id"])
            headers = {"Authorization": f"Bearer {user['access']}"}
            channels: list = ["email"]
            if hook is not None:
                async with http.post(
                    server.url + "/api/v1/channels",
                    headers=headers,
                    json={"type": "webhook", "url": hook.url, "format": "json"},
                ) as resp:
                    channel = await resp.json()
                    if resp.status != 201:
                        raise RuntimeError(f"channel: {resp.status} {channel}")
                channels = [channel["id"]]
            live = LiveAlerts(
                await http.ws_connect(server.ws_url + "/live-feed/subscribe/", headers=headers)
            )
            await live.ws.send_json({"action": "subscribe", "symbols": [SYMBOL]})
            fake.write(trade_frame(SYMBOL, 1, f"{START_PRICE:.2f}", "1", int(time.time() * 1000)))
            await live.wait_price(START_PRICE)
            created = time.monotonic()
            await create_alerts(http, server.url, headers, n, channels)
            create_s = time.monotonic() - created
            log.info("%s: %d alerts created in %.1fs; sending the trade", case, n, create_s)

            server_cpu, own_cpu = CpuMeter(server.pid), CpuMeter()
            server_cpu.start()
            own_cpu.start()
            sent = time.monotonic()
            fake.write(trade_frame(SYMBOL, 2, f"{CROSS_PRICE:.2f}", "1", int(time.time() * 1000)))
            try:
                await asyncio.wait_for(arrivals.done.wait(), timeout)
            except TimeoutError:
                log.error(
                    "%s: only %d of %d deliveries within %.0fs",
                    case,
                    len(arrivals.times),
                    n,
                    timeout,
                )
            cpu = {
                "server_cpu_pct": round(server_cpu.stop(), 1),
                "server_runqueue_wait_pct": server_cpu.wait_pct,
                "receiver_cpu_pct": round(own_cpu.stop(), 1),
            }
            async with asyncio.timeout(5):  # the events go out before the deliveries
                while len(live.alert_times) < n:
                    live.changed.clear()
                    await live.changed.wait()
            await live.ws.close()
    finally:
        if live is not None:
            live.task.cancel()
        await asyncio.to_thread(server.stop)
        await fake.close()
        if smtp is not None:
            await asyncio.to_thread(smtp.stop)
        if hook is not None:
            await hook.stop()

    times = sorted(arrivals.times)
    last = times[-1] - sent if len(times) == n else None
    return {
        "alerts": n,
        "delivered": len(times),
        "distinct": len(arrivals.keys),
        "create_alerts_s": round(create_s, 2),
        "triggered_first_s": _at(live.alert_times, sent, 0),
        "triggered_last_s": _at(live.alert_times, sent, 100),
        "first_s": _at(times, sent, 0),
        "p50_s": _at(times, sent, 50),
        "p90_s": _at(times, sent, 90),
        "last_s": round(last, 3) if last else None,
        "per_s": round(n / last) if last else None,
        # the delivery machinery's own share: from the trigger committed to the last
        "after_trigger_s": round(times[-1] - live.alert_times[-1], 3)
        if last and live.alert_times
        else None,
        "connections": arrivals.connections,
        **cpu,
        "goal_met": last is not None and last < 1.0,
    }


async def run(args) -> dict:
    cases = (
        ["email"]
        + ([] if args.skip_baseline else ["email_baseline"])
        + ([] if args.skip_webhook else ["webhook"])
    )
    out: dict = {"bench": "deliveries"}
    for case in cases:
        out[case] = await run_case(case, args.alerts, args.timeout)
        log.info("%s: %s", case, out[case])
    if "email_baseline" in out and out["email"]["last_s"] and out["email_baseline"]["last_s"]:
        out["email_speedup_vs_baseline"] = round(
            out["email_baseline"]["last_s"] / out["email"]["last_s"], 1
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=1000)
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for every delivery of a case"
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-webhook", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd: a line per command
    load_before = loadavg()
    began = time.monotonic()
    emit_run(asyncio.run(run(args)), load_before, began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
