"""A local SendGrid v3 server that checks requests the way the real mail send API does.

It validates what the real ``POST /v3/mail/send`` requires, in its order: a
Bearer API key first (401 whatever the body), then ``Content-Type:
application/json``, then the body: only the documented top-level fields,
``from.email``, a non-empty ``personalizations`` list whose entries have a
non-empty ``to`` with valid addresses, a subject and content unless a template
is used (``text/plain`` first, then ``text/html``, then any other type), a
``d-`` dynamic template id with ``dynamic_template_data`` objects, string
``custom_args``. Violations answer 400 with SendGrid's ``{"errors":
[{"message", "field"}]}``.

Answers are scripted per request (``script``): 202, 400, 401, 429 with
Retry-After, 5xx, ``hang`` (never answers) or ``accept_hang`` (accepts the
message, then never answers: the timeout-after-acceptance case). Accepted
messages are listed by ``GET /v3/messages`` (the Email Activity API), with
the ``unique_args['name']="value"`` query.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

API_KEY = "SG.test-key"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_UNIQUE_ARG_QUERY = re.compile(r"""^unique_args\['([^']+)'\]="([^"]*)"$""")
# The top-level fields of the v3 mail send body; anything else is refused.
MAIL_FIELDS = frozenset({
    "personalizations", "from", "reply_to", "reply_to_list", "subject", "content", "attachments",
    "template_id", "headers", "categories", "custom_args", "send_at", "batch_id", "asm",
    "ip_pool_name", "mail_settings", "tracking_settings",
})


@dataclass
class Accepted:
    msg_id: str
    body: dict[str, Any]


@dataclass
class FakeSendGrid:
    """State of the fake: scripted answers, accepted messages, every request seen."""

    script: list[Any] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    activity_visible: bool = True
    activity_status: int = 200
    activity_lookups: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def sent_with_key(self, key: str) -> list[Accepted]:
        return [a for a in self.accepted if a.body.get("custom_args", {}).get("idempotency_key") == key]


FAKE_KEY = web.AppKey("fake_sendgrid", FakeSendGrid)


def _errors(status: int, *problems: tuple[str, str | None]) -> web.Response:
    return web.json_response(
        {"errors": [{"message": m, "field": f, "help": None} for m, f in problems]}, status=status)


def _check_auth(request: web.Request) -> web.Response | None:
    if request.headers.get("Authorization") != f"Bearer {API_KEY}":
        return _errors(401, ("The provided authorization grant is invalid, expired, or revoked", None))
    return None


def validate_mail(body: Any) -> list[tuple[str, str | None]]:
    """The problems SendGrid would report for this mail-send body (empty = valid)."""
    if not isinstance(body, dict):
        return [("Bad Request", None)]
    problems: list[tuple[str, str | None]] = [
        (f"The field {name!r} is not a valid field of the mail send request.", name)
        for name in sorted(set(body) - MAIL_FIELDS)
    ]
    sender = body.get("from")
    if not isinstance(sender, dict) or not _EMAIL.match(str(sender.get("email", ""))):
        problems.append(("The from object must be provided for every email send.", "from"))
    templated = isinstance(body.get("template_id"), str)
    if templated and not body["template_id"].startswith("d-"):
        problems.append(("The template_id must be a valid dynamic template id.", "template_id"))
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        problems.append(("The personalizations field is required.", "personalizations"))
        personalizations = []
    for i, p in enumerate(personalizations):
        to = p.get("to") if isinstance(p, dict) else None
        if not isinstance(to, list) or not to:
            problems.append(("The to array is required for all personalization objects.",
                             f"personalizations.{i}.to"))
            continue
        for j, r in enumerate(to):
            if not isinstance(r, dict) or not _EMAIL.match(str(r.get("email", ""))):
                problems.append(("Does not contain a valid address.",
                                 f"personalizations.{i}.to.{j}.email"))
        if templated and not isinstance(p.get("dynamic_template_data", {}), dict):
            problems.append(("dynamic_template_data must be an object.",
                             f"personalizations.{i}.dynamic_template_data"))
        if not templated and not (body.get("subject") or p.get("subject")):
            problems.append(("The subject is required.", "subject"))
    if not templated:
        content = body.get("content")
        if (not isinstance(content, list) or not content
                or not all(isinstance(c, dict) and c.get("type") and isinstance(c.get("value"), str)
                           for c in content)):
            problems.append((("Unless a valid template_id is provided, the content parameter is "
                              "required."), "content"))
        else:
            problems.extend(_content_order(content))
    custom_args = body.get("custom_args", {})
    if not isinstance(custom_args, dict) or not all(isinstance(v, str) for v in custom_args.values()):
        problems.append(("custom_args values must be strings.", "custom_args"))
    return problems


def _content_order(content: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """SendGrid's rule: ``text/plain`` (if any) first, then ``text/html``, then other types."""
    rank = {"text/plain": 0, "text/html": 1}
    ranks = [rank.get(str(c["type"]).lower(), 2) for c in content]
    if ranks != sorted(ranks):
        return [(("The content value must be in order: text/plain first, then text/html, "
                 "then any other type."), "content")]
    return []


async def mail_send(request: web.Request) -> web.Response:
    fake = request.app[FAKE_KEY]
    raw = await request.read()
    try:
        body: Any = json.loads(raw) if raw else None
    except ValueError:
        body = None
    fake.requests.append({"headers": dict(request.headers), "body": body})
    denied = _check_auth(request)  # the key is checked before anything in the request
    if denied is not None:
        return denied
    if request.content_type != "application/json":
        return _errors(415, ("Content-Type should be application/json.", None))
    if body is None:
        return _errors(400, ("Bad Request", None))
    problems = validate_mail(body)
    if problems:
        return _errors(400, *problems)
    step = fake.script.pop(0) if fake.script else 202
    if step == "hang":
        await fake.stopping.wait()
        return _errors(503, ("hung", None))
    if step in (202, "accept_hang"):
        msg_id = uuid.uuid4().hex[:22]
        fake.accepted.append(Accepted(msg_id, body))
        if step == "accept_hang":
            await fake.stopping.wait()
        return web.Response(status=202, headers={"X-Message-Id": msg_id})
    if isinstance(step, tuple) and step[0] == 429:
        return web.json_response({"errors": [{"message": "too many requests", "field": None}]},
                                 status=429, headers={"Retry-After": str(step[1])})
    if step == 400:
        return _errors(400, ("Does not contain a valid address.", "personalizations.0.to.0.email"))
    if step == 401:
        return _errors(401, ("The provided authorization grant is invalid, expired, or revoked", None))
    return _errors(int(step), ("server error", None))


async def list_messages(request: web.Request) -> web.Response:
    fake = request.app[FAKE_KEY]
    denied = _check_auth(request)
    if denied is not None:
        return denied
    fake.activity_lookups += 1
    if fake.activity_status != 200:
        return _errors(fake.activity_status, ("access forbidden", None))
    match = _UNIQUE_ARG_QUERY.match(request.query.get("query", ""))
    if not match:
        return _errors(400, ("invalid query", "query"))
    name, value = match.groups()
    limit = int(request.query.get("limit", "10"))
    found = [a for a in fake.accepted if a.body.get("custom_args", {}).get(name) == value]
    if not fake.activity_visible:
        found = []
    return web.json_response({"messages": [
        {"msg_id": f"{a.msg_id}.filter0001", "to_email": a.body["personalizations"][0]["to"][0]["email"],
         "status": "delivered", "opens_count": 0, "clicks_count": 0} for a in found[:limit]]})


def create_fake_sendgrid() -> tuple[web.Application, FakeSendGrid]:
    fake = FakeSendGrid()
    app = web.Application()
    app[FAKE_KEY] = fake
    app.router.add_post("/v3/mail/send", mail_send)
    app.router.add_get("/v3/messages", list_messages)

    async def release(app: web.Application) -> None:
        fake.stopping.set()

    app.on_shutdown.append(release)
    return app, fake
