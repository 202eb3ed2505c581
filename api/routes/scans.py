"""Scans: submit, list, read (with results and finding pages) and delete.

Every lookup goes through ScanService with the caller's user, so another
user's scan gets 404 exactly like a scan that does not exist.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response, status
from pydantic import ConfigDict, Field

from secapi.api.deps import CurrentCaller, Parts, Session
from secapi.api.errors import AUTHENTICATED, NOT_FOUND
from secapi.api.query import parse_choices
from secapi.api.schemas import (
    ID_PATTERN,
    License,
    LicensePage,
    Misconfiguration,
    MisconfigurationPage,
    ScanAccepted,
    ScanDetail,
    ScanList,
    ScanListItem,
    ScanResults,
    ScanSummary,
    Secret,
    SecretPage,
    Severity,
    Vulnerability,
    VulnerabilityPage,
    options_of,
)
from secapi.core.audit import AuditAction, audit_action
from secapi.core.db.models import Finding, FindingKind, Scan, ScanStatus
from secapi.core.pagination import MAX_PAGE_SIZE
from secapi.core.scans.options import ScanOptions
from secapi.core.scans.service import ScanService

router = APIRouter(tags=["scans"])

ScanId = Annotated[str, Path(pattern=ID_PATTERN, description="The scan's id.")]
PageNumber = Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number.")]
PageSize = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Items per page.")]
SEVERITY_NAMES = ", ".join(level.value for level in Severity)
# Maximum wait of a GET of a scan in seconds, because proxies often cut idle requests at 60 s.
MAX_WAIT_SECONDS = 60


async def severity_filter(
    severity: Annotated[
        list[str] | None,
        Query(
            description="Only findings of these severities. Repeat the parameter "
            "(`severity=HIGH&severity=CRITICAL`) or separate values with commas "
            f"(`severity=HIGH,CRITICAL`), in any letter case. Values: {SEVERITY_NAMES}.",
            examples=["HIGH,CRITICAL"],
        ),
    ] = None,
) -> list[Severity] | None:
    """Return the requested severities without repeats, or None when the filter is absent."""
    if severity is None:
        return None
    return parse_choices(severity, Severity, parameter="severity")


SeverityFilter = Annotated[list[Severity] | None, Depends(severity_filter)]


class ScanRequest(ScanOptions):
    """An image to scan, and how."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        min_length=1,
        max_length=512,
        examples=["nginx:1.27", "registry.example.com/team/app@sha256:..."],
        description="Image reference: [registry/]repository[:tag][@digest].",
    )

    def options(self) -> ScanOptions:
        return ScanOptions.model_validate(self.model_dump(exclude={"image"}))


def _service(parts: Parts, session: Session) -> ScanService:
    return ScanService(session, parts.settings, parts.executor, documents=parts.documents)


@router.post(
    "/api/v1/scan/docker",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ScanAccepted,
    summary="Submit a container image scan",
    responses={
        202: {
            "headers": {
                "Location": {
                    "description": "The scan's URL, to poll.",
                    "schema": {"type": "string"},
                }
            }
        },
        **AUTHENTICATED,
    },
)
async def submit_scan(
    body: ScanRequest, response: Response, caller: CurrentCaller, parts: Parts, session: Session
) -> ScanAccepted:
    """Queue a scan and return at once. Poll the scan's URL until it is completed or failed."""
    user = caller.principal.user
    # The success event is written with the scan itself; failures are recorded here.
    async with audit_action(
        session,
        actor=caller.actor,
        action=AuditAction.SCAN_SUBMIT,
        resource_type="scan",
        record_success=False,
    ) as audit:
        audit.details["image"] = body.image
        await parts.limiter.check_scan_submission(user_id=user.id, tier=caller.tier)
        scan = await _service(parts, session).submit(
            user=user, image=body.image, options=body.options(), actor=caller.actor
        )
        audit.resource_id = scan.id
    await parts.limiter.count_scan_submission(user_id=user.id, tier=caller.tier)

    response.headers["Location"] = f"/api/v1/scans/{scan.id}"
    return ScanAccepted(
        scan_id=scan.id,
        status=ScanStatus(scan.status),
        image=scan.image,
        created_at=scan.created_at,
    )


async def status_filter(
    status: Annotated[
        list[str] | None,
        Query(
            description="Only scans in these statuses. Repeat the parameter "
            "(`status=pending&status=running`) or separate values with commas. "
            f"Values: {', '.join(member.value for member in ScanStatus)}.",
            examples=["pending,running"],
        ),
    ] = None,
) -> list[ScanStatus] | None:
    """Return the requested statuses without repeats, or None when the filter is absent."""
    if status is None:
        return None
    return parse_choices(status, ScanStatus, parameter="status")


@router.get(
    "/api/v1/scans",
    response_model=ScanList,
    summary="List the caller's scans, newest first",
    responses=AUTHENTICATED,
)
async def list_scans(
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
    statuses: Annotated[list[ScanStatus] | None, Depends(status_filter)],
    page: PageNumber = 1,
    page_size: PageSize = 20,
) -> ScanList:
    result = await _service(parts, session).list(
        user=caller.principal.user, statuses=statuses, page=page, page_size=page_size
    )
    return ScanList(
        items=[ScanListItem.of(scan) for scan in result.items],
        total=result.total,
        page=result.page,
        page_size=result.page_size,
    )


@router.get(
    "/api/v1/scans/{scan_id}",
    response_model=ScanDetail,
    summary="Show a scan's status and results",
    responses={**NOT_FOUND, **AUTHENTICATED},
)
async def get_scan(
    scan_id: ScanId,
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
    include_findings: Annotated[
        bool,
        Query(description="Include the finding lists in `results`; false keeps only the summary."),
    ] = True,
    wait: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="Seconds to wait for a pending or running scan to end (long poll). "
            "The answer comes as soon as the scan is completed or failed, or after this many "
            "seconds with the scan's current state. 0 answers at once. The request counts "
            "once against the rate limit however long it waits.",
        ),
    ] = 0,
) -> Response:
    """Return the scan, with ``results`` sent exactly as stored.

    With `wait`, hold the answer until the scan ends or the seconds pass, instead of polling.
    """
    service = _service(parts, session)
    async with audit_action(
        session,
        actor=caller.actor,
        action=AuditAction.SCAN_READ,
        resource_type="scan",
        resource_id=scan_id,
    ) as audit:
        if wait > 0:
            # The read is recorded once the scan is found, so no write delays the response.
            await service.wait_for_end(
                user=caller.principal.user,
                scan_id=scan_id,
                seconds=wait,
                before_waiting=audit.record_success_now,
            )
        scan, document = await service.get_with_results(
            user=caller.principal.user, scan_id=scan_id, with_results=include_findings
        )
        position = await service.queue_position(scan=scan)
        if scan.status != ScanStatus.COMPLETED:
            document = None

    detail = _detail(scan, position)
    if document is None:
        results = None
        if detail.summary is not None:
            results = ScanResults.without_findings(scan, detail.summary).model_dump(
                mode="json",
                exclude={"vulnerabilities", "secrets", "misconfigurations", "licenses"},
            )
        payload = {**detail.model_dump(mode="json"), "results": results}
        # Compact separators, like every other JSON response of the API.
        body = json.dumps(payload, separators=(",", ":")).encode()
        return Response(body, media_type="application/json")

    # Splice the stored document in as bytes: re-serialising thousands of findings is the
    # slow part of this endpoint, and the document was validated when it was stored.
    head = detail.model_dump_json(exclude={"results"}).encode()
    body = b"".join((head[:-1], b',"results":', document, b"}"))  # one copy of the document
    return Response(body, media_type="application/json")


def _detail(scan: Scan, position: int | None) -> ScanDetail:
    return ScanDetail(
        scan_id=scan.id,
        image=scan.image,
        status=ScanStatus(scan.status),
        reason=scan.reason,
        message=scan.message,
        options=options_of(scan),
        created_at=scan.created_at,
        started_at=scan.started_at,
        completed_at=scan.completed_at,
        queue_position=position,
        summary=ScanSummary.of(scan),
        results=None,
    )


@router.delete(
    "/api/v1/scans/{scan_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a scan and its results",
    responses={**NOT_FOUND, **AUTHENTICATED},
)
async def delete_scan(
    scan_id: ScanId, caller: CurrentCaller, parts: Parts, session: Session
) -> None:
    """Delete the scan; a pending or running scan is cancelled first."""
    # The success event is written with the deletion itself; failures are recorded here.
    async with audit_action(
        session,
        actor=caller.actor,
        action=AuditAction.SCAN_DELETE,
        resource_type="scan",
        resource_id=scan_id,
        record_success=False,
    ):
        await _service(parts, session).delete(
            user=caller.principal.user, scan_id=scan_id, actor=caller.actor
        )


FINDINGS_DESCRIPTION = f"""\
Pages come in report order, up to {MAX_PAGE_SIZE} findings each, and every page counts
against the caller's per-minute request limit. `GET /api/v1/scans/{{scan_id}}`
returns all findings of a scan in one request.

The audit trail records a successful read as one `scan.read` event for page 1
only, so paging through a large scan adds one event rather than one per page.
A failed read is recorded for every page.
"""


async def _findings(
    *,
    kind: FindingKind,
    scan_id: str,
    severity: list[Severity] | None,
    page: int,
    page_size: int,
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
) -> tuple[list[Finding], int]:
    # One success event per read of a list, not per page, as FINDINGS_DESCRIPTION states.
    async with audit_action(
        session,
        actor=caller.actor,
        action=AuditAction.SCAN_READ,
        resource_type="scan",
        resource_id=scan_id,
        record_success=page == 1,
    ) as audit:
        audit.details["findings"] = kind.value
        result = await _service(parts, session).findings(
            user=caller.principal.user,
            scan_id=scan_id,
            kind=kind,
            severity=[level.value for level in severity] if severity is not None else None,
            page=page,
            page_size=page_size,
        )
    return list(result.items), result.total


@router.get(
    "/api/v1/scans/{scan_id}/vulnerabilities",
    response_model=VulnerabilityPage,
    summary="List a scan's vulnerabilities, in report order",
    description=FINDINGS_DESCRIPTION,
    responses={**NOT_FOUND, **AUTHENTICATED},
)
async def list_vulnerabilities(
    scan_id: ScanId,
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
    severity: SeverityFilter = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> VulnerabilityPage:
    items, total = await _findings(
        kind=FindingKind.VULNERABILITY,
        scan_id=scan_id,
        severity=severity,
        page=page,
        page_size=page_size,
        caller=caller,
        parts=parts,
        session=session,
    )
    return VulnerabilityPage(
        items=[vulnerability_of(item) for item in items],
        total=total,
        page=page,
        page_size=page_size,
    )


@router.get(
    "/api/v1/scans/{scan_id}/secrets",
    response_model=SecretPage,
    summary="List the secrets a scan found, in report order",
    description=FINDINGS_DESCRIPTION,
    responses={**NOT_FOUND, **AUTHENTICATED},
)
async def list_secrets(
    scan_id: ScanId,
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
    severity: SeverityFilter = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> SecretPage:
    items, total = await _findings(
        kind=FindingKind.SECRET,
        scan_id=scan_id,
        severity=severity,
        page=page,
        page_size=page_size,
        caller=caller,
        parts=parts,
        session=session,
    )
    return SecretPage(
        items=[secret_of(item) for item in items], total=total, page=page, page_size=page_size
    )


@router.get(
    "/api/v1/scans/{scan_id}/misconfigurations",
    response_model=MisconfigurationPage,
    summary="List the misconfigurations a scan found, in report order",
    description=FINDINGS_DESCRIPTION,
    responses={**NOT_FOUND, **AUTHENTICATED},
)
async def list_misconfigurations(
    scan_id: ScanId,
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
    severity: SeverityFilter = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> MisconfigurationPage:
    items, total = await _findings(
        kind=FindingKind.MISCONFIGURATION,
        scan_id=scan_id,
        severity=severity,
        page=page,
        page_size=page_size,
        caller=caller,
        parts=parts,
        session=session,
    )
    return MisconfigurationPage(
        items=[misconfiguration_of(item) for item in items],
        total=total,
        page=page,
        page_size=page_size,
    )


@router.get(
    "/api/v1/scans/{scan_id}/licenses",
    response_model=LicensePage,
    summary="List the licenses a scan found, in report order",
    description=FINDINGS_DESCRIPTION,
    responses={**NOT_FOUND, **AUTHENTICATED},
)
async def list_licenses(
    scan_id: ScanId,
    caller: CurrentCaller,
    parts: Parts,
    session: Session,
    severity: SeverityFilter = None,
    page: PageNumber = 1,
    page_size: PageSize = 50,
) -> LicensePage:
    items, total = await _findings(
        kind=FindingKind.LICENSE,
        scan_id=scan_id,
        severity=severity,
        page=page,
        page_size=page_size,
        caller=caller,
        parts=parts,
        session=session,
    )
    return LicensePage(
        items=[license_of(item) for item in items], total=total, page=page, page_size=page_size
    )


def vulnerability_of(finding: Finding) -> Vulnerability:
    details = finding.details or {}
    return Vulnerability(
        id=finding.identifier,
        package=finding.package_name,
        installed_version=finding.installed_version,
        fixed_version=finding.fixed_version,
        severity=finding.severity,
        title=finding.title,
        target=finding.target,
        package_type=finding.package_type,
        package_path=_text(details.get("package_path")),
        primary_url=finding.primary_url,
    )


def secret_of(finding: Finding) -> Secret:
    details = finding.details or {}
    return Secret(
        rule_id=finding.identifier,
        category=_text(details.get("category")),
        severity=finding.severity,
        title=finding.title,
        target=finding.target,
        start_line=_number(details.get("start_line")),
        end_line=_number(details.get("end_line")),
    )


def misconfiguration_of(finding: Finding) -> Misconfiguration:
    details = finding.details or {}
    return Misconfiguration(
        id=finding.identifier,
        title=finding.title,
        severity=finding.severity,
        target=finding.target,
        message=_text(details.get("message")),
        resolution=_text(details.get("resolution")),
        primary_url=finding.primary_url,
    )


def license_of(finding: Finding) -> License:
    details = finding.details or {}
    return License(
        name=finding.title or finding.identifier,
        package=finding.package_name,
        severity=finding.severity,
        category=_text(details.get("category")),
        target=finding.target,
        package_path=_text(details.get("package_path")),
        confidence=_fraction(details.get("confidence")),
        link=finding.primary_url,
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
