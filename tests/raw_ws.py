"""A websocket client on a bare socket, for tests where a polite client library would hide
the problem: the test decides when (and whether) it reads, and sends any bytes it likes.

`RawWebSocket.connect()` does the RFC 6455 handshake and raises `Refused` (status, headers,
body) when the server answers anything but 101.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

import orjson

CONTINUATION, TEXT, CLOSE, PING, PONG = 0x0, 0x1, 0x8, 0x9, 0xA


class Refused(Exception):
    """The upgrade was answered with an HTTP response instead of 101."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        super().__init__(status)
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return orjson.loads(self.body)


def client_frame(payload: bytes, opcode: int = 0x1, fin: bool = True) -> bytes:
    """One masked (client->server) frame; `fin=False`: a message to be continued."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        header = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    if not n:
        return header + mask
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return header + mask + masked


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(
        cls, url: str, path: str, headers: dict[str, str] | None = None, rcvbuf: int | None = None
    ) -> RawWebSocket:
        """Open `path` on the server at `url` (http://host:port). `rcvbuf` shrinks the
        kernel receive buffer (set before connecting, so the TCP window stays small)."""
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Connection: Upgrade\r\nUpgrade: websocket\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                f"{extra}\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        if status != 101:
            body = await asyncio.wait_for(
                reader.readexactly(int(fields.get("content-length", 0))), 5
            )
            writer.transport.abort()
            writer.close()
            raise Refused(status, fields, body)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        """Write raw bytes (frames made with `client_frame`, or anything else)."""
        self.writer.write(data)

    def send_json(self, *messages: object) -> None:
        """Send each message as one text frame, all in one write."""
        self.writer.write(b"".join(client_frame(orjson.dumps(m)) for m in messages))

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame as (opcode, payload); pings are skipped."""
        async with asyncio.timeout(timeout):
            while True:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
                payload = await self.reader.readexactly(n)
                if b0 & 0x0F != PING:
                    return b0 & 0x0F, payload

    async def recv_json(self, timeout: float = 5.0) -> dict:
        opcode, payload = await self.frame(timeout)
        assert opcode == 0x1, (opcode, payload[:200])
        return orjson.loads(payload)

    async def until_closed(self, timeout: float = 10.0) -> tuple[list[dict], int | None]:
        """Read to the end: (every JSON message before it, the close code or None when the
        server cut the connection without a close frame)."""
        messages = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    opcode, payload = await self.frame(timeout=None)
                    if opcode == CLOSE:
                        return messages, struct.unpack("!H", payload[:2])[0]
                    if opcode != PONG:  # answers to pings a test sent
                        messages.append(orjson.loads(payload))
        except (asyncio.IncompleteReadError, ConnectionError):
            return messages, None

    def abort(self) -> None:
        """Drop the connection at once (no close handshake)."""
        self.writer.transport.abort()
        self.writer.close()
