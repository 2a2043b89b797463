"""The ``shopflow`` command line.

``runtime`` must not import ``actors`` or ``web``, so the commands those
packages provide are plugged in through the ``shopflow.commands`` entry-point
group (see pyproject.toml): each entry is a function ``register(subparsers)``
that adds its sub-commands. The core commands (migrate, services,
stop-services, tree, supervisor-events and the jobs group) live here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import NoReturn

import asyncpg
import redis

from runtime import db, embedded
from runtime.errors import ConfigError, ServiceError, ShopflowError, ValidationError
from runtime.logs import setup_logging
from runtime.settings import Settings

log = logging.getLogger("shopflow")

Handler = Callable[[argparse.Namespace, Settings], int]
COMMAND_GROUP = "shopflow.commands"
# Exit codes: a failure the operator can fix by running the command again later, and one
# where the command line or the settings are wrong (argparse's own code for usage errors).
EXIT_FAILED = 1
EXIT_USAGE = 2
# Errors of the PostgreSQL driver that mean "could not get a working connection".
_PG_CONNECT_ERRORS = (asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                      asyncpg.InvalidCatalogNameError,
                      asyncpg.InvalidAuthorizationSpecificationError)


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``shopflow: ...`` line on stderr.

    argparse's default prints the whole usage block before the error; at a
    glance the error is lost in it. Sub-command parsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"shopflow: {message} (see `{self.prog} --help`)\n")


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    help_text: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add a sub-command whose ``handler(args, settings)`` returns the exit code.

    ``help_text`` is its one line in the parent's command list (short enough
    not to wrap in 80 columns); ``description``, if given, is the longer
    text its own ``--help`` starts with.
    """
    parser = subparsers.add_parser(name, help=help_text, description=description or help_text)
    parser.set_defaults(handler=handler)
    return parser


def seconds_arg(raw: str) -> float:
    """An option's number of seconds above 0 (``--timeout-s``, ``--every``), or a usage error."""
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"takes a number of seconds above 0, got {raw!r}")
    return value


def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    settings = embedded.ensure_services(settings)
    applied = asyncio.run(run_migrations(settings))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none, schema is current'}")
    return 0


async def run_migrations(settings: Settings) -> list[str]:
    """Apply pending migrations to the settings' database."""
    _, database_url = settings.require_urls()
    conn = await db.connect(database_url)
    try:
        return await db.migrate(conn)
    finally:
        await conn.close()


def _cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    resolved = embedded.ensure_services(settings)
    print(f"REDIS_URL={resolved.redis_url}")
    print(f"DATABASE_URL={resolved.database_url}")
    return 0


def _cmd_stop_services(args: argparse.Namespace, settings: Settings) -> int:
    paths = embedded.EmbeddedPaths(settings.var_dir)
    stopped = []
    if settings.redis_url is None and embedded.stop_redis(paths, settings.embedded_redis_port):
        stopped.append("redis")
    if settings.database_url is None and embedded.stop_postgres(paths):
        stopped.append("postgresql")
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def _cmd_tree(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.tree import render_tree, tree_snapshot

    try:
        settings = embedded.find_services(settings)
        no_redis = None
    except ServiceError as exc:  # supervisord may still be up: show what it knows
        no_redis = exc
    snapshot = tree_snapshot(settings)
    if no_redis is not None and not snapshot["supervisord"]["reachable"]:
        raise ServiceError(f"nothing is running from {settings.var_dir}: no supervisord, no "
                           "embedded Redis; start the runtime with `ops/dev up`")
    print(json.dumps(snapshot, indent=2) if args.json else render_tree(snapshot))
    return 0


def _cmd_supervisor_events(args: argparse.Namespace, settings: Settings) -> int:
    from runtime.supervisor_events import cmd_supervisor_events

    return cmd_supervisor_events(args, settings)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: core commands plus every registered plugin's."""
    parser = CommandParser(
        prog="shopflow",
        description="ShopFlow runtime: supervised actors for the shop's background work.",
        epilog="Run `shopflow COMMAND --help` for a command's options. Settings come from the "
               "environment; see the README's settings table.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(sub, "migrate", _cmd_migrate, "apply pending database migrations")
    add_command(sub, "services", _cmd_services,
                "print the server URLs, starting the embedded servers",
                "start the embedded Redis/PostgreSQL if no URL is set; print the URLs")
    add_command(sub, "stop-services", _cmd_stop_services,
                "stop the embedded Redis/PostgreSQL of the var dir",
                "stop the embedded Redis and PostgreSQL started from this var dir")
    tree = add_command(sub, "tree", _cmd_tree,
                       "show the processes, supervisors and actors as a tree",
                       "show supervisord's processes and, inside each, its supervisors and actors")
    tree.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    add_command(sub, "supervisor-events", _cmd_supervisor_events,
                "supervisord listener: alert when a program is FATAL",
                "supervisord event listener: alert on FATAL programs (run by supervisord)")
    from runtime.jobs.cli import register as register_jobs  # imports this module

    register_jobs(sub)
    for entry in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        register = entry.load()
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shopflow`` command: the CLI's one error boundary.

    An expected failure (a server unreachable, a bad setting, something not
    found) is one line on stderr and a non-zero exit; a bug keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        setup_logging(settings.log_level)
        code: int = args.handler(args, settings)
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        failure = describe_failure(exc, settings)
        if failure is None:
            raise
        code, message = failure
        print(f"shopflow: {message}", file=sys.stderr)
        return code


def describe_failure(exc: BaseException, settings: Settings | None) -> tuple[int, str] | None:
    """The exit code and one-line message of an expected failure; None for a bug."""
    if isinstance(exc, ConfigError | ValidationError):
        return EXIT_USAGE, _one_line(exc)
    if isinstance(exc, ShopflowError):
        return EXIT_FAILED, _one_line(exc)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return EXIT_FAILED, _unreachable("Redis", "REDIS_URL", exc, settings)
    if isinstance(exc, _PG_CONNECT_ERRORS) or (
            isinstance(exc, ConnectionError | socket.gaierror | TimeoutError)
            and _raised_in(exc, "asyncpg")):
        return EXIT_FAILED, _unreachable("PostgreSQL", "DATABASE_URL", exc, settings)
    return None


def _unreachable(what: str, setting: str, exc: BaseException, settings: Settings | None) -> str:
    """Which server did not answer and what to do about it."""
    given = settings is not None and getattr(settings, setting.lower()) is not None
    fix = (f"check that it runs and that {setting} points at it" if given
           else "start the runtime with `ops/dev up`, or set " + setting)
    return f"cannot reach {what} ({_one_line(exc).rstrip('.') or type(exc).__name__}): {fix}"


def _raised_in(exc: BaseException, package: str) -> bool:
    """True if ``package``'s code is on the exception's traceback (asyncpg raises bare OSErrors)."""
    tb = exc.__traceback__
    while tb is not None:
        if f"/{package}/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
