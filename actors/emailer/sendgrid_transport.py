"""E-mail through SendGrid's v3 mail send API, on the official ``sendgrid`` SDK.

**One e-mail per logical key.** SendGrid has no idempotency key of its own,
so the transport keeps a ledger (table ``email_provider_sends``) and stamps
every message with ``custom_args.idempotency_key``:

1. *Intent before the call*: the key's row is set to ``sending`` (created, or
   moved there from ``not_sent``/``rejected``) in one statement; a row that is
   ``accepted`` is answered from the ledger without calling SendGrid.
2. *Outcome after*: 202 -> ``accepted`` (with ``X-Message-Id``). A definite
   refusal (429, 5xx, connection refused, the request never fully sent) ->
   ``not_sent``, a transient error. A 4xx such as a bad address or a bad key
   -> ``rejected``, a :class:`PermanentJobError` that is not retried.
3. *No answer* (timeout or reset after the request went out) leaves the row
   ``sending``: SendGrid may have accepted it. The call raises
   :class:`OutcomeUnknown` (transient), and the retry **reconciles** before
   sending: it asks SendGrid's Email Activity API for a message carrying the
   key. Found -> ``accepted``, nothing is re-sent. Not found -> it waits
   (``OutcomeUnknown`` again) until ``reconcile_grace_s`` has passed since
   the last attempt, because the activity feed lags; only then is the e-mail
   sent again. ``OutcomeUnknown.retry_after_s`` says when that will be.
4. If the e-mail's job runs out of retries first, the housekeeping sweep
   :meth:`SendGridTransport.reconcile_stale` settles rows left ``sending``
   past the grace period (``accepted`` or ``not_sent``), so the next send of
   that key does the right thing.

The honest limits: if SendGrid accepted a message but its activity feed still
does not show it after the grace period, the customer gets it twice; the
grace period (default 10 min) makes that rare, not impossible. The Activity
API is a paid add-on: without it (401/403/404 on the lookup) an unknown
outcome is never re-sent, the call raises a PermanentJobError and the row
stays ``sending`` for staff to check: at most once rather than twice.

The SDK is synchronous (urllib); each call runs in a worker thread with the
SDK's socket timeout, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from python_http_client.exceptions import HTTPError as SendGridHTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Content, CustomArg, From, Mail, TemplateId, To

from actors.emailer.transports import OutgoingEmail, SendResult
from runtime.circuit import CircuitBreaker
from runtime.errors import (
    ConfigError,
    ExternalServiceError,
    OutcomeUnknown,
    PermanentJobError,
    TransientJobError,
)
from runtime.settings import Settings

log = logging.getLogger(__name__)

PROVIDER = "sendgrid"
# The custom arg that carries the logical key into SendGrid (and its activity feed).
IDEMPOTENCY_ARG = "idempotency_key"
# Logical template names the emailer uses, mapped to SendGrid dynamic template ids by settings.
TEMPLATE_ORDER_CONFIRMATION = "order_confirmation"
TEMPLATE_CART_REMINDER = "cart_reminder"
TEMPLATE_DAILY_REPORT = "daily_report"
# Statuses that mean "not accepted, try later" rather than "your request is wrong".
_RETRY_LATER = frozenset({408, 429})


@dataclass(frozen=True)
class SendGridConfig:
    """Everything the transport needs to know, from settings."""

    api_key: str
    from_email: str
    host: str = "https://api.sendgrid.com"
    timeout_s: float = 10.0
    reconcile_grace_s: float = 600.0
    templates: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> SendGridConfig | None:
        """The config, or None when no SENDGRID_API_KEY is set (the outbox transport is used)."""
        if not settings.sendgrid_api_key:
            return None
        templates = {
            TEMPLATE_ORDER_CONFIRMATION: settings.sendgrid_template_order_confirmation,
            TEMPLATE_CART_REMINDER: settings.sendgrid_template_cart_reminder,
            TEMPLATE_DAILY_REPORT: settings.sendgrid_template_daily_report,
        }
        return cls(api_key=settings.sendgrid_api_key, from_email=settings.sendgrid_from,
                   host=settings.sendgrid_host, timeout_s=settings.sendgrid_timeout_s,
                   reconcile_grace_s=settings.sendgrid_reconcile_grace_s,
                   templates={k: v for k, v in templates.items() if v})


def build_mail(email: OutgoingEmail, config: SendGridConfig) -> dict[str, Any]:
    """The v3 mail-send JSON for ``email``: a dynamic template when one is configured for it.

    Without a configured template id the e-mail goes out with its own
    subject, text and HTML, so a missing setting degrades to plain content
    instead of failing.
    """
    template_id = config.templates.get(email.template) if email.template else None
    if template_id:
        mail = Mail(from_email=From(config.from_email), to_emails=To(email.to))
        mail.template_id = TemplateId(template_id)
        mail.dynamic_template_data = {"subject": email.subject, **email.template_data}
    else:
        mail = Mail(from_email=From(config.from_email), to_emails=To(email.to),
                    subject=email.subject)
        mail.add_content(Content("text/plain", email.text))
        if email.html:
            mail.add_content(Content("text/html", email.html))
    mail.custom_arg = CustomArg(IDEMPOTENCY_ARG, email.idempotency_key)
    body: dict[str, Any] = mail.get()
    return body


@dataclass(frozen=True)
class _Outcome:
    """What one HTTP call to SendGrid established."""

    state: str  # accepted | not_sent | rejected | unknown
    provider_id: str | None = None
    error: str | None = None
    status: int | None = None
    retry_after_s: float | None = None


def _classify_http_error(exc: SendGridHTTPError) -> _Outcome:
    status = int(exc.status_code)
    detail = _error_text(exc.body)
    if status in _RETRY_LATER or status >= 500:
        retry_after = None
        headers = exc.headers
        if headers is not None and headers.get("Retry-After"):
            try:
                retry_after = float(headers.get("Retry-After"))
            except ValueError:
                retry_after = None
        return _Outcome("not_sent", error=f"{status}: {detail}", status=status,
                        retry_after_s=retry_after)
    return _Outcome("rejected", error=f"{status}: {detail}", status=status)


def _error_text(body: Any) -> str:
    """SendGrid's ``errors[].message`` list as one line (or the raw body, cut short)."""
    try:
        data = json.loads(body)
        return "; ".join(str(e.get("message")) for e in data.get("errors", []))[:300]
    except (ValueError, TypeError, AttributeError):
        return str(body)[:300]


class SendGridTransport:
    """An :class:`EmailTransport` on SendGrid with an intent/outcome ledger (see module doc)."""

    name = PROVIDER

    def __init__(self, config: SendGridConfig, pool: asyncpg.Pool,
                 breaker: CircuitBreaker | None = None,
                 client_factory: Callable[..., SendGridAPIClient] = SendGridAPIClient) -> None:
        if not config.api_key:
            raise ConfigError("SendGridTransport needs SENDGRID_API_KEY")
        self._config = config
        self._pool = pool
        self._breaker = breaker
        self._client_factory = client_factory

    async def send(self, email: OutgoingEmail) -> SendResult:
        """Send ``email`` at most once per idempotency key (see the module doc for the rule)."""
        key = email.idempotency_key
        if await self._claim(key) is None:
            done = await self._settle_unknown(key)
            if done is not None:
                return done
        return await self._send_claimed(email)

    async def _claim(self, key: str) -> int | None:
        """Record the intent; the attempt number, or None if the row is accepted/sending."""
        attempts: int | None = await self._pool.fetchval(
            """INSERT INTO email_provider_sends (idempotency_key, provider, state, attempts)
               VALUES ($1, $2, 'sending', 1)
               ON CONFLICT (idempotency_key) DO UPDATE
                  SET state = 'sending', attempts = email_provider_sends.attempts + 1,
                      last_sent_at = now(), last_error = NULL
                WHERE email_provider_sends.state IN ('not_sent', 'rejected')
               RETURNING attempts""", key, PROVIDER)
        return attempts

    async def _settle_unknown(self, key: str) -> SendResult | None:
        """For an accepted or in-doubt key: the result, or None once a re-send was claimed."""
        row = await self._pool.fetchrow(
            """SELECT state, provider_id, last_sent_at,
                      extract(epoch FROM now() - last_sent_at)::float8 AS age_s
                 FROM email_provider_sends WHERE idempotency_key = $1""", key)
        if row is None:
            raise TransientJobError(f"ledger row for {key!r} vanished; retry")
        if row["state"] == "accepted":
            return SendResult(row["provider_id"])
        if row["state"] != "sending":
            raise TransientJobError(f"ledger row for {key!r} changed under us; retry")
        found = await self._find_in_activity(key)
        if found is not None:
            await self._record(key, _Outcome("accepted", provider_id=found))
            log.info("e-mail %s was accepted earlier (found in activity); not re-sent", key)
            return SendResult(found)
        if row["age_s"] < self._config.reconcile_grace_s:
            raise OutcomeUnknown(
                f"e-mail {key!r}: last attempt {row['age_s']:.0f}s ago had no answer and the "
                f"activity feed does not show it yet; checking again later",
                retry_after_s=self._config.reconcile_grace_s - row["age_s"])
        reclaimed = await self._pool.fetchval(
            """UPDATE email_provider_sends
                  SET attempts = attempts + 1, last_sent_at = now()
                WHERE idempotency_key = $1 AND state = 'sending' AND last_sent_at = $2
               RETURNING attempts""", key, row["last_sent_at"])
        if reclaimed is None:
            raise OutcomeUnknown(f"e-mail {key!r} is being reconciled by another worker")
        log.warning("e-mail %s: no trace at SendGrid after %.0fs; sending again", key, row["age_s"])
        return None

    async def _send_claimed(self, email: OutgoingEmail) -> SendResult:
        body = build_mail(email, self._config)
        if self._breaker is not None:
            try:
                await self._breaker.admit()  # waits for a half-open trial in flight to decide
            except Exception:
                await self._record(email.idempotency_key, _Outcome("not_sent", error="circuit open"))
                raise
        try:
            outcome = await asyncio.to_thread(self._post, body)
        except BaseException:
            # cancelled while the thread posts: no verdict on SendGrid, but the trial slot is freed
            if self._breaker is not None:
                self._breaker.release()
            raise
        self._tell_breaker(outcome)
        await self._record(email.idempotency_key, outcome)
        return self._result(email.idempotency_key, outcome)

    def _post(self, body: dict[str, Any]) -> _Outcome:
        """One mail-send call through the SDK (runs in a worker thread)."""
        client = self._client_factory(api_key=self._config.api_key, host=self._config.host)
        try:
            response = client.client.mail.send.post(request_body=body, timeout=self._config.timeout_s)
        except SendGridHTTPError as exc:
            return _classify_http_error(exc)
        except urllib.error.URLError as exc:
            # Raised while connecting or writing the request: SendGrid has not got it.
            return _Outcome("not_sent", error=f"unreachable: {exc.reason}")
        except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
            # The request went out; the answer did not come back.
            return _Outcome("unknown", error=f"no answer: {type(exc).__name__}: {exc}")
        if response.status_code != 202:
            return _Outcome("unknown", error=f"unexpected status {response.status_code}")
        headers = response.headers
        return _Outcome("accepted", provider_id=headers.get("X-Message-Id") if headers else None)

    async def _find_in_activity(self, key: str) -> str | None:
        """The ``msg_id`` of a message carrying ``key`` in the activity feed, or None."""
        query = f"unique_args['{IDEMPOTENCY_ARG}']=\"{key}\""

        def lookup() -> Any:
            client = self._client_factory(api_key=self._config.api_key, host=self._config.host)
            return client.client.messages.get(query_params={"query": query, "limit": 1},
                                              timeout=self._config.timeout_s)

        try:
            response = await asyncio.to_thread(lookup)
        except SendGridHTTPError as exc:
            if int(exc.status_code) in (401, 403, 404):
                raise PermanentJobError(
                    f"e-mail {key!r}: outcome unknown and the SendGrid activity API is not "
                    f"available ({exc.status_code}); not re-sent, check by hand") from None
            raise OutcomeUnknown(f"activity lookup for {key!r} failed: {exc.status_code}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise OutcomeUnknown(f"activity lookup for {key!r} failed: {exc}") from None
        return _first_msg_id(response.body)

    async def reconcile_stale(self, limit: int = 100) -> dict[str, int]:
        """Settle ledger rows left ``sending`` for longer than the grace period.

        For a periodic housekeeping job, so an unknown outcome is settled even
        when the e-mail's own job ran out of retries: found in the activity
        feed -> ``accepted``; not found -> ``not_sent`` (the next send of that
        key goes out). Rows whose lookup fails stay as they are; the first
        failure ends the run (the feed is down or refuses, and would only make
        each remaining row wait out its timeout), counting the rest
        ``unresolved`` for the next run.
        """
        rows = await self._pool.fetch(
            """SELECT idempotency_key, last_sent_at FROM email_provider_sends
                WHERE provider = $1 AND state = 'sending'
                  AND last_sent_at < now() - make_interval(secs => $2)
                ORDER BY last_sent_at LIMIT $3""", PROVIDER, self._config.reconcile_grace_s, limit)
        counts = {"accepted": 0, "not_sent": 0, "unresolved": 0}
        for done, row in enumerate(rows):
            key = row["idempotency_key"]
            try:
                found = await self._find_in_activity(key)
            except (OutcomeUnknown, PermanentJobError) as exc:
                log.warning("cannot reconcile e-mail %s: %s", key, exc)
                counts["unresolved"] += len(rows) - done
                break
            state = "accepted" if found is not None else "not_sent"
            await self._pool.execute(
                """UPDATE email_provider_sends
                      SET state = $2, provider_id = COALESCE($3, provider_id), finished_at = now(),
                          last_error = CASE WHEN $2 = 'not_sent'
                                            THEN 'no trace at SendGrid after the grace period'
                                            ELSE last_error END
                    WHERE idempotency_key = $1 AND state = 'sending' AND last_sent_at = $4""",
                key, state, found, row["last_sent_at"])
            counts[state] += 1
        return counts

    def _tell_breaker(self, outcome: _Outcome) -> None:
        if self._breaker is None:
            return
        if outcome.state == "accepted":
            self._breaker.record_success()
        elif outcome.state == "rejected":
            self._breaker.record_neutral()
        else:
            self._breaker.record_failure()

    async def _record(self, key: str, outcome: _Outcome) -> None:
        """Write the outcome; ``unknown`` leaves the row ``sending`` on purpose."""
        if outcome.state == "unknown":
            await self._pool.execute(
                "UPDATE email_provider_sends SET last_error = $2 WHERE idempotency_key = $1",
                key, outcome.error)
            return
        await self._pool.execute(
            """UPDATE email_provider_sends
                  SET state = $2, provider_id = COALESCE($3, provider_id), last_error = $4,
                      finished_at = now()
                WHERE idempotency_key = $1""", key, outcome.state, outcome.provider_id, outcome.error)

    @staticmethod
    def _result(key: str, outcome: _Outcome) -> SendResult:
        if outcome.state == "accepted":
            log.info("e-mail %s accepted by SendGrid as %s", key, outcome.provider_id)
            return SendResult(outcome.provider_id)
        if outcome.state == "rejected":
            raise PermanentJobError(f"SendGrid rejected e-mail {key!r}: {outcome.error}")
        if outcome.state == "unknown":
            raise OutcomeUnknown(f"e-mail {key!r}: {outcome.error}; will reconcile before re-sending")
        raise ExternalServiceError(f"SendGrid did not take e-mail {key!r}: {outcome.error}",
                                   status=outcome.status, retry_after_s=outcome.retry_after_s)


def _first_msg_id(body: Any) -> str | None:
    """``messages[0].msg_id`` from an activity answer; None for an empty or odd answer."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return None
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        msg_id = messages[0].get("msg_id")
        return msg_id if isinstance(msg_id, str) and msg_id else None
    return None


def make_sendgrid_transport(settings: Settings, pool: asyncpg.Pool) -> SendGridTransport | None:
    """The SendGrid transport when SENDGRID_API_KEY is set, else None (use the outbox transport).

    The emailer picks its transport with
    ``make_sendgrid_transport(settings, pool) or OutboxTransport(settings.mail_dir)``.
    """
    config = SendGridConfig.from_settings(settings)
    if config is None:
        return None
    breaker = CircuitBreaker(PROVIDER, settings.breaker_failures, settings.breaker_reset_s)
    return SendGridTransport(config, pool, breaker)
