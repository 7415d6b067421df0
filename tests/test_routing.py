"""connector.routing: route choice, template rendering and the API's request rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.config import Route
from connector.errors import EventRejected, Stage
from connector.events import Event, InputRecord
from connector.routing import Router, ThreadRequest, validate_request

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "connector.yaml"
IDENTIFIERS = ("humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress")


@pytest.fixture(scope="module")
def router() -> Router:
    """The routes of the shipped config/connector.yaml."""
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))["routes"]
    return Router([Route.model_validate(r) for r in raw])


def event(body: dict[str, Any], topic: str = "domain-events", event_id: str = "evt-1") -> Event:
    rec = InputRecord(topic, 0, 0, None, b"{}")
    return Event(event_id=event_id, event_type=str(body.get("type")), body=body, record=rec)


def route(**overrides: Any) -> Route:
    fields: dict[str, Any] = {
        "event_type": "custom",
        "app_uid": "app",
        "agent_uid": "agent",
        "message_template": "hello",
        "user": {"field": "humanUid", "path": "user.id"},
    }
    return Route.model_validate(fields | overrides)


def build_one(r: Route, body: dict[str, Any]) -> ThreadRequest:
    return Router([r]).build(event({"type": "custom", "user": {"id": "h-1"}} | body))[1]


def rejection(router: Router, ev: Event) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        router.build(ev)
    return info.value


def shipped_order(user: Any, **data: Any) -> Event:
    return event(
        {
            "type": "order.shipped",
            "data": {"orderId": "o-1", "carrier": "DHL", "eta": "Monday"} | data,
            "user": user,
        }
    )


def onboarding(human_uid: Any) -> Event:
    return event(
        {
            "type": "onboarding.milestone",
            "data": {"milestone": "week 1"},
            "user": {"humanUid": human_uid},
        }
    )


def compliance(email: str, case_id: Any = "case-7") -> Event:
    return event(
        {
            "type": "compliance.deadline",
            "data": {"caseId": case_id, "policy": "GDPR", "dueDate": "2025-01-31"},
            "user": {"email": email},
        }
    )


def ticket(external_id: Any) -> Event:
    return event(
        {
            "type": "ticket.resolved",
            "data": {"ticketId": "T-9", "subject": "VPN"},
            "user": {"externalUserId": external_id},
        }
    )


# -- the shipped routes --------------------------------------------------------------------


def test_order_shipped_with_the_identifier_chosen_by_the_event(router: Router) -> None:
    found, request = router.build(shipped_order({"externalUserId": "cust-42"}))

    assert found.event_type == "order.shipped"
    assert request.app_uid == "demo-app"
    assert request.agent_uid == "agent-orders"
    assert request.message_type == "system"
    assert request.message.startswith("Order o-1 has shipped with DHL, expected Monday.")
    assert request.body() == {
        "agentUid": "agent-orders",
        "message": request.message,
        "messageType": "system",
        "externalUserId": "cust-42",
    }
    assert request.user_key == "externalUserId:cust-42"


@pytest.mark.parametrize(
    ("field", "value"),
    [("humanUid", "h-1"), ("sdkUserEmail", "a@b.c"), ("realEmailAddress", "x@y.z")],
)
def test_object_form_accepts_each_identifier(router: Router, field: str, value: str) -> None:
    _, request = router.build(shipped_order({field: value, "name": "not an identifier"}))
    assert (request.identifier_field, request.identifier_value) == (field, value)
    assert [k for k in request.body() if k in IDENTIFIERS] == [field]


@pytest.mark.parametrize(
    "user",
    [
        {"humanUid": "h-1", "externalUserId": "cust-1"},
        {"sdkUserEmail": "a@b.c", "realEmailAddress": "x@y.z", "humanUid": "h"},
        {},
        {"name": "Ann"},
        {"humanUid": "", "externalUserId": None},
    ],
)
def test_object_form_needs_exactly_one_identifier(router: Router, user: dict[str, Any]) -> None:
    exc = rejection(router, shipped_order(user))
    assert exc.stage is Stage.VALIDATE
    assert exc.code == "invalid_identifier"
    present = [name for name in IDENTIFIERS if user.get(name)]
    assert f"found {len(present)}" in exc.reason
    assert all(name in exc.reason for name in present)


def test_object_form_ignores_empty_identifiers(router: Router) -> None:
    _, request = router.build(shipped_order({"humanUid": "", "externalUserId": "cust-1"}))
    assert request.identifier_field == "externalUserId"


@pytest.mark.parametrize("user", ["cust-1", ["cust-1"], 42])
def test_object_form_needs_an_object(router: Router, user: Any) -> None:
    exc = rejection(router, shipped_order(user))
    assert exc.stage is Stage.VALIDATE
    assert exc.code == "invalid_identifier"


def test_object_form_without_the_user_object(router: Router) -> None:
    ev = event({"type": "order.shipped", "data": {"orderId": 1, "carrier": "c", "eta": "e"}})
    exc = rejection(router, ev)
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "missing_field")
    assert "user" in exc.reason


def test_field_form_human_uid(router: Router) -> None:
    _, request = router.build(onboarding("h-77"))
    assert request.agent_uid == "agent-onboarding"
    assert '"week 1"' in request.message
    assert (request.identifier_field, request.identifier_value) == ("humanUid", "h-77")


def test_human_uid_length_is_not_limited(router: Router) -> None:
    _, request = router.build(onboarding("h" * 500))
    assert request.identifier_value == "h" * 500


def test_composite_agent_uid_is_rendered(router: Router) -> None:
    _, request = router.build(compliance("ann@example.com", case_id="case-7"))
    assert request.agent_uid == "agent-compliance::case-7"
    assert (request.identifier_field, request.identifier_value) == (
        "sdkUserEmail",
        "ann@example.com",
    )
    assert "GDPR attestation is due on 2025-01-31" in request.message


def test_composite_agent_uid_with_an_empty_session_is_rejected(router: Router) -> None:
    exc = rejection(router, compliance("ann@example.com", case_id=""))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_request")
    assert "agentUid" in exc.reason


def email_of_length(n: int) -> str:
    return "a" * (n - len("@example.com")) + "@example.com"


def test_sdk_user_email_max_length(router: Router) -> None:
    _, request = router.build(compliance(email_of_length(100)))
    assert len(request.identifier_value) == 100
    exc = rejection(router, compliance(email_of_length(101)))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_request")
    assert "sdkUserEmail" in exc.reason


def test_real_email_address_max_length(router: Router) -> None:
    router.build(shipped_order({"realEmailAddress": email_of_length(100)}))
    exc = rejection(router, shipped_order({"realEmailAddress": email_of_length(101)}))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_request")
    assert "realEmailAddress" in exc.reason


@pytest.mark.parametrize("value", ["cust-1", "A_b-9", "x" * 100, 12345])
def test_external_user_id_accepted(router: Router, value: Any) -> None:
    _, request = router.build(ticket(value))
    assert request.agent_uid == "agent-support"
    assert request.identifier_value == str(value)


@pytest.mark.parametrize("value", ["has space", "dot.ted", "a@b", "ünï", "x" * 101, "a/b"])
def test_external_user_id_rejected(router: Router, value: str) -> None:
    exc = rejection(router, ticket(value))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_request")
    assert "externalUserId" in exc.reason


def test_external_user_id_with_a_trailing_newline_is_rejected(router: Router) -> None:
    exc = rejection(router, ticket("cust-1\n"))
    assert exc.code == "invalid_request"


@pytest.mark.parametrize("value", [True, None, {"id": 1}, 1.5])
def test_identifier_must_be_a_string_or_integer(router: Router, value: Any) -> None:
    exc = rejection(router, ticket(value))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_identifier")


def test_missing_template_field_is_a_validation_error(router: Router) -> None:
    ev = event(
        {"type": "order.shipped", "data": {"orderId": "o-1", "eta": "x"}, "user": {"humanUid": "h"}}
    )
    exc = rejection(router, ev)
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "missing_field")
    assert "data.carrier" in exc.reason


def test_null_template_value_counts_as_missing(router: Router) -> None:
    exc = rejection(router, shipped_order({"humanUid": "h"}, carrier=None))
    assert exc.code == "missing_field"


def test_no_route(router: Router) -> None:
    exc = rejection(router, event({"type": "invoice.paid", "user": {"humanUid": "h"}}))
    assert (exc.stage, exc.code) == (Stage.ROUTE, "no_route")
    assert "invoice.paid" in exc.reason


# -- route matching ------------------------------------------------------------------------


def test_topic_specific_route_and_wildcards() -> None:
    on_billing = route(topic="billing", event_type="*", agent_uid="billing-agent")
    anything = route(event_type="*", agent_uid="catch-all")
    r = Router([on_billing, anything])

    assert r.find(event({"type": "x"}, topic="billing")).agent_uid == "billing-agent"
    assert r.find(event({"type": "x"}, topic="orders")).agent_uid == "catch-all"


def test_first_matching_route_wins() -> None:
    first = route(agent_uid="first")
    second = route(agent_uid="second")
    assert Router([first, second]).find(event({"type": "custom"})).agent_uid == "first"


def test_route_for_another_topic_does_not_match() -> None:
    with pytest.raises(EventRejected) as info:
        Router([route(topic="billing")]).find(event({"type": "custom"}, topic="orders"))
    assert info.value.code == "no_route"


def test_malformed_template_is_refused_when_the_route_is_built() -> None:
    with pytest.raises(ValueError, match="malformed placeholder"):
        Router([route(message_template="Order ${data.orderId")])
    with pytest.raises(ValueError, match="malformed placeholder"):
        Router([route(agent_uid="agent::${}")])


# -- templates -----------------------------------------------------------------------------


def test_template_paths_values_and_escapes() -> None:
    template = (
        "$$${data.items.1.sku} n=${data.count} ok=${data.ok} tags=${data.tags} "
        "id=${eventId} type=${eventType} obj=$data"
    )
    data = {"items": [{"sku": "A"}, {"sku": "B"}], "count": 3, "ok": True, "tags": ["x"]}

    request = build_one(route(message_template=template), {"data": data})

    assert request.message == (
        '$B n=3 ok=true tags=["x"] id=evt-1 type=custom '
        'obj={"items":[{"sku":"A"},{"sku":"B"}],"count":3,"ok":true,"tags":["x"]}'
    )


@pytest.mark.parametrize(
    "template",
    [
        "${__class__}",
        "${data.__class__}",
        "${data.__class__.__name__}",
        "${__builtins__}",
        "${data.keys}",
        "${data.name.upper}",
    ],
)
def test_templates_cannot_reach_attributes(template: str) -> None:
    r = Router([route(message_template=f"x {template} y")])
    exc = rejection(r, event({"type": "custom", "data": {"name": "n"}, "user": {"id": "h"}}))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "missing_field")


def test_format_syntax_is_literal_and_values_are_not_rendered_twice() -> None:
    template = "{0.__class__} {data.name} ${data.name}"
    request = build_one(route(message_template=template), {"data": {"name": "${data.secret}"}})
    assert request.message == "{0.__class__} {data.name} ${data.secret}"


def test_blank_rendered_message_is_rejected() -> None:
    r = Router([route(message_template="${data.note}")])
    exc = rejection(r, event({"type": "custom", "data": {"note": "   "}, "user": {"id": "h"}}))
    assert (exc.stage, exc.code) == (Stage.VALIDATE, "invalid_request")


# -- validate_request ----------------------------------------------------------------------


def valid_request(**overrides: str) -> ThreadRequest:
    fields = {
        "app_uid": "app",
        "agent_uid": "agent::session",
        "message": "hi",
        "message_type": "user",
        "identifier_field": "humanUid",
        "identifier_value": "h",
    }
    return ThreadRequest(**(fields | overrides))


def test_validate_request_accepts_a_valid_request() -> None:
    validate_request(valid_request())


@pytest.mark.parametrize(
    ("overrides", "mentions"),
    [
        ({"app_uid": ""}, "appUid"),
        ({"agent_uid": ""}, "agentUid"),
        ({"agent_uid": "::session"}, "agentUid"),
        ({"agent_uid": "agent::"}, "agentUid"),
        ({"message": " \n "}, "message"),
        ({"message_type": "assistant"}, "messageType"),
        ({"identifier_value": ""}, "humanUid"),
    ],
)
def test_validate_request_rejects(overrides: dict[str, str], mentions: str) -> None:
    with pytest.raises(EventRejected) as info:
        validate_request(valid_request(**overrides))
    assert (info.value.stage, info.value.code) == (Stage.VALIDATE, "invalid_request")
    assert mentions in info.value.reason


def test_a_rejection_quoting_a_huge_event_value_has_a_bounded_reason() -> None:
    """The reason quotes the event's event type or rendered agentUid; it is the dead-letter
    log line (one per event), and a 900 KB value made a 900 KB line (container runtimes
    split lines over 16 KB, breaking the JSON log). The reason is cut, saying its size."""
    huge = "x" * 900_000
    no_route = rejection(Router([route()]), event({"type": huge, "user": {"id": "h-1"}}))
    bad_agent = rejection(
        Router([route(agent_uid="${data.agent}::")]),
        event({"type": "custom", "user": {"id": "h-1"}, "data": {"agent": huge}}),
    )
    for exc in (no_route, bad_agent):
        assert len(exc.reason) < 1100 and len(str(exc)) < 1100
        assert exc.reason.endswith("characters)")


def test_the_compiled_template_renders_what_string_template_renders() -> None:
    """``render`` splits a template once; it must give what ``substitute`` gives: the same
    text, the same KeyError for a missing field, the same ValueError for a bad template."""
    from connector.routing import _compiled, _DottedTemplate

    values = {"a": "1", "b.c": "x$y", "id": "", "d-e.f": "{z}"}
    templates = [
        "",
        "plain",
        "$a",
        "${a}",
        "$a$a",
        "pre ${b.c} mid $a post",
        "$$a is not ${a}",
        "$$$a",
        "${id}${id}",
        "$d-e.f and ${d-e.f}.",
        "$a.",
        "${a}b",
        "$missing here",
        "${b.missing}",
        "$",
        "cost: 5$",
        "${unclosed",
        "$1",
        "tail $$",
    ]
    for template in templates:
        try:
            expected: object = _DottedTemplate(template).substitute(values)
        except (KeyError, ValueError) as exc:
            expected = (type(exc), exc.args)
        try:
            got: object = _compiled(template).substitute(values)
        except (KeyError, ValueError) as exc:
            got = (type(exc), exc.args)
        assert got == expected, template
