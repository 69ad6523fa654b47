"""From the bytes a user sends to validated specs: YAML, JSON or compose."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml

from .compose import compose_path, from_compose, is_compose
from .errors import SpecError, join
from .model import ServiceSpec

MAX_BYTES = 1 << 20


def load(data: bytes | str, filename: str | None = None) -> Any:
    """The document as plain values; syntax errors carry line and column."""
    where = filename or ""
    if isinstance(data, bytes):
        if len(data) > MAX_BYTES:
            raise SpecError(where, f"spec is larger than {MAX_BYTES} bytes")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SpecError(where, f"not UTF-8 text (byte {exc.start})") from None
    if len(data) > MAX_BYTES:
        raise SpecError(where, f"spec is larger than {MAX_BYTES} characters")
    stripped = data.lstrip()
    if (filename or "").endswith(".json") or stripped[:1] in ("{", "["):
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            if (filename or "").endswith(".json"):
                raise SpecError(
                    where, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
                ) from None
        except ValueError as exc:  # integers beyond Python's digit limit
            raise SpecError(where, f"invalid JSON: {exc}") from None
        except RecursionError:
            raise SpecError(where, "document is nested too deeply") from None
    try:
        docs = [d for d in yaml.safe_load_all(data) if d is not None]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "syntax error"
        raise SpecError(where, f"invalid YAML{at}: {problem}") from None
    except yaml.YAMLError as exc:
        raise SpecError(where, f"invalid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a tagged scalar that will not convert
        raise SpecError(where, f"invalid YAML value: {exc}") from None
    except RecursionError:
        raise SpecError(where, "document is nested too deeply") from None
    if not docs:
        raise SpecError(where, "empty document")
    return docs[0] if len(docs) == 1 else docs


def parse_spec(data: bytes | str, *, filename: str | None = None) -> list[ServiceSpec]:
    """Every spec in a document: one native spec, a list of them, or a compose file.

    Unknown keys are errors in native specs (a typo must not be ignored) but
    warnings in compose files, which carry much that has no meaning here; the
    warnings ride on each spec's ``warnings``.
    """
    return specs_from_value(load(data, filename))


def specs_from_value(value: Any) -> list[ServiceSpec]:
    """Specs from an already-decoded document (an API body, say)."""
    try:
        specs = _specs(value)
    except RecursionError:
        raise SpecError("", "document is nested too deeply") from None
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise SpecError("name", f"duplicate service name {spec.name!r}")
        seen.add(spec.name)
    return specs


def _specs(value: Any) -> list[ServiceSpec]:
    if is_compose(value):
        specs = []
        for path, native, warnings in from_compose(value):
            try:
                spec = ServiceSpec.from_dict(native)
            except SpecError as exc:
                raise SpecError(compose_path(exc.path), exc.message).under(path) from None
            specs.append(replace(spec, warnings=tuple(warnings)))
        return specs
    if isinstance(value, list):
        if not value:
            raise SpecError("", "no specs in the list")
        return [ServiceSpec.from_dict(item, join("", i)) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        return [ServiceSpec.from_dict(value)]
    raise SpecError("", f"must be a spec mapping or a list of specs, got {type(value).__name__}")
