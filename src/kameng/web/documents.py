"""The member's qualification documents page: what they uploaded, what staff decided, and an
upload form. Some products can only be bought with an approved document on the account; the
refusal at checkout points here.

Only the logged-in member's own documents are ever listed (keyed by the session's member id);
the files themselves are never served back to the browser — staff open them with
`kameng documents show ID --save PATH`. The file's type is judged by its bytes in the service;
the size is checked here first from Content-Length, so an oversized upload is refused before
its body is parsed and spooled to disk, and the app's body limit cuts off one sent without a
length (chunked) at the same size, answering with `refuse_unread` below.
"""

from __future__ import annotations

import functools
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from kameng.container import Container
from kameng.documents import service as documents
from kameng.errors import ErrorCode, KamengError
from kameng.web.browser import Browser, browser
from kameng.web.templating import render

router = APIRouter(include_in_schema=False)

PAGE = documents.UPLOAD_PATH
# Room for the multipart framing and the small fields around the file.
FORM_OVERHEAD = 64 * 1024
# The most an upload request may send (the body limit cuts off anything longer as it streams).
MAX_UPLOAD_BODY = documents.MAX_BYTES + FORM_OVERHEAD

# This page's texts; the same keys in both languages (a unit test checks).
TEXT: dict[str, dict[str, str]] = {
    "zh-CN": {
        "title": "资质文件",
        "intro": "部分商品需要账户中有一份审核通过且未过期的资质文件才能购买。"
        "上传后由工作人员审核，结果会显示在下方。",
        "kind": "文件类型",
        "kind_hint": "以小写字母开头，只含小写字母、数字和下划线，例如 business_license",
        "file": "文件",
        "file_hint": "PDF、PNG 或 JPEG，最大 {mb} MB",
        "upload": "上传",
        "uploaded": "已上传，等待审核。",
        "none": "还没有上传过资质文件",
        "filename": "文件名",
        "size": "大小",
        "reason": "原因",
        "expires": "有效期至",
        "no_expiry": "长期有效",
        "uploaded_at": "上传时间",
        "back": "返回我的账户",
        "status_pending": "审核中",
        "status_approved": "已通过",
        "status_rejected": "已驳回",
        "status_expired": "已过期",
    },
    "en": {
        "title": "Documents",
        "intro": "Some products can only be bought with an approved, unexpired document on "
        "your account. Staff review what you upload; the decision shows below.",
        "kind": "Kind",
        "kind_hint": "starts with a lowercase letter; a-z, 0-9 and _ only, e.g. business_license",
        "file": "File",
        "file_hint": "PDF, PNG or JPEG, at most {mb} MB",
        "upload": "Upload",
        "uploaded": "Uploaded; waiting for review.",
        "none": "No documents uploaded yet",
        "filename": "File name",
        "size": "Size",
        "reason": "Reason",
        "expires": "Valid until",
        "no_expiry": "No expiry",
        "uploaded_at": "Uploaded",
        "back": "Back to my account",
        "status_pending": "Under review",
        "status_approved": "Approved",
        "status_rejected": "Rejected",
        "status_expired": "Expired",
    },
}


def _container(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


def display_status(doc: documents.DocumentInfo, now: datetime) -> str:
    """What the member should read: an approved document past its expiry is 'expired'."""
    if doc.status == "approved" and not doc.is_valid(now):
        return "expired"
    return doc.status


def _size(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    if size_bytes < 1024 * 1024:
        return f"{size_bytes / 1024:.0f} KB"
    return f"{size_bytes / (1024 * 1024):.1f} MB"


@router.get(PAGE)
def documents_page(request: Request) -> Response:
    container = _container(request)
    ctx = browser(request, container)
    if ctx.member is None:
        return ctx.apply(RedirectResponse(f"/login?next={PAGE}", status_code=303))
    notice = TEXT[ctx.language]["uploaded"] if request.query_params.get("uploaded") else ""
    return _page(ctx, container, notice=notice)


def _page(
    ctx: Browser,
    container: Container,
    *,
    error: str = "",
    detail: str = "",
    code: str = "",
    kind: str = "",
    notice: str = "",
    status_code: int = 200,
) -> Response:
    assert ctx.member is not None
    with container.db.connect(write=False) as conn:
        docs = documents.list_for_member(conn, member_id=ctx.member.member_id)
    now = container.clock()
    rows = [
        {
            "id": d.id,
            "kind": d.kind,
            "filename": d.filename,
            "size": _size(d.size_bytes),
            "status": display_status(d, now),
            "reason": d.reason,
            "expires_at": d.expires_at,
            "created_at": d.created_at,
        }
        for d in docs
    ]
    texts = TEXT[ctx.language]
    return render(
        ctx,
        "account_documents.html",
        status_code=status_code,
        dtext=texts,
        file_hint=texts["file_hint"].format(mb=documents.MAX_MB),
        docs=rows,
        error=error,
        detail=detail,
        code=code,
        kind=kind,
        notice=notice,
    )


def _refuse(ctx: Browser, container: Container, exc: KamengError, *, kind: str = "") -> Response:
    if ctx.member is None:
        return render(
            ctx,
            "error.html",
            status_code=exc.http_status,
            code=exc.code.value,
            message=exc.message(ctx.language),
            back="/",
        )
    return _page(
        ctx,
        container,
        error=exc.message(ctx.language),
        detail=documents.problem(exc, ctx.language),
        code=exc.code.value,
        kind=kind,
        status_code=exc.http_status,
    )


async def _read_form(request: Request) -> tuple[dict[str, str], bytes, str, str]:
    """The text fields plus the file's bytes (at most MAX_BYTES + 1: enough to tell it is too
    big), its name and its declared type."""
    form = await request.form(max_files=1, max_fields=10)
    try:
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            return fields, b"", "", ""
        content = await upload.read(documents.MAX_BYTES + 1)
        return fields, content, upload.filename or "", upload.content_type or ""
    finally:
        await form.close()


async def refuse_unread(request: Request, exc: KamengError) -> Response:
    """This page's answer when the body limit refuses an upload before it is read (declared or
    streamed past `MAX_BYTES + FORM_OVERHEAD`): too large is said as a file over the limit, on
    the member's own page, exactly as the Content-Length check below says it."""
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    if exc.code is ErrorCode.payload_too_large:
        try:
            documents.check_size(documents.MAX_BYTES + 1)
        except KamengError as too_large:
            exc = too_large
    return await run_in_threadpool(_refuse, ctx, container, exc)


@router.post(PAGE)
async def upload(request: Request) -> Response:
    container = _container(request)
    ctx = await run_in_threadpool(browser, request, container)
    refuse = functools.partial(_refuse, ctx, container)
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    try:
        if declared > MAX_UPLOAD_BODY:
            documents.check_size(declared - FORM_OVERHEAD)
    except KamengError as exc:
        return await run_in_threadpool(refuse, exc)
    try:
        fields, content, filename, declared_type = await _read_form(request)
    except (HTTPException, MultiPartException) as exc:  # malformed, or too many parts
        detail = str(getattr(exc, "detail", None) or getattr(exc, "message", "form"))
        return await run_in_threadpool(
            refuse, KamengError(ErrorCode.invalid_request, detail=detail)
        )
    kind = fields.get("kind", "").strip().lower()[:64]
    try:
        ctx.check_csrf(fields.get("csrf_token"))
        if ctx.member is None:
            raise KamengError(ErrorCode.login_required)
    except KamengError as exc:
        return await run_in_threadpool(refuse, exc, kind=kind)
    member_id = ctx.member.member_id

    def job(conn: Connection) -> int:
        return documents.upload(
            conn,
            member_id=member_id,
            kind=kind,
            filename=filename,
            content_type=declared_type,
            content=content,
            now=container.clock(),
        )

    try:
        await container.writer.run_async(job)
    except KamengError as exc:
        return await run_in_threadpool(refuse, exc, kind=kind)
    return ctx.apply(RedirectResponse(f"{PAGE}?uploaded=1", status_code=303))
