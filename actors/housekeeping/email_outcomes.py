"""E-mails whose SendGrid outcome was in doubt: settled, and re-sent if they never arrived.

The SendGrid transport leaves its ledger row (``email_provider_sends``)
``sending`` when a call got no answer, and its e-mail's own job settles it on
a retry. When that job runs out of retries first, nothing would: the row stays
in doubt and the customer may never get the e-mail. One run of this job:

1. asks the transport to settle rows left ``sending`` past the grace period
   (``reconcile_stale``: found in SendGrid's activity feed -> ``accepted``,
   not found -> ``not_sent``);
2. marks ``sent`` the ``email_log`` rows of e-mails SendGrid did accept but
   whose job never heard it (nothing is sent);
3. for every order confirmation SendGrid never took (ledger ``not_sent``, no
   attempt for the grace period, so its own job has stopped trying) whose
   ``email_log`` row is not sent either, enqueues the confirmation job again
   with the job id ``confirm-<order_id>-resend``.

At most one e-mail still goes out per order: the re-sent job delivers through
the emailer's ``deliver()`` (``email_log`` lease, then the ledger's atomic
claim), so it sends nothing if the original job was somehow still alive, and
the job id makes the runs of this sweep enqueue it once (a later run may send
it again only if that job failed for good: a new attempt, not a second e-mail).
Every statement is idempotent, so two runs at once are harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import asyncpg

log = logging.getLogger(__name__)

# The ledger's provider name for SendGrid (actors/emailer/sendgrid_transport.py).
PROVIDER = "sendgrid"
# The email_log kind of an order confirmation (actors/emailer/emails.py).
KIND_ORDER_CONFIRMATION = "order_confirmation"
# Ledger rows settled, and confirmations re-sent, per run at most.
DEFAULT_BATCH = 100


def resend_job_id(order_id: int) -> str:
    """The job id of an order confirmation's re-send: one such job per order at a time."""
    return f"confirm-{order_id}-resend"


class OutcomeReconciler(Protocol):
    """Settles sends whose outcome is unknown (``SendGridTransport``)."""

    async def reconcile_stale(self, limit: int = DEFAULT_BATCH) -> dict[str, int]:
        """Counts of rows settled ``accepted`` / ``not_sent`` and left ``unresolved``."""
        ...


# resend(order_id, job_id) enqueues the confirmation job; True if a new job was enqueued,
# False if one with that id is already waiting, running or recently completed.
Resend = Callable[[int, str], Awaitable[bool]]


@dataclass(frozen=True)
class EmailOutcomes:
    """What one run did (kept as the scheduled run's result)."""

    accepted: int = 0  # in-doubt sends found in the activity feed
    not_sent: int = 0  # in-doubt sends SendGrid never got
    unresolved: int = 0  # in-doubt sends whose lookup failed (tried again next run)
    logs_settled: int = 0  # email_log rows marked sent from an accepted ledger row
    resent: int = 0  # confirmation jobs enqueued again
    already_queued: int = 0  # re-send jobs already waiting, running or done


# $1 provider. email_log rows not sent (nor being sent: lease over) whose e-mail the
# provider did accept.
_SETTLE_ACCEPTED = """
UPDATE email_log l
   SET status = 'sent', provider_id = COALESCE(l.provider_id, p.provider_id), error = NULL,
       lease_until = NULL, sent_at = COALESCE(p.finished_at, now())
  FROM email_provider_sends p
 WHERE p.idempotency_key = l.idempotency_key AND p.provider = $1 AND p.state = 'accepted'
   AND l.status IN ('pending', 'sending') AND (l.lease_until IS NULL OR l.lease_until <= now())
RETURNING l.idempotency_key
"""

# $1 provider, $2 kind, $3 quiet period (s), $4 batch. Confirmations the provider never
# got, last tried longer ago than the quiet period, whose email_log row is not sent.
_NEVER_SENT_CONFIRMATIONS = """
SELECT l.order_id
  FROM email_log l
  JOIN email_provider_sends p ON p.idempotency_key = l.idempotency_key
 WHERE l.status IN ('pending', 'sending') AND (l.lease_until IS NULL OR l.lease_until <= now())
   AND l.kind = $2 AND l.order_id IS NOT NULL
   AND p.provider = $1 AND p.state = 'not_sent'
   AND p.last_sent_at < now() - make_interval(secs => $3)
 ORDER BY p.last_sent_at
 LIMIT $4
"""


async def reconcile_email_outcomes(
    pool: asyncpg.Pool, reconciler: OutcomeReconciler, resend: Resend, quiet_s: float,
    batch: int = DEFAULT_BATCH,
) -> EmailOutcomes:
    """Settle in-doubt SendGrid sends and re-send the confirmations that never arrived.

    ``quiet_s`` is the reconcile grace period: a ``not_sent`` confirmation is
    re-sent only when nobody has tried it for that long, so an e-mail whose
    own job is still retrying is left to that job.
    """
    settled: Mapping[str, int] = await reconciler.reconcile_stale(batch)
    logs = await pool.fetch(_SETTLE_ACCEPTED, PROVIDER)
    never_sent = await pool.fetch(_NEVER_SENT_CONFIRMATIONS, PROVIDER, KIND_ORDER_CONFIRMATION,
                                  quiet_s, batch)
    resent = already = 0
    for row in never_sent:
        order_id = int(row["order_id"])
        if await resend(order_id, resend_job_id(order_id)):
            resent += 1
            log.warning("order %d: its confirmation never reached SendGrid; sent again",
                        order_id, extra={"order_id": order_id})
        else:
            already += 1
    outcome = EmailOutcomes(settled.get("accepted", 0), settled.get("not_sent", 0),
                            settled.get("unresolved", 0), len(logs), resent, already)
    log.info("e-mail outcomes reconciled: %s", outcome, extra={"email_outcomes": asdict(outcome)})
    return outcome
