"""The configuration reference (config/README.md) names every settings field."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from connector.config import ConnectorSettings

REFERENCE = Path(__file__).resolve().parents[1] / "config" / "README.md"


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(field_paths(annotation, f"{prefix}{name}."))
        else:
            paths.append(f"{prefix}{name}")
    return paths


def test_every_field_is_documented() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    missing = [p for p in field_paths(ConnectorSettings) if f"`{p}`" not in text]
    missing = [p for p in missing if p not in ("routes", "event_type_field")]
    assert not missing, f"config/README.md does not document: {missing}"
    for route_field in (
        "topic",
        "event_type",
        "app_uid",
        "agent_uid",
        "message_type",
        "message_template",
        "user.field",
        "user.path",
        "max_event_age_s",
        "event_time_field",
    ):
        assert f"`routes[].{route_field}`" in text
    assert "`event_type_field`" in text


def test_documented_defaults_match_the_model() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    s = ConnectorSettings(
        routes=[
            {
                "event_type": "x",
                "app_uid": "a",
                "agent_uid": "g",
                "message_template": "m",
                "user": {"path": "u"},
            }
        ],
        api={"api_key": "k"},
    )
    for path, expected in {
        "delivery.drain_timeout_s": "`70`",
        "delivery.revoke_timeout_s": "`65`",
        "api.request_timeout_s": "`60`",
        "dedup.ttl_s": "`86400`",
        "api.rate_limit_per_s": "`20`",
        "server.port": "`9464`",
    }.items():
        section, name = path.split(".")
        value = getattr(getattr(s, section), name)
        assert f"`{value:g}`" == expected, path
        assert f"| `{path}` | {expected} |" in text, path
