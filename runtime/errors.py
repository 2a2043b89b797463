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


class ActorUnavailable(TransientJobError):
    """An ``ask`` went to an actor that is dead, stopping or restarting."""


class MailboxFull(TransientJobError):
    """A bounded mailbox stayed full past the sender's timeout."""


class QueueFull(ShopflowError):
    """A bounded queue is at its maximum length; the message was not enqueued."""


# --- web ---
class Unauthenticated(ShopflowError):
    """No credentials, or credentials that are malformed, forged or expired (HTTP 401)."""


class Forbidden(ShopflowError):
    """Valid credentials that do not allow this request (HTTP 403)."""


class NotAvailable(ShopflowError):
    """A capability this process was not wired with (HTTP 503): e.g. no jobs admin plugged in."""
