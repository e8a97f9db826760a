"""Starting `python -m pricewatch`: each bad start is one line naming its cause and exit 2,
and "serving" is said only once the port listens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import run_cli


def serve_env(db: Path, port: int) -> dict[str, str]:
    return {"PRICEWATCH_DB": str(db), "PRICEWATCH_PORT": str(port), "PRICEWATCH_FEED": "off"}


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *names: str) -> str:
    """The run stopped with exit 2 and one stderr line naming each of `names`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "serving" not in result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def unwritable(path: Path):
    """Make `path` unwritable even for root (chmod, else `chattr +i`); skip where impossible."""
    mode = path.stat().st_mode
    path.chmod(0o555 if path.is_dir() else 0o444)
    immutable = False
    if os.access(path, os.W_OK) and shutil.which("chattr"):  # root ignores the mode
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    try:
        if os.access(path, os.W_OK):
            pytest.skip("cannot make a path unwritable here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


def test_a_database_in_a_missing_directory_is_one_line(tmp_path):
    db = tmp_path / "missing" / "pw.db"
    result = run_cli(env=serve_env(db, 0), cwd=tmp_path)
    line = assert_one_line_exit_2(result, str(db), "does not exist")
    assert str(tmp_path / "missing") in line


def test_a_database_directory_that_is_not_writable_is_one_line(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    with unwritable(directory):
        result = run_cli(env=serve_env(directory / "pw.db", 0), cwd=tmp_path)
    assert_one_line_exit_2(result, str(directory), "not writable")


def test_a_read_only_database_file_is_one_line(tmp_path):
    db = tmp_path / "pw.db"
    db.touch()  # an empty file is an empty SQLite database
    with unwritable(db):
        result = run_cli(env=serve_env(db, 0), cwd=tmp_path)
    assert_one_line_exit_2(result, str(db), "read-only")


def test_a_port_in_use_is_one_line_and_no_serving_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(env=serve_env(tmp_path / "pw.db", port), cwd=tmp_path)
    assert_one_line_exit_2(result, f"127.0.0.1:{port}", "in use")
    assert not (tmp_path / "pw.db").exists()  # stopped before the database was touched


async def test_a_second_pricewatch_on_the_same_database_refuses_to_start(tmp_path):
    db = tmp_path / "pw.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRICEWATCH_")}
    env.update(serve_env(db, 0), PRICEWATCH_LOG_LEVEL="INFO")
    # The first one through `serve --port`: the options work after the subcommand too.
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pricewatch",
        "serve",
        "--port",
        "0",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        lines = []
        while True:  # the serving line, read as it is written
            line = (await asyncio.wait_for(first.stderr.readline(), 15)).decode()
            assert line, "".join(lines)
            lines.append(line)
            if "pricewatch serving on" in line:
                break
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        # Said only once the port listens: a connection succeeds right away.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        second = await asyncio.to_thread(run_cli, "serve", env=serve_env(db, 0), cwd=tmp_path)
        assert_one_line_exit_2(second, str(db), "in use by another pricewatch", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(first.wait(), 15)
    assert first.returncode == 0
    # The lock went with the process: the next start is not refused.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        again = run_cli(env=serve_env(db, port), cwd=tmp_path)  # fails later, on the port
    assert_one_line_exit_2(again, "in use")
    assert "another pricewatch" not in again.stderr
