"""The event streams' wire format: keys, ids and entries.

The outbox relay (runtime/outbox.py) XADDs one entry per event with the
fields ``id`` (outbox id), ``type``, ``payload`` (JSON text),
``correlation_id`` and ``at`` (ISO UTC). :func:`append_event` writes the
same shape; tests and the benchmark use it in place of the relay.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

# "<milliseconds>-<sequence>", both unsigned 64-bit at most.
_STREAM_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
ZERO_ID = "0-0"

StreamId = tuple[int, int]


def stream_key(namespace: str, channel: str) -> str:
    """The Redis key of one channel's stream."""
    return f"{namespace}:events:{channel}"


def parse_id(text: str) -> StreamId | None:
    """``"123-4"`` as ``(123, 4)`` for comparing; ``None`` if it is not a stream id."""
    match = _STREAM_ID.match(text)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms >= 2**64 or seq >= 2**64:
        return None
    return ms, seq


def id_text(stream_id: StreamId) -> str:
    """The inverse of :func:`parse_id`."""
    return f"{stream_id[0]}-{stream_id[1]}"


def text(value: Any) -> str:
    """A Redis reply item as ``str``, whether or not the client decodes responses.

    ``create_app`` shares one non-decoding client (bytes) across the api
    process; the notifier has its own decoding one (str). Readers of the
    streams must work with both.
    """
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def text_fields(fields: dict[Any, Any]) -> dict[str, str]:
    """A stream entry's fields with ``str`` keys and values, whatever the client returned."""
    return {text(k): text(v) for k, v in fields.items()}


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a channel's stream, parsed once and shared by every subscriber."""

    channel: str
    stream_id: StreamId
    payload: dict[str, Any]
    # The message every subscriber is sent, serialised once per event, not once per client.
    wire_text: str
    # The outbox row's id (the ``id`` field): a row the relay published twice has it twice.
    # Empty for entries written without one (tests, the benchmark): never de-duplicated.
    event_id: str = ""


def event_json(channel: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any] | None:
    """A stream entry as clients see an event (WebSocket and ``GET /events``), or ``None``
    for an entry whose payload is not a JSON object."""
    try:
        payload = json.loads(fields.get("payload", ""))
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    return {
        "channel": channel,
        "id": entry_id,
        "event_id": fields.get("id") or None,
        "event": fields.get("type"),
        "payload": payload,
        "correlation_id": fields.get("correlation_id") or None,
        "at": fields.get("at"),
    }


def parse_entry(channel: str, entry_id: str, fields: dict[str, str]) -> StreamEvent | None:
    """The event in a raw entry, or ``None`` for an entry that is not one (logged by the caller)."""
    stream_id = parse_id(entry_id)
    event = event_json(channel, entry_id, fields) if stream_id is not None else None
    if stream_id is None or event is None:
        return None
    message = {"type": "event", **event}
    return StreamEvent(channel, stream_id, event["payload"],
                       json.dumps(message, separators=(",", ":")), fields.get("id") or "")


async def append_event(
    redis: aioredis.Redis,
    namespace: str,
    channel: str,
    event_type: str,
    payload: dict[str, Any],
    event_id: int | str = "",
    correlation_id: str = "",
    maxlen: int | None = None,
) -> str:
    """XADD one event in the relay's format; returns its stream id."""
    fields: dict[Any, Any] = {
        "id": str(event_id),
        "type": event_type,
        "payload": json.dumps(payload),
        "correlation_id": correlation_id,
        "at": datetime.now(UTC).isoformat(),
    }
    entry_id = await redis.xadd(stream_key(namespace, channel), fields, maxlen=maxlen,
                                approximate=False)
    return entry_id if isinstance(entry_id, str) else entry_id.decode()


# Each stream's position in one atomic step, with no entry bodies (XINFO STREAM would send the
# first and last entries whole): [length, entries-added, first entry id, last-generated-id,
# max-deleted-entry-id], or false for a missing key. entries-added and max-deleted-entry-id
# exist from Redis 7 (and in Valkey); before that they come back as -1 and ''.
POSITIONS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    out[i] = false
  else
    local info = redis.call('XINFO', 'STREAM', key)
    local pos = {-1, -1, '', '0-0', ''}
    for j = 1, #info, 2 do
      local name, value = info[j], info[j + 1]
      if name == 'length' then pos[1] = value
      elseif name == 'entries-added' then pos[2] = value
      elseif name == 'first-entry' then if value then pos[3] = value[1] end
      elseif name == 'last-generated-id' then pos[4] = value
      elseif name == 'max-deleted-entry-id' then pos[5] = value end
    end
    out[i] = pos
  end
end
return out
"""


@dataclass(frozen=True)
class StreamPosition:
    """Where one stream stands: what it keeps, what it ever held, what it let go.

    Read with :data:`POSITIONS_LUA` in the same ``MULTI`` as the entries it
    judges, so "was anything after my cursor removed before I read it?" is
    answered for the very state that was read.
    """

    length: int
    # The newest id the stream ever generated (its last entry, unless that was deleted).
    newest: StreamId
    # The oldest entry still kept; None when the stream is empty.
    first: StreamId | None
    # Entries ever added, and the newest XDEL'd id: Redis 7+ and Valkey only (else None).
    added: int | None
    max_deleted: StreamId | None

    @property
    def removed(self) -> int | None:
        """How many entries were ever trimmed or deleted (None before Redis 7)."""
        return None if self.added is None else self.added - self.length


def parse_position(reply: Any) -> StreamPosition | None:
    """One item of :data:`POSITIONS_LUA`'s answer; None for a stream that does not exist."""
    if not reply:
        return None
    length, added, first, newest, max_deleted = reply
    return StreamPosition(
        length=int(length),
        newest=parse_id(text(newest)) or (0, 0),
        first=parse_id(text(first)),
        added=int(added) if int(added) >= 0 else None,
        max_deleted=parse_id(text(max_deleted)),
    )


def resync_text(channel: str, reason: str, last_id: StreamId) -> str:
    """The ``resync`` message: the client's view of ``channel`` is stale, reload it.

    Live events of the channel follow from ``last_id``, which the client
    keeps as its position (to resume with ``since`` after a reconnect).
    """
    # No ref: this resync answers no client message (web/realtime.py sends those).
    return json.dumps({"type": "resync", "channel": channel, "reason": reason,
                       "last_id": id_text(last_id)}, separators=(",", ":"))
