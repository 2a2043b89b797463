"""One frozen settings object, read from the environment once and passed down.

Every setting is listed in the README's settings table. A default that matters
is a named constant with a comment saying where it comes from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from runtime.errors import ConfigError

# The original Node.js system retried every job 3 times with exponential
# backoff starting at 2 s (Bull's `attempts: 3, backoff: {type: exponential, delay: 2000}`).
DEFAULT_JOB_ATTEMPTS = 3
DEFAULT_JOB_BACKOFF_MS = 2_000
# Process counts of the original PM2 ecosystem file.
DEFAULT_API_PROCESSES = 4
DEFAULT_EMAIL_WORKERS = 2
DEFAULT_INVENTORY_CONCURRENCY = 5
# Ports for the embedded servers: away from the standard 6379/5432 so a
# developer's own Redis or PostgreSQL is never touched.
DEFAULT_EMBEDDED_REDIS_PORT = 6390
DEFAULT_EMBEDDED_PG_PORT = 5440
DEFAULT_HTTP_PORT = 8080
DEFAULT_TIMEZONE = "America/Sao_Paulo"
# A pending order's stock is held this long before housekeeping releases it.
DEFAULT_RESERVATION_TTL_S = 15 * 60
# How long a thin Dramatiq actor waits for its pykka actor to answer.
DEFAULT_ACTOR_ASK_TIMEOUT_S = 60.0
# Bounded mailboxes: at most this many messages wait for one pykka actor.
DEFAULT_MAILBOX_SIZE = 100
# A worker silent for this long is presumed dead and its jobs are redelivered.
DEFAULT_BROKER_HEARTBEAT_TIMEOUT_MS = 30_000
# Out of a million broker commands, how many also run the dead-worker sweep.
DEFAULT_BROKER_MAINTENANCE_CHANCE = 1_000
# The outbox relay wakes on NOTIFY; this poll is only the safety net.
DEFAULT_OUTBOX_POLL_S = 1.0
# --- web ---
# A signed access token is valid this long unless `shopflow token --ttl-s` says otherwise.
DEFAULT_TOKEN_TTL_S = 24 * 3600
# Events a WebSocket client may have waiting before it counts as a slow consumer and is closed.
DEFAULT_WS_SEND_QUEUE_MAX = 1_000
# Seconds between WebSocket protocol pings; a peer silent for this long is dropped.
DEFAULT_WS_HEARTBEAT_S = 20.0
# Largest WebSocket frame a client may send (control messages are tiny).
DEFAULT_WS_MAX_FRAME_BYTES = 64 * 1024
# How long one XREAD blocks waiting for new events before looping.
DEFAULT_NOTIFIER_BLOCK_MS = 1_000


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _opt(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    return raw or None


def _zone(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name) or default
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{name} must be an IANA time zone such as {default}, got {value!r}") from None
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the runtime can be told, with the defaults of a fresh machine.

    Build it with :meth:`from_env` at the edge of a process and pass it down;
    nothing else in the code base reads ``os.environ``.
    """

    redis_url: str | None = None
    database_url: str | None = None
    var_dir: Path = field(default_factory=lambda: Path("var").resolve())
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    timezone: str = DEFAULT_TIMEZONE
    embedded_redis_port: int = DEFAULT_EMBEDDED_REDIS_PORT
    embedded_pg_port: int = DEFAULT_EMBEDDED_PG_PORT
    job_attempts: int = DEFAULT_JOB_ATTEMPTS
    job_backoff_ms: int = DEFAULT_JOB_BACKOFF_MS
    api_processes: int = DEFAULT_API_PROCESSES
    email_workers: int = DEFAULT_EMAIL_WORKERS
    inventory_concurrency: int = DEFAULT_INVENTORY_CONCURRENCY
    reservation_ttl_s: int = DEFAULT_RESERVATION_TTL_S
    actor_ask_timeout_s: float = DEFAULT_ACTOR_ASK_TIMEOUT_S
    mailbox_size: int = DEFAULT_MAILBOX_SIZE
    broker_heartbeat_timeout_ms: int = DEFAULT_BROKER_HEARTBEAT_TIMEOUT_MS
    broker_maintenance_chance: int = DEFAULT_BROKER_MAINTENANCE_CHANCE
    outbox_poll_s: float = DEFAULT_OUTBOX_POLL_S
    sendgrid_api_key: str | None = None
    anthropic_api_key: str | None = None
    warehouse_url: str | None = None
    alert_webhook_url: str | None = None
    log_level: str = "INFO"
    namespace: str = "shopflow"
    # --- web ---
    token_secret: str | None = None
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    ws_send_queue_max: int = DEFAULT_WS_SEND_QUEUE_MAX
    ws_heartbeat_s: float = DEFAULT_WS_HEARTBEAT_S
    ws_max_frame_bytes: int = DEFAULT_WS_MAX_FRAME_BYTES
    notifier_block_ms: int = DEFAULT_NOTIFIER_BLOCK_MS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read every setting from ``env`` (``os.environ`` by default), failing on bad values."""
        e = os.environ if env is None else env
        return cls(
            redis_url=_opt(e, "REDIS_URL"),
            database_url=_opt(e, "DATABASE_URL"),
            var_dir=Path(e.get("SHOPFLOW_VAR_DIR") or "var").resolve(),
            http_host=e.get("SHOPFLOW_HTTP_HOST") or "127.0.0.1",
            http_port=_int(e, "SHOPFLOW_HTTP_PORT", DEFAULT_HTTP_PORT, 1),
            timezone=_zone(e, "SHOPFLOW_TIMEZONE", DEFAULT_TIMEZONE),
            embedded_redis_port=_int(e, "SHOPFLOW_EMBEDDED_REDIS_PORT", DEFAULT_EMBEDDED_REDIS_PORT, 1),
            embedded_pg_port=_int(e, "SHOPFLOW_EMBEDDED_PG_PORT", DEFAULT_EMBEDDED_PG_PORT, 1),
            job_attempts=_int(e, "SHOPFLOW_JOB_ATTEMPTS", DEFAULT_JOB_ATTEMPTS, 1),
            job_backoff_ms=_int(e, "SHOPFLOW_JOB_BACKOFF_MS", DEFAULT_JOB_BACKOFF_MS, 0),
            api_processes=_int(e, "SHOPFLOW_API_PROCESSES", DEFAULT_API_PROCESSES, 1),
            email_workers=_int(e, "SHOPFLOW_EMAIL_WORKERS", DEFAULT_EMAIL_WORKERS, 1),
            inventory_concurrency=_int(
                e, "SHOPFLOW_INVENTORY_CONCURRENCY", DEFAULT_INVENTORY_CONCURRENCY, 1
            ),
            reservation_ttl_s=_int(e, "SHOPFLOW_RESERVATION_TTL_S", DEFAULT_RESERVATION_TTL_S, 1),
            actor_ask_timeout_s=_float(e, "SHOPFLOW_ACTOR_ASK_TIMEOUT_S", DEFAULT_ACTOR_ASK_TIMEOUT_S),
            mailbox_size=_int(e, "SHOPFLOW_MAILBOX_SIZE", DEFAULT_MAILBOX_SIZE, 1),
            broker_heartbeat_timeout_ms=_int(
                e, "SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS", DEFAULT_BROKER_HEARTBEAT_TIMEOUT_MS, 1000
            ),
            broker_maintenance_chance=_int(
                e, "SHOPFLOW_BROKER_MAINTENANCE_CHANCE", DEFAULT_BROKER_MAINTENANCE_CHANCE, 0
            ),
            outbox_poll_s=_float(e, "SHOPFLOW_OUTBOX_POLL_S", DEFAULT_OUTBOX_POLL_S),
            sendgrid_api_key=_opt(e, "SENDGRID_API_KEY"),
            anthropic_api_key=_opt(e, "ANTHROPIC_API_KEY"),
            warehouse_url=_opt(e, "WAREHOUSE_URL"),
            alert_webhook_url=_opt(e, "ALERT_WEBHOOK_URL"),
            log_level=(e.get("SHOPFLOW_LOG_LEVEL") or "INFO").upper(),
            namespace=e.get("SHOPFLOW_NAMESPACE") or "shopflow",
            # --- web ---
            token_secret=_opt(e, "SHOPFLOW_TOKEN_SECRET"),
            token_ttl_s=_int(e, "SHOPFLOW_TOKEN_TTL_S", DEFAULT_TOKEN_TTL_S, 1),
            ws_send_queue_max=_int(e, "SHOPFLOW_WS_SEND_QUEUE_MAX", DEFAULT_WS_SEND_QUEUE_MAX, 1),
            ws_heartbeat_s=_float(e, "SHOPFLOW_WS_HEARTBEAT_S", DEFAULT_WS_HEARTBEAT_S),
            ws_max_frame_bytes=_int(
                e, "SHOPFLOW_WS_MAX_FRAME_BYTES", DEFAULT_WS_MAX_FRAME_BYTES, 1024
            ),
            notifier_block_ms=_int(e, "SHOPFLOW_NOTIFIER_BLOCK_MS", DEFAULT_NOTIFIER_BLOCK_MS, 10),
        )

    def with_urls(self, redis_url: str, database_url: str) -> "Settings":
        """A copy pointing at concrete servers (after the embedded ones started)."""
        return replace(self, redis_url=redis_url, database_url=database_url)

    @property
    def zone(self) -> ZoneInfo:
        """The shop's time zone, for showing times (storage is always UTC)."""
        return ZoneInfo(self.timezone)

    @property
    def mail_dir(self) -> Path:
        """Where the outbox e-mail transport writes its ``.eml`` files."""
        return self.var_dir / "mail"

    def require_urls(self) -> tuple[str, str]:
        """Both server URLs, or a clear error if the embedded servers were not resolved."""
        if not self.redis_url or not self.database_url:
            raise ConfigError(
                "REDIS_URL and DATABASE_URL are not set; run `shopflow up` (which starts the "
                "embedded servers and exports them) or set both"
            )
        return self.redis_url, self.database_url
