"""On-call hears when an outside service refuses fulfilment requests, and when it stops.

A carrier or warehouse that refuses an order's request for good (a 4xx: a
revoked token, a changed API) fails that order, and would go on failing
every order after it, one by one. :class:`RefusalPager` turns the flow's
:class:`~actors.fulfillment.flow.StepOutcomes` into one incident per service
and step (alert ``FulfillmentRefused``, labels ``service`` and ``step``) in
:class:`runtime.alerts.Alerter`: the first refusal pages, the ones after it
page nobody while the incident is open (in any process), and the next order
that gets through that step resolves it (after the alerter's resolve
hysteresis, ``SHOPFLOW_ALERT_RESOLVE_AFTER_S``).

The flow calls it on the process loop while a Dramatiq thread waits for the
step, so it never waits for Redis or the webhook: the work goes through an
:class:`~runtime.alerts.AlertDispatcher`, one queue per incident so a page is
never overtaken by the resolve that follows it.
"""

from __future__ import annotations

import logging

from runtime.alerts import Alert, AlertDispatcher, Alerter, Severity

log = logging.getLogger(__name__)

# Name of the alert raised when a service refuses the flow's requests.
FULFILLMENT_REFUSED_ALERT = "FulfillmentRefused"


def refused_alert(service: str, step: str, order_id: int | None = None,
                  http_status: int | None = None, reason: str | None = None) -> Alert:
    """The incident of ``service`` refusing ``step`` requests (labels identify it)."""
    summary = (f"{service} refuses {step} requests: order {order_id} failed ({reason})"
               if order_id is not None else f"{service} takes {step} requests again")
    details = {"order_id": order_id, "http_status": http_status, "reason": reason}
    return Alert(FULFILLMENT_REFUSED_ALERT, Severity.CRITICAL, summary,
                 labels={"service": service, "step": step},
                 details={k: v for k, v in details.items() if v is not None})


class RefusalPager:
    """A :class:`~actors.fulfillment.flow.StepOutcomes` that pages through the alerter."""

    def __init__(self, alerter: Alerter, dispatcher: AlertDispatcher) -> None:
        self._alerter = alerter
        self._dispatcher = dispatcher

    def refused(self, service: str, step: str, order_id: int, http_status: int | None,
                reason: str) -> None:
        """Process loop: open (or keep open) the incident; returns at once."""
        alert = refused_alert(service, step, order_id, http_status, reason)
        self._dispatcher.submit(self._alerter.fire(alert),
                                what=f"page for {service} refusing order {order_id}",
                                key=alert.fingerprint)

    def passed(self, service: str, step: str, order_id: int) -> None:
        """Process loop: an order got through, so the incident (if any) may close."""
        alert = refused_alert(service, step)
        self._dispatcher.submit(self._alerter.resolve(alert),
                                what=f"resolve of {service} refusing {step} requests",
                                key=alert.fingerprint)

    async def aclose(self) -> None:
        """On the loop at shutdown: let notifications in flight finish (bounded)."""
        if not await self._dispatcher.drain_async(self._alerter.max_delivery_s() + 1.0):
            log.error("fulfilment pages still undelivered at shutdown: %d",
                      self._dispatcher.pending())
