"""Helpers shared by the server benchmarks (fanout, ingest, http).

* ``ServerProcess``: ``python -m pricewatch`` as a subprocess on a free loopback port, with a
  clean ``PRICEWATCH_*`` environment, a temp DB and its output in a log file; CPU and memory
  figures read from /proc/<pid>.
* ``FakeUpstream``: a minimal websocket server speaking Binance's combined-stream format over
  raw asyncio streams (no aiohttp per-frame cost), so that it is never the bottleneck. It
  answers pings and closes; everything else a client sends is ignored.
* ``trade_frame``: one pre-serialised server->client text frame holding one trade event.
* ``raw_ws_socket`` / ``client_frame``: a websocket client on a bare non-blocking socket that
  never reads after the handshake (the abusive client of ``abuse.py``); ``raw_ws_connect``
  and ``FrameCounter`` for one that reads what it is sent without parsing every message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmark this checkout, whatever copy is installed
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )


def loadavg() -> float:
    """1-minute load average: other work on the machine skews every figure."""
    return round(os.getloadavg()[0], 2)


def emit(figures: dict) -> None:
    """The one JSON line on stdout."""
    print(json.dumps(figures), flush=True)


def emit_run(figures: dict, load_before: float, began: float) -> None:
    """`figures` with the machine's cores, its load before the run and the run's duration
    (from `began`, a time.monotonic()), as the one JSON line on stdout."""
    figures["cores"] = os.cpu_count()
    figures["loadavg_1m_before"] = load_before
    figures["elapsed_s"] = round(time.monotonic() - began, 1)
    emit(figures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def status_mb(pid: int | str, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def runqueue_wait_seconds(pid: int | str = "self") -> float:
    """Time the process's main thread spent runnable but waiting for a CPU (schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


class CpuMeter:
    """CPU% of a process between start() and stop() (100 = one core busy).

    ``wait_pct`` after stop(): % of the wall time its main thread was runnable but not
    running (other processes had the cores): a high value means the figures are skewed
    by CPU contention, not by the process itself.
    """

    def __init__(self, pid: int | str = "self"):
        self.pid = pid
        self.cpu0 = self.wall0 = self.wait0 = 0.0
        self.wait_pct = float("nan")

    def start(self) -> None:
        self.cpu0, self.wall0 = cpu_seconds(self.pid), time.monotonic()
        self.wait0 = runqueue_wait_seconds(self.pid)

    def stop(self) -> float:
        cpu, wall = cpu_seconds(self.pid) - self.cpu0, time.monotonic() - self.wall0
        self.wait_pct = round(100.0 * (runqueue_wait_seconds(self.pid) - self.wait0) / wall, 1)
        return 100.0 * cpu / wall if wall > 0 else float("nan")


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


# --------------------------------------------------------------------------- server


class ServerProcess:
    """``python -m pricewatch`` on 127.0.0.1:<free port>; stop() sends SIGTERM (then kills).
    `command`: the interpreter's arguments instead of ``-m pricewatch`` (a patched start)."""

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        tmpdir: str | None = None,
        root: Path | str | None = None,
        command: list[str] | None = None,
    ):
        self.command = command or ["-m", "pricewatch"]
        self._tmp = None
        if tmpdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pricewatch-bench-")
            tmpdir = self._tmp.name
        self.tmpdir = Path(tmpdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
        # `root`: the checkout whose server runs (another worktree: the old design's figures)
        base["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(root or ROOT), base.get("PYTHONPATH")])
        )
        base.update(
            {
                "PRICEWATCH_HOST": "127.0.0.1",
                "PRICEWATCH_PORT": str(self.port),
                "PRICEWATCH_DB": str(self.tmpdir / "pricewatch.db"),
                "PRICEWATCH_JWT_SECRET": "bench-secret-" + "x" * 40,
                "PRICEWATCH_LOG_LEVEL": "WARNING",
                "PRICEWATCH_FEED": "off",
                # Loopback only: no candle history from Binance, and REST (a backfill) goes to a
                # closed local port.
                "PRICEWATCH_CANDLE_HISTORY": "false",
                "PRICEWATCH_BINANCE_REST_URL": "http://127.0.0.1:9",
            }
        )
        base.update(env or {})
        self.env = base
        self.log_path = self.tmpdir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> ServerProcess:
        # cwd = tmpdir: no stray ./.env of the developer's is read.
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, *self.command],
            env=self.env,
            cwd=self.tmpdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n" + self.log_tail()
                )
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1.0) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /healthz in time:\n" + self.log_tail())
            time.sleep(0.05)

    def healthz(self) -> dict:
        with urllib.request.urlopen(self.url + "/healthz", timeout=5.0) as resp:
            return json.loads(resp.read())

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server did not stop within %.0fs of SIGTERM; killing", timeout)
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        rc = self.proc.returncode if self.proc is not None else None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return rc

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- fake upstream


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked (server->client) FIN frame."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked (client->server) frame, FIN unless `fin` is False; the mask is fixed
    (this is a load tool)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", b0, 0x80 | 127, n)
    mask = b"\x5a\x17\xc3\x01"
    return header + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


class Refused(Exception):
    """The server answered a websocket upgrade with this HTTP status instead of 101."""


async def raw_ws_socket(
    port: int, path: str, rcvbuf: int | None = 4096, headers: dict[str, str] | None = None
) -> socket.socket:
    """A non-blocking socket with a completed websocket handshake to 127.0.0.1:`port`.

    Its receive buffer is `rcvbuf` bytes (set before connecting, so the TCP window stays
    small; None: the system's default); the caller sends frames with ``loop.sock_sendall``
    and never reads. `headers` go into the upgrade request. Raises ``Refused`` for a non-101
    answer, OSError when the connection fails.
    """
    sock, _ = await raw_ws_connect(port, path, rcvbuf, headers)
    return sock


async def raw_ws_connect(
    port: int, path: str, rcvbuf: int | None = None, headers: dict[str, str] | None = None
) -> tuple[socket.socket, bytes]:
    """``raw_ws_socket`` for a client that reads: also returns the bytes that came after
    the 101 answer in the same reads (the first frames), for a ``FrameCounter``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16))
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        await loop.sock_sendall(
            sock,
            b"GET " + path.encode() + b" HTTP/1.1\r\n"
            b"Host: 127.0.0.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n" + extra + b"\r\n",
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionResetError("closed during the handshake")
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            raise Refused(status)
        return sock, head.split(b"\r\n\r\n", 1)[1]
    except BaseException:
        sock.close()
        raise


class FrameCounter:
    """Reads server->client websocket frames from a stream of bytes without copying their
    payloads: counts frames by opcode, text messages by their ``"type"`` when they start
    with ``{"type":"...`` (orjson's key order), and keeps the close code. Runs of empty
    pongs (the answers to a ping flood, 2 bytes each) are skipped in one step."""

    EMPTY_PONG = b"\x8a\x00"

    def __init__(self) -> None:
        self.buf = bytearray()
        self.frames = 0
        self.pongs = 0
        self.bytes = 0
        self.types: dict[str, int] = {}
        self.close_code: int | None = None  # set once a close frame came

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= 2 and self.close_code is None:
            if buf[pos] == 0x8A and buf[pos + 1] == 0:
                rest = buf[pos:].lstrip(self.EMPTY_PONG)  # any mix of both bytes ...
                run = (n - pos - len(rest)) & ~1  # ... so whole 2-byte frames only
                self.pongs += run // 2
                self.frames += run // 2
                pos += run
                continue
            b0, b1 = buf[pos], buf[pos + 1] & 0x7F
            head = 2 if b1 < 126 else 4 if b1 == 126 else 10
            if n - pos < head:
                break
            size = b1 if b1 < 126 else int.from_bytes(buf[pos + 2 : pos + head], "big")
            if n - pos < head + size:
                break
            opcode, start = b0 & 0x0F, pos + head
            self.frames += 1
            if opcode == 0x8:
                self.close_code = (
                    int.from_bytes(buf[start : start + 2], "big") if size >= 2 else 1005
                )
            elif opcode == 0xA:
                self.pongs += 1
            elif opcode == 0x1 and buf.startswith(b'{"type":"', start):
                end = buf.find(b'"', start + 9, start + 40)
                kind = buf[start + 9 : end].decode() if end > 0 else "?"
                self.types[kind] = self.types.get(kind, 0) + 1
            pos = start + size
        del buf[:pos]


def trade_frame(symbol: str, trade_id: int, price: str, qty: str, time_ms: int) -> bytes:
    payload = (
        b'{"stream":"%s@trade","data":{"e":"trade","E":%d,"s":"%s","t":%d,"p":"%s",'
        b'"q":"%s","T":%d,"m":false,"M":true}}'
        % (
            symbol.lower().encode(),
            time_ms + 1,
            symbol.encode(),
            trade_id,
            price.encode(),
            qty.encode(),
            time_ms,
        )
    )
    return ws_frame(payload)


class FakeUpstream:
    """Raw-asyncio websocket server: accepts ``GET /stream?...`` upgrades on 127.0.0.1.

    ``await wait_client()`` returns once a client completed the handshake; ``write(data)``
    writes bytes (pre-built frames) to every open client; ``drain()`` waits for their buffers.
    """

    def __init__(self) -> None:
        self.writers: set[asyncio.StreamWriter] = set()
        self.paths: list[str] = []
        self._server: asyncio.base_events.Server | None = None
        self._connected = asyncio.Event()
        self.port = 0

    async def start(self, port: int = 0) -> FakeUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, limit=1 << 16)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def wait_client(self, timeout: float = 20.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def write(self, data: bytes) -> None:
        for w in self.writers:
            w.write(data)

    async def drain(self) -> None:
        for w in list(self.writers):
            try:
                await w.drain()
            except ConnectionError:
                self.writers.discard(w)

    async def close(self) -> None:
        for w in list(self.writers):
            try:
                w.write(ws_frame(struct.pack("!H", 1001), 0x8))
                w.close()
            except (ConnectionError, RuntimeError):
                pass
        self.writers.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        key = headers.get("sec-websocket-key")
        if key is None:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.paths.append(lines[0].split(" ")[1] if " " in lines[0] else "")
        self.writers.add(writer)
        self._connected.set()
        try:
            await self._read_loop(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # (cancelled: the loop is shutting down; end quietly)
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        """Answer pings with pongs and closes with closes; ignore the rest."""
        while True:
            b0, b1 = await reader.readexactly(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            mask = await reader.readexactly(4) if b1 & 0x80 else b""
            data = await reader.readexactly(n)
            if mask:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            if opcode == 0x9:
                writer.write(ws_frame(data, 0xA))
            elif opcode == 0x8:
                writer.write(ws_frame(data[:2], 0x8))
                await writer.drain()
                return
