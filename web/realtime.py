"""The WebSocket at ``/ws``: authenticated, resumable, bounded live events.

Protocol (JSON text frames; docs/web.md has the full table):

client → server
    ``{"type": "subscribe", "channel": C, "since": "<stream id>"?, "keys": [int]?, "ref": R?}``
    ``{"type": "unsubscribe", "channel": C, "ref": R?}``
    ``{"type": "ping", "ref": R?}``

    Every answer to a message that carried a ``ref`` echoes it (errors too,
    with the ``channel`` the message named); an answer to one without has none.
server → client
    ``welcome``, ``subscribed``, ``unsubscribed``, ``resync``, ``event``, ``pong``, ``error``

Close codes (all documented in docs/web.md): 1001 server shutting down,
1003 binary frame, 1007 invalid UTF-8, 1009 frame too big, 4400 too many bad
messages, 4401 unauthenticated or token expired, 4403 forbidden channel,
4429 slow consumer (send queue full).

Each connection has one send queue, bounded by messages and by bytes, drained
by one writer task, so a client that stops reading fills only its own queue
and is closed before it can grow the server's memory; other clients never wait
for it. :class:`RealtimeRecord` keeps what the server did (close codes it sent,
the deepest send queue) for health views and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiohttp import WSCloseCode, WSMsgType, web

from actors.notifier.channels import (
    CHANNELS,
    FILTER_FIELDS,
    STAFF_ONLY,
    TEXT_KEYS,
    Viewer,
    may_subscribe,
)
from actors.notifier.notifier import Notifier, Resync
from actors.notifier.streams import StreamId, parse_id
from runtime.actor import MailboxConfig, TaskActor
from runtime.errors import Unauthenticated
from runtime.loop import LoopBridge
from runtime.metrics import Metrics, get_metrics
from runtime.settings import DEFAULT_WS_SEND_QUEUE_MAX_BYTES, Settings
from runtime.supervision import ChildSpec, Restart
from web.auth import Principal, bearer_token, ensure_signer
from web.supervision import add_child

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_BAD_PROTOCOL = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_SLOW_CONSUMER = 4429
# After this many bad messages in a row the client is broken or hostile: close it.
MAX_CONSECUTIVE_ERRORS = 10
# A job id or queue name in a filter is at most this long (job ids are up to 200).
MAX_TEXT_KEY = 200
# A client's ref (echoed in answers) is at most this long; so is a channel echoed in an error.
MAX_ECHO_CHARS = 64
# A subscription filter longer than this is refused (it is a list scan per event).
MAX_FILTER_KEYS = 1_000
# Backlog replay waits at most this long for room in a client's send queue.
BACKLOG_PUT_TIMEOUT_S = 5.0
# Closing a client that does not read must not hang the server.
CLOSE_TIMEOUT_S = 2.0
# How long the process waits for the notifier to learn where the streams end.
READY_TIMEOUT_S = 10.0
# The notifier's id under the api's root supervisor.
NOTIFIER_CHILD = "notifier"
# How every event frame starts (actors.notifier.streams.parse_entry builds it, type then channel).
EVENT_FRAME_PREFIX = '{"type":"event","channel":"'

NOTIFIER_KEY = web.AppKey("notifier", Notifier)
CONNECTIONS_KEY = web.AppKey("ws_connections", set)
WS_SETTINGS_KEY = web.AppKey("ws_settings", Settings)


@dataclass(frozen=True)
class RealtimeStats:
    """An immutable snapshot of :class:`RealtimeRecord`."""

    closes_by_code: dict[int, int]
    peak_queue_messages: int
    peak_queue_bytes: int


class RealtimeRecord:
    """What this process's ``/ws`` did: the close codes it chose, the deepest send queue.

    Counted when the server decides (not when the peer acknowledges): a client
    that stops reading never takes the 4429 frame, and the record is how an
    operator (or a test) knows it was sent and that its queue stayed bounded.
    Updated on the app's event loop only.
    """

    def __init__(self) -> None:
        self._closes: Counter[int] = Counter()
        self._peak_messages = 0
        self._peak_bytes = 0
        self._changed = asyncio.Event()

    def closed(self, code: int) -> None:
        """The server is closing a client with ``code``."""
        self._closes[code] += 1
        self._notify()

    def queued(self, messages: int, size_bytes: int) -> None:
        """A send queue now holds ``messages`` frames of ``size_bytes`` in all."""
        self._peak_messages = max(self._peak_messages, messages)
        self._peak_bytes = max(self._peak_bytes, size_bytes)

    def stats(self) -> RealtimeStats:
        """A snapshot."""
        return RealtimeStats(dict(self._closes), self._peak_messages, self._peak_bytes)

    async def wait_for(self, predicate: Callable[[RealtimeStats], bool], timeout_s: float) -> None:
        """Wait until ``predicate(stats())`` holds (no polling)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self.stats()):
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


RECORD_KEY = web.AppKey("ws_record", RealtimeRecord)


class SendQueue:
    """One connection's outgoing frames, bounded by count and by bytes; one reader.

    A frame that does not fit is refused (the caller closes the client 4429),
    except that an empty queue always takes one frame: an event larger than
    the byte cap is sent alone rather than closing every subscriber. Frames
    are JSON with ASCII escapes, so their length in characters is their size
    in bytes. The strings are shared by every client of an event; what a slow
    client pins is the events it has not taken, which these caps bound.
    """

    def __init__(self, max_messages: int, max_bytes: int,
                 on_queued: Callable[[int, int], None] | None = None) -> None:
        self._frames: deque[str] = deque()
        self._bytes = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._on_queued = on_queued
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    def fits(self, text: str) -> bool:
        """True if ``text`` may join the queue now."""
        if not self._frames:
            return True
        return (len(self._frames) < self._max_messages
                and self._bytes + len(text) <= self._max_bytes)

    def put_nowait(self, text: str) -> bool:
        """Append ``text`` if it fits; False (nothing queued) otherwise."""
        if not self.fits(text):
            return False
        self._frames.append(text)
        self._bytes += len(text)
        self._readable.set()
        if self._on_queued is not None:
            self._on_queued(len(self._frames), self._bytes)
        return True

    async def put(self, text: str) -> None:
        """Append ``text``, waiting for the reader to make room (wrap in a timeout)."""
        while not self.put_nowait(text):
            self._room.clear()
            await self._room.wait()

    async def get(self) -> str:
        """The oldest frame, waiting for one."""
        while not self._frames:
            self._readable.clear()
            await self._readable.wait()
        text = self._frames.popleft()
        self._bytes -= len(text)
        self._room.set()
        return text


class WsMetrics:
    """The WebSocket's two metrics: open connections, and events sent per channel.

    The per-channel counters are looked up once, not per frame (``labels()`` is
    a dict lookup under a lock). Built at app start-up, never at import.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.connections = metrics.websocket_connections
        self._sent = {c: metrics.websocket_events_sent.labels(c) for c in CHANNELS}

    def count_sent(self, text: str) -> None:
        """Count ``text`` if it is an event frame (control messages are not events)."""
        if text.startswith(EVENT_FRAME_PREFIX):
            channel = text[len(EVENT_FRAME_PREFIX):].partition('"')[0]
            counter = self._sent.get(channel)
            if counter is not None:
                counter.inc()


WS_METRICS_KEY = web.AppKey("ws_metrics", WsMetrics)


class BadMessage(Exception):
    """A client frame that is not a valid protocol message (answered with an error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Connection:
    """One WebSocket client: its principal, bounded send queue and writer task."""

    def __init__(self, ws: web.WebSocketResponse, principal: Principal, queue_max: int,
                 transport: asyncio.BaseTransport | None = None,
                 queue_max_bytes: int = DEFAULT_WS_SEND_QUEUE_MAX_BYTES,
                 record: RealtimeRecord | None = None,
                 metrics: WsMetrics | None = None) -> None:
        self.ws = ws
        self._metrics = metrics
        # Kept to cut a client that will not even take a close frame.
        self._transport = transport
        self.principal = principal
        self._record = record
        self._queue = SendQueue(queue_max, queue_max_bytes,
                                record.queued if record is not None else None)
        self._writer: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.subscribed: dict[str, asyncio.Task[None]] = {}

    @property
    def viewer(self) -> Viewer:
        """The principal, as the notifier's policy sees it."""
        return self.principal

    def start(self) -> None:
        """Start the writer task (kept; cancelled and awaited by :meth:`finish`)."""
        self._writer = asyncio.create_task(self._write_loop(), name="ws-writer")

    def close_at_expiry(self, clock_s: Callable[[], float]) -> None:
        """Close this client 4401 when its token expires, even if it never sends or gets a frame.

        Messages and events check the token too, but an idle connection has
        neither. ``clock_s`` is the signer's clock (Unix seconds); the timer
        sleeps until the expiry and looks again, so a clock that is not the
        wall clock (tests) only delays the close.
        """
        self._expiry = asyncio.create_task(self._expire(clock_s), name="ws-expiry")

    async def _expire(self, clock_s: Callable[[], float]) -> None:
        while (remaining_s := self.principal.expires_at_s - clock_s()) > 0:
            await asyncio.sleep(remaining_s)
        self.refuse(CLOSE_UNAUTHENTICATED, "token expired")

    async def _write_loop(self) -> None:
        try:
            while True:
                text = await self._queue.get()
                await self.ws.send_str(text)
                if self._metrics is not None:
                    self._metrics.count_sent(text)
        except ConnectionError:
            return  # the peer went away; the read loop ends the connection

    def send(self, message: dict[str, Any]) -> bool:
        """Queue a control message (same queue as events, so order is kept)."""
        return self.offer(json.dumps(message, separators=(",", ":")))

    def offer(self, text: str) -> bool:
        """Queue ``text`` now, or close the client as a slow consumer if its queue is full."""
        if self._closing is not None:
            return False
        if self._queue.put_nowait(text):
            return True
        self.refuse(CLOSE_SLOW_CONSUMER, "slow consumer: send queue full")
        return False

    async def offer_backlog(self, text: str) -> bool:
        """Queue replayed events, waiting a bounded time for room."""
        if self._closing is not None:
            return False
        try:
            async with asyncio.timeout(BACKLOG_PUT_TIMEOUT_S):
                await self._queue.put(text)
            return True
        except TimeoutError:
            self.refuse(CLOSE_SLOW_CONSUMER, "slow consumer: send queue full")
            return False

    @property
    def refused(self) -> bool:
        """True once the server decided to close this client (with its own code)."""
        return self._closing is not None

    def refuse(self, code: int, reason: str) -> None:
        """Close this client with ``code`` (once); the read loop then ends."""
        if self._closing is None:
            log.info("closing websocket: %d %s", code, reason)
            if self._record is not None:
                self._record.closed(code)
            self._closing = asyncio.create_task(self._close(code, reason), name="ws-close")

    async def _close(self, code: int, reason: str) -> None:
        if self._writer is not None:
            self._writer.cancel()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close(code=code, message=reason.encode()[:120])
        except Exception as exc:  # noqa: BLE001 - the peer is gone or stuck: nothing to tell
            log.debug("websocket close ended with %r", exc)
        finally:
            # A client that does not read never lets the close frame (or
            # anything buffered before it) drain, and a plain transport close
            # waits for that drain; abort so the socket and its buffers go now.
            if isinstance(self._transport, asyncio.WriteTransport):
                self._transport.abort()

    async def finish(self) -> None:
        """Stop every task this connection started and wait for them."""
        tasks = [t for t in (self._writer, self._expiry, *self.subscribed.values())
                 if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("websocket task %s failed", task.get_name())
        if self._closing is not None:
            with contextlib.suppress(Exception):
                await self._closing


# --- message parsing ----------------------------------------------------------------


def decode_frame(text: str) -> dict[str, Any]:
    """A text frame as a JSON object, or :class:`BadMessage` (not JSON, not an object)."""
    try:
        message = json.loads(text)
    except ValueError:
        raise BadMessage("bad_json", "frames must be JSON text") from None
    except RecursionError:
        # '[' * 5000 fits in a frame but nests deeper than the parser recurses: still garbage.
        raise BadMessage("bad_json", "frames must be JSON text nested at most a few hundred "
                                     "levels deep") from None
    if not isinstance(message, dict):
        raise BadMessage("bad_message", "a message must be a JSON object")
    return message


def check_message(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` if it is a protocol message, else :class:`BadMessage` saying what is wrong."""
    kind = message.get("type")
    if kind not in ("subscribe", "unsubscribe", "ping"):
        raise BadMessage("bad_message", "type must be subscribe, unsubscribe or ping")
    ref = message.get("ref")
    if ref is not None and not _echoable(ref):
        raise BadMessage("bad_message", f"ref must be a string or number of at most "
                                        f"{MAX_ECHO_CHARS} characters")
    if kind != "ping":
        channel = message.get("channel")
        if not isinstance(channel, str):
            raise BadMessage("bad_message", "channel must be a string")
        if channel not in CHANNELS:
            raise BadMessage("unknown_channel", f"channels are {', '.join(CHANNELS)}")
    return message


def _echoable(value: Any) -> bool:
    """A ``ref`` (or a ``channel``) short enough to send back."""
    return isinstance(value, str | int) and len(str(value)) <= MAX_ECHO_CHARS


def answer(kind: str, ref: Any, **fields: Any) -> dict[str, Any]:
    """A server message answering a client message: ``ref`` is echoed only if one was sent."""
    message = {"type": kind, **fields}
    if ref is not None:
        message["ref"] = ref
    return message


def error_answer(exc: BadMessage, message: dict[str, Any] | None) -> dict[str, Any]:
    """The ``error`` for a bad message, echoing the ``ref`` and ``channel`` it carried.

    Either is echoed only when it can be (a JSON object's short string or
    number): the error may be about the ``ref`` itself, and a ``channel`` of
    64 KiB is nobody's channel name.
    """
    echo = {k: v for k, v in (message or {}).items()
            if k in ("ref", "channel") and v is not None and _echoable(v)}
    return {"type": "error", "code": exc.code, "message": str(exc), **echo}


def parse_since(message: dict[str, Any]) -> StreamId | None:
    """The ``since`` stream id of a subscribe message, if any."""
    since = message.get("since")
    if since is None:
        return None
    parsed = parse_id(since) if isinstance(since, str) else None
    if parsed is None:
        raise BadMessage("bad_since", "since must be a stream id like '1700000000000-0'")
    return parsed


def parse_keys(message: dict[str, Any]) -> frozenset[int | str] | None:
    """The optional filter: order or product ids, or job ids or queue names (strings)."""
    keys = message.get("keys")
    if keys is None:
        return None
    channel = message["channel"]
    if channel not in FILTER_FIELDS:
        raise BadMessage("bad_message", f"channel {channel} takes no keys filter")
    if channel in TEXT_KEYS:
        valid = all(isinstance(k, str) and 0 < len(k) <= MAX_TEXT_KEY for k in keys) \
            if isinstance(keys, list) else False
        kind = f"names of at most {MAX_TEXT_KEY} characters"
    else:
        valid = isinstance(keys, list) and all(
            isinstance(k, int) and not isinstance(k, bool) for k in keys)
        kind = "ids"
    if not valid or len(keys) > MAX_FILTER_KEYS:
        raise BadMessage("bad_message", f"keys must be a list of at most {MAX_FILTER_KEYS} {kind}")
    return frozenset(keys)


# --- the handler ----------------------------------------------------------------------


async def websocket_handler(request: web.Request) -> web.WebSocketResponse:
    """``GET /ws``: authenticate, greet, then serve subscribe/unsubscribe/ping."""
    settings = request.app[WS_SETTINGS_KEY]
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat_s,
        max_msg_size=settings.ws_max_frame_bytes,
        timeout=CLOSE_TIMEOUT_S,
    )
    await ws.prepare(request)
    principal = _authenticate(request)
    if principal is None:
        await ws.close(code=CLOSE_UNAUTHENTICATED, message=b"unauthenticated: missing, bad or "
                                                          b"expired token")
        return ws
    metrics = request.app[WS_METRICS_KEY]
    conn = Connection(ws, principal, settings.ws_send_queue_max, request.transport,
                      settings.ws_send_queue_max_bytes, request.app[RECORD_KEY], metrics)
    connections: set[Connection] = request.app[CONNECTIONS_KEY]
    connections.add(conn)
    conn.start()
    conn.close_at_expiry(ensure_signer(request.app, settings).now_s)
    conn.send({
        "type": "welcome", "role": principal.role, "customer_id": principal.customer_id,
        "channels": [c for c in CHANNELS if may_subscribe(principal, c)],
        "expires_at": principal.expires_at_s,
    })
    metrics.connections.inc()
    try:
        await _read_loop(request.app, conn)
    finally:
        metrics.connections.dec()  # whatever ended it: a close, a refusal, a dropped socket
        connections.discard(conn)
        request.app[NOTIFIER_KEY].drop(conn)
        await conn.finish()
    return ws


def _authenticate(request: web.Request) -> Principal | None:
    token = bearer_token(request)
    if token is None:
        return None
    try:
        return ensure_signer(request.app, request.app[WS_SETTINGS_KEY]).verify(token)
    except Unauthenticated:
        return None


async def _read_loop(app: web.Application, conn: Connection) -> None:
    errors_in_row = 0
    async for frame in conn.ws:
        if frame.type == WSMsgType.BINARY:
            conn.refuse(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted")
            break
        if frame.type != WSMsgType.TEXT:
            break
        message: dict[str, Any] | None = None
        try:
            message = decode_frame(frame.data)
            await _handle(app, conn, check_message(message))
            errors_in_row = 0
        except BadMessage as exc:
            errors_in_row += 1
            conn.send(error_answer(exc, message))
            if errors_in_row >= MAX_CONSECUTIVE_ERRORS:
                conn.refuse(CLOSE_BAD_PROTOCOL, "too many bad messages")
                break
    if conn.refused or conn.ws.close_code is not None:
        return
    with contextlib.suppress(Exception):
        await conn.ws.close()


async def _handle(app: web.Application, conn: Connection, message: dict[str, Any]) -> None:
    ref = message.get("ref")
    if conn.principal.expired(ensure_signer(app, app[WS_SETTINGS_KEY]).now_s()):
        conn.refuse(CLOSE_UNAUTHENTICATED, "token expired")
        return
    if message["type"] == "ping":
        conn.send(answer("pong", ref))
        return
    channel: str = message["channel"]
    notifier = app[NOTIFIER_KEY]
    if message["type"] == "unsubscribe":
        _cancel_subscription(conn, channel)
        notifier.unsubscribe(conn, channel)
        conn.send(answer("unsubscribed", ref, channel=channel))
        return
    if not may_subscribe(conn.principal, channel):
        if channel in STAFF_ONLY:
            conn.refuse(CLOSE_FORBIDDEN, f"forbidden: {channel} is for staff only")
            return
        raise BadMessage("forbidden", f"not allowed to subscribe to {channel}")
    since, keys = parse_since(message), parse_keys(message)
    _cancel_subscription(conn, channel)
    conn.subscribed[channel] = asyncio.create_task(
        _subscribe(notifier, conn, channel, keys, since, ref), name=f"ws-subscribe-{channel}")


def _cancel_subscription(conn: Connection, channel: str) -> None:
    task = conn.subscribed.pop(channel, None)
    if task is not None and not task.done():
        task.cancel()


async def _subscribe(notifier: Notifier, conn: Connection, channel: str,
                     keys: frozenset[int | str] | None, since: StreamId | None, ref: Any) -> None:
    """Subscribe (replaying from ``since``) in its own task so the reader keeps reading."""

    async def announce(last_id: str, resync: Resync | None) -> None:
        if resync is not None:
            conn.send(answer("resync", ref, channel=channel, reason=resync.reason,
                             last_id=resync.last_id))
        conn.send(answer("subscribed", ref, channel=channel, last_id=last_id))

    await notifier.subscribe(conn, channel, keys, since, announce)


# --- wiring ---------------------------------------------------------------------------


def setup_realtime(app: web.Application, settings: Settings) -> None:
    """Add ``GET /ws`` and the notifier actor (a child of the api's root supervisor)."""
    ensure_signer(app, settings)
    app[WS_SETTINGS_KEY] = settings
    app[CONNECTIONS_KEY] = set()
    app[RECORD_KEY] = RealtimeRecord()
    app.router.add_get("/ws", websocket_handler)
    app.cleanup_ctx.append(_notifier_ctx(settings))
    app.on_shutdown.append(_close_connections)
    add_child(app, settings, notifier_child)


def _notifier_ctx(settings: Settings) -> Any:
    """The notifier's Redis client and state, open for the app's life (its actor runs it)."""

    async def notifier_ctx(app: web.Application) -> AsyncIterator[None]:
        redis_url, _ = settings.require_urls()
        client = aioredis.Redis.from_url(
            redis_url, decode_responses=True, encoding_errors="replace",
            socket_timeout=settings.notifier_block_ms / 1000 + 5, socket_connect_timeout=2,
        )
        signer = ensure_signer(app, settings)
        app[WS_METRICS_KEY] = WsMetrics(get_metrics(settings))
        app[NOTIFIER_KEY] = Notifier(
            client, settings.namespace, block_ms=settings.notifier_block_ms,
            expired=lambda viewer: isinstance(viewer, Principal) and viewer.expired(
                signer.now_s()),
        )
        try:
            yield
        finally:
            await client.aclose()

    return notifier_ctx


def notifier_child(app: web.Application, bridge: LoopBridge) -> ChildSpec:
    """The notifier as a supervised async actor: ``Notifier.run`` is its life.

    Redis outages are ridden out inside ``run()``; anything else escaping it
    crashes the actor and the root restarts it (log line, metric, event). The
    ``Notifier`` object outlives its incarnations: a restart resumes tailing
    from the cursors it had and keeps the connections' subscriptions, so no
    client notices beyond the event that broke it. Its start waits (at most
    :data:`READY_TIMEOUT_S`) until the stream ends are known, so ``/ws``
    serves subscriptions at once.
    """
    notifier = app[NOTIFIER_KEY]
    mailbox = MailboxConfig.from_settings(app[WS_SETTINGS_KEY])

    async def ready() -> None:
        with contextlib.suppress(TimeoutError):  # Redis is away: run() keeps trying
            await notifier.wait_ready(READY_TIMEOUT_S)

    return ChildSpec(
        NOTIFIER_CHILD,
        # stop=: run() returns within one XREAD block even if the cancel would be swallowed.
        lambda: TaskActor.start(bridge, NOTIFIER_CHILD, notifier.run, ready=ready,
                                stop=notifier.stop, mailbox=mailbox),
        Restart.PERMANENT, start_timeout_s=READY_TIMEOUT_S + 5,
    )


async def _close_connections(app: web.Application) -> None:
    """On shutdown tell every client to reconnect elsewhere (1001 going away)."""
    conns = list(app.get(CONNECTIONS_KEY, ()))
    for conn in conns:
        conn.refuse(CLOSE_GOING_AWAY, "server shutting down")
    await asyncio.gather(*(c.finish() for c in conns), return_exceptions=True)


__all__ = ["NOTIFIER_KEY", "RECORD_KEY", "WSCloseCode", "setup_realtime"]
