"""A real SMTP server (aiosmtpd) on loopback that records every accepted message."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading

from aiosmtpd.controller import Controller
from fake_binance import free_port

from pricewatch.verify_api import SUBJECT as CODE_SUBJECT


class SmtpSink:
    """Runs aiosmtpd on 127.0.0.1:`port` in its own thread; the first `fail_first` DATA
    commands are answered with `fail_reply` instead of being accepted.

    Verification-code mails (registering with SMTP configured sends one) are kept apart in
    `codes`, always accepted: `messages`, `rejected` and `sessions` are about alert mail.
    """

    def __init__(
        self,
        port: int = 0,
        fail_first: int = 0,
        fail_reply: str = "451 4.3.0 try again later",
        hold_quit: bool = False,
    ):
        self.port = port
        self.hold_quit = hold_quit  # QUIT is answered only once `release` is set
        self.release = threading.Event()
        self.fail_first = fail_first
        self.fail_reply = fail_reply
        self.messages: list[email.message.EmailMessage] = []
        self.codes: list[email.message.EmailMessage] = []  # verification-code mails
        self.rejected = 0
        self.peers: set = set()  # (host, port) of every client that sent DATA
        self._lock = threading.Lock()
        self._arrived = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._controller: Controller | None = None

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd handler hook
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            if msg["Subject"] == CODE_SUBJECT:
                self.codes.append(msg)
            elif self.rejected < self.fail_first:
                self.rejected += 1
                return self.fail_reply
            else:
                self.messages.append(msg)
                self.peers.add(session.peer)
        self._loop.call_soon_threadsafe(self._arrived.set)
        return "250 OK"

    @property
    def sessions(self) -> int:
        """SMTP connections that delivered at least one message."""
        return len(self.peers)

    async def handle_QUIT(self, server, session, envelope):  # aiosmtpd handler hook
        if self.hold_quit:
            await asyncio.to_thread(self.release.wait, 10)
        return "221 Bye"

    async def start(self) -> SmtpSink:
        if self.port == 0:
            self.port = free_port()
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        await asyncio.to_thread(self._controller.start)  # it blocks until it listens
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._controller is not None:
            await asyncio.to_thread(self._controller.stop)
            self._controller = None

    async def __aenter__(self) -> SmtpSink:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def wait_messages(self, n: int, timeout: float = 10.0) -> list:
        return await self._wait(self.messages, n, timeout)

    async def wait_codes(self, n: int, timeout: float = 10.0) -> list:
        """The first `n` verification-code mails, once they arrived."""
        return await self._wait(self.codes, n, timeout)

    async def _wait(self, arrived: list, n: int, timeout: float) -> list:
        async def reached() -> None:
            while True:
                with self._lock:
                    if len(arrived) >= n:
                        return
                    self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(reached(), timeout)
        return list(arrived)
