"""connector.eventtime: event times, and routes that drop events older than they allow."""

from __future__ import annotations

from typing import Any

import pytest

from connector.config import Route
from connector.errors import EventRejected, Stage
from connector.events import Event, InputRecord
from connector.eventtime import check_fresh, parse_event_time
from connector.routing import Router

NOW = 1_790_000_000.0  # 2026-09-21


def route(**overrides: Any) -> Route:
    fields: dict[str, Any] = {
        "event_type": "deadline",
        "app_uid": "app",
        "agent_uid": "agent",
        "message_template": "Deadline ${data.due}",
        "user": {"field": "humanUid", "path": "user.id"},
    }
    return Route.model_validate(fields | overrides)


def event(body: dict[str, Any], timestamp_ms: int = 0) -> Event:
    rec = InputRecord("t", 0, 0, None, b"{}", (), timestamp_ms)
    full = {"type": "deadline", "user": {"id": "h-1"}, "data": {"due": "Fri"}} | body
    return Event(event_id="e-1", event_type="deadline", body=full, record=rec)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-09-21T00:00:00Z", 1_789_948_800.0),
        ("2026-09-21T02:00:00+02:00", 1_789_948_800.0),
        ("2026-09-21T00:00:00", 1_789_948_800.0),  # no zone: UTC
        (1_789_948_800, 1_789_948_800.0),
        (1_789_948_800_000, 1_789_948_800.0),  # milliseconds
        ("1789948800", 1_789_948_800.0),
        (1_789_948_800.5, 1_789_948_800.5),
    ],
)
def test_parses_iso_and_epoch(value: Any, expected: float) -> None:
    assert parse_event_time(value) == expected


@pytest.mark.parametrize("value", ["yesterday", "", True, None, {"t": 1}, [1], -5, "nan"])
def test_refuses_what_is_not_a_time(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_event_time(value)


def test_no_limit_no_check() -> None:
    check_fresh(route(event_time_field="at"), event({"at": "garbage"}), NOW)


def test_old_event_expires_fresh_one_passes() -> None:
    r = route(max_event_age_s=3600, event_time_field="meta.at")
    check_fresh(r, event({"meta": {"at": NOW - 3599}}), NOW)
    with pytest.raises(EventRejected) as info:
        check_fresh(r, event({"meta": {"at": NOW - 3601}}), NOW)
    assert (info.value.stage, info.value.code) == (Stage.ROUTE, "expired")
    assert "3601 s old" in info.value.reason


def test_record_timestamp_without_a_field() -> None:
    r = route(max_event_age_s=60)
    check_fresh(r, event({}, timestamp_ms=int((NOW - 30) * 1000)), NOW)
    with pytest.raises(EventRejected, match="90 s old"):
        check_fresh(r, event({}, timestamp_ms=int((NOW - 90) * 1000)), NOW)
    check_fresh(r, event({}, timestamp_ms=-1), NOW)  # no timestamp: processed


@pytest.mark.parametrize("body", [{"at": "soon"}, {}, {"at": False}])
def test_unreadable_event_time(body: dict[str, Any]) -> None:
    with pytest.raises(EventRejected) as info:
        check_fresh(route(max_event_age_s=60, event_time_field="at"), event(body), NOW)
    assert (info.value.stage, info.value.code) == (Stage.VALIDATE, "invalid_event_time")


def test_router_checks_age_before_building() -> None:
    r = route(max_event_age_s=60, event_time_field="at")
    router = Router([r], clock=lambda: NOW)
    _, request = router.build(event({"at": NOW - 10}))
    assert request.message == "Deadline Fri"
    with pytest.raises(EventRejected, match="max_event_age_s"):
        router.build(event({"at": NOW - 120}))


def test_route_fields_validated() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        route(max_event_age_s=0)
    with pytest.raises(ValueError, match="at least 1 character"):
        route(event_time_field="")


def test_an_events_own_time_field_is_used_when_the_route_names_none() -> None:
    route = Route(
        event_type="*",
        app_uid="a",
        agent_uid="g",
        message_template="m",
        user={"path": "u"},
        max_event_age_s=60,
    )
    rec = InputRecord("t", 0, 0, None, b"{}", timestamp_ms=2_000_000_000_000)
    body = {"time": "2020-01-01T00:00:00Z"}
    cloud = Event("e", "t", body, rec, time_field="time")
    with pytest.raises(EventRejected, match="max_event_age_s"):
        check_fresh(route, cloud, now_s=1_600_000_000)
    check_fresh(route, Event("e", "t", body, rec), now_s=2_000_000_000)  # the record's time
