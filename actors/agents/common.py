"""Pieces the three agents share: answer sources and delimited data in prompts."""

from __future__ import annotations

import json
import secrets
from typing import Any

from runtime.errors import LlmInvalidOutput, LlmLimited, LlmUnavailable

# Which part of the system produced an answer; every answer carries one.
SOURCE_MODEL = "model"  # a validated tool call of the model
SOURCE_FALLBACK = "fallback"  # the agent's offline rules (SQL, templates, classifier)
SOURCE_POLICY = "policy"  # a fixed safe answer: the request was refused before any model saw it

FALLBACK_NOTICE = "Answered by ShopFlow's automatic rules (the AI assistant is not available right now)."


def fallback_reason(exc: LlmUnavailable | LlmLimited | LlmInvalidOutput) -> str:
    """The label saying why an answer came from the fallback (metrics, logs, answers)."""
    if isinstance(exc, LlmInvalidOutput):
        return f"invalid_output:{exc.reason}"
    return exc.reason


def delimited(tag: str, payload: Any) -> tuple[str, str]:
    """``payload`` as JSON inside a tag no outside text can guess; returns (text, tag).

    The tag carries a fresh random suffix, and ``<``/``>`` inside the JSON are
    escaped, so text written by a customer can neither close the element nor
    open a new one: it stays data, whatever it says.
    """
    name = f"{tag}-{secrets.token_hex(6)}"
    body = json.dumps(payload, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
    return f"<{name}>\n{body}\n</{name}>", name
