"""Where each setting came from: the environment variables the settings models accept,
unknown ones named with a suggestion, and the YAML line of each key, so a validation error
names the variable or the file line that caused it.

Imports nothing of the connector: ``config`` calls it with its models.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from pydantic import BaseModel

# variables with the prefix that are not settings: the local broker's jar cache, its class
# data archive, and the image under test (tooling, read outside the settings)
NOT_SETTINGS = frozenset({"CACHE", "KAFKA_CDS", "TEST_IMAGE"})
_WILDCARD = "*"  # a dict key in an environment variable name (an appUid)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _dict_value_model(annotation: Any) -> type[BaseModel] | None:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2:
        return _model_of(args[1])
    return None


def env_names(model: type[BaseModel], prefix: str, delimiter: str = "__") -> set[str]:
    """Every variable name (upper case) pydantic-settings reads for ``model``: a section as
    JSON, each field of a section, and each field of a mapping's entries (``*`` stands for
    the key, e.g. ``API__APPS__*__API_KEY``)."""
    names: set[str] = set()

    def walk(cls: type[BaseModel], base: str) -> None:
        for name, info in cls.model_fields.items():
            full = f"{base}{name.upper()}"
            names.add(full)
            inner = _model_of(info.annotation)
            if inner is not None:
                walk(inner, full + delimiter)
            value_model = _dict_value_model(info.annotation)
            if value_model is not None:
                names.add(f"{full}{delimiter}{_WILDCARD}")
                walk(value_model, f"{full}{delimiter}{_WILDCARD}{delimiter}")

    walk(model, prefix)
    return names


def _matches(name: str, pattern: str, delimiter: str) -> bool:
    parts, wanted = name.split(delimiter), pattern.split(delimiter)
    return len(parts) == len(wanted) and all(
        (w == _WILDCARD and p != "") or w == p for p, w in zip(parts, wanted, strict=True)
    )


def unknown_env(
    model: type[BaseModel],
    prefix: str,
    environ: Mapping[str, str] | None = None,
    delimiter: str = "__",
) -> list[str]:
    """One line per variable with ``prefix`` that no setting reads, with the closest
    known name when one is close (``difflib``). Values are never quoted."""
    environ = os.environ if environ is None else environ
    known = env_names(model, prefix, delimiter)
    exact = {n for n in known if _WILDCARD not in n}
    patterns = [n for n in known if _WILDCARD in n]
    problems = []
    for raw in sorted(environ):
        name = raw.upper()
        if not name.startswith(prefix) or name[len(prefix) :] in NOT_SETTINGS:
            continue
        if name in exact or any(_matches(name, p, delimiter) for p in patterns):
            continue
        parts = name.split(delimiter)
        candidates = set(exact) | {
            delimiter.join(p if p != _WILDCARD else parts[i] for i, p in enumerate(split))
            for split in (pattern.split(delimiter) for pattern in patterns)
            if len(split) == len(parts)
        }
        close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.8)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(f"{raw}: no setting reads this environment variable{hint}")
    return problems


def suggest_key(key: str, model: type[BaseModel]) -> str:
    """``; did you mean X?`` for a key of ``model`` close to ``key``, else empty."""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.7)
    return f"; did you mean {close[0]}?" if close else ""


def key_lines(node: yaml.Node | None) -> dict[str, int]:
    """The 1-based line of each dotted path in a composed YAML document (keys and list
    items), for error messages. A node reached again through an alias is not walked twice."""
    lines: dict[str, int] = {}
    seen: set[int] = set()

    def walk(current: yaml.Node, where: str) -> None:
        if id(current) in seen:
            return
        seen.add(id(current))
        if isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                lines.setdefault(f"{where}{index}", item.start_mark.line + 1)
                walk(item, f"{where}{index}.")
        elif isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                lines.setdefault(f"{where}{key}", key_node.start_mark.line + 1)
                walk(value_node, f"{where}{key}.")

    if node is not None:
        walk(node, "")
    return lines


def env_source(
    loc: Iterable[object],
    prefix: str,
    environ: Mapping[str, str] | None = None,
    delimiter: str = "__",
) -> str | None:
    """The environment variable that set the value at ``loc`` (the field's own, or a
    section given as JSON), or None if none is set."""
    environ = os.environ if environ is None else environ
    present = {name.upper(): name for name in environ}
    parts = [str(part).upper() for part in loc]
    for end in range(len(parts), 0, -1):
        name = prefix + delimiter.join(parts[:end])
        if name in present:
            return present[name]
    return None


def file_line(loc: Iterable[object], lines: Mapping[str, int]) -> int | None:
    """The line of the deepest key of ``loc`` written in the file, or None."""
    parts = [str(part) for part in loc]
    for end in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:end]))
        if line is not None:
            return line
    return None
