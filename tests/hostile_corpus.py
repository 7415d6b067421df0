"""A seeded corpus of hostile input records, each with the outcome it must get.

``hostile_corpus(seed)`` returns :class:`Case` objects: a record (key, value, headers) and
its expected outcome -- a result (with the event id it carries), a dead letter (stage and
code, and header values the dead letter must carry), or a duplicate drop. The routes the
expectations assume are :data:`CORPUS_ROUTES` (the harness's ``order.shipped`` route plus
one whose event chooses its own identifier).

Event-id rules (another branch): a JSON string or integer is a valid id; an integer and
the string of its digits are different ids; any other JSON type, an empty id or one over
256 characters is dead-lettered with code ``invalid_event_id``. The kinds whose outcome
depends on that rule are in :data:`NEEDS_EVENT_ID_RULES`; their ``expect`` is written for
the new rule and tests check them only when :func:`event_id_rules_present` says the rule
is in ``connector.events`` (detected by behaviour, not by version).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from connector.errors import EventRejected
from connector.events import InputRecord, parse_event
from tests.harness import ROUTES

LIMIT = 1_048_576  # the producer's default max_request_size
MAX_EVENT_ID = 256
CORPUS_ROUTES: list[dict[str, Any]] = [
    *ROUTES,
    {
        "event_type": "user.said",
        "app_uid": "demo-app",
        "agent_uid": "agent-support",
        "message_type": "user",
        "message_template": "${data.text}",
        "user": {"path": "who"},
    },
]
NEEDS_EVENT_ID_RULES = frozenset(
    {
        "id_float",
        "id_bool",
        "id_object",
        "id_array",
        "id_null",
        "id_empty_string",
        "id_10000_chars",
        "id_257_chars",
        "id_huge_float_number",
        "id_integer_beyond_64_bits",
        "id_headers_that_disagree",
        "id_string_of_an_integer_id",
    }
)


@dataclass(frozen=True)
class Expect:
    outcome: str  # result | dead_letter | duplicate
    stage: str = ""
    code: str = ""
    event_id: str | None = None  # a result's eventId
    headers: dict[str, bytes] = field(default_factory=dict)  # a dead letter's, at least these
    bounded: bool | None = False  # a dead letter written in bounded form (None: either)


@dataclass(frozen=True)
class Case:
    kind: str
    value: bytes | None
    expect: Expect
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def result(event_id: str) -> Expect:
    return Expect("result", event_id=event_id)


def dead(stage: str, code: str, *, bounded: bool | None = False, **headers: bytes) -> Expect:
    return Expect(
        "dead_letter",
        stage,
        code,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
        bounded=bounded,
    )


DUPLICATE = Expect("duplicate")


def order(event_id: Any, *, user: Any = "u-1", order_id: Any = "A-1", **extra: Any) -> bytes:
    body: dict[str, Any] = {"type": "order.shipped", "user": {"id": user}}
    body["data"] = {"orderId": order_id}
    if event_id is not _MISSING:
        body["id"] = event_id
    body.update(extra)
    return orjson.dumps(body)


def said(event_id: str, who: dict[str, Any], text: str = "hello") -> bytes:
    return orjson.dumps({"id": event_id, "type": "user.said", "who": who, "data": {"text": text}})


_MISSING = object()


def hostile_corpus(seed: int = 9) -> list[Case]:
    """Every kind once, in a fixed order; ``seed`` drives the random bytes and ids."""
    rng = random.Random(seed)
    tag = f"{rng.getrandbits(32):08x}"

    def eid(name: str) -> str:
        return f"{name}-{tag}"

    def noise(n: int) -> bytes:
        return rng.randbytes(n)

    def not_json(n: int) -> bytes:
        return b"\x00" + noise(n - 1)

    big_pad = "p" * 1_500_000
    long_id = eid("long") + "x" * 10_000
    id257 = "i" * 257
    id256 = "j" * 256
    int_id = rng.randrange(10**8, 10**9)
    deep_ok = b"[" * 1000 + b"]" * 1000
    many_fields = {f"f{i}": i for i in range(50_000)}
    cases = [
        # -- oversize values around the limits
        Case(
            "value_1048400_not_json",
            not_json(1_048_400),
            dead("parse", "invalid_json", bounded=True),
        ),
        Case(
            "value_limit_minus_600_not_json",
            not_json(LIMIT - 600),
            dead("parse", "invalid_json", bounded=None),
        ),
        Case(
            "value_limit_minus_2000_not_json", not_json(LIMIT - 2000), dead("parse", "invalid_json")
        ),
        Case(
            "value_limit_plus_12_not_json",
            not_json(LIMIT + 12),
            dead("parse", "invalid_json", bounded=True),
        ),
        Case(
            "value_2mb_not_json", not_json(2_000_000), dead("parse", "invalid_json", bounded=True)
        ),
        Case(
            "value_5mb_not_json", not_json(5_000_000), dead("parse", "invalid_json", bounded=True)
        ),
        Case(
            "value_1_5mb_valid_event", order(eid("bigvalid"), pad=big_pad), result(eid("bigvalid"))
        ),
        Case(
            "value_1_5mb_json_no_route",
            orjson.dumps({"id": eid("bignr"), "type": "nope", "pad": big_pad}),
            dead("route", "no_route", bounded=True),
        ),
        # -- structure
        Case(
            "deep_nesting_10000",
            b'{"id":"'
            + eid("deep").encode()
            + b'","type":"order.shipped","a":'
            + b"[" * 10_000
            + b"]" * 10_000
            + b"}",
            dead("parse", "invalid_json"),
        ),
        Case(
            "deep_nesting_1000_valid",
            order(eid("deep1000"), nest=orjson.Fragment(deep_ok)),
            result(eid("deep1000")),
        ),
        Case("fields_50000", order(eid("fields"), extra=many_fields), result(eid("fields"))),
        Case(
            "invalid_utf8",
            b'{"id":"' + eid("utf8").encode() + b'\xff\xfe","type":"order.shipped"}',
            dead("parse", "invalid_json"),
        ),
        Case("empty_value", b"", dead("parse", "empty_value")),
        Case("whitespace_value", b"  \n\t ", dead("parse", "empty_value")),
        Case("tombstone", None, dead("parse", "empty_value"), key=b"tombstone"),
        Case("json_null", b"null", dead("parse", "not_an_object")),
        Case("json_array", b'[{"id":"a"}]', dead("parse", "not_an_object")),
        Case("json_number", b"42", dead("parse", "not_an_object")),
        Case("json_string", b'"{\\"id\\":\\"x\\"}"', dead("parse", "not_an_object")),
        Case("json_true", b"true", dead("parse", "not_an_object")),
        Case(
            "duplicate_keys",
            b'{"id":"'
            + eid("dk-a").encode()
            + b'","id":"'
            + eid("dk-b").encode()
            + b'","type":"order.shipped","user":{"id":"u-1"},"data":{"orderId":"1"}}',
            result(eid("dk-b")),
        ),
        Case(
            "nan_literal",
            b'{"id":"x","type":"order.shipped","n":NaN}',
            dead("parse", "invalid_json"),
        ),
        Case(
            "infinity_literal",
            b'{"id":"x","type":"order.shipped","n":-Infinity}',
            dead("parse", "invalid_json"),
        ),
        Case(
            "huge_float_literal",
            b'{"id":"x","type":"order.shipped","n":1e400}',
            dead("parse", "invalid_json"),
        ),
        Case(
            "huge_integer_literal",
            order(eid("hugeint"), n=orjson.Fragment(b"1" + b"0" * 400)),
            dead("parse", "invalid_json"),
        ),
        Case(
            "integer_over_u64_field",
            order(eid("bigint"), n=orjson.Fragment(b"1" + b"0" * 30)),
            result(eid("bigint")),
        ),
        Case(
            "bom_prefixed_json", b"\xef\xbb\xbf" + order(eid("bom")), dead("parse", "invalid_json")
        ),
        Case("trailing_garbage", order(eid("trail")) + b" }{", dead("parse", "invalid_json")),
        Case(
            "two_documents",
            order(eid("two-a")) + order(eid("two-b")),
            dead("parse", "invalid_json"),
        ),
        # -- event ids
        Case("no_id", order(_MISSING), dead("validate", "no_event_id")),
        Case(
            "id_from_header",
            order(_MISSING),
            result(eid("hdr")),
            headers=(("event-id", eid("hdr").encode()),),
        ),
        Case("id_integer", order(int_id), result(str(int_id))),
        Case("id_string_of_an_integer_id", order(str(int_id)), result(str(int_id))),
        Case("id_negative_integer", order(-int_id), result(str(-int_id))),
        Case(
            "id_u64_max",
            order(orjson.Fragment(b"18446744073709551615")),
            result("18446744073709551615"),
        ),
        Case(
            # orjson reads an integer beyond 64 bits as a float: the input's digits are kept
            "id_integer_beyond_64_bits",
            order(orjson.Fragment(b"1000000000000000000000000000000")),
            result("1000000000000000000000000000000"),
        ),
        Case(
            "id_huge_float_number",
            order(orjson.Fragment(b"1e30")),
            dead("validate", "invalid_event_id"),
        ),
        Case(
            # 400 digits: orjson refuses it (past a double); an id over 256 characters
            "id_integer_past_the_float_range",
            order(orjson.Fragment(b"9" * 400)),
            dead("validate", "invalid_event_id"),
        ),
        Case(
            "id_headers_that_disagree",
            order(_MISSING),
            dead("validate", "ambiguous_event_id"),
            headers=(("event-id", eid("hdr-a").encode()), ("Event-ID", eid("hdr-b").encode())),
        ),
        Case(
            "id_headers_that_agree",
            order(_MISSING),
            result(eid("hdr-same")),
            headers=(
                ("event-id", eid("hdr-same").encode()),
                ("event-id", eid("hdr-same").encode()),
            ),
        ),
        Case("id_float", order(1.5), dead("validate", "invalid_event_id")),
        Case("id_bool", order(True), dead("validate", "invalid_event_id")),
        Case("id_object", order({"v": 1}), dead("validate", "invalid_event_id")),
        Case("id_array", order([1]), dead("validate", "invalid_event_id")),
        Case("id_null", order(None), dead("validate", "invalid_event_id")),
        Case("id_empty_string", order(""), dead("validate", "invalid_event_id")),
        Case("id_10000_chars", order(long_id), dead("validate", "invalid_event_id")),
        Case("id_257_chars", order(id257), dead("validate", "invalid_event_id")),
        Case("id_256_chars", order(id256), result(id256)),
        Case(
            "id_zero_width_and_rtl",
            order(eid("zw") + "\u200b\u200f"),
            result(eid("zw") + "\u200b\u200f"),
        ),
        Case("duplicate_of_earlier", order(eid("bigvalid")), DUPLICATE),
        # -- type and route
        Case(
            "no_type",
            orjson.dumps({"id": eid("notype"), "user": {"id": "u"}}),
            dead("validate", "no_event_type"),
        ),
        Case(
            "type_not_a_string",
            orjson.dumps({"id": eid("typelist"), "type": ["order.shipped"]}),
            dead("validate", "no_event_type"),
        ),
        Case(
            "type_integer",
            orjson.dumps({"id": eid("typeint"), "type": 7}),
            dead("route", "no_route"),
        ),
        # -- headers and keys
        Case(
            "binary_headers_valid_event",
            order(eid("binhdr")),
            result(eid("binhdr")),
            headers=(("bin", noise(64)), ("nul", b"\x00")),
        ),
        Case(
            "binary_headers_not_json",
            b"<xml/>",
            dead("parse", "invalid_json", bin=b"\xff\xfe\xfd"),
            headers=(("bin", b"\xff\xfe\xfd"),),
        ),
        Case(
            "huge_header_valid_event",
            order(eid("hugehdr")),
            result(eid("hugehdr")),
            headers=(("blob", b"h" * 1_200_000),),
        ),
        Case(
            "huge_header_not_json",
            b"<xml/>",
            dead("parse", "invalid_json", bounded=True, dlq_headers_dropped=b"1"),
            headers=(("blob", b"h" * 1_200_000),),
        ),
        Case("binary_key_valid_event", order(eid("binkey")), result(eid("binkey")), key=noise(32)),
        Case(
            "huge_key_valid_event",
            order(eid("hugekey")),
            result(eid("hugekey")),
            key=b"k" * 1_100_000,
        ),
        Case(
            "huge_key_not_json",
            b"<xml/>",
            dead("parse", "invalid_json", bounded=True, dlq_key_bytes=b"1100000"),
            key=b"k" * 1_100_000,
        ),
        # -- templates
        Case(
            "placeholder_in_data",
            order(eid("tpl"), order_id="${eventId} ${data.orderId} $$"),
            result(eid("tpl")),
        ),
        Case(
            "missing_template_field",
            orjson.dumps({"id": eid("nodata"), "type": "order.shipped", "user": {"id": "u"}}),
            dead("validate", "missing_field"),
        ),
        Case(
            "null_template_value",
            order(eid("nullval"), order_id=None),
            dead("validate", "missing_field"),
        ),
        Case(
            "object_template_value",
            order(eid("objval"), order_id={"a": [1, "${x}"]}),
            result(eid("objval")),
        ),
        Case("number_template_value", order(eid("numval"), order_id=12.5), result(eid("numval"))),
        Case("message_600kb", order(eid("msg600"), order_id="m" * 600_000), result(eid("msg600"))),
        Case(
            "message_over_api_body_limit",
            order(eid("msg2mb"), order_id="m" * 1_100_000),
            dead("api", "http_413", bounded=True),
        ),
        # -- user identifiers
        Case(
            "external_id_bad_charset",
            order(eid("charset"), user="a b!"),
            dead("validate", "invalid_request"),
        ),
        Case(
            "external_id_zero_width",
            order(eid("zwuser"), user="u\u200b1"),
            dead("validate", "invalid_request"),
        ),
        Case(
            "external_id_101_chars",
            order(eid("long-user"), user="u" * 101),
            dead("validate", "invalid_request"),
        ),
        Case("external_id_integer", order(eid("intuser"), user=4242), result(eid("intuser"))),
        Case(
            "external_id_float",
            order(eid("floatuser"), user=1.5),
            dead("validate", "invalid_identifier"),
        ),
        Case(
            "external_id_bool",
            order(eid("booluser"), user=False),
            dead("validate", "invalid_identifier"),
        ),
        Case(
            "external_id_object",
            order(eid("objuser"), user={"id": "u"}),
            dead("validate", "invalid_identifier"),
        ),
        Case(
            "email_over_100_chars",
            said(eid("email"), {"sdkUserEmail": "e" * 95 + "@x.com"}),
            dead("validate", "invalid_request"),
        ),
        Case(
            "two_identifiers",
            said(eid("two-ids"), {"externalUserId": "u-1", "sdkUserEmail": "a@b.co"}),
            dead("validate", "invalid_identifier"),
        ),
        Case(
            "no_identifier",
            said(eid("no-ids"), {"other": "x"}),
            dead("validate", "invalid_identifier"),
        ),
        Case(
            "one_email_identifier",
            said(eid("email-ok"), {"sdkUserEmail": "a@b.co"}),
            result(eid("email-ok")),
        ),
        # -- unicode
        Case(
            "escaped_lone_surrogate",
            b'{"id":"' + eid("surr").encode() + b'\\ud800","type":"order.shipped"}',
            dead("parse", "invalid_json"),
        ),
        Case(
            "raw_surrogate_bytes",
            b'{"id":"' + eid("rawsurr").encode() + b'\xed\xa0\x80","type":"order.shipped"}',
            dead("parse", "invalid_json"),
        ),
        Case(
            "surrogate_pair_escaped",
            b'{"id":"'
            + eid("pair").encode()
            + b'\\ud83d\\ude00","type":"order.shipped","user":{"id":"u"},"data":{"orderId":"1"}}',
            result(eid("pair") + "\U0001f600"),
        ),
        Case(
            "rtl_and_zero_width_text",
            said(eid("rtl"), {"externalUserId": "u-1"}, "\u202eevil\u200b\u2066x\u2069"),
            result(eid("rtl")),
        ),
        Case(
            "no_route_reason_over_1000_bytes",
            orjson.dumps({"id": eid("r1000"), "type": "\u00e9" * 700}),
            dead("route", "no_route"),
        ),
    ]
    return cases


def event_id_rules_present() -> bool:
    """True when ``connector.events`` dead-letters a float id as ``invalid_event_id``."""
    record = InputRecord("t", 0, 0, None, b'{"id": 1.5, "type": "x"}')
    try:
        parse_event(record, id_field="id", id_header="event-id", type_field="type")
    except EventRejected as exc:
        return exc.code == "invalid_event_id"
    return False
