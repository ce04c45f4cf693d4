"""Qualification documents: a member uploads, staff approve or reject, checkout asks `require`.

Some products may only be sold to buyers who proved something (a business licence, an age or
identity check...). The proof is a document on the member's account; staff decide it once. The
rules that matter, and why:

- The file type is taken from the file's first bytes, never from the name or the type the
  browser declared (both are whatever the uploader wants them to be). Only PDF, PNG and JPEG are
  accepted: formats staff can open safely, and nothing a browser would run as a page.
- A decision is a compare-and-set on `status = 'pending'`: when two staff decide the same
  document at once, exactly one wins and the other hears `document_already_decided` instead of
  silently overwriting the first decision.
- Every decision writes an audit row in the same transaction as the decision itself.
- Guests cannot hold documents, so a product that needs one is refused to guests with the same
  code members get, telling them to log in and upload.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from kameng.audit import service as audit
from kameng.db import table
from kameng.documents.models import BuyerDocument, DocStatus
from kameng.errors import ErrorCode, KamengError, field_error

_doc = table(BuyerDocument)

MAX_BYTES = 5 * 1024 * 1024
MAX_MB = MAX_BYTES // (1024 * 1024)
MAX_PENDING = 20
MAX_FILENAME = 200
MAX_STAFF = 100
MAX_REASON = 1000
UPLOAD_PATH = "/account/documents"  # named in `qualification_required`, so buyers find it

_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")

# Signatures at offset 0. JPEG is FF D8 FF (SOI plus the first marker's lead byte); PNG is its
# full 8-byte signature; PDF readers accept "%PDF-" later in the file too, but we do not: a file
# that is something else first is exactly what this check is meant to keep out.
_SIGNATURES: tuple[tuple[bytes, str, str], ...] = (
    (b"%PDF-", "application/pdf", ".pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
)
_EXTENSION = {mime: ext for _, mime, ext in _SIGNATURES}

_COLUMNS = (
    _doc.c.id,
    _doc.c.member_id,
    _doc.c.kind,
    _doc.c.filename,
    _doc.c.content_type,
    _doc.c.size_bytes,
    _doc.c.sha256,
    _doc.c.status,
    _doc.c.reason,
    _doc.c.reviewed_by,
    _doc.c.reviewed_at,
    _doc.c.expires_at,
    _doc.c.created_at,
)


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    """A document as pages and the CLI see it; `content` only when asked for (it can be MBs)."""

    id: int
    member_id: int
    kind: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    status: str
    reason: str
    reviewed_by: str
    reviewed_at: datetime | None
    expires_at: datetime | None
    created_at: datetime
    content: bytes | None = None

    def is_valid(self, now: datetime) -> bool:
        """Approved and not expired: the same test `has_valid` runs in SQL."""
        return self.status == DocStatus.approved and (
            self.expires_at is None or self.expires_at > now
        )


# -- pure checks ---------------------------------------------------------------------------------


def _invalid(field: str, zh: str, en: str) -> KamengError:
    """The message states the rules; the specific problem travels as a field problem, in both
    languages until the edge picks one (as with `invalid_fields`)."""
    return KamengError(
        ErrorCode.document_invalid,
        max_mb=MAX_MB,
        extra={"fields": [field_error(field, "invalid", zh, en)]},
    )


def problem(exc: KamengError, language: str) -> str:
    """The specific problem behind a `document_invalid` refusal, in `language` ('' if none)."""
    fields = exc.extra.get("fields") or []
    if not fields or not isinstance(fields[0], dict):
        return ""
    return str(fields[0].get("message_en" if language == "en" else "message_zh", ""))


def sniff_type(content: bytes) -> str | None:
    """The MIME type the bytes really are (PDF, PNG or JPEG), or None for anything else."""
    for magic, mime, _ in _SIGNATURES:
        if content.startswith(magic):
            return mime
    return None


def check_size(size_bytes: int) -> None:
    """1 byte to MAX_BYTES (the web edge also asks this of a Content-Length, before reading)."""
    if size_bytes <= 0:
        raise _invalid("file", "文件为空", "the file is empty")
    if size_bytes > MAX_BYTES:
        raise _invalid(
            "file", f"文件超过 {MAX_MB} MB 上限", f"the file is larger than the {MAX_MB} MB limit"
        )


def check_content(content: bytes) -> str:
    """The sniffed MIME type of an acceptable file; `document_invalid` otherwise."""
    check_size(len(content))
    mime = sniff_type(content)
    if mime is None:
        raise _invalid(
            "file", "文件内容不是 PDF、PNG 或 JPEG", "the file is not a PDF, PNG or JPEG"
        )
    return mime


def check_kind(kind: str) -> str:
    """A document kind is a short machine name (products name the kind they need)."""
    if not _KIND.fullmatch(kind):
        raise _invalid(
            "kind",
            "类型格式不正确（最多 32 个字符，例如 business_license）",
            "the kind is not in the required form (at most 32 characters, e.g. business_license)",
        )
    return kind


def clean_filename(filename: str, content_type: str) -> str:
    """The name shown to staff: the last path part only (browsers on Windows may send a full
    path), no control or invisible formatting characters (a right-to-left override can make
    "gpj.exe" read as "exe.jpg"), no leading dots, at most MAX_FILENAME characters with the
    extension kept. An empty result falls back to "document" plus the sniffed extension."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if not unicodedata.category(ch).startswith("C"))
    name = name.strip().lstrip(".").strip()
    if not name:
        return "document" + _EXTENSION.get(content_type, "")
    if len(name) <= MAX_FILENAME:
        return name
    stem, dot, ext = name.rpartition(".")
    if dot and stem and 0 < len(ext) <= 16:
        return stem[: MAX_FILENAME - len(ext) - 1] + "." + ext
    return name[:MAX_FILENAME]


def _check_staff(staff: str) -> str:
    cleaned = staff.strip()
    if not cleaned or len(cleaned) > MAX_STAFF:
        raise KamengError(
            ErrorCode.invalid_request, detail=f"staff name must be 1 to {MAX_STAFF} characters"
        )
    return cleaned


# -- member side ---------------------------------------------------------------------------------


def upload(
    conn: Connection,
    *,
    member_id: int,
    kind: str,
    filename: str,
    content_type: str,
    content: bytes,
    now: datetime,
) -> int:
    """Store a new pending document and return its id.

    `content_type` is what the browser declared; it is deliberately not trusted or stored —
    the stored type is the sniffed one, so whoever opens the file later opens what it is.
    The same file of the same kind uploaded again while still pending (a double-click, a
    resubmitted form) returns the existing document rather than queueing a second review.
    The pending cap bounds what one account can make staff look at (and store); on PostgreSQL
    two simultaneous uploads may both pass a count of MAX_PENDING - 1, which is harmless.
    """
    del content_type  # see the docstring
    check_kind(kind)
    mime = check_content(content)
    digest = hashlib.sha256(content).hexdigest()
    pending = _doc.c.member_id == member_id, _doc.c.status == DocStatus.pending
    same = conn.execute(
        select(_doc.c.id).where(*pending, _doc.c.kind == kind, _doc.c.sha256 == digest).limit(1)
    ).scalar()
    if same is not None:
        return int(same)
    waiting = conn.execute(select(func.count()).select_from(_doc).where(*pending)).scalar_one()
    if waiting >= MAX_PENDING:
        raise KamengError(ErrorCode.too_many_pending_documents, limit=MAX_PENDING)
    return int(
        conn.execute(
            insert(_doc)
            .values(
                member_id=member_id,
                kind=kind,
                filename=clean_filename(filename, mime),
                content_type=mime,
                size_bytes=len(content),
                sha256=digest,
                content=content,
                status=DocStatus.pending,
                reason="",
                reviewed_by="",
                reviewed_at=None,
                expires_at=None,
                created_at=now,
            )
            .returning(_doc.c.id)
        ).scalar_one()
    )


def _info(row: Any, *, content: bytes | None = None) -> DocumentInfo:
    return DocumentInfo(
        id=int(row.id),
        member_id=int(row.member_id),
        kind=row.kind,
        filename=row.filename,
        content_type=row.content_type,
        size_bytes=int(row.size_bytes),
        sha256=row.sha256,
        status=row.status,
        reason=row.reason,
        reviewed_by=row.reviewed_by,
        reviewed_at=row.reviewed_at,
        expires_at=row.expires_at,
        created_at=row.created_at,
        content=content,
    )


def list_for_member(conn: Connection, *, member_id: int) -> list[DocumentInfo]:
    """The member's documents, newest first (without the files)."""
    rows = conn.execute(
        select(*_COLUMNS)
        .where(_doc.c.member_id == member_id)
        .order_by(_doc.c.created_at.desc(), _doc.c.id.desc())
    )
    return [_info(r) for r in rows]


# -- staff side ----------------------------------------------------------------------------------


def list_pending(conn: Connection, *, limit: int = 100) -> list[DocumentInfo]:
    """Documents waiting for a decision, oldest first: the review queue is first come, first
    served."""
    rows = conn.execute(
        select(*_COLUMNS)
        .where(_doc.c.status == DocStatus.pending)
        .order_by(_doc.c.created_at, _doc.c.id)
        .limit(limit)
    )
    return [_info(r) for r in rows]


def list_recent(conn: Connection, *, limit: int = 100) -> list[DocumentInfo]:
    """All documents, newest first (the staff overview)."""
    rows = conn.execute(
        select(*_COLUMNS).order_by(_doc.c.created_at.desc(), _doc.c.id.desc()).limit(limit)
    )
    return [_info(r) for r in rows]


def get(conn: Connection, *, document_id: int, with_content: bool = False) -> DocumentInfo:
    columns = (*_COLUMNS, _doc.c.content) if with_content else _COLUMNS
    row = conn.execute(select(*columns).where(_doc.c.id == document_id)).first()
    if row is None:
        raise KamengError(ErrorCode.document_not_found, document_id=document_id)
    return _info(row, content=bytes(row.content) if with_content else None)


def approve(
    conn: Connection,
    *,
    document_id: int,
    staff: str,
    expires_at: datetime | None,
    now: datetime,
) -> None:
    """Approve a pending document, valid until `expires_at` (None: no expiry)."""
    if expires_at is not None and expires_at <= now:
        raise KamengError(ErrorCode.invalid_request, detail="expires_at must be in the future")
    _decide(
        conn,
        document_id=document_id,
        staff=_check_staff(staff),
        status=DocStatus.approved,
        reason="",
        expires_at=expires_at,
        now=now,
    )


def reject(conn: Connection, *, document_id: int, staff: str, reason: str, now: datetime) -> None:
    """Reject a pending document. The reason is shown to the member, who needs it to know what
    to upload instead, so it may not be blank."""
    cleaned = reason.strip()
    if not cleaned:
        raise KamengError(ErrorCode.reject_reason_required)
    _decide(
        conn,
        document_id=document_id,
        staff=_check_staff(staff),
        status=DocStatus.rejected,
        reason=cleaned[:MAX_REASON],
        expires_at=None,
        now=now,
    )


def _decide(
    conn: Connection,
    *,
    document_id: int,
    staff: str,
    status: DocStatus,
    reason: str,
    expires_at: datetime | None,
    now: datetime,
) -> None:
    row = conn.execute(
        update(_doc)
        .where(_doc.c.id == document_id, _doc.c.status == DocStatus.pending)
        .values(
            status=status, reason=reason, reviewed_by=staff, reviewed_at=now, expires_at=expires_at
        )
        .returning(_doc.c.member_id, _doc.c.kind, _doc.c.sha256)
    ).first()
    if row is None:
        current = conn.execute(select(_doc.c.status).where(_doc.c.id == document_id)).scalar()
        if current is None:
            raise KamengError(ErrorCode.document_not_found, document_id=document_id)
        raise KamengError(ErrorCode.document_already_decided, status=current)
    details: dict[str, Any] = {
        "member_id": int(row.member_id),
        "kind": row.kind,
        "sha256": row.sha256,
    }
    if status is DocStatus.approved:
        details["expires_at"] = expires_at.isoformat() if expires_at else None
    else:
        details["reason"] = reason
    # In the caller's transaction: the audit row commits with the decision or not at all.
    audit.record_on(
        conn,
        actor=staff,
        action=f"document.{status.value}",
        target_type="buyer_document",
        target_id=document_id,
        now=now,
        details=details,
    )


# -- checkout side -------------------------------------------------------------------------------


def has_valid(conn: Connection, *, member_id: int, kind: str, now: datetime) -> bool:
    """Whether the member holds an approved, unexpired document of `kind` ('' = any kind)."""
    conditions = [
        _doc.c.member_id == member_id,
        _doc.c.status == DocStatus.approved,
        or_(_doc.c.expires_at.is_(None), _doc.c.expires_at > now),
    ]
    if kind:
        conditions.append(_doc.c.kind == kind)
    found = conn.execute(select(_doc.c.id).where(and_(*conditions)).limit(1)).scalar()
    return found is not None


def require(
    conn: Connection, *, member_id: int | None, requires: bool, kind: str, now: datetime
) -> None:
    """Refuse a purchase of a product that `requires` a qualification the buyer lacks.

    Guests (`member_id` None) are refused with the same code: the message tells everyone to log
    in and upload, which is the one thing that helps either of them."""
    if not requires:
        return
    if member_id is not None and has_valid(conn, member_id=member_id, kind=kind, now=now):
        return
    raise KamengError(
        ErrorCode.qualification_required,
        kind=f" ({kind})" if kind else "",
        path=UPLOAD_PATH,
        extra={"kind": kind, "upload_path": UPLOAD_PATH, "logged_in": member_id is not None},
    )
