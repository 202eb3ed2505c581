"""The one error body of the API, and the mapping of every error to it.

Every error response has the body ``{"error": {"code", "message", "field", "errors"}}``
with all four keys present: ``code`` is stable and machine-readable,
``message`` says what failed and what to do, ``field`` names the request field
at fault (``body.image``, ``query.page_size``) or is null, and ``errors``
lists each problem of an invalid request (422) and is empty for every other
error. FastAPI's own ``{"detail": ...}`` shape is not used.
"""

from __future__ import annotations

import json
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from secapi.api.query import accepted_body_fields
from secapi.core.errors import (
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitExceededError,
    SecapiError,
    ServiceUnavailableError,
)

log = structlog.get_logger(__name__)

# Maximum length of a rejected value as quoted in a validation message.
MAX_VALUE_LENGTH = 80


class FieldProblem(BaseModel):
    field: str = Field(description="Where the bad value is, e.g. `body.image` or `query.page`.")
    message: str = Field(description="What is wrong with it.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `not_found`.")
    message: str = Field(description="What failed, on which value, and what to do.")
    # No defaults, so the OpenAPI document marks both as required: they are always sent.
    field: str | None = Field(description="The request field at fault; null when no field is.")
    errors: list[FieldProblem] = Field(
        description="Every problem of an invalid request (422); empty for other errors."
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


# The `responses` argument of FastAPI's route decorators, for the OpenAPI document.
Responses = dict[int | str, dict[str, Any]]


def error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


UNAUTHORIZED: Responses = {
    401: error_response("The X-API-Key header is missing, or the key is unknown or revoked.")
}
NOT_FOUND: Responses = {404: error_response("No such resource among yours.")}
INVALID: Responses = {422: error_response("A request field is invalid; `field` names it.")}
RATE_LIMITED: Responses = {
    429: {
        **error_response("A rate limit was reached; retry after `Retry-After` seconds."),
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
            "X-RateLimit-Limit": {"schema": {"type": "integer"}},
            "X-RateLimit-Remaining": {"schema": {"type": "integer"}},
            "X-RateLimit-Reset": {
                "description": "When the window resets, in seconds since the epoch.",
                "schema": {"type": "integer"},
            },
        },
    }
}
UNAVAILABLE: Responses = {
    503: error_response("The database or the scan executor cannot be reached.")
}
AUTHENTICATED: Responses = {**UNAUTHORIZED, **INVALID, **RATE_LIMITED, **UNAVAILABLE}

_STATUS = {
    InvalidInputError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    AuthenticationError: 401,
    PermissionDeniedError: 403,
    RateLimitExceededError: 429,
    ServiceUnavailableError: 503,
}


def status_of(error: SecapiError) -> int:
    for kind, status in _STATUS.items():
        if isinstance(error, kind):
            return status
    return 500


def render(
    status: int,
    *,
    code: str,
    message: str,
    field: str | None = None,
    errors: list[FieldProblem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    detail = ErrorDetail(code=code, message=message, field=field, errors=errors or [])
    body = ErrorResponse(error=detail)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _request_location(field: str | None) -> str | None:
    """Return the field as the API names it: with its location, as in `body.image`.

    The core names a field of the submitted body without a location
    (`image`). Errors about query parameters name theirs (`query.page`).
    """
    if field is None or "." in field:
        return field
    return f"body.{field}"


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SecapiError)
    status = status_of(error)
    headers: dict[str, str] = {}
    field = None
    problems: list[FieldProblem] = []
    if isinstance(error, InvalidInputError):
        field = _request_location(error.field)
        problems.append(FieldProblem(field=field, message=error.message))
    if isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "APIKey"
    if isinstance(error, RateLimitExceededError):
        headers.update(
            {
                "Retry-After": str(error.retry_after),
                "X-RateLimit-Limit": str(error.limit),
                "X-RateLimit-Remaining": str(error.remaining),
                "X-RateLimit-Reset": str(error.reset_at),
            }
        )
    if status >= 500:
        log.warning("request failed", path=request.url.path, code=error.code, error=error.message)
    return render(
        status,
        code=error.code,
        message=error.message,
        field=field,
        errors=problems,
        headers=headers,
    )


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        body_problem = await _describe_body_problem(request, item)
        problems.append(body_problem or _describe_problem(item))
    if not problems:
        problems = [FieldProblem(field="request", message="the request is invalid")]
    first = problems[0]
    message = f"{first.field}: {first.message}"
    if len(problems) > 1:
        others = len(problems) - 1
        noun = "problem" if others == 1 else "problems"
        message += f" (and {others} more {noun}, listed in `errors`)"
    return render(422, code="invalid_input", message=message, field=first.field, errors=problems)


async def _describe_body_problem(request: Request, item: dict[str, Any]) -> FieldProblem | None:
    """Describe a body that is not JSON at all, which pydantic's messages leave unclear."""
    location = tuple(item.get("loc", ()))
    if not location or location[0] != "body":
        return None

    if item.get("type") == "json_invalid":
        # FastAPI reports only a character offset; parsing again gives the line and column.
        where = ""
        try:
            json.loads(await request.body())
        except json.JSONDecodeError as decode_error:
            where = (
                f": {decode_error.msg} at line {decode_error.lineno}, column {decode_error.colno}"
            )
        except (UnicodeDecodeError, RuntimeError):
            if len(location) > 1:
                where = f" at character {location[1]}"
        return FieldProblem(field="body", message=f"the request body is not valid JSON{where}")

    if item.get("type") == "extra_forbidden" and len(location) == 2:
        # A misspelt optional field: name the fields the endpoint takes, as for a query parameter.
        path = getattr(request.scope.get("route"), "path", None)
        accepted = accepted_body_fields(request.app, path or "", request.method)
        if accepted:
            return FieldProblem(
                field=f"body.{location[1]}",
                message=f"unknown field {location[1]!r}: {request.method} {path} takes "
                f"{', '.join(accepted)}; check the spelling",
            )

    # Without a JSON content type FastAPI hands the model the raw bytes of the body.
    if isinstance(item.get("input"), bytes) and location == ("body",):
        content_type = request.headers.get("content-type")
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return FieldProblem(
            field="body",
            message="the request body must be JSON sent with `Content-Type: application/json`; "
            f"this request has {sent}",
        )
    return None


def _describe_problem(item: dict[str, Any]) -> FieldProblem:
    location = ".".join(str(part) for part in item.get("loc", ())) or "request"
    message = str(item.get("msg", "invalid value"))
    if item.get("type") == "missing":
        return FieldProblem(field=location, message="required, but missing")
    if item.get("type") == "value_error":
        # Messages of the models' own validators already quote the value.
        return FieldProblem(field=location, message=message.removeprefix("Value error, "))
    if "input" in item and item.get("type") != "json_invalid":
        value = repr(item["input"])
        if len(value) > MAX_VALUE_LENGTH:
            value = value[: MAX_VALUE_LENGTH - 3] + "..."
        message = f"{message}, got {value}"
    return FieldProblem(field=location, message=message)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    message = str(error.detail)
    if error.status_code == 400:
        # FastAPI returns 400 only for a body it cannot decode, such as one that is not UTF-8.
        # Every other unreadable input gets 422 here, so this one does too.
        return render(
            422,
            code="invalid_input",
            message="the request body could not be decoded; send JSON encoded as UTF-8",
            field="body",
        )
    if error.status_code == 404:
        message = f"no endpoint at {request.url.path}; the endpoints are listed at /docs"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
    return render(
        error.status_code,
        code=codes.get(error.status_code, "http_error"),
        message=message,
        headers=dict(error.headers or {}),
    )


async def _database_error(request: Request, error: Exception) -> JSONResponse:
    # The driver's message can contain the connection URL, so only the class is logged.
    log.error(
        "database unavailable for a request",
        path=request.url.path,
        error_type=type(error).__name__,
    )
    return render(
        503,
        code="service_unavailable",
        message="the database cannot be reached; retry later, and check /ready",
    )


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("request failed with an unexpected error", path=request.url.path)
    return render(
        500,
        code="internal_error",
        message="the server failed to handle the request; the server log has the details",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SecapiError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for kind in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(kind, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
