"""The staff JSON API: the review queue and risk rules/lists (the console will sit on these).

Authentication is a bearer token made by `kameng staff add` (`Authorization: Bearer kst_…`);
each route names the roles it accepts (admin is accepted everywhere). Errors are the same
problem documents as the Reseller API: a stable code and a message in zh-CN or en.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool

from kameng.container import Container
from kameng.documents import service as documents
from kameng.errors import ErrorCode, KamengError
from kameng.orders import queries as order_queries
from kameng.pipeline import review_actions
from kameng.review import service as review
from kameng.risk import backtest as risk_backtest
from kameng.risk import lists as risk_lists
from kameng.risk import records as risk_records
from kameng.risk import service as risk
from kameng.risk.models import RuleSetStatus
from kameng.staff import service as staff_service
from kameng.staff.models import Role
from kameng.staff.service import Staff

router = APIRouter(prefix="/api/staff", include_in_schema=False)
T = TypeVar("T")


def _container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


async def _staff(request: Request) -> Staff:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise KamengError(ErrorCode.staff_auth_required)
    container = _container(request)

    def check() -> Staff:
        with container.db.connect(write=False) as conn:
            return staff_service.authenticate(conn, token=token.strip())

    return await run_in_threadpool(check)


StaffDep = Annotated[Staff, Depends(_staff)]
ContainerDep = Annotated[Container, Depends(_container)]


async def _read(container: Container, job: Callable[[Connection], T]) -> T:
    def run() -> T:
        with container.db.connect(write=False) as conn:
            return job(conn)

    return await run_in_threadpool(run)


async def _write(container: Container, job: Callable[[Connection], T]) -> T:
    result: T = await container.writer.run_async(job)
    return result


class Note(BaseModel):
    note: str = Field(default="", max_length=2000)


class RuleSetIn(BaseModel):
    rules: list[dict[str, Any]]
    note: str = Field(default="", max_length=2000)


class ActivateIn(BaseModel):
    mode: str = Field(pattern="^(live|shadow)$")


class ListEntryIn(BaseModel):
    list: str = Field(pattern="^(allow|block|proxy)$")
    kind: str = Field(max_length=16)
    value: str = Field(max_length=200)
    note: str = Field(default="", max_length=500)


class BacktestIn(BaseModel):
    version: int
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(default=5000, ge=1, le=50_000)


# -- review queue -----------------------------------------------------------------------------


@router.get("/review/items")
async def review_items(
    staff: StaffDep,
    container: ContainerDep,
    status: Annotated[str, Query(max_length=12)] = "open",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    now = container.clock()
    items = await _read(
        container, lambda c: review.list_items(c, status=status, limit=limit, offset=offset)
    )
    return {"items": [i.as_json(now) for i in items]}


@router.get("/review/figures")
async def review_figures(staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    return await _read(container, lambda c: review.queue_figures(c, now=container.clock()))


@router.get("/review/items/{item_id}")
async def review_item(item_id: int, staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    """The item, its reasons, its decisions so far, the order and the buyer's history."""
    staff_service.require(staff, Role.reviewer)
    now = container.clock()

    def load(conn: Connection) -> dict[str, Any]:
        item = review.get_item(conn, item_id=item_id)
        order = order_queries.order_by_id(conn, order_id=item.order_id)
        return {
            "item": item.as_json(now),
            "decisions": review.decisions_of(conn, item_id=item_id),
            "order": {
                "order_no": order.order_no,
                "status": order.status,
                "stage": order.stage,
                "reason": order.reason,
                "channel": order.channel,
                "amount_cents": order.amount_cents,
                "currency": order.currency,
                "created_at": order.created_at.isoformat(),
            },
            "screenings": risk.screenings_of(conn, order_id=item.order_id),
            "buyer_history": risk_records.buyer_history(conn, order_id=item.order_id),
        }

    return await _read(container, load)


@router.post("/review/items/{item_id}/claim")
async def claim(item_id: int, staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    now = container.clock()
    item = await _write(
        container,
        lambda c: review.claim(
            c, item_id=item_id, reviewer=staff.actor, policy=container.review_policy, now=now
        ),
    )
    return item.as_json(now)


@router.post("/review/items/{item_id}/release")
async def release(item_id: int, staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    now = container.clock()
    item = await _write(
        container, lambda c: review.release(c, item_id=item_id, reviewer=staff.actor, now=now)
    )
    return item.as_json(now)


@router.post("/review/items/{item_id}/approve")
async def approve(
    item_id: int, body: Note, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    return await _write(
        container,
        lambda c: review_actions.approve(
            c,
            item_id=item_id,
            reviewer=staff.actor,
            note=body.note,
            policy=container.review_policy,
            accounts=container.accounts,
            fulfil_sla_s=container.settings.default_sla_s,
            now=container.clock(),
        ),
    )


@router.post("/review/items/{item_id}/reject")
async def reject(
    item_id: int, body: Note, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    return await _write(
        container,
        lambda c: review_actions.reject(
            c,
            item_id=item_id,
            reviewer=staff.actor,
            note=body.note,
            accounts=container.accounts,
            now=container.clock(),
        ),
    )


# -- risk rules and lists ---------------------------------------------------------------------


@router.get("/risk/rule-sets")
async def rule_sets(staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    sets = await _read(container, risk.list_rule_sets)
    return {"rule_sets": [{**s.as_json(), "rules": len(s.rules)} for s in sets]}


@router.get("/risk/rule-sets/{version}")
async def rule_set(version: int, staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    found = await _read(container, lambda c: risk.get_rule_set(c, version=version))
    return found.as_json()


@router.post("/risk/rule-sets", status_code=201)
async def save_rule_set(body: RuleSetIn, staff: StaffDep, container: ContainerDep) -> Any:
    staff_service.require(staff)
    saved = await _write(
        container,
        lambda c: risk.save_rule_set(
            c, rules=body.rules, note=body.note, actor=staff.actor, now=container.clock()
        ),
    )
    return saved.as_json()


@router.post("/risk/rule-sets/{version}/activate")
async def activate(
    version: int, body: ActivateIn, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff)
    done = await _write(
        container,
        lambda c: risk.activate(
            c,
            version=version,
            mode=RuleSetStatus(body.mode),
            actor=staff.actor,
            now=container.clock(),
        ),
    )
    container.risk_engine.invalidate()
    return done.as_json()


@router.post("/risk/shadow/stop")
async def stop_shadow(staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff)
    stopped = await _write(
        container, lambda c: risk.stop_shadow(c, actor=staff.actor, now=container.clock())
    )
    container.risk_engine.invalidate()
    return {"stopped": stopped}


@router.get("/risk/shadow/report")
async def shadow_report(
    staff: StaffDep,
    container: ContainerDep,
    version: Annotated[int | None, Query()] = None,
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    return await _read(container, lambda c: risk_backtest.shadow_report(c, version=version))


@router.post("/risk/backtest")
async def backtest(body: BacktestIn, staff: StaffDep, container: ContainerDep) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    result = await _read(
        container,
        lambda c: risk_backtest.backtest(
            c,
            version=body.version,
            since=body.since,
            until=body.until,
            limit=body.limit,
            now=container.clock(),
        ),
    )
    return result.as_json()


@router.get("/risk/lists")
async def lists(
    staff: StaffDep,
    container: ContainerDep,
    which: Annotated[str | None, Query(alias="list", max_length=8)] = None,
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    return {"entries": await _read(container, lambda c: risk_lists.list_entries(c, which=which))}


@router.post("/risk/lists", status_code=201)
async def add_entry(body: ListEntryIn, staff: StaffDep, container: ContainerDep) -> Any:
    staff_service.require(staff)
    value = await _write(
        container,
        lambda c: risk_lists.add_list_entry(
            c,
            which=body.list,
            kind=body.kind,
            value=body.value,
            note=body.note,
            actor=staff.actor,
            now=container.clock(),
        ),
    )
    container.risk_engine.invalidate()
    return {"list": body.list, "kind": body.kind, "value": value}


@router.post("/risk/lists/remove")
async def remove_entry(
    body: ListEntryIn, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff)
    removed = await _write(
        container,
        lambda c: risk_lists.remove_list_entry(
            c,
            which=body.list,
            kind=body.kind,
            value=body.value,
            actor=staff.actor,
            now=container.clock(),
        ),
    )
    container.risk_engine.invalidate()
    return {"removed": removed}


@router.get("/orders/{order_no}/screenings")
async def order_screenings(
    order_no: str, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer, Role.support)

    def load(conn: Connection) -> dict[str, Any]:
        order = order_queries.find_order(conn, order_no=order_no[:40], reseller_id=None)
        return {
            "order_no": order.order_no,
            "screenings": risk.screenings_of(conn, order_id=order.id),
        }

    return await _read(container, load)


# -- qualification documents ------------------------------------------------------------------


class DocumentApproveIn(BaseModel):
    expires_at: datetime | None = None


class DocumentRejectIn(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


def _document_json(doc: documents.DocumentInfo, now: datetime) -> dict[str, Any]:
    return {
        "id": doc.id,
        "member_id": doc.member_id,
        "kind": doc.kind,
        "filename": doc.filename,
        "content_type": doc.content_type,
        "size_bytes": doc.size_bytes,
        "sha256": doc.sha256,
        "status": doc.status,
        "reason": doc.reason,
        "reviewed_by": doc.reviewed_by,
        "reviewed_at": doc.reviewed_at.isoformat() if doc.reviewed_at else None,
        "expires_at": doc.expires_at.isoformat() if doc.expires_at else None,
        "valid": doc.is_valid(now),
        "created_at": doc.created_at.isoformat(),
    }


@router.get("/documents")
async def list_documents(
    staff: StaffDep,
    container: ContainerDep,
    pending: Annotated[bool, Query()] = True,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Documents waiting for a decision (oldest first), or the most recent ones."""
    staff_service.require(staff, Role.reviewer, Role.support)
    now = container.clock()
    docs = await _read(
        container,
        lambda c: (
            documents.list_pending(c, limit=limit)
            if pending
            else documents.list_recent(c, limit=limit)
        ),
    )
    return {"documents": [_document_json(d, now) for d in docs]}


@router.get("/documents/{document_id}/file")
async def document_file(document_id: int, staff: StaffDep, container: ContainerDep) -> Response:
    """The file itself, as uploaded (type sniffed from its content at upload); never cached."""
    staff_service.require(staff, Role.reviewer, Role.support)
    doc = await _read(
        container, lambda c: documents.get(c, document_id=document_id, with_content=True)
    )
    return Response(
        doc.content or b"",
        media_type=doc.content_type,
        headers={
            "Content-Disposition": f'attachment; filename="document-{doc.id}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.post("/documents/{document_id}/approve")
async def approve_document(
    document_id: int, body: DocumentApproveIn, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    now = container.clock()

    def job(c: Connection) -> documents.DocumentInfo:
        documents.approve(
            c, document_id=document_id, staff=staff.actor, expires_at=body.expires_at, now=now
        )
        return documents.get(c, document_id=document_id)

    return _document_json(await _write(container, job), now)


@router.post("/documents/{document_id}/reject")
async def reject_document(
    document_id: int, body: DocumentRejectIn, staff: StaffDep, container: ContainerDep
) -> dict[str, Any]:
    staff_service.require(staff, Role.reviewer)
    now = container.clock()

    def job(c: Connection) -> documents.DocumentInfo:
        documents.reject(c, document_id=document_id, staff=staff.actor, reason=body.reason, now=now)
        return documents.get(c, document_id=document_id)

    return _document_json(await _write(container, job), now)
