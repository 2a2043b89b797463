"""Free text from outside that PostgreSQL can store: one rule for every concern and the API.

PostgreSQL's ``text`` cannot hold NUL (U+0000), and asyncpg cannot encode a
lone surrogate (U+D800..U+DFFF, which JSON's ``\\ud800`` escapes let through
``json.loads``) to UTF-8. Either would reach the first query as a driver error
(a 500 at the API, a crash in a worker) instead of a clear
:class:`~runtime.errors.ValidationError` naming the field. Check the value where it
enters, before any query.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import ValidationError


def storable_text(raw: Any, field: str, max_chars: int, min_chars: int = 1, *,
                  strip: bool = True) -> str:
    """``raw`` as text PostgreSQL can store, within length bounds; ValidationError if not.

    ``strip`` trims surrounding white space first (free text: a review, a
    question); identifiers a client matches on later (an ``external_ref``) keep
    theirs with ``strip=False``.
    """
    if not isinstance(raw, str):
        raise ValidationError(f"{field} must be a string", field=field)
    text = raw.strip() if strip else raw
    if not min_chars <= len(text) <= max_chars:
        raise ValidationError(f"{field} must have {min_chars} to {max_chars} characters",
                              field=field)
    if "\x00" in text:
        raise ValidationError(f"{field} must not contain NUL characters", field=field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{field} must be valid Unicode text (no lone surrogates)",
                              field=field) from None
    return text
