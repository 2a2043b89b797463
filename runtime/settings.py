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
# Retries for a job that failed only because PostgreSQL, Redis or an outside service was away:
# with the backoff capped at 16x the base (32 s) this rides out ~10 minutes.
DEFAULT_JOB_INFRA_RETRIES = 25
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
# A concern's handler deadline, from when its pykka actor takes the message; the thin
# Dramatiq actor's ask waits a little longer (runtime.worker.ASK_MARGIN_S).
DEFAULT_ACTOR_ASK_TIMEOUT_S = 60.0
# A worker's whole graceful stop (running jobs, actors, resources) fits in this; keep it
# below supervisord.conf's stopwaitsecs (40) for the workers, or supervisord SIGKILLs first.
DEFAULT_WORKER_STOP_S = 30.0
# Bounded mailboxes: at most this many messages wait for one pykka actor.
DEFAULT_MAILBOX_SIZE = 100
# A worker silent for this long is presumed dead and its jobs are redelivered.
DEFAULT_BROKER_HEARTBEAT_TIMEOUT_MS = 30_000
# --- jobs (runtime/jobs) ---
# Every worker's keeper beats, renews limit leases and sweeps dead workers this often.
DEFAULT_JOB_SWEEP_INTERVAL_S = 5.0
# A job that has killed its worker this many times is quarantined (poison pill).
DEFAULT_JOB_POISON_DEATHS = 3
# Finished jobs kept per queue, as the original (Bull's removeOnComplete 100 / removeOnFail 500).
DEFAULT_JOB_KEEP_COMPLETED = 100
DEFAULT_JOB_KEEP_FAILED = 500
# A finished job id blocks re-sends under the same id this long.
DEFAULT_JOB_DEDUP_S = 24 * 3600
# A job held back by a concurrency or rate limit waits this long in its worker, then requeues.
DEFAULT_JOB_LIMIT_WAIT_MS = 1_000
# An idle consumer blocks on its queue's wake-up list this long before looking again.
DEFAULT_WORKER_IDLE_TIMEOUT_MS = 1_000
# Queue bounds: 0 = unbounded; a producer facing a full queue waits ("block") up to the
# timeout or gets QueueFull at once ("fail").
DEFAULT_QUEUE_MAX_LENGTH = 0
DEFAULT_QUEUE_FULL_POLICY = "block"
DEFAULT_QUEUE_FULL_TIMEOUT_S = 5.0
# The outbox relay wakes on NOTIFY; this poll is only the safety net.
DEFAULT_OUTBOX_POLL_S = 1.0
# --- observability ---
# The original polled its queues once a minute.
DEFAULT_MONITOR_INTERVAL_S = 60.0
# The original paged when more than 1,000 jobs waited in a queue.
DEFAULT_MONITOR_BACKLOG_THRESHOLD = 1_000
# A job waiting this long means the queue is not keeping up.
DEFAULT_MONITOR_OLDEST_AGE_THRESHOLD_S = 300.0
# Share of failed attempts (retried or failed for good) that raises an alert...
DEFAULT_MONITOR_FAILURE_RATE_THRESHOLD = 0.2
# ...measured over this window...
DEFAULT_MONITOR_FAILURE_RATE_WINDOW_S = 300
# ...once at least this many attempts ended in it (a few failures of a quiet queue are noise).
DEFAULT_MONITOR_FAILURE_RATE_MIN_JOBS = 20
# Work waiting this long with no live consumer for its queue raises an alert (deploys restart workers).
DEFAULT_MONITOR_NO_CONSUMER_GRACE_S = 60.0
# One webhook POST may take this long before it counts as failed.
DEFAULT_ALERT_WEBHOOK_TIMEOUT_S = 5.0
# Delivery attempts per webhook message (backoff 0.5 s, 1 s, ...); later checks retry undelivered pages.
DEFAULT_ALERT_WEBHOOK_ATTEMPTS = 3
# An incident resolves only once its condition stayed clear this long: a condition
# flapping at its threshold stays one incident (one page, one resolve). 0 = at once.
DEFAULT_ALERT_RESOLVE_AFTER_S = 120
# --- scheduling ---
# Scheduler processes under supervisord: one leads, the other stands by.
DEFAULT_SCHEDULERS = 2
# A scheduler instance wakes this often to renew its lease and fire due slots.
DEFAULT_SCHEDULER_TICK_S = 1.0
# A standby scheduler takes over this long after the leader's last renewal.
DEFAULT_SCHEDULER_LEASE_S = 15.0
# A slot run later than this counts as missed (misfire policy); above the lease.
DEFAULT_SCHEDULER_MISFIRE_GRACE_S = 60.0
# A slot claimed by a scheduler that died before sending it is sent again after this.
DEFAULT_SCHEDULER_RESEND_AFTER_S = 30.0
# The original system's schedules (Bull repeatables in America/Sao_Paulo).
DEFAULT_SALES_REPORT_CRON = "0 8 * * *"
DEFAULT_DAILY_REPORT_CRON = "0 9 * * *"
DEFAULT_CART_CLEANUP_EVERY_S = 60 * 60
DEFAULT_RESERVATION_RELEASE_EVERY_S = 15 * 60
DEFAULT_CRON_HEARTBEAT_EVERY_S = 5 * 60
# The heartbeat key outlives one missed beat; /health calls the scheduler stale after it.
DEFAULT_CRON_HEARTBEAT_TTL_S = 10 * 60
# Anonymous carts idle this long are deleted.
DEFAULT_CART_MAX_AGE_S = 24 * 60 * 60
# Expired reservations released per atomic statement.
DEFAULT_RESERVATION_RELEASE_BATCH = 5_000


# --- externals: stock sync, warehouse, carrier, SendGrid, abandoned carts (issue 7) ---
# The original stock sync ran every 30 s.
DEFAULT_STOCK_SYNC_INTERVAL_S = 30.0
# External ids per warehouse lookup (the warehouse API takes at most 200).
DEFAULT_STOCK_SYNC_BATCH_SIZE = 100
# Lookups in flight at once: gentle on the warehouse, enough to hide latency.
DEFAULT_STOCK_SYNC_CONCURRENCY = 4
# Connect fast-fails a dead host; read covers the warehouse's slowest normal answer.
DEFAULT_EXTERNAL_CONNECT_TIMEOUT_S = 2.0
DEFAULT_EXTERNAL_READ_TIMEOUT_S = 5.0
# Attempts per external call and the first backoff (doubling, capped at 8x).
DEFAULT_EXTERNAL_ATTEMPTS = 3
DEFAULT_EXTERNAL_BACKOFF_S = 0.5
# Consecutive failures that open a service's breaker, and how long it stays open.
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_RESET_S = 30.0
# Alert when this many sync intervals passed without a successful sync.
DEFAULT_STOCK_SYNC_ALERT_INTERVALS = 3
# Where the stock-sync daemon also serves /metrics (0 = only via the api's /metrics).
DEFAULT_STOCK_SYNC_METRICS_PORT = 0
# Ports of the simulators the runtime starts when no WAREHOUSE_URL / CARRIER_URL is set.
DEFAULT_WAREHOUSE_SIM_PORT = 8090
DEFAULT_CARRIER_SIM_PORT = 8091
DEFAULT_SENDGRID_HOST = "https://api.sendgrid.com"
DEFAULT_SENDGRID_FROM = "ShopFlow <pedidos@shopflow.example>"
# The SendGrid SDK call's socket timeout.
DEFAULT_SENDGRID_TIMEOUT_S = 10.0
# A send whose outcome is unknown is re-sent only if SendGrid's activity feed
# still shows nothing for its key after this long (the feed lags by minutes).
DEFAULT_SENDGRID_RECONCILE_GRACE_S = 600.0
# Housekeeping settles SendGrid sends left in doubt this often: half the grace period, so a
# row is settled (and its e-mail re-sent if it never arrived) soon after its grace ends.
DEFAULT_EMAIL_RECONCILE_EVERY_S = 5 * 60
# A known customer's cart idle this long gets one reminder (the original: 24 h).
DEFAULT_CART_IDLE_S = 24 * 3600
# --- supervision ---
# More than this many restarts within the window makes a supervisor give up (OTP MaxR/MaxT).
DEFAULT_SUPERVISOR_MAX_RESTARTS = 3
DEFAULT_SUPERVISOR_MAX_SECONDS = 5.0
# Restart back-off: base * 2**(n-1), capped; reset after a child ran quietly this long.
DEFAULT_RESTART_BACKOFF_BASE_S = 0.1
DEFAULT_RESTART_BACKOFF_MAX_S = 30.0
DEFAULT_RESTART_BACKOFF_RESET_S = 60.0
# A full mailbox makes senders wait this long ("block") or refuses at once ("fail").
DEFAULT_MAILBOX_OVERFLOW = "block"
DEFAULT_MAILBOX_PUT_TIMEOUT_S = 2.0
# Each process republishes its supervision tree to Redis this often; entries expire after the TTL.
DEFAULT_TREE_PUBLISH_INTERVAL_S = 5.0
DEFAULT_TREE_TTL_S = 15

# --- agents ---
# A current Claude model listed by the installed anthropic SDK (2.16); the
# original's model id has been retired. Any id the API accepts works here.
DEFAULT_LLM_MODEL = "claude-sonnet-5-5"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# One model call may take this long before it counts as failed.
DEFAULT_LLM_TIMEOUT_S = 20.0
# Retries of one model request (transport errors, 408/409/429/5xx/529 with their
# retry-after), made by the gateway within the request's deadline.
DEFAULT_LLM_MAX_RETRIES = 2
# Output cap of one answer; our tool answers are short JSON objects.
DEFAULT_LLM_MAX_OUTPUT_TOKENS = 1_024
# Over a rate limit a call waits ("wait") up to the max wait, or answers from
# the fallback at once ("fallback").
DEFAULT_LLM_ON_LIMIT = "wait"
DEFAULT_LLM_MAX_WAIT_S = 20.0
# One agent's whole model request (rate wait, attempts, backoff) ends by then and
# the agent answers from its fallback; never more than 3/4 of the actor ask timeout,
# nor of what the handler has left (the job's time limit, its ask's deadline).
DEFAULT_LLM_DEADLINE_S = 40.0
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
# --- web ---
# A signed access token is valid this long unless `shopflow token --ttl-s` says otherwise.
DEFAULT_TOKEN_TTL_S = 24 * 3600
# Events a WebSocket client may have waiting before it counts as a slow consumer and is closed.
DEFAULT_WS_SEND_QUEUE_MAX = 1_000
# ...and the bytes they may add up to (JSON frames are ASCII, so characters are bytes).
DEFAULT_WS_SEND_QUEUE_MAX_BYTES = 4 * 1024 * 1024
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


def _pairs(env: Mapping[str, str], name: str) -> tuple[tuple[str, float], ...]:
    """Parse ``queue=number,queue=number`` (per-queue thresholds) into sorted pairs."""
    raw = (env.get(name) or "").strip()
    pairs: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not key.strip() or number < 0:
            raise ConfigError(f"{name} must look like 'emails=500,inventory=2000', got {raw!r}")
        pairs[key.strip()] = number
    return tuple(sorted(pairs.items()))


def _fraction_pairs(env: Mapping[str, str], name: str) -> tuple[tuple[str, float], ...]:
    """:func:`_pairs` whose numbers are shares of attempts, so between 0 and 1."""
    pairs = _pairs(env, name)
    for key, number in pairs:
        if number > 1:
            raise ConfigError(f"{name} takes shares between 0 and 1 (emails=0.5), "
                              f"got {key}={number:g}")
    return pairs


def _pairs_text(pairs: tuple[tuple[str, float], ...]) -> str:
    """The ``queue=number,...`` form :func:`_pairs` reads."""
    return ",".join(f"{key}={value!r}" for key, value in pairs)


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


def _cron(env: Mapping[str, str], name: str, default: str) -> str:
    from runtime.errors import ValidationError
    from runtime.scheduling.cron import CronExpr  # leaf module: imports only runtime.errors

    value = env.get(name) or default
    try:
        CronExpr.parse(value)
    except ValidationError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def _check_job_sweep(settings: Settings) -> Settings:
    """Refuse a stall sweep that is not well within the heartbeat timeout.

    The job keeper writes each worker's heartbeat once per sweep interval; an
    interval near the timeout lets a live worker busy with a slow job look dead,
    and its job runs a second time elsewhere.
    """
    interval_ms = settings.job_sweep_interval_s * 1000
    if interval_ms * 2 >= settings.broker_heartbeat_timeout_ms:
        raise ConfigError(
            f"SHOPFLOW_JOB_SWEEP_INTERVAL_S ({settings.job_sweep_interval_s:g} s) must be less "
            f"than half of SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS "
            f"({settings.broker_heartbeat_timeout_ms} ms): each worker beats once per sweep "
            f"interval, so a live worker running a slow job would look dead and the job would "
            f"run twice")
    return settings


# The environment variable behind every setting: ``to_env`` writes each one, so a
# child process started with that environment reads back exactly the same Settings
# (tests/runtime/test_settings.py checks every field round-trips through from_env).
_ENV_NAMES: Mapping[str, str] = {
    "redis_url": "REDIS_URL",
    "database_url": "DATABASE_URL",
    "var_dir": "SHOPFLOW_VAR_DIR",
    "http_host": "SHOPFLOW_HTTP_HOST",
    "http_port": "SHOPFLOW_HTTP_PORT",
    "timezone": "SHOPFLOW_TIMEZONE",
    "embedded_redis_port": "SHOPFLOW_EMBEDDED_REDIS_PORT",
    "embedded_pg_port": "SHOPFLOW_EMBEDDED_PG_PORT",
    "job_attempts": "SHOPFLOW_JOB_ATTEMPTS",
    "job_backoff_ms": "SHOPFLOW_JOB_BACKOFF_MS",
    "job_infra_retries": "SHOPFLOW_JOB_INFRA_RETRIES",
    "api_processes": "SHOPFLOW_API_PROCESSES",
    "email_workers": "SHOPFLOW_EMAIL_WORKERS",
    "inventory_concurrency": "SHOPFLOW_INVENTORY_CONCURRENCY",
    "reservation_ttl_s": "SHOPFLOW_RESERVATION_TTL_S",
    "actor_ask_timeout_s": "SHOPFLOW_ACTOR_ASK_TIMEOUT_S",
    "worker_stop_s": "SHOPFLOW_WORKER_STOP_S",
    "mailbox_size": "SHOPFLOW_MAILBOX_SIZE",
    "broker_heartbeat_timeout_ms": "SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS",
    "job_sweep_interval_s": "SHOPFLOW_JOB_SWEEP_INTERVAL_S",
    "job_poison_deaths": "SHOPFLOW_JOB_POISON_DEATHS",
    "job_keep_completed": "SHOPFLOW_JOB_KEEP_COMPLETED",
    "job_keep_failed": "SHOPFLOW_JOB_KEEP_FAILED",
    "job_dedup_s": "SHOPFLOW_JOB_DEDUP_S",
    "job_limit_wait_ms": "SHOPFLOW_JOB_LIMIT_WAIT_MS",
    "worker_idle_timeout_ms": "SHOPFLOW_WORKER_IDLE_TIMEOUT_MS",
    "queue_max_length": "SHOPFLOW_QUEUE_MAX_LENGTH",
    "queue_max_lengths": "SHOPFLOW_QUEUE_MAX_LENGTHS",
    "queue_full_policy": "SHOPFLOW_QUEUE_FULL_POLICY",
    "queue_full_timeout_s": "SHOPFLOW_QUEUE_FULL_TIMEOUT_S",
    "outbox_poll_s": "SHOPFLOW_OUTBOX_POLL_S",
    "sendgrid_api_key": "SENDGRID_API_KEY",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "warehouse_url": "WAREHOUSE_URL",
    "alert_webhook_url": "ALERT_WEBHOOK_URL",
    "log_level": "SHOPFLOW_LOG_LEVEL",
    "namespace": "SHOPFLOW_NAMESPACE",
    "metrics_dir": "PROMETHEUS_MULTIPROC_DIR",
    "monitor_interval_s": "SHOPFLOW_MONITOR_INTERVAL_S",
    "monitor_backlog_threshold": "SHOPFLOW_MONITOR_BACKLOG_THRESHOLD",
    "monitor_backlog_thresholds": "SHOPFLOW_MONITOR_BACKLOG_THRESHOLDS",
    "monitor_oldest_age_threshold_s": "SHOPFLOW_MONITOR_OLDEST_AGE_THRESHOLD_S",
    "monitor_oldest_age_thresholds_s": "SHOPFLOW_MONITOR_OLDEST_AGE_THRESHOLDS_S",
    "monitor_failure_rate_threshold": "SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLD",
    "monitor_failure_rate_thresholds": "SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLDS",
    "monitor_failure_rate_window_s": "SHOPFLOW_MONITOR_FAILURE_RATE_WINDOW_S",
    "monitor_failure_rate_min_jobs": "SHOPFLOW_MONITOR_FAILURE_RATE_MIN_JOBS",
    "monitor_no_consumer_grace_s": "SHOPFLOW_MONITOR_NO_CONSUMER_GRACE_S",
    "monitor_no_consumer_graces_s": "SHOPFLOW_MONITOR_NO_CONSUMER_GRACES_S",
    "alert_webhook_timeout_s": "SHOPFLOW_ALERT_WEBHOOK_TIMEOUT_S",
    "alert_webhook_attempts": "SHOPFLOW_ALERT_WEBHOOK_ATTEMPTS",
    "alert_resolve_after_s": "SHOPFLOW_ALERT_RESOLVE_AFTER_S",
    "stock_sync_interval_s": "SHOPFLOW_STOCK_SYNC_INTERVAL_S",
    "stock_sync_batch_size": "SHOPFLOW_STOCK_SYNC_BATCH_SIZE",
    "stock_sync_concurrency": "SHOPFLOW_STOCK_SYNC_CONCURRENCY",
    "stock_sync_alert_intervals": "SHOPFLOW_STOCK_SYNC_ALERT_INTERVALS",
    "stock_sync_metrics_port": "SHOPFLOW_STOCK_SYNC_METRICS_PORT",
    "external_connect_timeout_s": "SHOPFLOW_EXTERNAL_CONNECT_TIMEOUT_S",
    "external_read_timeout_s": "SHOPFLOW_EXTERNAL_READ_TIMEOUT_S",
    "external_attempts": "SHOPFLOW_EXTERNAL_ATTEMPTS",
    "external_backoff_s": "SHOPFLOW_EXTERNAL_BACKOFF_S",
    "breaker_failures": "SHOPFLOW_BREAKER_FAILURES",
    "breaker_reset_s": "SHOPFLOW_BREAKER_RESET_S",
    "warehouse_token": "WAREHOUSE_TOKEN",
    "warehouse_sim_port": "SHOPFLOW_WAREHOUSE_SIM_PORT",
    "warehouse_sim_stock_file": "SHOPFLOW_WAREHOUSE_SIM_STOCK_FILE",
    "carrier_url": "CARRIER_URL",
    "carrier_token": "CARRIER_TOKEN",
    "carrier_sim_port": "SHOPFLOW_CARRIER_SIM_PORT",
    "sendgrid_host": "SENDGRID_HOST",
    "sendgrid_from": "SENDGRID_FROM",
    "sendgrid_timeout_s": "SENDGRID_TIMEOUT_S",
    "sendgrid_reconcile_grace_s": "SENDGRID_RECONCILE_GRACE_S",
    "email_reconcile_every_s": "SHOPFLOW_EMAIL_RECONCILE_EVERY_S",
    "sendgrid_template_order_confirmation": "SENDGRID_TEMPLATE_ORDER_CONFIRMATION",
    "sendgrid_template_cart_reminder": "SENDGRID_TEMPLATE_CART_REMINDER",
    "sendgrid_template_daily_report": "SENDGRID_TEMPLATE_DAILY_REPORT",
    "cart_idle_s": "SHOPFLOW_CART_IDLE_S",
    "anthropic_base_url": "ANTHROPIC_BASE_URL",
    "llm_model": "SHOPFLOW_LLM_MODEL",
    "llm_timeout_s": "SHOPFLOW_LLM_TIMEOUT_S",
    "llm_max_retries": "SHOPFLOW_LLM_MAX_RETRIES",
    "llm_max_output_tokens": "SHOPFLOW_LLM_MAX_OUTPUT_TOKENS",
    "llm_on_limit": "SHOPFLOW_LLM_ON_LIMIT",
    "llm_max_wait_s": "SHOPFLOW_LLM_MAX_WAIT_S",
    "llm_deadline_s": "SHOPFLOW_LLM_DEADLINE_S",
    "llm_input_usd_per_mtok": "SHOPFLOW_LLM_INPUT_USD_PER_MTOK",
    "llm_output_usd_per_mtok": "SHOPFLOW_LLM_OUTPUT_USD_PER_MTOK",
    "llm_circuit_failures": "SHOPFLOW_LLM_CIRCUIT_FAILURES",
    "llm_circuit_cooldown_s": "SHOPFLOW_LLM_CIRCUIT_COOLDOWN_S",
    "recommendation_rpm": "SHOPFLOW_RECOMMENDATION_RPM",
    "recommendation_tpm": "SHOPFLOW_RECOMMENDATION_TPM",
    "recommendation_daily_tokens": "SHOPFLOW_RECOMMENDATION_DAILY_TOKENS",
    "support_rpm": "SHOPFLOW_SUPPORT_RPM",
    "support_tpm": "SHOPFLOW_SUPPORT_TPM",
    "support_daily_tokens": "SHOPFLOW_SUPPORT_DAILY_TOKENS",
    "moderation_rpm": "SHOPFLOW_MODERATION_RPM",
    "moderation_tpm": "SHOPFLOW_MODERATION_TPM",
    "moderation_daily_tokens": "SHOPFLOW_MODERATION_DAILY_TOKENS",
    "recommendation_count": "SHOPFLOW_RECOMMENDATION_COUNT",
    "recommendation_candidates": "SHOPFLOW_RECOMMENDATION_CANDIDATES",
    "recommendation_cache_ttl_s": "SHOPFLOW_RECOMMENDATION_CACHE_TTL_S",
    "recommendation_fallback_ttl_s": "SHOPFLOW_RECOMMENDATION_FALLBACK_TTL_S",
    "recommendation_active_days": "SHOPFLOW_RECOMMENDATION_ACTIVE_DAYS",
    "recommendation_refresh_batch": "SHOPFLOW_RECOMMENDATION_REFRESH_BATCH",
    "support_recent_orders": "SHOPFLOW_SUPPORT_RECENT_ORDERS",
    "moderation_min_confidence": "SHOPFLOW_MODERATION_MIN_CONFIDENCE",
    "schedulers": "SHOPFLOW_SCHEDULERS",
    "scheduler_tick_s": "SHOPFLOW_SCHEDULER_TICK_S",
    "scheduler_lease_s": "SHOPFLOW_SCHEDULER_LEASE_S",
    "scheduler_misfire_grace_s": "SHOPFLOW_SCHEDULER_MISFIRE_GRACE_S",
    "scheduler_resend_after_s": "SHOPFLOW_SCHEDULER_RESEND_AFTER_S",
    "sales_report_cron": "SHOPFLOW_SALES_REPORT_CRON",
    "daily_report_cron": "SHOPFLOW_DAILY_REPORT_CRON",
    "cart_cleanup_every_s": "SHOPFLOW_CART_CLEANUP_EVERY_S",
    "reservation_release_every_s": "SHOPFLOW_RESERVATION_RELEASE_EVERY_S",
    "cron_heartbeat_every_s": "SHOPFLOW_CRON_HEARTBEAT_EVERY_S",
    "cron_heartbeat_ttl_s": "SHOPFLOW_CRON_HEARTBEAT_TTL_S",
    "cart_max_age_s": "SHOPFLOW_CART_MAX_AGE_S",
    "reservation_release_batch": "SHOPFLOW_RESERVATION_RELEASE_BATCH",
    "token_secret": "SHOPFLOW_TOKEN_SECRET",
    "token_ttl_s": "SHOPFLOW_TOKEN_TTL_S",
    "ws_send_queue_max": "SHOPFLOW_WS_SEND_QUEUE_MAX",
    "ws_send_queue_max_bytes": "SHOPFLOW_WS_SEND_QUEUE_MAX_BYTES",
    "ws_heartbeat_s": "SHOPFLOW_WS_HEARTBEAT_S",
    "ws_max_frame_bytes": "SHOPFLOW_WS_MAX_FRAME_BYTES",
    "notifier_block_ms": "SHOPFLOW_NOTIFIER_BLOCK_MS",
    "supervisor_max_restarts": "SHOPFLOW_SUPERVISOR_MAX_RESTARTS",
    "supervisor_max_seconds": "SHOPFLOW_SUPERVISOR_MAX_SECONDS",
    "restart_backoff_base_s": "SHOPFLOW_RESTART_BACKOFF_BASE_S",
    "restart_backoff_max_s": "SHOPFLOW_RESTART_BACKOFF_MAX_S",
    "restart_backoff_reset_s": "SHOPFLOW_RESTART_BACKOFF_RESET_S",
    "mailbox_overflow": "SHOPFLOW_MAILBOX_OVERFLOW",
    "mailbox_put_timeout_s": "SHOPFLOW_MAILBOX_PUT_TIMEOUT_S",
    "tree_publish_interval_s": "SHOPFLOW_TREE_PUBLISH_INTERVAL_S",
    "tree_ttl_s": "SHOPFLOW_TREE_TTL_S",
}


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
    job_infra_retries: int = DEFAULT_JOB_INFRA_RETRIES
    api_processes: int = DEFAULT_API_PROCESSES
    email_workers: int = DEFAULT_EMAIL_WORKERS
    inventory_concurrency: int = DEFAULT_INVENTORY_CONCURRENCY
    reservation_ttl_s: int = DEFAULT_RESERVATION_TTL_S
    actor_ask_timeout_s: float = DEFAULT_ACTOR_ASK_TIMEOUT_S
    worker_stop_s: float = DEFAULT_WORKER_STOP_S
    mailbox_size: int = DEFAULT_MAILBOX_SIZE
    broker_heartbeat_timeout_ms: int = DEFAULT_BROKER_HEARTBEAT_TIMEOUT_MS
    job_sweep_interval_s: float = DEFAULT_JOB_SWEEP_INTERVAL_S
    job_poison_deaths: int = DEFAULT_JOB_POISON_DEATHS
    job_keep_completed: int = DEFAULT_JOB_KEEP_COMPLETED
    job_keep_failed: int = DEFAULT_JOB_KEEP_FAILED
    job_dedup_s: int = DEFAULT_JOB_DEDUP_S
    job_limit_wait_ms: int = DEFAULT_JOB_LIMIT_WAIT_MS
    worker_idle_timeout_ms: int = DEFAULT_WORKER_IDLE_TIMEOUT_MS
    queue_max_length: int = DEFAULT_QUEUE_MAX_LENGTH
    # Per-queue bounds: ((queue, max), ...), sorted; tuples keep Settings hashable.
    queue_max_lengths: tuple[tuple[str, float], ...] = ()
    queue_full_policy: str = DEFAULT_QUEUE_FULL_POLICY
    queue_full_timeout_s: float = DEFAULT_QUEUE_FULL_TIMEOUT_S
    outbox_poll_s: float = DEFAULT_OUTBOX_POLL_S
    sendgrid_api_key: str | None = None
    anthropic_api_key: str | None = None
    warehouse_url: str | None = None
    alert_webhook_url: str | None = None
    log_level: str = "INFO"
    namespace: str = "shopflow"
    # --- observability ---
    # Prometheus multiprocess directory; None means ``var_dir / "metrics"``.
    metrics_dir: Path | None = None
    monitor_interval_s: float = DEFAULT_MONITOR_INTERVAL_S
    monitor_backlog_threshold: int = DEFAULT_MONITOR_BACKLOG_THRESHOLD
    # Per-queue overrides: ((queue, threshold), ...), sorted; tuples keep Settings hashable.
    monitor_backlog_thresholds: tuple[tuple[str, float], ...] = ()
    monitor_oldest_age_threshold_s: float = DEFAULT_MONITOR_OLDEST_AGE_THRESHOLD_S
    monitor_oldest_age_thresholds_s: tuple[tuple[str, float], ...] = ()
    monitor_failure_rate_threshold: float = DEFAULT_MONITOR_FAILURE_RATE_THRESHOLD
    monitor_failure_rate_thresholds: tuple[tuple[str, float], ...] = ()
    monitor_failure_rate_window_s: int = DEFAULT_MONITOR_FAILURE_RATE_WINDOW_S
    monitor_failure_rate_min_jobs: int = DEFAULT_MONITOR_FAILURE_RATE_MIN_JOBS
    monitor_no_consumer_grace_s: float = DEFAULT_MONITOR_NO_CONSUMER_GRACE_S
    monitor_no_consumer_graces_s: tuple[tuple[str, float], ...] = ()
    alert_webhook_timeout_s: float = DEFAULT_ALERT_WEBHOOK_TIMEOUT_S
    alert_webhook_attempts: int = DEFAULT_ALERT_WEBHOOK_ATTEMPTS
    alert_resolve_after_s: int = DEFAULT_ALERT_RESOLVE_AFTER_S
    # --- externals (issue 7) ---
    stock_sync_interval_s: float = DEFAULT_STOCK_SYNC_INTERVAL_S
    stock_sync_batch_size: int = DEFAULT_STOCK_SYNC_BATCH_SIZE
    stock_sync_concurrency: int = DEFAULT_STOCK_SYNC_CONCURRENCY
    stock_sync_alert_intervals: int = DEFAULT_STOCK_SYNC_ALERT_INTERVALS
    stock_sync_metrics_port: int = DEFAULT_STOCK_SYNC_METRICS_PORT
    external_connect_timeout_s: float = DEFAULT_EXTERNAL_CONNECT_TIMEOUT_S
    external_read_timeout_s: float = DEFAULT_EXTERNAL_READ_TIMEOUT_S
    external_attempts: int = DEFAULT_EXTERNAL_ATTEMPTS
    external_backoff_s: float = DEFAULT_EXTERNAL_BACKOFF_S
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_reset_s: float = DEFAULT_BREAKER_RESET_S
    warehouse_token: str | None = None
    warehouse_sim_port: int = DEFAULT_WAREHOUSE_SIM_PORT
    # JSON {external_id: quantity} the simulator starts with (``shopflow up`` writes it for
    # --stock-multiplier), so no sync can apply other levels first; None: its own levels.
    warehouse_sim_stock_file: Path | None = None
    carrier_url: str | None = None
    carrier_token: str | None = None
    carrier_sim_port: int = DEFAULT_CARRIER_SIM_PORT
    sendgrid_host: str = DEFAULT_SENDGRID_HOST
    sendgrid_from: str = DEFAULT_SENDGRID_FROM
    sendgrid_timeout_s: float = DEFAULT_SENDGRID_TIMEOUT_S
    sendgrid_reconcile_grace_s: float = DEFAULT_SENDGRID_RECONCILE_GRACE_S
    email_reconcile_every_s: int = DEFAULT_EMAIL_RECONCILE_EVERY_S
    sendgrid_template_order_confirmation: str | None = None
    sendgrid_template_cart_reminder: str | None = None
    sendgrid_template_daily_report: str | None = None
    cart_idle_s: int = DEFAULT_CART_IDLE_S
    # --- agents ---
    anthropic_base_url: str = DEFAULT_ANTHROPIC_BASE_URL
    llm_model: str = DEFAULT_LLM_MODEL
    llm_timeout_s: float = DEFAULT_LLM_TIMEOUT_S
    llm_max_retries: int = DEFAULT_LLM_MAX_RETRIES
    llm_max_output_tokens: int = DEFAULT_LLM_MAX_OUTPUT_TOKENS
    llm_on_limit: str = DEFAULT_LLM_ON_LIMIT
    llm_max_wait_s: float = DEFAULT_LLM_MAX_WAIT_S
    llm_deadline_s: float = DEFAULT_LLM_DEADLINE_S
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
    # --- scheduling ---
    schedulers: int = DEFAULT_SCHEDULERS
    scheduler_tick_s: float = DEFAULT_SCHEDULER_TICK_S
    scheduler_lease_s: float = DEFAULT_SCHEDULER_LEASE_S
    scheduler_misfire_grace_s: float = DEFAULT_SCHEDULER_MISFIRE_GRACE_S
    scheduler_resend_after_s: float = DEFAULT_SCHEDULER_RESEND_AFTER_S
    sales_report_cron: str = DEFAULT_SALES_REPORT_CRON
    daily_report_cron: str = DEFAULT_DAILY_REPORT_CRON
    cart_cleanup_every_s: int = DEFAULT_CART_CLEANUP_EVERY_S
    reservation_release_every_s: int = DEFAULT_RESERVATION_RELEASE_EVERY_S
    cron_heartbeat_every_s: int = DEFAULT_CRON_HEARTBEAT_EVERY_S
    cron_heartbeat_ttl_s: int = DEFAULT_CRON_HEARTBEAT_TTL_S
    cart_max_age_s: int = DEFAULT_CART_MAX_AGE_S
    reservation_release_batch: int = DEFAULT_RESERVATION_RELEASE_BATCH
    # --- web ---
    token_secret: str | None = None
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S
    ws_send_queue_max: int = DEFAULT_WS_SEND_QUEUE_MAX
    ws_send_queue_max_bytes: int = DEFAULT_WS_SEND_QUEUE_MAX_BYTES
    ws_heartbeat_s: float = DEFAULT_WS_HEARTBEAT_S
    ws_max_frame_bytes: int = DEFAULT_WS_MAX_FRAME_BYTES
    notifier_block_ms: int = DEFAULT_NOTIFIER_BLOCK_MS
    # --- supervision ---
    supervisor_max_restarts: int = DEFAULT_SUPERVISOR_MAX_RESTARTS
    supervisor_max_seconds: float = DEFAULT_SUPERVISOR_MAX_SECONDS
    restart_backoff_base_s: float = DEFAULT_RESTART_BACKOFF_BASE_S
    restart_backoff_max_s: float = DEFAULT_RESTART_BACKOFF_MAX_S
    restart_backoff_reset_s: float = DEFAULT_RESTART_BACKOFF_RESET_S
    mailbox_overflow: str = DEFAULT_MAILBOX_OVERFLOW
    mailbox_put_timeout_s: float = DEFAULT_MAILBOX_PUT_TIMEOUT_S
    tree_publish_interval_s: float = DEFAULT_TREE_PUBLISH_INTERVAL_S
    tree_ttl_s: int = DEFAULT_TREE_TTL_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``env`` (``os.environ`` by default), failing on bad values."""
        e = os.environ if env is None else env
        return _check_job_sweep(cls(
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
            job_infra_retries=_int(e, "SHOPFLOW_JOB_INFRA_RETRIES", DEFAULT_JOB_INFRA_RETRIES, 0),
            api_processes=_int(e, "SHOPFLOW_API_PROCESSES", DEFAULT_API_PROCESSES, 1),
            email_workers=_int(e, "SHOPFLOW_EMAIL_WORKERS", DEFAULT_EMAIL_WORKERS, 1),
            inventory_concurrency=_int(
                e, "SHOPFLOW_INVENTORY_CONCURRENCY", DEFAULT_INVENTORY_CONCURRENCY, 1
            ),
            reservation_ttl_s=_int(e, "SHOPFLOW_RESERVATION_TTL_S", DEFAULT_RESERVATION_TTL_S, 1),
            actor_ask_timeout_s=_float(e, "SHOPFLOW_ACTOR_ASK_TIMEOUT_S", DEFAULT_ACTOR_ASK_TIMEOUT_S),
            worker_stop_s=_float(e, "SHOPFLOW_WORKER_STOP_S", DEFAULT_WORKER_STOP_S),
            mailbox_size=_int(e, "SHOPFLOW_MAILBOX_SIZE", DEFAULT_MAILBOX_SIZE, 1),
            broker_heartbeat_timeout_ms=_int(
                e, "SHOPFLOW_BROKER_HEARTBEAT_TIMEOUT_MS", DEFAULT_BROKER_HEARTBEAT_TIMEOUT_MS, 1000
            ),
            job_sweep_interval_s=_float(e, "SHOPFLOW_JOB_SWEEP_INTERVAL_S",
                                        DEFAULT_JOB_SWEEP_INTERVAL_S),
            job_poison_deaths=_int(e, "SHOPFLOW_JOB_POISON_DEATHS", DEFAULT_JOB_POISON_DEATHS, 1),
            job_keep_completed=_int(e, "SHOPFLOW_JOB_KEEP_COMPLETED", DEFAULT_JOB_KEEP_COMPLETED, 0),
            job_keep_failed=_int(e, "SHOPFLOW_JOB_KEEP_FAILED", DEFAULT_JOB_KEEP_FAILED, 0),
            job_dedup_s=_int(e, "SHOPFLOW_JOB_DEDUP_S", DEFAULT_JOB_DEDUP_S, 0),
            job_limit_wait_ms=_int(e, "SHOPFLOW_JOB_LIMIT_WAIT_MS", DEFAULT_JOB_LIMIT_WAIT_MS, 0),
            worker_idle_timeout_ms=_int(e, "SHOPFLOW_WORKER_IDLE_TIMEOUT_MS",
                                        DEFAULT_WORKER_IDLE_TIMEOUT_MS, 10),
            queue_max_length=_int(e, "SHOPFLOW_QUEUE_MAX_LENGTH", DEFAULT_QUEUE_MAX_LENGTH, 0),
            queue_max_lengths=_pairs(e, "SHOPFLOW_QUEUE_MAX_LENGTHS"),
            queue_full_policy=_choice(e, "SHOPFLOW_QUEUE_FULL_POLICY", DEFAULT_QUEUE_FULL_POLICY,
                                      ("block", "fail")),
            queue_full_timeout_s=_float(e, "SHOPFLOW_QUEUE_FULL_TIMEOUT_S",
                                        DEFAULT_QUEUE_FULL_TIMEOUT_S),
            outbox_poll_s=_float(e, "SHOPFLOW_OUTBOX_POLL_S", DEFAULT_OUTBOX_POLL_S),
            sendgrid_api_key=_opt(e, "SENDGRID_API_KEY"),
            anthropic_api_key=_opt(e, "ANTHROPIC_API_KEY"),
            warehouse_url=_opt(e, "WAREHOUSE_URL"),
            alert_webhook_url=_opt(e, "ALERT_WEBHOOK_URL"),
            log_level=(e.get("SHOPFLOW_LOG_LEVEL") or "INFO").upper(),
            namespace=e.get("SHOPFLOW_NAMESPACE") or "shopflow",
            # --- observability ---
            metrics_dir=Path(e["PROMETHEUS_MULTIPROC_DIR"]).resolve()
            if e.get("PROMETHEUS_MULTIPROC_DIR") else None,
            monitor_interval_s=_float(e, "SHOPFLOW_MONITOR_INTERVAL_S", DEFAULT_MONITOR_INTERVAL_S),
            monitor_backlog_threshold=_int(
                e, "SHOPFLOW_MONITOR_BACKLOG_THRESHOLD", DEFAULT_MONITOR_BACKLOG_THRESHOLD, 1
            ),
            monitor_backlog_thresholds=_pairs(e, "SHOPFLOW_MONITOR_BACKLOG_THRESHOLDS"),
            monitor_oldest_age_threshold_s=_float(
                e, "SHOPFLOW_MONITOR_OLDEST_AGE_THRESHOLD_S", DEFAULT_MONITOR_OLDEST_AGE_THRESHOLD_S
            ),
            monitor_oldest_age_thresholds_s=_pairs(e, "SHOPFLOW_MONITOR_OLDEST_AGE_THRESHOLDS_S"),
            monitor_failure_rate_threshold=_float(
                e, "SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLD", DEFAULT_MONITOR_FAILURE_RATE_THRESHOLD
            ),
            monitor_failure_rate_thresholds=_fraction_pairs(
                e, "SHOPFLOW_MONITOR_FAILURE_RATE_THRESHOLDS"),
            monitor_failure_rate_window_s=_int(
                e, "SHOPFLOW_MONITOR_FAILURE_RATE_WINDOW_S", DEFAULT_MONITOR_FAILURE_RATE_WINDOW_S, 60
            ),
            monitor_failure_rate_min_jobs=_int(
                e, "SHOPFLOW_MONITOR_FAILURE_RATE_MIN_JOBS", DEFAULT_MONITOR_FAILURE_RATE_MIN_JOBS, 1
            ),
            monitor_no_consumer_grace_s=_float(
                e, "SHOPFLOW_MONITOR_NO_CONSUMER_GRACE_S", DEFAULT_MONITOR_NO_CONSUMER_GRACE_S
            ),
            monitor_no_consumer_graces_s=_pairs(e, "SHOPFLOW_MONITOR_NO_CONSUMER_GRACES_S"),
            alert_webhook_timeout_s=_float(
                e, "SHOPFLOW_ALERT_WEBHOOK_TIMEOUT_S", DEFAULT_ALERT_WEBHOOK_TIMEOUT_S
            ),
            alert_webhook_attempts=_int(
                e, "SHOPFLOW_ALERT_WEBHOOK_ATTEMPTS", DEFAULT_ALERT_WEBHOOK_ATTEMPTS, 1
            ),
            alert_resolve_after_s=_int(
                e, "SHOPFLOW_ALERT_RESOLVE_AFTER_S", DEFAULT_ALERT_RESOLVE_AFTER_S, 0
            ),
            # --- externals (issue 7) ---
            stock_sync_interval_s=_float(e, "SHOPFLOW_STOCK_SYNC_INTERVAL_S",
                                         DEFAULT_STOCK_SYNC_INTERVAL_S),
            stock_sync_batch_size=_int(e, "SHOPFLOW_STOCK_SYNC_BATCH_SIZE",
                                       DEFAULT_STOCK_SYNC_BATCH_SIZE, 1),
            stock_sync_concurrency=_int(e, "SHOPFLOW_STOCK_SYNC_CONCURRENCY",
                                        DEFAULT_STOCK_SYNC_CONCURRENCY, 1),
            stock_sync_alert_intervals=_int(e, "SHOPFLOW_STOCK_SYNC_ALERT_INTERVALS",
                                            DEFAULT_STOCK_SYNC_ALERT_INTERVALS, 1),
            stock_sync_metrics_port=_int(e, "SHOPFLOW_STOCK_SYNC_METRICS_PORT",
                                         DEFAULT_STOCK_SYNC_METRICS_PORT, 0),
            external_connect_timeout_s=_float(e, "SHOPFLOW_EXTERNAL_CONNECT_TIMEOUT_S",
                                              DEFAULT_EXTERNAL_CONNECT_TIMEOUT_S),
            external_read_timeout_s=_float(e, "SHOPFLOW_EXTERNAL_READ_TIMEOUT_S",
                                           DEFAULT_EXTERNAL_READ_TIMEOUT_S),
            external_attempts=_int(e, "SHOPFLOW_EXTERNAL_ATTEMPTS", DEFAULT_EXTERNAL_ATTEMPTS, 1),
            external_backoff_s=_float(e, "SHOPFLOW_EXTERNAL_BACKOFF_S", DEFAULT_EXTERNAL_BACKOFF_S),
            breaker_failures=_int(e, "SHOPFLOW_BREAKER_FAILURES", DEFAULT_BREAKER_FAILURES, 1),
            breaker_reset_s=_float(e, "SHOPFLOW_BREAKER_RESET_S", DEFAULT_BREAKER_RESET_S),
            warehouse_token=_opt(e, "WAREHOUSE_TOKEN"),
            warehouse_sim_port=_int(e, "SHOPFLOW_WAREHOUSE_SIM_PORT", DEFAULT_WAREHOUSE_SIM_PORT, 1),
            warehouse_sim_stock_file=Path(e["SHOPFLOW_WAREHOUSE_SIM_STOCK_FILE"]).resolve()
            if e.get("SHOPFLOW_WAREHOUSE_SIM_STOCK_FILE") else None,
            carrier_url=_opt(e, "CARRIER_URL"),
            carrier_token=_opt(e, "CARRIER_TOKEN"),
            carrier_sim_port=_int(e, "SHOPFLOW_CARRIER_SIM_PORT", DEFAULT_CARRIER_SIM_PORT, 1),
            sendgrid_host=_opt(e, "SENDGRID_HOST") or DEFAULT_SENDGRID_HOST,
            sendgrid_from=_opt(e, "SENDGRID_FROM") or DEFAULT_SENDGRID_FROM,
            sendgrid_timeout_s=_float(e, "SENDGRID_TIMEOUT_S", DEFAULT_SENDGRID_TIMEOUT_S),
            sendgrid_reconcile_grace_s=_float(e, "SENDGRID_RECONCILE_GRACE_S",
                                              DEFAULT_SENDGRID_RECONCILE_GRACE_S),
            email_reconcile_every_s=_int(e, "SHOPFLOW_EMAIL_RECONCILE_EVERY_S",
                                         DEFAULT_EMAIL_RECONCILE_EVERY_S, 1),
            sendgrid_template_order_confirmation=_opt(e, "SENDGRID_TEMPLATE_ORDER_CONFIRMATION"),
            sendgrid_template_cart_reminder=_opt(e, "SENDGRID_TEMPLATE_CART_REMINDER"),
            sendgrid_template_daily_report=_opt(e, "SENDGRID_TEMPLATE_DAILY_REPORT"),
            cart_idle_s=_int(e, "SHOPFLOW_CART_IDLE_S", DEFAULT_CART_IDLE_S, 1),
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
            llm_deadline_s=_float(e, "SHOPFLOW_LLM_DEADLINE_S", DEFAULT_LLM_DEADLINE_S),
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
            # --- scheduling ---
            schedulers=_int(e, "SHOPFLOW_SCHEDULERS", DEFAULT_SCHEDULERS, 1),
            scheduler_tick_s=_float(e, "SHOPFLOW_SCHEDULER_TICK_S", DEFAULT_SCHEDULER_TICK_S),
            scheduler_lease_s=_float(e, "SHOPFLOW_SCHEDULER_LEASE_S", DEFAULT_SCHEDULER_LEASE_S),
            scheduler_misfire_grace_s=_float(
                e, "SHOPFLOW_SCHEDULER_MISFIRE_GRACE_S", DEFAULT_SCHEDULER_MISFIRE_GRACE_S
            ),
            scheduler_resend_after_s=_float(
                e, "SHOPFLOW_SCHEDULER_RESEND_AFTER_S", DEFAULT_SCHEDULER_RESEND_AFTER_S
            ),
            sales_report_cron=_cron(e, "SHOPFLOW_SALES_REPORT_CRON", DEFAULT_SALES_REPORT_CRON),
            daily_report_cron=_cron(e, "SHOPFLOW_DAILY_REPORT_CRON", DEFAULT_DAILY_REPORT_CRON),
            cart_cleanup_every_s=_int(
                e, "SHOPFLOW_CART_CLEANUP_EVERY_S", DEFAULT_CART_CLEANUP_EVERY_S, 1
            ),
            reservation_release_every_s=_int(
                e, "SHOPFLOW_RESERVATION_RELEASE_EVERY_S", DEFAULT_RESERVATION_RELEASE_EVERY_S, 1
            ),
            cron_heartbeat_every_s=_int(
                e, "SHOPFLOW_CRON_HEARTBEAT_EVERY_S", DEFAULT_CRON_HEARTBEAT_EVERY_S, 1
            ),
            cron_heartbeat_ttl_s=_int(
                e, "SHOPFLOW_CRON_HEARTBEAT_TTL_S", DEFAULT_CRON_HEARTBEAT_TTL_S, 1
            ),
            cart_max_age_s=_int(e, "SHOPFLOW_CART_MAX_AGE_S", DEFAULT_CART_MAX_AGE_S, 1),
            reservation_release_batch=_int(
                e, "SHOPFLOW_RESERVATION_RELEASE_BATCH", DEFAULT_RESERVATION_RELEASE_BATCH, 1
            ),
            # --- web ---
            token_secret=_opt(e, "SHOPFLOW_TOKEN_SECRET"),
            token_ttl_s=_int(e, "SHOPFLOW_TOKEN_TTL_S", DEFAULT_TOKEN_TTL_S, 1),
            ws_send_queue_max=_int(e, "SHOPFLOW_WS_SEND_QUEUE_MAX", DEFAULT_WS_SEND_QUEUE_MAX, 1),
            ws_send_queue_max_bytes=_int(
                e, "SHOPFLOW_WS_SEND_QUEUE_MAX_BYTES", DEFAULT_WS_SEND_QUEUE_MAX_BYTES, 1024
            ),
            ws_heartbeat_s=_float(e, "SHOPFLOW_WS_HEARTBEAT_S", DEFAULT_WS_HEARTBEAT_S),
            ws_max_frame_bytes=_int(
                e, "SHOPFLOW_WS_MAX_FRAME_BYTES", DEFAULT_WS_MAX_FRAME_BYTES, 1024
            ),
            notifier_block_ms=_int(e, "SHOPFLOW_NOTIFIER_BLOCK_MS", DEFAULT_NOTIFIER_BLOCK_MS, 10),
            # --- supervision ---
            supervisor_max_restarts=_int(
                e, "SHOPFLOW_SUPERVISOR_MAX_RESTARTS", DEFAULT_SUPERVISOR_MAX_RESTARTS, 0),
            supervisor_max_seconds=_float(
                e, "SHOPFLOW_SUPERVISOR_MAX_SECONDS", DEFAULT_SUPERVISOR_MAX_SECONDS),
            restart_backoff_base_s=_float(
                e, "SHOPFLOW_RESTART_BACKOFF_BASE_S", DEFAULT_RESTART_BACKOFF_BASE_S),
            restart_backoff_max_s=_float(
                e, "SHOPFLOW_RESTART_BACKOFF_MAX_S", DEFAULT_RESTART_BACKOFF_MAX_S),
            restart_backoff_reset_s=_float(
                e, "SHOPFLOW_RESTART_BACKOFF_RESET_S", DEFAULT_RESTART_BACKOFF_RESET_S),
            mailbox_overflow=_choice(
                e, "SHOPFLOW_MAILBOX_OVERFLOW", DEFAULT_MAILBOX_OVERFLOW, ("block", "fail")),
            mailbox_put_timeout_s=_float(
                e, "SHOPFLOW_MAILBOX_PUT_TIMEOUT_S", DEFAULT_MAILBOX_PUT_TIMEOUT_S),
            tree_publish_interval_s=_float(
                e, "SHOPFLOW_TREE_PUBLISH_INTERVAL_S", DEFAULT_TREE_PUBLISH_INTERVAL_S),
            tree_ttl_s=_int(e, "SHOPFLOW_TREE_TTL_S", DEFAULT_TREE_TTL_S, 1),
        ))

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process read these same settings.

        Every setting is written, so a setting changed in code (``replace``)
        reaches the children too, not only the ones that came from the
        environment. A setting that is None is left out (its variable unset
        means None), because some libraries read their variable themselves
        and treat an empty value differently from none.
        """
        env: dict[str, str] = {}
        for name, variable in _ENV_NAMES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, tuple):
                env[variable] = _pairs_text(value)
            else:
                env[variable] = str(value)
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
