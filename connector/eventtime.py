"""When an event happened, and whether its route still wants it (``max_event_age_s``).

After an outage the backlog may hold events whose moment has passed: "your compliance
deadline is tomorrow" read two days late. A route with ``max_event_age_s`` drops such
events before any call: they go to the dead-letter topic (stage ``route``, code
``expired``), where an operator can still see them, and redrive them on purpose.

The event time is the route's ``event_time_field`` (a dotted path to an ISO-8601 string or
an epoch number) or, without one, the event's own (a CloudEvent's ``time``) or else the
Kafka record's timestamp. An event time that cannot
be read is the event's fault: stage ``validate``, code ``invalid_event_time``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from connector.config import Route
from connector.errors import EventRejected, Stage
from connector.events import Event, lookup

# Epoch numbers above this are milliseconds: 1e11 seconds is the year 5138, 1e11 ms is 1973.
EPOCH_MS_ABOVE = 100_000_000_000


def parse_event_time(value: Any) -> float:
    """Epoch seconds from an ISO-8601 string or an epoch number (seconds, or milliseconds
    above 1e11); ValueError if it is neither. A time without a zone is taken as UTC."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            parsed = datetime.fromisoformat(text)  # ValueError names the text
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.timestamp()
        return _epoch(number)
    if isinstance(value, int | float):
        return _epoch(float(value))
    raise ValueError(f"a JSON {type(value).__name__} is not a time")


def _epoch(number: float) -> float:
    if number != number or number in (float("inf"), float("-inf")) or number < 0:
        raise ValueError(f"{number} is not an epoch time")
    return number / 1000 if number > EPOCH_MS_ABOVE else number


def event_time_s(route: Route, event: Event) -> float | None:
    """The event's time in epoch seconds; None if the record has no timestamp either."""
    field = route.event_time_field or event.time_field
    if field is None:
        ts_ms = event.record.timestamp_ms
        return ts_ms / 1000 if ts_ms > 0 else None
    try:
        return parse_event_time(lookup(event.body, field))
    except KeyError as exc:
        raise EventRejected(
            Stage.VALIDATE,
            f"event time field {field!r} is missing",
            code="invalid_event_time",
        ) from exc
    except (ValueError, OverflowError) as exc:
        raise EventRejected(
            Stage.VALIDATE,
            f"event time field {field!r} is not an ISO-8601 time or epoch number: {exc}",
            code="invalid_event_time",
        ) from exc


def check_fresh(route: Route, event: Event, now_s: float) -> None:
    """Raise EventRejected(``expired``) if the event is older than its route allows."""
    if route.max_event_age_s is None:
        return
    happened = event_time_s(route, event)
    if happened is None:
        return  # no time to judge by: process it rather than drop it
    age_s = now_s - happened
    if age_s > route.max_event_age_s:
        raise EventRejected(
            Stage.ROUTE,
            f"event is {age_s:.0f} s old, over the route's max_event_age_s "
            f"{route.max_event_age_s:g}",
            code="expired",
        )
