"""The runtime's one error hierarchy.

Errors are translated at boundaries: a domain error becomes an HTTP 4xx in
``web/``, a driver error becomes a retryable job error in a worker. Control
signals (skip, retry later) are not failures and do not derive from
:class:`ShopflowError`'s failure branches.
"""

from __future__ import annotations


class ShopflowError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(ShopflowError):
    """A setting is missing or has a bad value; the process cannot start."""


class ServiceError(ShopflowError):
    """An embedded or external service could not be started or reached."""


class ValidationError(ShopflowError):
    """Input is malformed. Nothing was changed; retrying the same input fails again."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ShopflowError):
    """The thing asked for does not exist."""


class Conflict(ShopflowError):
    """The request is well-formed but the current state does not allow it."""


class InvalidTransition(Conflict):
    """An order status change that the state machine does not allow."""


class PermanentJobError(ShopflowError):
    """The job can never succeed; retrying would only repeat the failure.

    Workers record the outcome and do not retry.
    """


class TransientJobError(ShopflowError):
    """The job failed for a reason that may pass (a timeout, a restart); retry it."""


class Busy(TransientJobError):
    """Another worker holds this piece of work (a lease); try again once it is released.

    Retried like an outage, not counted as the job's own failure.
    """


class ActorUnavailable(TransientJobError):
    """An ``ask`` went to an actor that is dead, stopping or restarting."""


class MailboxFull(TransientJobError):
    """A bounded mailbox stayed full past the sender's timeout."""


class InfrastructureUnavailable(TransientJobError):
    """A server the work needs (PostgreSQL, Redis) was unreachable or went away mid-call.

    An actor raises it to its asker in place of the driver's connection error,
    which is kept as ``__cause__``. An outage is not the actor's fault: it is
    not a crash (no restart, so an outage cannot exhaust a supervisor's restart
    intensity and end the process), and the job that asked is retried later.
    """


class QueueFull(ShopflowError):
    """A bounded queue is at its maximum length; the message was not enqueued."""


# --- external services (issue 7) ---


class ExternalServiceError(TransientJobError):
    """An external HTTP service failed in a way that may pass (timeout, 5xx, 429, reset).

    ``retry_after_s`` carries the service's own hint (a ``Retry-After`` header) when it gave one.
    """

    def __init__(self, message: str, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class MalformedResponse(ExternalServiceError):
    """The service answered, but not in the documented shape; nothing of it was used."""


class CircuitOpen(ExternalServiceError):
    """The circuit breaker in front of a service is open: the call was not even attempted."""


class ExternalRequestRejected(PermanentJobError):
    """The service refused the request itself (a 4xx other than 408/429): retrying cannot help."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OutcomeUnknown(TransientJobError):
    """A call may or may not have taken effect (timeout after sending); reconcile before repeating.

    ``retry_after_s`` says when a retry can next learn more (e.g. the end of a grace period).
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- agents ---


class AgentError(ShopflowError):
    """An LLM agent could not get a trustworthy answer from the model."""


class LlmUnavailable(AgentError, TransientJobError):
    """The model cannot be asked now: no key, API failing or timing out, circuit open.

    ``reason`` is a short label (``no_api_key``, ``timeout``, ``api_error``,
    ``circuit_open``) used in metrics and in the answer's fallback label.
    ``retry_after_s`` carries the API's own hint (``retry-after`` of a 429/529),
    so a retried job waits at least that long.
    """

    def __init__(self, reason: str, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class LlmLimited(AgentError):
    """A rate limit or the daily token budget stops the call (``reason`` says which)."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


class LlmInvalidOutput(AgentError):
    """The model answered, but not with something we may trust (cut, prose, off-schema)."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason
# --- web ---
class Unauthenticated(ShopflowError):
    """No credentials, or credentials that are malformed, forged or expired (HTTP 401)."""


class Forbidden(ShopflowError):
    """Valid credentials that do not allow this request (HTTP 403)."""


class NotAvailable(ShopflowError):
    """A capability this process was not wired with (HTTP 503): e.g. no jobs admin plugged in."""


class MalformedRequest(ShopflowError):
    """The request cannot even be read: a body that is not JSON text (HTTP 400).

    Well-formed JSON with wrong or missing fields is a :class:`ValidationError` (422).
    """


class RequestTooLarge(ShopflowError):
    """A request body over the API's size limit (HTTP 413); it was not read to the end."""


# --- supervision ---


class ActorCrashed(ActorUnavailable):
    """The actor crashed while handling this very message; it is being restarted.

    The original exception is the ``__cause__``. Being transient, the job that
    asked is retried under its attempts and backoff (the message is redelivered).
    """


class AskTimeout(ActorUnavailable):
    """The actor did not answer within the ask's timeout (stuck or far behind)."""


class SupervisorStartError(ShopflowError):
    """A supervisor could not start one of its children; names the child and the cause."""

    def __init__(self, supervisor: str, child: str, cause: BaseException | str) -> None:
        super().__init__(f"supervisor {supervisor!r} could not start child {child!r}: {cause}")
        self.supervisor = supervisor
        self.child = child


class SupervisorGaveUp(ShopflowError):
    """Children restarted more than MaxR times in MaxT seconds; the supervisor escalates."""


# --- jobs ---


class JobCancelled(ShopflowError):
    """Control signal: the job saw a cancellation request and stopped; not a failure.

    A job raises it (``current_job().check_cancelled()``) after cleaning up;
    the job ends ``cancelled`` and is not retried.
    """
