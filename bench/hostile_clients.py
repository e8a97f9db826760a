"""The hostile clients of ``abuse.py``: raw websocket sockets on a loopback server.

* ``Flooder``: empty masked pings, unsolicited pongs, or (after a text frame with FIN=0)
  empty non-final continuation frames, written as fast as the socket takes them.
* ``ResumeStorm``: one user's live sockets asking to resume from event 0 over and over.
* ``SlowReaders``: the first round's attack, never-reading sockets asking for 1000-candle
  snapshots.

Each reconnects when the server ends its connection (at a bounded rate) and counts how it
ended: the close code, or "reset" when there was no close frame. ``client_attacks`` runs a
phase's attacks in a child process (``abuse.py`` runs it in a process pool) and returns
their figures.
"""

from __future__ import annotations

import asyncio

from bench._common import (
    CpuMeter,
    FrameCounter,
    Refused,
    client_frame,
    raise_nofile,
    raw_ws_connect,
    raw_ws_socket,
)

FLOODS = ("ping_flood", "pong_flood", "cont_flood")
FLOOD_BYTES = {  # (sent once after the upgrade, then written again and again)
    "ping_flood": (b"", client_frame(b"", 0x9) * 4096),
    "pong_flood": (b"", client_frame(b"", 0xA) * 4096),
    "cont_flood": (client_frame(b"", 0x1, fin=False), client_frame(b"", 0x0, fin=False) * 4096),
}
RESUME = client_frame(b'{"action":"resume","since":0}')


def snapshot_request(symbol: str) -> bytes:
    return client_frame(b'{"symbol":"%s","timeframe":"1s","limit":1000}' % symbol.encode())


class RawClients:
    """`n` raw websocket clients on `path`, each reconnecting (at most `per_s` a second)
    until the end; `_write` is what one sends. Closes are counted by code ("reset": the
    connection ended without a close frame)."""

    path = "/ws/ohlc/"

    def __init__(
        self, port: int, n: int, per_s: float = 5.0, headers: dict[str, str] | None = None
    ):
        self.port, self.n, self.per_s, self.headers = port, n, per_s, headers
        self.connections = 0
        self.refused: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        self.types: dict[str, int] = {}
        self.sent_bytes = self.received_bytes = self.pongs = 0

    async def run(self, duration: float) -> dict:
        stop_at = asyncio.get_running_loop().time() + duration
        await asyncio.gather(*(self._one(stop_at) for _ in range(self.n)))
        return self.figures()

    def figures(self) -> dict:
        return {
            "connections": self.connections,
            "closes": self.closes,
            "refused": self.refused,
            "sent_mb": round(self.sent_bytes / 2**20, 1),
            "received_mb": round(self.received_bytes / 2**20, 1),
        }

    async def _write(self, sock, counter: FrameCounter, stop_at: float) -> bool:
        """Send until `stop_at`; True when the client hung up by itself (not a close)."""
        raise NotImplementedError

    async def _one(self, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        last = -1e9
        while loop.time() < stop_at:
            await asyncio.sleep(max(0.0, last + 1 / self.per_s - loop.time()))
            last = loop.time()
            try:
                sock, first = await asyncio.wait_for(
                    raw_ws_connect(self.port, self.path, headers=self.headers), 5
                )
            except Refused as exc:
                self.refused[str(exc.args[0])] = self.refused.get(str(exc.args[0]), 0) + 1
                continue
            except (OSError, TimeoutError):
                self.refused["error"] = self.refused.get("error", 0) + 1
                continue
            self.connections += 1
            counter = FrameCounter()
            counter.feed(first)
            try:
                await self._session(sock, counter, stop_at)
            finally:
                sock.close()
                self.received_bytes += counter.bytes
                self.pongs += counter.pongs
                for kind, count in counter.types.items():
                    self.types[kind] = self.types.get(kind, 0) + count

    async def _session(self, sock, counter: FrameCounter, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._read(sock, counter))
        writer = asyncio.create_task(self._write(sock, counter, stop_at))
        done, _ = await asyncio.wait(
            {reader, writer},
            return_when=asyncio.FIRST_COMPLETED,
            timeout=max(0.0, stop_at - loop.time()) + 1,
        )
        if writer in done and not writer.exception() and writer.result():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            return  # hung up by the client itself
        if done and not reader.done():  # a send failed: the close frame may still be there
            await asyncio.wait({reader}, timeout=0.5)
        for task in (reader, writer):
            task.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
        if counter.close_code is not None:
            key = str(counter.close_code)
        elif reader.done() and not reader.cancelled() or loop.time() < stop_at:
            key = "reset"
        else:
            return  # still open when the phase ended
        self.closes[key] = self.closes.get(key, 0) + 1

    async def _read(self, sock, counter: FrameCounter) -> None:
        loop = asyncio.get_running_loop()
        while counter.close_code is None:
            try:
                data = await loop.sock_recv(sock, 1 << 16)
            except OSError:
                return
            if not data:
                return
            counter.feed(data)


class Flooder(RawClients):
    """Control frames (or empty continuation frames) as fast as the socket takes them."""

    def __init__(self, port: int, kind: str, n: int):
        super().__init__(port, n)
        self.opening, self.chunk = FLOOD_BYTES[kind]

    async def _write(self, sock, counter: FrameCounter, stop_at: float) -> bool:
        loop = asyncio.get_running_loop()
        if self.opening:
            await loop.sock_sendall(sock, self.opening)
        while loop.time() < stop_at:
            await loop.sock_sendall(sock, self.chunk)
            self.sent_bytes += len(self.chunk)
        return False

    def figures(self) -> dict:
        return {
            **super().figures(),
            "frames_written": self.sent_bytes // 6,
            "pongs_received": self.pongs,
        }


class ResumeStorm(RawClients):
    """One user's live sockets, each asking to resume from event 0 `rate` times a second.

    `reconnect`: each socket asks once, waits for the answer to end (``resumed`` or
    ``error``, at most 5 s), hangs up and comes back on a new connection (at most twice a
    second): a limit per connection does not hold it back."""

    path = "/live-feed/subscribe/"

    def __init__(self, port: int, token: str, n: int, rate: float = 10.0, reconnect: bool = False):
        super().__init__(port, n, per_s=2.0, headers={"Authorization": f"Bearer {token}"})
        self.rate, self.reconnect = rate, reconnect
        self.sent = 0

    async def _write(self, sock, counter: FrameCounter, stop_at: float) -> bool:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while loop.time() < stop_at:
            await loop.sock_sendall(sock, RESUME)
            self.sent += 1
            if self.reconnect:
                deadline = min(stop_at, loop.time() + 5.0)
                while (
                    loop.time() < deadline
                    and not counter.types.get("resumed")
                    and not counter.types.get("error")
                ):
                    await asyncio.sleep(0.02)
                return True
            next_at += 1 / self.rate
            await asyncio.sleep(max(0.0, min(next_at, stop_at) - loop.time()))
        return False

    def figures(self) -> dict:
        return {
            **super().figures(),
            "resumes_sent": self.sent,
            "answers": {k: v for k, v in self.types.items() if k != "price"},
        }


class SlowReaders:
    """The first round's attack: never-reading sockets asking for 1000-candle snapshots."""

    def __init__(self, port: int, n: int, rate: float, symbol: str):
        self.port, self.n, self.rate = port, n, rate
        self.request = snapshot_request(symbol)
        self.sent = self.ended = 0
        self.refused: dict[str, int] = {}

    async def run(self, duration: float) -> dict:
        stop_at = asyncio.get_running_loop().time() + duration
        await asyncio.gather(*(self._one(stop_at) for _ in range(self.n)))
        return {
            "attackers": self.n,
            "requests_sent": self.sent,
            "ended_by_server": self.ended,
            "refused": self.refused,
        }

    async def _one(self, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < stop_at:
            try:
                sock = await raw_ws_socket(self.port, "/ws/ohlc/")
            except (Refused, OSError) as exc:
                key = str(exc.args[0]) if isinstance(exc, Refused) else "error"
                self.refused[key] = self.refused.get(key, 0) + 1
                await asyncio.sleep(0.1)
                continue
            try:
                next_at = loop.time()
                while loop.time() < stop_at:
                    await asyncio.wait_for(loop.sock_sendall(sock, self.request), 5)
                    self.sent += 1
                    next_at += 1.0 / self.rate
                    await asyncio.sleep(max(0.0, next_at - loop.time()))
            except (OSError, TimeoutError):
                self.ended += 1
            finally:
                sock.close()


def client_attacks(
    port: int, kinds: list[str], duration: float, token: str | None, opts: dict
) -> dict:
    """The client-side attacks of a phase, run in a child process; their figures."""
    return asyncio.run(_client_attacks(port, kinds, duration, token, opts))


async def _client_attacks(
    port: int, kinds: list[str], duration: float, token: str | None, opts: dict
) -> dict:
    raise_nofile()
    meter = CpuMeter()
    meter.start()
    runs = []
    for kind in kinds:
        if kind in FLOODS:
            runs.append(Flooder(port, kind, opts["flooders"]).run(duration))
        elif kind.startswith("resume_"):
            assert token is not None
            runs.append(
                ResumeStorm(
                    port, token, opts["resume_sockets"], reconnect=kind == "resume_reconnect"
                ).run(duration)
            )
        else:
            runs.append(
                SlowReaders(port, opts["attackers"], opts["rate"], opts["symbol"]).run(duration)
            )
    out = dict(zip(kinds, await asyncio.gather(*runs), strict=True))
    out["attacker_cpu_pct"] = round(meter.stop(), 1)
    return out
