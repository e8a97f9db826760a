"""`python -m pricewatch backup PATH`: a consistent, checked copy taken beside a running
server that keeps writing; the shipped systemd units run it as written."""

from __future__ import annotations

import asyncio
import configparser
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bench._common import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def run_backup(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pricewatch", "backup", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def rows(path: Path, sql: str) -> list:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def integrity(path: Path) -> list:
    return [r[0] for r in rows(path, "PRAGMA integrity_check")]


class Writer:
    """Creates alerts one after another, as fast as the server acknowledges them; `acked`
    holds the id of every alert answered 201, in order."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str):
        self.http, self.url, self.token = http, url, token
        self.acked: list[int] = []
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            async with self.http.post(
                self.url + "/api/v1/alerts",
                json={"asset": "BTCUSDT", "price": 1000.0 + i, "direction": "above"},
                headers={"Authorization": f"Bearer {self.token}"},
            ) as resp:
                if resp.status != 201:
                    self.failures.append(f"{resp.status} {await resp.text()}")
                    return
                self.acked.append((await resp.json())["id"])


async def backup_while_writing(
    writer: Writer, env: dict[str, str], cwd: Path, *args: str
) -> tuple[subprocess.CompletedProcess, set[int]]:
    """Run the backup command while `writer` keeps writing; returns its result and the
    writes acknowledged before it started."""
    while len(writer.acked) < 5:  # the writer is under way
        await asyncio.sleep(0.01)
    before = set(writer.acked)
    result = await asyncio.to_thread(run_backup, env, *args, cwd=cwd)
    return result, before


async def test_backup_beside_a_writing_server_holds_every_acknowledged_write(tmp_path):
    server = ServerProcess(
        {
            "PRICEWATCH_BCRYPT_ROUNDS": "4",
            "PRICEWATCH_ALERT_CREATE_RATE": "1000000",
            "PRICEWATCH_MAX_ALERTS_PER_USER": "1000000",
        },
        tmpdir=str(tmp_path),
    )
    await asyncio.to_thread(server.start)
    try:
        db = Path(server.env["PRICEWATCH_DB"])
        # Some megabytes, so the copy takes many steps while the server writes.
        with sqlite3.connect(db, timeout=10) as ballast:
            ballast.execute("CREATE TABLE ballast (data BLOB)")
            ballast.executemany("INSERT INTO ballast VALUES (randomblob(4000))", [()] * 3000)
        ballast.close()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                server.url + "/auth/register",
                json={
                    "username": "alice",
                    "password": "correct horse",
                    "email": "alice@example.com",
                },
            ) as resp:
                assert resp.status == 201, await resp.text()
                token = (await resp.json())["access"]
            writer = Writer(http, server.url, token)
            task = asyncio.create_task(writer.run())
            try:
                copy = tmp_path / "backups" / "pricewatch.db"
                copy.parent.mkdir()
                result, before = await backup_while_writing(writer, server.env, tmp_path, str(copy))
                assert result.returncode == 0, result.stderr
                assert len(result.stdout.strip().splitlines()) == 1, result.stdout
                assert result.stdout.startswith("backed up ") and not result.stderr
                assert integrity(copy) == ["ok"]
                saved = {r[0] for r in rows(copy, "SELECT id FROM alerts")}
                assert before <= saved, sorted(before - saved)[:10]
                assert rows(copy, "SELECT username FROM users") == [("alice",)]
                assert rows(copy, "SELECT COUNT(*) FROM ballast") == [(3000,)]
                assert not list(copy.parent.glob(".*")), "a temporary file was left"
                assert os.stat(copy).st_mode & 0o077 == 0  # password hashes: owner only

                # PATH exists: refused, the copy untouched.
                kept = copy.read_bytes()
                result, _ = await backup_while_writing(writer, server.env, tmp_path, str(copy))
                assert result.returncode == 2 and not result.stdout
                assert len(result.stderr.strip().splitlines()) == 1
                assert "exists" in result.stderr and "--force" in result.stderr
                assert copy.read_bytes() == kept

                # --force replaces it with a fresh copy.
                result, before = await backup_while_writing(
                    writer, server.env, tmp_path, "--force", str(copy)
                )
                assert result.returncode == 0, result.stderr
                assert integrity(copy) == ["ok"]
                saved = {r[0] for r in rows(copy, "SELECT id FROM alerts")}
                assert before <= saved
            finally:
                writer.stop.set()
                await task
            assert not writer.failures, writer.failures  # the server kept writing throughout
            assert len(writer.acked) > len(before)
            assert (await asyncio.to_thread(server.healthz))["db"] == "ok"
    finally:
        server.stop()


@pytest.mark.parametrize(
    "case",
    [
        "no database",
        "no directory",
        "a directory",
        "under a file",
        "unwritable",
        "the database",
        "its wal",
    ],
)
def test_backup_errors_are_one_line_and_exit_code_2(tmp_path, case):
    db = tmp_path / "pricewatch.db"
    if case != "no database":
        sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.close()
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    target = {
        "no database": tmp_path / "copy.db",
        "no directory": tmp_path / "no" / "c.db",
        "a directory": tmp_path / "dir",
        "under a file": tmp_path / "file" / "c.db",
        # No file can be created there, not even by root.
        "unwritable": Path("/proc/self/c.db"),
        # --force onto the live file would swap its inode under the running server.
        "the database": tmp_path / "." / "pricewatch.db",
        "its wal": tmp_path / "pricewatch.db-wal",
    }[case]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env.update(PYTHONPATH=os.pathsep.join(sys.path), PRICEWATCH_DB=str(db))
    result = run_backup(env, "--force", str(target), cwd=tmp_path)
    assert result.returncode == 2 and not result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pricewatch: backup: "), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file", "dir"] + (["pricewatch.db"] if case != "no database" else [])
    )
    if case != "no database":
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM t").fetchone() == (0,)


# The example systemd units --------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / name).read_text())
    return parser


def test_the_example_systemd_units_run_a_backup_as_written(tmp_path):
    service, timer = unit("pricewatch-backup.service"), unit("pricewatch-backup.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Install"]["WantedBy"] == "timers.target"
    assert "Unit" not in timer["Timer"]  # the default: the service of the same name
    assert service["Service"]["Type"] == "oneshot"
    # The paths the units name, moved into tmp_path.
    lib, backups = tmp_path / "lib", tmp_path / "backups"
    lib.mkdir(), backups.mkdir()
    places = {
        "/var/lib/pricewatch": str(lib),
        "/var/backups/pricewatch": str(backups),
        "/etc/pricewatch": str(tmp_path),
    }

    def moved(text: str) -> str:
        for old, new in places.items():
            text = text.replace(old, new)
        return text

    section = service["Service"]
    env_file = Path(moved(section["EnvironmentFile"].lstrip("-")))
    env_file.write_text(f"PRICEWATCH_DB={lib / 'pricewatch.db'}\n")
    db = sqlite3.connect(lib / "pricewatch.db")
    db.execute("CREATE TABLE t (x)")
    db.execute("INSERT INTO t VALUES (42)")
    db.commit()
    db.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    for line in env_file.read_text().splitlines():  # as systemd reads an EnvironmentFile
        key, _, value = line.partition("=")
        env[key] = value
    argv = shlex.split(moved(section["ExecStart"]))
    assert argv[0].endswith("/python") and argv[1:4] == ["-m", "pricewatch", "backup"]
    argv[0] = sys.executable
    for _ in range(2):  # a daily timer: the second run replaces the first copy
        result = subprocess.run(
            argv,
            env=env,
            cwd=moved(section["WorkingDirectory"]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    [copy] = backups.iterdir()
    assert rows(copy, "SELECT x FROM t") == [(42,)] and integrity(copy) == ["ok"]
