"""Command line: `python -m pricewatch [options]` serves; `edge` serves as a cluster edge
(PRICEWATCH_ROLE=edge); `createuser` adds a user; `backup PATH` copies the database."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sqlite3
import sys
from dataclasses import fields

from .config import ConfigError, Settings, env_names

# Shown for settings whose values are a fixed list or a pattern.
_CHOICES = {"feed": "{binance,demo,off,replay:PATH}", "log_level": "{DEBUG,INFO,WARNING,ERROR}"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _option_fields() -> list:
    """Settings that have a command-line option: all but the secrets, which would show in
    `ps` output and shell history."""
    return [f for f in fields(Settings) if not f.metadata["secret"]]


def _secrets_text() -> str:
    """The --help epilog: each secret variable with its help."""
    names = env_names()
    secrets = [f for f in fields(Settings) if f.metadata["secret"]]
    width = max(len(names[f.name]) for f in secrets)
    lines = [f"  {names[f.name]:<{width}}  {f.metadata['help']}" for f in secrets]
    return (
        "Secrets have no option (they would show in `ps` and shell history); set them in "
        "the\nenvironment or in ./.env:\n" + "\n".join(lines)
    )


def _options_parser() -> argparse.ArgumentParser:
    """The serving options, shared by `pricewatch [options]` and `pricewatch serve [options]`.

    Every default is SUPPRESS: an option not given leaves no attribute, so the subcommand's
    parser never overwrites a value given before the subcommand.
    """
    options = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    group = options.add_argument_group("options (each also read from its environment variable)")
    names = env_names()
    for f in _option_fields():
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar=_CHOICES.get(f.name, "VALUE"),
            help=f"{f.metadata['help']} ({names[f.name]}, default: {_show(f.default)})",
        )
    return options


def _parser() -> argparse.ArgumentParser:
    options = _options_parser()
    parser = argparse.ArgumentParser(
        prog="pricewatch",
        parents=[options],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Self-hosted crypto price server. Every option can also be set by the "
        "environment\nvariable shown, or in ./.env (the environment wins; an "
        "option wins over both).",
        epilog=_secrets_text(),
    )
    sub = parser.add_subparsers(dest="command", metavar="{serve,edge,createuser,backup}")
    sub.add_parser(
        "serve",
        parents=[options],
        help="serve (the default)",
        description="Serve HTTP and websockets; the same options as without `serve`.",
    )
    sub.add_parser(
        "edge",
        parents=[options],
        help="serve as a cluster edge (ROLE=edge)",
        description="Serve websockets and market REST from a cluster's Redis: "
        "PRICEWATCH_ROLE=edge. Needs PRICEWATCH_REDIS_URL and the "
        "core's PRICEWATCH_JWT_SECRET; no database, no feeds.",
    )
    create = sub.add_parser(
        "createuser",
        help="create a user",
        description="Create a user. The password comes from PRICEWATCH_PASSWORD, else the "
        "prompt on a terminal, else one line of standard input.",
    )
    create.add_argument("username")
    create.add_argument("--email", required=True)
    create.add_argument("--admin", action="store_true", help="may manage feeds")
    backup = sub.add_parser(
        "backup",
        parents=[options],
        help="copy the database, while the server runs",
        description="Write a consistent copy of the database (PRICEWATCH_DB) to PATH while "
        "the server keeps serving, check it with PRAGMA integrity_check, and "
        "print one line. Restore: stop the server, copy the file back over the "
        "database, remove the database's -wal and -shm files, start.",
    )
    backup.add_argument("path", metavar="PATH")
    backup.add_argument("--force", action="store_true", help="replace PATH if it exists")
    return parser


def _show(value) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, tuple):
        return ",".join("/".join(v) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _option_values(args: argparse.Namespace) -> dict[str, str]:
    """The options given, as environment variables; raises ConfigError naming the option
    (`--port`, not PRICEWATCH_PORT) when a value is malformed."""
    names = env_names()
    values = {}
    for f in _option_fields():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        option = "--" + f.name.replace("_", "-")
        f.metadata["parse"](option, value)  # raises ConfigError naming the option
        if f.name == "log_level" and value.upper() not in _LOG_LEVELS:
            raise ConfigError(f"{option} must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
        values[names[f.name]] = value
    return values


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        environ = dict(os.environ)
        environ.update(_option_values(args))
        if args.command == "edge":
            environ["PRICEWATCH_ROLE"] = "edge"
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        print(f"pricewatch: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "createuser":
        return _createuser(settings, args.username, args.email, args.admin)
    if args.command == "backup":
        return _backup(settings, args.path, args.force)
    from .feeds import FeedConfigError
    from .server import run
    from .startup import StartupError

    try:
        run(settings)
    except FeedConfigError as exc:
        print(f"pricewatch: configuration error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # database path, lock or port: one line, no traceback
        print(f"pricewatch: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # what the path checks could not foresee
        print(f"pricewatch: database {settings.db}: {exc}", file=sys.stderr)
        return 2
    return 0


def _read_password() -> str | None:
    """The password for createuser: PRICEWATCH_PASSWORD (via settings), else asked twice on a
    terminal, else one line of standard input. None (after one line on stderr) if there is
    none."""
    if sys.stdin is None or not sys.stdin.isatty():
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            print(
                "pricewatch: no password: set PRICEWATCH_PASSWORD or write it as one line "
                "to standard input",
                file=sys.stderr,
            )
            return None
        return line.rstrip("\r\n")
    try:
        password = getpass.getpass("Password: ")
        again = getpass.getpass("Password (again): ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        print("pricewatch: no password given", file=sys.stderr)
        return None
    if password != again:
        print("pricewatch: passwords differ", file=sys.stderr)
        return None
    return password


def _createuser(settings: Settings, username: str, email: str, admin: bool) -> int:
    from .auth import EMAIL_RE, MAX_PASSWORD_BYTES, USERNAME_RE, Auth
    from .store import Conflict, Store

    if not USERNAME_RE.fullmatch(username):
        print("pricewatch: username must be 3-150 letters, digits or @.+-_", file=sys.stderr)
        return 2
    if not EMAIL_RE.fullmatch(email):
        print("pricewatch: enter a valid email address", file=sys.stderr)
        return 2
    password = settings.password if settings.password is not None else _read_password()
    if password is None:
        return 2
    if len(password) < 8 or len(password.encode()) > MAX_PASSWORD_BYTES:
        print("pricewatch: password must be 8 characters to 72 bytes", file=sys.stderr)
        return 2

    async def create() -> int:
        store = await Store.open(settings.db)
        try:
            auth = await Auth.create(settings, store)
            user = await store.create_user(
                username,
                email,
                await auth.hash_password(password),
                is_admin=admin,
                email_verified=True,
            )
        except Conflict:
            print(f"pricewatch: user {username!r} exists", file=sys.stderr)
            return 1
        finally:
            await store.close()
        print(f"created {'admin ' if admin else ''}user {user.username} (id {user.id})")
        return 0

    return asyncio.run(create())


def _backup(settings: Settings, path: str, force: bool) -> int:
    from .storage.backup import BackupError, backup_database

    try:
        result = backup_database(settings.db, path, force=force)
    except BackupError as exc:
        print(f"pricewatch: backup: {exc}", file=sys.stderr)
        return 2
    print(
        f"backed up {settings.db} to {result.path}: {result.pages} pages "
        f"({result.bytes / 2**20:.1f} MiB), integrity ok, in {result.seconds:.2f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
