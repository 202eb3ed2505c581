"""The caller's own audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from secapi.api.deps import CurrentCaller, Session
from secapi.api.errors import AUTHENTICATED
from secapi.api.query import parse_choices
from secapi.api.schemas import AuditEventResponse, AuditPage
from secapi.core.audit import AuditAction, list_events
from secapi.core.pagination import MAX_PAGE_SIZE

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

ACTION_NAMES = ", ".join(action.value for action in AuditAction)


async def action_filter(
    action: Annotated[
        list[str] | None,
        Query(
            description="Only events of these actions. Repeat the parameter "
            "(`action=scan.submit&action=scan.delete`) or separate values with commas. "
            f"Values: {ACTION_NAMES}.",
            examples=["scan.submit,scan.delete"],
        ),
    ] = None,
) -> list[AuditAction] | None:
    """Return the requested actions without repeats, or None when the filter is absent."""
    if action is None:
        return None
    return parse_choices(action, AuditAction, parameter="action")


@router.get(
    "",
    response_model=AuditPage,
    summary="List the caller's audit events, newest first",
    responses=AUTHENTICATED,
)
async def list_audit_events(
    caller: CurrentCaller,
    session: Session,
    page: Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number.")] = 1,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")] = 50,
    actions: Annotated[list[AuditAction] | None, Depends(action_filter)] = None,
) -> AuditPage:
    """List events about the caller's account: its requests, and failed uses of its keys."""
    result = await list_events(
        session,
        user_id=caller.principal.user.id,
        page=page,
        page_size=page_size,
        actions=actions,
    )
    return AuditPage(
        items=[AuditEventResponse.of(event) for event in result.items],
        total=result.total,
        page=result.page,
        page_size=result.page_size,
    )
