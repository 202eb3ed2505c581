"""Reject query parameters an endpoint does not take.

FastAPI ignores query parameters that a route does not declare. So a misspelt
filter (``?severities=HIGH`` for ``?severity=HIGH``) would return unfiltered
results with status 200. The accepted names come from the app's OpenAPI
document, so they match what the documentation lists.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from fastapi import FastAPI, Request

from secapi.core.errors import InvalidInputError

# app.state attribute holding {(path template, lower-case method): accepted names}.
_STATE_KEY = "accepted_query_parameters"
_SCHEMA_PREFIX = "#/components/schemas/"
ChoiceT = TypeVar("ChoiceT", bound=StrEnum)


def accepted_query_parameters(app: FastAPI) -> dict[tuple[str, str], frozenset[str]]:
    """Return the query parameter names each operation documents, built once per app."""
    accepted: dict[tuple[str, str], frozenset[str]] | None = getattr(app.state, _STATE_KEY, None)
    if accepted is None:
        accepted = {}
        for path, operations in app.openapi().get("paths", {}).items():
            for method, operation in operations.items():
                names = {
                    parameter["name"]
                    for parameter in operation.get("parameters", ())
                    if parameter.get("in") == "query"
                }
                accepted[(path, method)] = frozenset(names)
        setattr(app.state, _STATE_KEY, accepted)
    return accepted


def accepted_body_fields(app: FastAPI, path: str, method: str) -> list[str] | None:
    """Return the top-level fields of an operation's JSON body, or None when it has none."""
    document = app.openapi()
    operation = document.get("paths", {}).get(path, {}).get(method.lower(), {})
    content = operation.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema", {})
    # An optional body is documented as anyOf the model and null.
    for variant in schema.get("anyOf", ()):
        if "$ref" in variant:
            schema = variant
    reference = schema.get("$ref", "")
    if reference.startswith(_SCHEMA_PREFIX):
        schema = document.get("components", {}).get("schemas", {})
        schema = schema.get(reference.removeprefix(_SCHEMA_PREFIX), {})
    properties = schema.get("properties")
    return sorted(properties) if properties else None


def parse_choices(values: list[str], kind: type[ChoiceT], *, parameter: str) -> list[ChoiceT]:
    """Return the members of ``kind`` named in repeated or comma-separated values, once each.

    Any letter case is accepted. Raises InvalidInputError (field ``query.<parameter>``)
    naming the invalid value and every accepted one.
    """
    chosen: list[ChoiceT] = []
    for value in values:
        for item in value.split(","):
            match = next(
                (member for member in kind if member.value.lower() == item.strip().lower()), None
            )
            if match is None:
                names = ", ".join(member.value for member in kind)
                example = ",".join(member.value for member in list(kind)[-2:])
                raise InvalidInputError(
                    f"{parameter} {item!r} is invalid: use {names}, in any letter case, "
                    f"repeated or separated by commas, e.g. {parameter}={example}",
                    field=f"query.{parameter}",
                    value=value,
                )
            chosen.append(match)
    return list(dict.fromkeys(chosen))


async def reject_unknown_query_parameters(request: Request) -> None:
    """Raise InvalidInputError (422) for a query parameter the endpoint does not document."""
    if not request.query_params:
        return
    path = getattr(request.scope.get("route"), "path", None)
    accepted = accepted_query_parameters(request.app).get((path or "", request.method.lower()))
    if accepted is None:
        return
    for name in request.query_params:
        if name in accepted:
            continue
        allowed = ", ".join(sorted(accepted)) if accepted else "no query parameters"
        raise InvalidInputError(
            f"unknown query parameter {name!r}: {request.method} {path} takes {allowed}; "
            "check the spelling",
            field=f"query.{name}",
            value=request.query_params[name],
            code="unknown_parameter",
        )
