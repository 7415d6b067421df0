"""Event → thread request: pick the route, render the templates, check the API's rules.

Everything the Threads API would answer 400/422 to is caught here, so such an event goes
to the dead-letter topic without spending a rate-limit token.

Templates use ``string.Template`` syntax with dotted paths into the event:
``"Order ${data.orderId} shipped to ${user.name}"``. Rendering only looks values up; it
never evaluates anything, and a missing field rejects the event (stage ``validate``).
"""

from __future__ import annotations

import functools
import re
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from connector.config import IDENTIFIER_FIELDS, TEMPLATE_ID, Route, check_template_syntax
from connector.errors import EventRejected, Stage
from connector.events import Event, lookup
from connector.eventtime import check_fresh

EXTERNAL_USER_ID = re.compile(r"^[A-Za-z0-9_-]+$")
IDENTIFIER_MAX_LENGTH = 100  # externalUserId, sdkUserEmail, realEmailAddress (OpenAPI)


class _DottedTemplate(string.Template):
    idpattern = TEMPLATE_ID  # the one the config validators check templates against


class _EventView(Mapping[str, str]):
    """A read-only mapping that resolves dotted paths in the event body."""

    def __init__(self, body: dict[str, Any], extra: Mapping[str, str]) -> None:
        self._body = body
        self._extra = extra

    def __getitem__(self, path: str) -> str:
        if path in self._extra:
            return self._extra[path]
        value = lookup(self._body, path)
        if value is None:
            raise KeyError(path)
        if isinstance(value, str):
            return value
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError as exc:  # a TypeError: it would escape the pipeline
            # orjson writes 255 levels but reads 1,023: an event can hold what cannot render
            raise ValueError(f"field {path!r} cannot be written as JSON ({exc})") from exc

    def __iter__(self) -> Any:
        return iter(self._body)

    def __len__(self) -> int:
        return len(self._body)


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A template split once into literal text and placeholder names: ``parts`` is
    literal, name, literal, ..., literal. Rendering joins them with the looked-up values,
    as ``string.Template.substitute`` would (same values, same KeyError), without its
    regular expression and callback per call. ``parts`` is None for a template with an
    invalid placeholder: ``substitute`` then raises its own ValueError."""

    template: _DottedTemplate
    parts: tuple[str, ...] | None

    def substitute(self, view: Mapping[str, str]) -> str:
        parts = self.parts
        if parts is None:
            return self.template.substitute(view)
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(view[parts[i]])
            out.append(parts[i + 1])
        return "".join(out)


@functools.lru_cache(maxsize=1024)
def _compiled(template: str) -> _Compiled:
    compiled = _DottedTemplate(template)
    parts: list[str] = []
    literal: list[str] = []
    position = 0
    for match in compiled.pattern.finditer(template):
        literal.append(template[position : match.start()])
        position = match.end()
        if match.group("invalid") is not None:
            return _Compiled(compiled, None)
        if match.group("escaped") is not None:
            literal.append(compiled.delimiter)
            continue
        parts += ["".join(literal), match.group("named") or match.group("braced")]
        literal = []
    literal.append(template[position:])
    parts.append("".join(literal))
    return _Compiled(compiled, tuple(parts))


class _UrlView(_EventView):
    """The values percent-encoded for a URL: only RFC 3986 unreserved characters are kept
    (RFC 6570's simple expansion), so no value can add a path, a query parameter or a
    fragment to the link, or a scheme or a line break."""

    def __getitem__(self, path: str) -> str:
        return quote(super().__getitem__(path), safe="")


def render(
    template: str,
    body: dict[str, Any],
    extra: Mapping[str, str] | None = None,
    *,
    url: bool = False,
) -> str:
    """Render a template against the event; KeyError names the first missing field.
    ``url``: the template is a URL (the deep link), each value is percent-encoded."""
    view = (_UrlView if url else _EventView)(body, extra or {})
    return _compiled(template).substitute(view)


def render_event(
    template: str,
    body: dict[str, Any],
    extra: Mapping[str, str] | None = None,
    *,
    url: bool = False,
) -> str:
    """``render``, with its failures as the event's: EventRejected (stage validate)."""
    try:
        return render(template, body, extra, url=url)
    except KeyError as exc:
        raise _missing(exc) from exc
    except ValueError as exc:
        raise _template_error(exc) from exc


def _missing(exc: KeyError) -> EventRejected:
    return EventRejected(
        Stage.VALIDATE, f"field {exc.args[0]!r} is missing from the event", code="missing_field"
    )


def _template_error(exc: ValueError) -> EventRejected:
    return EventRejected(Stage.VALIDATE, f"template error: {exc}", code="template_error")


def check_template(template: str) -> None:
    """Raise ValueError if the template itself is malformed (the settings models run the
    same check, so ``check-config`` reports it against the field)."""
    check_template_syntax(template)


@dataclass(frozen=True, slots=True)
class ThreadRequest:
    """A request the Threads API will accept, already checked against its OpenAPI rules."""

    app_uid: str
    agent_uid: str
    message: str
    message_type: str
    identifier_field: str
    identifier_value: str
    route: str = ""  # the route that made it (``route_label``): its failures are counted by it

    def body(self) -> dict[str, str]:
        """The JSON body of ``POST /api/v1/appuid/{appUid}/threads``."""
        return {
            "agentUid": self.agent_uid,
            "message": self.message,
            "messageType": self.message_type,
            self.identifier_field: self.identifier_value,
        }

    @property
    def user_key(self) -> str:
        """Key for the results topic: one user's results stay in order."""
        return f"{self.identifier_field}:{self.identifier_value}"


def validate_request(request: ThreadRequest) -> None:
    """The OpenAPI's rules for the create-thread body; raise EventRejected(validate)."""
    problems: list[str] = []
    if not request.app_uid:
        problems.append("appUid is empty")
    agent = request.agent_uid
    if not agent or agent.startswith("::") or agent.endswith("::"):
        problems.append(f"agentUid {agent!r} must be agentUid or agentUid::sessionUid")
    if not request.message.strip():
        problems.append("message is empty")
    if request.message_type not in ("user", "system"):
        problems.append(f"messageType {request.message_type!r} is not user or system")
    value = request.identifier_value
    if not value:
        problems.append(f"{request.identifier_field} is empty")
    elif request.identifier_field != "humanUid" and len(value) > IDENTIFIER_MAX_LENGTH:
        problems.append(
            f"{request.identifier_field} is {len(value)} characters, over {IDENTIFIER_MAX_LENGTH}"
        )
    if (
        request.identifier_field == "externalUserId"
        and value
        and not EXTERNAL_USER_ID.fullmatch(value)
    ):
        problems.append("externalUserId may only contain A-Za-z0-9_-")
    if problems:
        raise EventRejected(Stage.VALIDATE, "; ".join(problems), code="invalid_request")


def _identifier(route: Route, event: Event) -> tuple[str, Any]:
    """The (API field, raw value) of the user identifier; KeyError if absent."""
    found = lookup(event.body, route.user.path)
    if route.user.field is not None:
        return route.user.field, found
    if not isinstance(found, dict):
        raise EventRejected(
            Stage.VALIDATE,
            f"{route.user.path!r} must be an object holding one user identifier",
            code="invalid_identifier",
        )
    present = [name for name in IDENTIFIER_FIELDS if found.get(name) not in (None, "")]
    if len(present) != 1:
        raise EventRejected(
            Stage.VALIDATE,
            f"exactly one user identifier of {', '.join(IDENTIFIER_FIELDS)} is required "
            f"at {route.user.path!r}, found {len(present)}"
            + (f" ({', '.join(present)})" if present else ""),
            code="invalid_identifier",
        )
    return present[0], found[present[0]]


def route_label(route: Route) -> str:
    """A route's name in readiness, logs and the ``route`` metric label: ``topic/type``
    (``*`` for any). Routes match first-first, so the reachable ones have distinct names;
    bounded by the configuration."""
    return f"{route.topic}/{route.event_type}"


class Router:
    """Finds the route for an event and builds its ThreadRequest."""

    def __init__(self, routes: Sequence[Route], clock: Callable[[], float] = time.time) -> None:
        """``clock``: epoch seconds, for the routes' ``max_event_age_s``."""
        for route in routes:
            check_template(route.message_template)
            check_template(route.agent_uid)
        self._routes = tuple(routes)
        self._clock = clock

    def find(self, event: Event) -> Route:
        topic = event.record.topic
        for route in self._routes:
            if route.topic in ("*", topic) and route.event_type in ("*", event.event_type):
                return route
        raise EventRejected(
            Stage.ROUTE,
            f"no route for event type {event.event_type!r} on topic {topic!r}",
            code="no_route",
        )

    def build(self, event: Event) -> tuple[Route, ThreadRequest]:
        route = self.find(event)
        check_fresh(route, event, self._clock())  # stale events make no call
        extra = {"eventId": event.event_id, "eventType": event.event_type}
        try:
            message = render(route.message_template, event.body, extra)
            agent_uid = render(route.agent_uid, event.body, extra)
            id_field, raw_user = _identifier(route, event)
        except KeyError as exc:
            raise _missing(exc) from exc
        except ValueError as exc:
            raise _template_error(exc) from exc
        if isinstance(raw_user, bool) or not isinstance(raw_user, str | int):
            raise EventRejected(
                Stage.VALIDATE,
                f"user identifier at {route.user.path!r} must be a string, "
                f"got {type(raw_user).__name__}",
                code="invalid_identifier",
            )
        request = ThreadRequest(
            app_uid=route.app_uid,
            agent_uid=agent_uid,
            message=message,
            message_type=route.message_type,
            identifier_field=id_field,
            identifier_value=str(raw_user),
            route=route_label(route),
        )
        validate_request(request)
        return route, request
