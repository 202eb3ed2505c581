"""The caller's own audit trail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from secapi.api.deps import CurrentCaller, Session
from secapi.api.errors import AUTHENTICATED
from secapi.api.schemas import AuditEventResponse, AuditPage
from secapi.core.audit import list_events
from secapi.core.pagination import MAX_PAGE_SIZE

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


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
) -> AuditPage:
    """List events about the caller's account: its requests, and failed uses of its keys."""
    result = await list_events(
        session, user_id=caller.principal.user.id, page=page, page_size=page_size
    )
    return AuditPage(
        items=[AuditEventResponse.of(event) for event in result.items],
        total=result.total,
        page=result.page,
        page_size=result.page_size,
    )
