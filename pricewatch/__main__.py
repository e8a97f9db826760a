"""Command line: `python -m pricewatch [options]` serves; `createuser` adds a user."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from dataclasses import fields

from .config import ConfigError, Settings, env_names

# Settings that have no command-line option: secrets do not belong in `ps` output.
_NO_OPTION = {"jwt_secret", "alphavantage_api_key", "smtp_password", "password",
              "binance_api_key"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pricewatch",
        description="Self-hosted crypto price server. Every option can also be set by the "
                    "environment variable shown, or in ./.env (the environment wins; an "
                    "option wins over both).")
    names = env_names()
    for f in fields(Settings):
        if f.name in _NO_OPTION:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar="VALUE",
                            help=f"{f.metadata['help']} (env {names[f.name]}, default: "
                                 f"{_show(f.default)})")
    sub = parser.add_subparsers(dest="command")
    create = sub.add_parser("createuser", help="create a user (password from the prompt or "
                                               "PRICEWATCH_PASSWORD)")
    create.add_argument("username")
    create.add_argument("--email", required=True)
    create.add_argument("--admin", action="store_true", help="may manage feeds")
    sub.add_parser("serve", help="serve (the default)")
    return parser


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join("/".join(v) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = dict(os.environ)
    names = env_names()
    for name, value in vars(args).items():
        if name in names and value is not None:
            environ[names[name]] = value
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        print(f"pricewatch: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "createuser":
        return _createuser(settings, args.username, args.email, args.admin)
    from .feeds import FeedConfigError
    from .server import run

    try:
        run(settings)
    except FeedConfigError as exc:
        print(f"pricewatch: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken: one line, not a traceback
        print(f"pricewatch: cannot serve on {settings.host}:{settings.port}: {exc}",
              file=sys.stderr)
        return 1
    return 0


def _createuser(settings: Settings, username: str, email: str, admin: bool) -> int:
    from .auth import EMAIL_RE, MAX_PASSWORD_BYTES, USERNAME_RE, Auth
    from .store import Conflict, Store

    if not USERNAME_RE.fullmatch(username):
        print("pricewatch: username must be 3-150 letters, digits or @.+-_", file=sys.stderr)
        return 2
    if not EMAIL_RE.fullmatch(email):
        print("pricewatch: enter a valid email address", file=sys.stderr)
        return 2
    password = settings.password
    if password is None:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Password (again): "):
            print("pricewatch: passwords differ", file=sys.stderr)
            return 2
    if len(password) < 8 or len(password.encode()) > MAX_PASSWORD_BYTES:
        print("pricewatch: password must be 8 characters to 72 bytes", file=sys.stderr)
        return 2

    async def create() -> int:
        store = await Store.open(settings.db)
        try:
            auth = await Auth.create(settings, store)
            user = await store.create_user(username, email, await auth.hash_password(password),
                                           is_admin=admin)
        except Conflict:
            print(f"pricewatch: user {username!r} exists", file=sys.stderr)
            return 1
        finally:
            await store.close()
        print(f"created {'admin ' if admin else ''}user {user.username} (id {user.id})")
        return 0

    return asyncio.run(create())


if __name__ == "__main__":
    sys.exit(main())
