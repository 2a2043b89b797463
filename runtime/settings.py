"""One frozen settings object, read from the environment once and passed down.

Every setting is listed in the README's settings table. A default that matters
is a named constant with a comment saying where it comes from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
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

# --- agents ---
# A current Claude model listed by the installed anthropic SDK (2.16); the
# original's model id has been retired. Any id the API accepts works here.
DEFAULT_LLM_MODEL = "claude-sonnet-5-5"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# One model call may take this long before it counts as failed.
DEFAULT_LLM_TIMEOUT_S = 20.0
# The SDK's own retries (transport errors, 429/529 with retry-after) per call.
DEFAULT_LLM_MAX_RETRIES = 2
# Output cap of one answer; our tool answers are short JSON objects.
DEFAULT_LLM_MAX_OUTPUT_TOKENS = 1_024
# Over a rate limit a call waits ("wait") up to the max wait, or answers from
# the fallback at once ("fallback").
DEFAULT_LLM_ON_LIMIT = "wait"
DEFAULT_LLM_MAX_WAIT_S = 20.0
# Cost estimate in US dollars per million tokens (set to your price list).
DEFAULT_LLM_INPUT_USD_PER_MTOK = 3.0
DEFAULT_LLM_OUTPUT_USD_PER_MTOK = 15.0
# After this many failed calls in a row an agent skips the API for the cooldown.
DEFAULT_LLM_CIRCUIT_FAILURES = 5
DEFAULT_LLM_CIRCUIT_COOLDOWN_S = 60
# Per-agent limits: requests and tokens per minute, tokens per shop-zone day.
DEFAULT_AGENT_RPM = 50
DEFAULT_AGENT_TPM = 40_000
DEFAULT_AGENT_DAILY_TOKENS = 2_000_000
# Recommendations: how many, from how many candidates, cached how long.
DEFAULT_RECOMMENDATION_COUNT = 5
DEFAULT_RECOMMENDATION_CANDIDATES = 30
DEFAULT_RECOMMENDATION_CACHE_TTL_S = 6 * 3600
# A fallback answer is cached briefly so the model's answer replaces it soon.
DEFAULT_RECOMMENDATION_FALLBACK_TTL_S = 300
# The refresh job recomputes customers who ordered within this many days.
DEFAULT_RECOMMENDATION_ACTIVE_DAYS = 90
DEFAULT_RECOMMENDATION_REFRESH_BATCH = 500
# Support: how many of the customer's latest orders the agent may see.
DEFAULT_SUPPORT_RECENT_ORDERS = 5
# Moderation: below this confidence a review waits for a person.
DEFAULT_MODERATION_MIN_CONFIDENCE = 0.8


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


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (env.get(name) or default).strip().lower()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if value > 1:
        raise ConfigError(f"{name} must be between 0 and 1, got {value}")
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
    # --- agents ---
    anthropic_base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    llm_model: str = DEFAULT_LLM_MODEL
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S
    llm_max_retries: int = DEFAULT_LLM_MAX_RETRIES
    llm_max_output_tokens: int = DEFAULT_LLM_MAX_OUTPUT_TOKENS
    llm_on_limit: str = DEFAULT_LLM_ON_LIMIT
    llm_max_wait_s: float = DEFAULT_LLM_MAX_WAIT_S
    llm_input_usd_per_mtok: float = DEFAULT_LLM_INPUT_USD_PER_MTOK
    llm_output_usd_per_mtok: float = DEFAULT_LLM_OUTPUT_USD_PER_MTOK
    llm_circuit_failures: int = DEFAULT_LLM_CIRCUIT_FAILURES
    llm_circuit_cooldown_s: int = DEFAULT_LLM_CIRCUIT_COOLDOWN_S
    recommendation_rpm: int = DEFAULT_AGENT_RPM
    recommendation_tpm: int = DEFAULT_AGENT_TPM
    recommendation_daily_tokens: int = DEFAULT_AGENT_DAILY_TOKENS
    support_rpm: int = DEFAULT_AGENT_RPM
    support_tpm: int = DEFAULT_AGENT_TPM
    support_daily_tokens: int = DEFAULT_AGENT_DAILY_TOKENS
    moderation_rpm: int = DEFAULT_AGENT_RPM
    moderation_tpm: int = DEFAULT_AGENT_TPM
    moderation_daily_tokens: int = DEFAULT_AGENT_DAILY_TOKENS
    recommendation_count: int = DEFAULT_RECOMMENDATION_COUNT
    recommendation_candidates: int = DEFAULT_RECOMMENDATION_CANDIDATES
    recommendation_cache_ttl_s: int = DEFAULT_RECOMMENDATION_CACHE_TTL_S
    recommendation_fallback_ttl_s: int = DEFAULT_RECOMMENDATION_FALLBACK_TTL_S
    recommendation_active_days: int = DEFAULT_RECOMMENDATION_ACTIVE_DAYS
    recommendation_refresh_batch: int = DEFAULT_RECOMMENDATION_REFRESH_BATCH
    support_recent_orders: int = DEFAULT_SUPPORT_RECENT_ORDERS
    moderation_min_confidence: float = DEFAULT_MODERATION_MIN_CONFIDENCE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
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
            # --- agents ---
            anthropic_base_url=e.get("ANTHROPIC_BASE_URL") or DEFAULT_ANTHROPIC_BASE_URL,
            llm_model=e.get("SHOPFLOW_LLM_MODEL") or DEFAULT_LLM_MODEL,
            llm_timeout_s=_float(e, "SHOPFLOW_LLM_TIMEOUT_S", DEFAULT_LLM_TIMEOUT_S),
            llm_max_retries=_int(e, "SHOPFLOW_LLM_MAX_RETRIES", DEFAULT_LLM_MAX_RETRIES, 0),
            llm_max_output_tokens=_int(
                e, "SHOPFLOW_LLM_MAX_OUTPUT_TOKENS", DEFAULT_LLM_MAX_OUTPUT_TOKENS, 64
            ),
            llm_on_limit=_choice(e, "SHOPFLOW_LLM_ON_LIMIT", DEFAULT_LLM_ON_LIMIT, ("wait", "fallback")),
            llm_max_wait_s=_float(e, "SHOPFLOW_LLM_MAX_WAIT_S", DEFAULT_LLM_MAX_WAIT_S),
            llm_input_usd_per_mtok=_float(
                e, "SHOPFLOW_LLM_INPUT_USD_PER_MTOK", DEFAULT_LLM_INPUT_USD_PER_MTOK
            ),
            llm_output_usd_per_mtok=_float(
                e, "SHOPFLOW_LLM_OUTPUT_USD_PER_MTOK", DEFAULT_LLM_OUTPUT_USD_PER_MTOK
            ),
            llm_circuit_failures=_int(e, "SHOPFLOW_LLM_CIRCUIT_FAILURES", DEFAULT_LLM_CIRCUIT_FAILURES, 1),
            llm_circuit_cooldown_s=_int(
                e, "SHOPFLOW_LLM_CIRCUIT_COOLDOWN_S", DEFAULT_LLM_CIRCUIT_COOLDOWN_S, 1
            ),
            recommendation_rpm=_int(e, "SHOPFLOW_RECOMMENDATION_RPM", DEFAULT_AGENT_RPM, 1),
            recommendation_tpm=_int(e, "SHOPFLOW_RECOMMENDATION_TPM", DEFAULT_AGENT_TPM, 1),
            recommendation_daily_tokens=_int(
                e, "SHOPFLOW_RECOMMENDATION_DAILY_TOKENS", DEFAULT_AGENT_DAILY_TOKENS, 0
            ),
            support_rpm=_int(e, "SHOPFLOW_SUPPORT_RPM", DEFAULT_AGENT_RPM, 1),
            support_tpm=_int(e, "SHOPFLOW_SUPPORT_TPM", DEFAULT_AGENT_TPM, 1),
            support_daily_tokens=_int(e, "SHOPFLOW_SUPPORT_DAILY_TOKENS", DEFAULT_AGENT_DAILY_TOKENS, 0),
            moderation_rpm=_int(e, "SHOPFLOW_MODERATION_RPM", DEFAULT_AGENT_RPM, 1),
            moderation_tpm=_int(e, "SHOPFLOW_MODERATION_TPM", DEFAULT_AGENT_TPM, 1),
            moderation_daily_tokens=_int(
                e, "SHOPFLOW_MODERATION_DAILY_TOKENS", DEFAULT_AGENT_DAILY_TOKENS, 0
            ),
            recommendation_count=_int(
                e, "SHOPFLOW_RECOMMENDATION_COUNT", DEFAULT_RECOMMENDATION_COUNT, 1
            ),
            recommendation_candidates=_int(
                e, "SHOPFLOW_RECOMMENDATION_CANDIDATES", DEFAULT_RECOMMENDATION_CANDIDATES, 1
            ),
            recommendation_cache_ttl_s=_int(
                e, "SHOPFLOW_RECOMMENDATION_CACHE_TTL_S", DEFAULT_RECOMMENDATION_CACHE_TTL_S, 1
            ),
            recommendation_fallback_ttl_s=_int(
                e, "SHOPFLOW_RECOMMENDATION_FALLBACK_TTL_S", DEFAULT_RECOMMENDATION_FALLBACK_TTL_S, 1
            ),
            recommendation_active_days=_int(
                e, "SHOPFLOW_RECOMMENDATION_ACTIVE_DAYS", DEFAULT_RECOMMENDATION_ACTIVE_DAYS, 1
            ),
            recommendation_refresh_batch=_int(
                e, "SHOPFLOW_RECOMMENDATION_REFRESH_BATCH", DEFAULT_RECOMMENDATION_REFRESH_BATCH, 1
            ),
            support_recent_orders=_int(
                e, "SHOPFLOW_SUPPORT_RECENT_ORDERS", DEFAULT_SUPPORT_RECENT_ORDERS, 1
            ),
            moderation_min_confidence=_fraction(
                e, "SHOPFLOW_MODERATION_MIN_CONFIDENCE", DEFAULT_MODERATION_MIN_CONFIDENCE
            ),
        )

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process read these same settings."""
        env = {
            "SHOPFLOW_VAR_DIR": str(self.var_dir),
            "SHOPFLOW_HTTP_HOST": self.http_host,
            "SHOPFLOW_HTTP_PORT": str(self.http_port),
            "SHOPFLOW_TIMEZONE": self.timezone,
            "SHOPFLOW_EMBEDDED_REDIS_PORT": str(self.embedded_redis_port),
            "SHOPFLOW_EMBEDDED_PG_PORT": str(self.embedded_pg_port),
            "SHOPFLOW_JOB_ATTEMPTS": str(self.job_attempts),
            "SHOPFLOW_JOB_BACKOFF_MS": str(self.job_backoff_ms),
            "SHOPFLOW_API_PROCESSES": str(self.api_processes),
            "SHOPFLOW_EMAIL_WORKERS": str(self.email_workers),
            "SHOPFLOW_INVENTORY_CONCURRENCY": str(self.inventory_concurrency),
            "SHOPFLOW_RESERVATION_TTL_S": str(self.reservation_ttl_s),
            "SHOPFLOW_ACTOR_ASK_TIMEOUT_S": str(self.actor_ask_timeout_s),
            "SHOPFLOW_MAILBOX_SIZE": str(self.mailbox_size),
            "SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS": str(self.broker_heartbeat_timeout_ms),
            "SHOPFLOW_BROKER_MAINTENANCE_CHANCE": str(self.broker_maintenance_chance),
            "SHOPFLOW_OUTBOX_POLL_S": str(self.outbox_poll_s),
            "SHOPFLOW_LOG_LEVEL": self.log_level,
            "SHOPFLOW_NAMESPACE": self.namespace,
        }
        optional = {
            "REDIS_URL": self.redis_url, "DATABASE_URL": self.database_url,
            "SENDGRID_API_KEY": self.sendgrid_api_key, "ANTHROPIC_API_KEY": self.anthropic_api_key,
            "WAREHOUSE_URL": self.warehouse_url, "ALERT_WEBHOOK_URL": self.alert_webhook_url,
        }
        env.update({k: v for k, v in optional.items() if v})
        return env

    def with_urls(self, redis_url: str, database_url: str) -> Settings:
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
