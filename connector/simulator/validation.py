"""The create-thread request body rules, as the OpenAPI document states them. Pure.

``tests/test_simulator.py`` checks these constants against the shipped
``threads-api-openapi.yaml``, so a change to the document that is not made here fails.
They are kept apart from ``connector.routing`` on purpose: the simulator is the
independent check of the client.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

REQUIRED_FIELDS = ("agentUid", "message")
MESSAGE_TYPES = ("user", "system")
DEFAULT_MESSAGE_TYPE = "user"
IDENTIFIER_FIELDS = ("humanUid", "externalUserId", "sdkUserEmail", "realEmailAddress")
STRING_FIELDS = ("agentUid", "message", "messageType", *IDENTIFIER_FIELDS)
MAX_LENGTHS = {"externalUserId": 100, "sdkUserEmail": 100, "realEmailAddress": 100}
PATTERNS = {"externalUserId": "^[A-Za-z0-9_-]+$"}
SESSION_SEPARATOR = "::"
IDENTITY_FIELD = "identity"  # the ``field`` of errors about the identifiers as a group

_COMPILED = {name: re.compile(pattern) for name, pattern in PATTERNS.items()}


@dataclass(frozen=True, slots=True)
class FieldError:
    """One reason a request body is invalid (a 422 ``detail`` entry)."""

    field: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RequestInvalid(Exception):
    """The body breaks the OpenAPI's rules; the API answers 422."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ThreadInput:
    """A valid create-thread body."""

    agent_uid: str
    """As sent: ``agentUid`` or ``agentUid::sessionUid``."""
    agent: str
    """The agent part, before ``::``."""
    session_uid: str | None
    message: str
    message_type: str
    identifier_field: str
    identifier_value: str


def _check_strings(body: dict[str, Any], errors: list[FieldError]) -> None:
    for name in REQUIRED_FIELDS:
        if name not in body:
            errors.append(FieldError(name, "is required"))
    for name in STRING_FIELDS:
        if name in body and not isinstance(body[name], str):
            errors.append(FieldError(name, f"must be a string, got {_json_type(body[name])}"))


def _check_values(body: dict[str, Any], errors: list[FieldError]) -> None:
    agent = body.get("agentUid")
    if isinstance(agent, str):
        base, sep, session = agent.partition(SESSION_SEPARATOR)
        if not agent:
            errors.append(FieldError("agentUid", "must not be empty"))
        elif not base or (sep and not session):
            errors.append(FieldError("agentUid", "must be agentUid or agentUid::sessionUid"))
    message = body.get("message")
    if isinstance(message, str) and not message.strip():
        errors.append(FieldError("message", "must not be empty"))
    message_type = body.get("messageType")
    if isinstance(message_type, str) and message_type not in MESSAGE_TYPES:
        errors.append(FieldError("messageType", f"must be one of {', '.join(MESSAGE_TYPES)}"))
    for name in IDENTIFIER_FIELDS:
        value = body.get(name)
        if not isinstance(value, str):
            continue
        if not value:
            errors.append(FieldError(name, "must not be empty"))
            continue
        limit = MAX_LENGTHS.get(name)
        if limit is not None and len(value) > limit:
            errors.append(FieldError(name, f"must be at most {limit} characters"))
        pattern = _COMPILED.get(name)
        if pattern is not None and not pattern.fullmatch(value):
            errors.append(FieldError(name, "may only contain A-Za-z0-9_-"))


def _check_identity(body: dict[str, Any], errors: list[FieldError]) -> None:
    present = [name for name in IDENTIFIER_FIELDS if name in body]
    if not present:
        errors.append(
            FieldError(
                IDENTITY_FIELD,
                f"cannot resolve the user: one of {', '.join(IDENTIFIER_FIELDS)} is required",
            )
        )
    elif len(present) > 1:
        errors.append(
            FieldError(
                IDENTITY_FIELD,
                f"user identifiers are mutually exclusive, got {', '.join(present)}",
            )
        )


def parse_thread_request(body: dict[str, Any]) -> ThreadInput:
    """Check a JSON object against the OpenAPI; raise ``RequestInvalid`` listing every fault."""
    errors: list[FieldError] = []
    _check_strings(body, errors)
    _check_values(body, errors)
    _check_identity(body, errors)
    if errors:
        raise RequestInvalid(errors)
    agent_uid: str = body["agentUid"]
    agent, _, session = agent_uid.partition(SESSION_SEPARATOR)
    field = next(name for name in IDENTIFIER_FIELDS if name in body)
    return ThreadInput(
        agent_uid=agent_uid,
        agent=agent,
        session_uid=session or None,
        message=body["message"],
        message_type=body.get("messageType", DEFAULT_MESSAGE_TYPE),
        identifier_field=field,
        identifier_value=body[field],
    )


def resolve_human_uid(app_uid: str, identifier_field: str, identifier_value: str) -> str:
    """The humanUid of a user: the one given, else stable for (app, identifier, value)."""
    if identifier_field == "humanUid":
        return identifier_value
    digest = hashlib.sha256(
        f"{app_uid}\x00{identifier_field}\x00{identifier_value}".encode()
    ).hexdigest()
    return f"hu_{digest[:24]}"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
