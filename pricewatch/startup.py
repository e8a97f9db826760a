"""Checks made before anything starts, so that a bad start is one line and exit code 2.

`python -m pricewatch` (`server.run`) checks the database path, takes the database lock and
binds the listening sockets before it opens the database or starts a feed; each failure is a
`StartupError` whose message names the path or the port, and `main()` prints it as one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path


class StartupError(Exception):
    """pricewatch cannot start; the message is one line naming the cause (path, port)."""


def check_database_path(db: str) -> None:
    """Raise StartupError unless SQLite can create or write `db` and its journal files."""
    if db == ":memory:" or db.startswith("file:"):
        return  # no file of ours to check (an in-memory or URI database)
    path = Path(db)
    directory = path.parent
    if not directory.is_dir():
        raise StartupError(f"database {db}: directory {directory} does not exist")
    # SQLite writes its journal (-wal, -shm) beside the database file.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StartupError(f"database {db}: directory {directory} is not writable")
    if path.exists():
        if not path.is_file():
            raise StartupError(f"database {db} is not a file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise StartupError(f"database {db} is read-only")


class DatabaseLock:
    """An exclusive OS lock (`flock`) on `<db>.lock`, held while the process serves.

    Two servers on one database file would each keep their own alert index and trigger the
    same alerts twice. The lock is released by the OS when the process ends, however it ends,
    so a stale lock file never blocks a restart. `createuser` does not take it: adding a
    user beside a running server is safe.
    """

    def __init__(self, db: str) -> None:
        self.db = db
        self.path = Path(db + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StartupError naming the database."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot create lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise StartupError(
                f"database {self.db} is in use by another pricewatch"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + f": it holds {self.path}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def lock_database(db: str) -> DatabaseLock | None:
    """Check `db` and lock it for this process; None for a database without a file."""
    check_database_path(db)
    if db == ":memory:" or db.startswith("file:"):
        return None
    lock = DatabaseLock(db)
    lock.acquire()
    return lock


def bind(host: str, port: int, backlog: int = 128) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as asyncio would make them.

    Bound here, before the app starts, so that a port in use stops startup before the
    database is opened or a feed connects. Raises StartupError naming host and port.
    """
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: each family on its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(f"cannot listen on {where}: {reason}") from None
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
