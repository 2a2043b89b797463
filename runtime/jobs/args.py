"""Reading a named argument of a job from its actor's signature (``order_id``, say).

Actors take their order as ``def ...(order_id: int)``; the signature says
which positional argument it is, so no actor has to declare it twice for
logs, traces and pages to name the order.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

ORDER_ID = "order_id"


@functools.lru_cache(maxsize=512)
def _position(fn: Callable[..., Any], name: str) -> int | None:
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index(name) if name in names else None


def int_arg(fn: Callable[..., Any] | None, args: Sequence[Any], name: str = ORDER_ID) -> int | None:
    """The positional argument ``fn`` calls ``name``, if it is there and a whole number."""
    if fn is None:
        return None
    position = _position(fn, name)
    if position is None or position >= len(args):
        return None
    value = args[position]
    return value if isinstance(value, int) and not isinstance(value, bool) else None
