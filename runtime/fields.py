"""JSON objects from outside (an HTTP body, a command's ``--add``): fields nobody reads are refused.

An unknown field is not ignored: it is almost always a typo (``option`` for
``options``, ``externalref`` for ``external_ref``), and ignoring it silently
drops what the client meant, such as the ``job_id`` that makes a producer's
retry a duplicate rather than a second job. One rule, used by every concern
and by the API, so the answer is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from runtime.errors import ValidationError


def reject_unknown_fields(data: Mapping[str, Any], known: Collection[str]) -> None:
    """Raise :class:`ValidationError` naming the fields of ``data`` not in ``known``.

    ``field`` is set when exactly one field is to blame; the message lists the
    known ones, so a typo is easy to spot.
    """
    unknown = sorted(set(data) - set(known))
    if not unknown:
        return
    raise ValidationError(
        f"unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}",
        field=unknown[0] if len(unknown) == 1 else None)
