"""Accounts and API keys: register, who am I, list, create and revoke keys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status

from secapi.api.deps import (
    CurrentCaller,
    Parts,
    Session,
    record_rate_limit,
    remember_rate_limit,
    source_address,
)
from secapi.api.errors import (
    AUTHENTICATED,
    INVALID,
    NOT_FOUND,
    RATE_LIMITED,
    UNAVAILABLE,
    error_response,
)
from secapi.api.schemas import (
    ID_PATTERN,
    ApiKeyList,
    ApiKeyResponse,
    CreatedKeyResponse,
    CreateKeyRequest,
    RegisterRequest,
    RegisterResponse,
    UserResponse,
)
from secapi.core.audit import ANONYMOUS, Actor, AuditAction, audit_action
from secapi.core.auth import AuthService, check_registration_open
from secapi.core.ratelimit import LimitReachedError
from secapi.core.settings import Tier

router = APIRouter(prefix="/api/v1/auth", tags=["accounts"])


@router.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=RegisterResponse,
    summary="Register a user and get an API key",
    responses={
        403: error_response("Registration is closed on this server."),
        409: error_response("An account with this email address already exists."),
        **INVALID,
        **RATE_LIMITED,
        **UNAVAILABLE,
    },
)
async def register(
    body: RegisterRequest, request: Request, parts: Parts, session: Session
) -> RegisterResponse:
    """Create a free-tier account. The response contains the API key, shown this once only."""
    address = source_address(request, parts)
    actor = Actor(user_id=None, name=ANONYMOUS, source_ip=address)
    try:
        remember_rate_limit(request, await parts.limiter.hit_registration(address=address))
    except LimitReachedError as error:
        if error.first_in_window:
            await record_rate_limit(session, request, actor, error)
        raise

    async with audit_action(
        session,
        actor=actor,
        action=AuditAction.USER_REGISTER,
        resource_type="user",
        record_success=False,
    ):
        check_registration_open(parts.settings)
        user, issued = await AuthService(session, parts.settings).register(
            email=body.email, source_ip=address
        )
    return RegisterResponse(
        user_id=user.id,
        email=user.email,
        tier=Tier(user.tier),
        api_key=issued.key,
        key_prefix=issued.record.prefix,
    )


@router.get(
    "/me",
    response_model=UserResponse,
    summary="Show the caller's account and limits",
    responses=AUTHENTICATED,
)
async def me(caller: CurrentCaller, parts: Parts) -> UserResponse:
    return UserResponse.of(
        caller.principal.user,
        limits=parts.settings.tiers.for_tier(caller.tier),
        enabled=parts.settings.rate_limit_enabled,
    )


@router.get(
    "/keys",
    response_model=ApiKeyList,
    summary="List the caller's API keys, revoked ones included",
    responses=AUTHENTICATED,
)
async def list_keys(caller: CurrentCaller, parts: Parts, session: Session) -> ApiKeyList:
    keys = await AuthService(session, parts.settings).list_keys(principal=caller.principal)
    return ApiKeyList(items=[ApiKeyResponse.of(key) for key in keys])


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=CreatedKeyResponse,
    summary="Create another API key",
    responses={
        409: error_response("The maximum number of active keys is reached."),
        **AUTHENTICATED,
    },
)
async def create_key(
    caller: CurrentCaller, parts: Parts, session: Session, body: CreateKeyRequest | None = None
) -> CreatedKeyResponse:
    """Create a key for the caller. The response contains the key, shown this once only."""
    name = body.name if body is not None else CreateKeyRequest().name
    async with audit_action(
        session,
        actor=caller.actor,
        action=AuditAction.KEY_CREATE,
        resource_type="api_key",
        record_success=False,
    ):
        issued = await AuthService(session, parts.settings).create_key(
            principal=caller.principal, name=name, actor=caller.actor
        )
    return CreatedKeyResponse(**ApiKeyResponse.of(issued.record).model_dump(), api_key=issued.key)


@router.delete(
    "/keys/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Revoke an API key",
    responses={
        409: error_response(
            "This is the caller's last active key; create another before revoking it."
        ),
        **NOT_FOUND,
        **AUTHENTICATED,
    },
)
async def revoke_key(
    key_id: Annotated[str, Path(pattern=ID_PATTERN, description="The key's id.")],
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
) -> None:
    """Revoke one of the caller's keys; revoking a revoked key changes nothing.

    The last active key cannot be revoked, because no key would be left to
    create a new one with: create a new key first.
    """
    async with audit_action(
        session,
        actor=caller.actor,
        action=AuditAction.KEY_REVOKE,
        resource_type="api_key",
        resource_id=key_id,
        record_success=False,
    ):
        await AuthService(session, parts.settings).revoke_key(
            principal=caller.principal, key_id=key_id, actor=caller.actor
        )
