"""Ping-flood benchmark: websocket clients send empty pings as fast as they can while another
client times ``GET /api/v1/prices``.

    python bench/ws_flood.py [--flooders 3] [--duration 10] [--root CHECKOUT]

``python -m pricewatch`` runs as a subprocess (no feed, default limits). First the polite
client alone times GETs for ``--baseline`` s; then ``--flooders`` raw sockets (threads of a
separate process, blocking sockets: the flood is not slowed by this process's event loop)
connect to /ws/ohlc/ and write 60 KB batches of empty masked pings with no pause; a flooder
whose connection ends reconnects at once. The polite client (one keep-alive connection,
one request at a time) keeps timing GETs for ``--duration`` s.

Figures: ``baseline_ms`` and ``flood_ms`` (p50/p99/max and the number of requests),
``failures`` (GETs that errored or took over 5 s), ``flood_connections`` (how many times the
flooders connected), ``flood_mb`` (bytes they got written), the server's
``pricewatch_websocket_dropped_total`` for too_many_messages, ``server_cpu_pct`` over the
flood. ``--root``: run another checkout's server (the old design's figures).
Goal (README): flood p99 < 100 ms with 3 flooders.

Prints one JSON line; logs go to stderr. Takes about baseline + duration + 5 s (<= 20 s
with the defaults).
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import http.client  # noqa: E402  (bench/http.py would shadow it)
import urllib.request  # noqa: E402

from bench._common import (  # noqa: E402
    CpuMeter,
    ServerProcess,
    emit_run,
    loadavg,
    log,
    percentile,
    setup_logging,
)

PING = struct.pack("!BB", 0x89, 0x80) + b"\x00\x00\x00\x00"  # empty, masked (zero key)
BATCH = PING * 10_000


def flood_one(port: int, stop: threading.Event, counts: list[int], i: int) -> None:
    """One flooder: connect, write pings until the connection ends, again until `stop`."""
    while not stop.is_set():
        sock = socket.socket()
        try:
            sock.settimeout(5.0)
            sock.connect(("127.0.0.1", port))
            key = base64.b64encode(os.urandom(16))
            sock.sendall(b"GET /ws/ohlc/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
                         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key
                         + b"\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during the handshake")
                head += chunk
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                time.sleep(0.05)  # refused (per-address cap): try again shortly
                continue
            counts[2 * i] += 1
            while not stop.is_set():
                sock.sendall(BATCH)
                counts[2 * i + 1] += len(BATCH)
        except OSError:
            pass
        finally:
            sock.close()


def flood(port: int, flooders: int, stop, counts) -> None:
    """The flooders' process: one thread each until `stop` is set."""
    local = threading.Event()
    threads = [threading.Thread(target=flood_one, args=(port, local, counts, i), daemon=True)
               for i in range(flooders)]
    for thread in threads:
        thread.start()
    stop.wait()
    local.set()
    for thread in threads:
        thread.join(6.0)


def time_gets(port: int, seconds: float) -> tuple[list[float], int]:
    """GET /api/v1/prices back to back on one keep-alive connection for `seconds`:
    (sorted latencies in ms, failures)."""
    latencies, failures = [], 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        try:
            conn.request("GET", "/api/v1/prices")
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures += 1
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
            continue
        latencies.append((time.perf_counter() - began) * 1000)
        time.sleep(0.005)  # ~150 requests a second: a client, not a second flood
    conn.close()
    return sorted(latencies), failures


def figures(latencies: list[float]) -> dict:
    return {"p50": round(percentile(latencies, 50) or 0, 2),
            "p99": round(percentile(latencies, 99) or 0, 2),
            "max": round(latencies[-1], 2) if latencies else None, "n": len(latencies)}


def dropped(url: str) -> int | None:
    with urllib.request.urlopen(url + "/metrics", timeout=5.0) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("pricewatch_websocket_dropped_total") and \
                    'reason="too_many_messages"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flooders", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--baseline", type=float, default=2.0)
    parser.add_argument("--root", default=None, help="checkout whose server runs")
    args = parser.parse_args()
    setup_logging()
    load_before, began = loadavg(), time.monotonic()
    with ServerProcess(root=args.root) as server:
        baseline, base_failures = time_gets(server.port, args.baseline)
        stop = multiprocessing.Event()
        counts = multiprocessing.Array("q", 2 * args.flooders, lock=False)
        proc = multiprocessing.Process(target=flood, args=(server.port, args.flooders, stop,
                                                           counts))
        cpu = CpuMeter(server.pid)
        proc.start()
        cpu.start()
        try:
            flooded, failures = time_gets(server.port, args.duration)
        finally:
            server_cpu = cpu.stop()
            stop.set()
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
        log.info("flooders stopped")
        out = {
            "bench": "ws_flood", "flooders": args.flooders, "duration_s": args.duration,
            "baseline_ms": figures(baseline), "flood_ms": figures(flooded),
            "failures": failures + base_failures,
            "flood_connections": sum(counts[0::2]),
            "flood_mb": round(sum(counts[1::2]) / 1e6, 1),
            "dropped_too_many_messages": dropped(server.url),
            "server_cpu_pct": round(server_cpu, 1),
            "server_runqueue_wait_pct": cpu.wait_pct,
            "root": args.root or "this checkout",
        }
    emit_run(out, load_before, began)


if __name__ == "__main__":
    main()
