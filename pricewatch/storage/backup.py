"""`python -m pricewatch backup PATH`: a consistent copy of the database, taken beside a
running server with SQLite's online backup API.

A separate process (never the server's event loop), so plain blocking `sqlite3` is right
here. The copy is read from one snapshot: a read transaction is opened on the source before
the first page is copied and held to the last, so it holds every write committed before the
backup started, and nothing half-written after. In WAL mode that snapshot blocks no writer
(they append to the WAL; only the checkpoint waits for the backup to finish), and pages are
copied `STEP_PAGES` at a time, so no lock is held for long by the copy either.

The copy is written to a temporary file beside PATH, checked with `PRAGMA integrity_check`,
made a standalone file (rollback journal, no -wal beside it), synced, then renamed to PATH:
PATH is never a half-written file, and an existing PATH is replaced only when asked (--force).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

STEP_PAGES = 1024  # pages copied per step (4 MiB at the default page size)


class BackupError(Exception):
    """The backup was not made; the message is one line naming the cause."""


@dataclass(frozen=True)
class BackupResult:
    path: str
    pages: int
    bytes: int
    seconds: float


def backup_database(
    db: str, path: str, force: bool = False, step_pages: int = STEP_PAGES
) -> BackupResult:
    """Copy the database file `db` to `path`. Raises BackupError (PATH exists and not
    `force`, no database, PATH not writable, the copy fails its integrity check)."""
    began = time.monotonic()
    if db == ":memory:" or db.startswith("file:"):
        raise BackupError(f"database {db} has no file to back up")
    source_path, target = Path(db), Path(path)
    if not source_path.is_file():
        raise BackupError(f"database {db} does not exist")
    live = source_path.resolve()
    if target.resolve() in {live, *(Path(f"{live}{end}") for end in ("-wal", "-shm", "-journal"))}:
        raise BackupError(f"{path} is the database itself (or one of its files)")
    if target.exists() and not force:
        raise BackupError(f"{path} exists (--force replaces it)")
    if target.is_dir():
        raise BackupError(f"{path} is a directory")
    if not target.parent.is_dir():
        raise BackupError(
            f"{target.parent} is not a directory"
            if target.parent.exists()
            else f"directory {target.parent} does not exist"
        )
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pages = _copy(db, temp, step_pages)
        _place(temp, target, force)
    except OSError as exc:
        raise BackupError(f"cannot write {path}: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise BackupError(f"backup of {db} to {path} failed: {exc}") from None
    finally:
        for leftover in (temp, *(Path(f"{temp}{end}") for end in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
    return BackupResult(path, pages, target.stat().st_size, time.monotonic() - began)


def _copy(db: str, temp: Path, step_pages: int) -> int:
    """The snapshot of `db` into the new file `temp`, checked; returns its page count."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # ours alone, from now
    os.close(fd)
    # `mode=rw`: never create a database that is not there (raced away since the check).
    source = sqlite3.connect(
        Path(db).resolve().as_uri() + "?mode=rw", uri=True, isolation_level=None
    )
    try:
        source.execute("PRAGMA busy_timeout=5000")
        source.execute("PRAGMA query_only=1")
        copy = sqlite3.connect(temp, isolation_level=None)
        try:
            # The snapshot: from this read on, the copy sees the database as it is now.
            source.execute("BEGIN")
            source.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            source.backup(copy, pages=step_pages)
            source.execute("COMMIT")
            copy.execute("PRAGMA journal_mode=DELETE")  # one standalone file
            problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise BackupError("the copy fails its integrity check: " + "; ".join(problems[:3]))
            return copy.execute("PRAGMA page_count").fetchone()[0]
        finally:
            copy.close()
    finally:
        source.close()


def _place(temp: Path, target: Path, force: bool) -> None:
    """Make the checked copy `target`, durably: synced, renamed, its directory synced."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(temp, target)
    else:
        try:
            os.link(temp, target)  # fails if PATH appeared meanwhile: never replaced unasked
        except FileExistsError:
            raise BackupError(f"{target} exists (--force replaces it)") from None
        temp.unlink()
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
