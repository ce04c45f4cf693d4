"""Qualification documents on a real migrated SQLite database: upload, review, validity over
time, the checkout gate (`require`), the staff CLI and the member's upload page.

Times are explicit values (`now` arguments, a settable clock): nothing here waits or times
anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from tests.integration._helpers import cli_env
from tests.support import factories
from typer.testing import CliRunner

from kameng.audit.models import AuditEntry
from kameng.container import Container
from kameng.documents import service as documents
from kameng.errors import ErrorCode, KamengError
from kameng.members import service as members

T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)
PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x01" * 13


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def new_member(container: Container, email: str) -> int:
    with container.db.connect() as conn:
        # A placeholder hash: these members never log in with a password.
        return members.register(
            conn, email=email, password_hash="$argon2id$placeholder", language="zh-CN", now=T0
        )


def upload(
    container: Container,
    member_id: int,
    *,
    kind: str = "business_license",
    content: bytes = PDF,
    filename: str = "licence.pdf",
    content_type: str = "application/pdf",
    now: datetime = T0,
) -> int:
    with container.db.connect() as conn:
        return documents.upload(
            conn,
            member_id=member_id,
            kind=kind,
            filename=filename,
            content_type=content_type,
            content=content,
            now=now,
        )


def has_valid(container: Container, member_id: int, kind: str, now: datetime) -> bool:
    with container.db.connect(write=False) as conn:
        return documents.has_valid(conn, member_id=member_id, kind=kind, now=now)


def get(container: Container, document_id: int, **kw: Any) -> documents.DocumentInfo:
    with container.db.connect(write=False) as conn:
        return documents.get(conn, document_id=document_id, **kw)


def approve(
    container: Container, document_id: int, expires_at: datetime | None, staff: str = "staff:amy"
) -> None:
    with container.db.connect() as conn:
        documents.approve(conn, document_id=document_id, staff=staff, expires_at=expires_at, now=T0)


def reject(container: Container, document_id: int, reason: str, staff: str = "staff:bo") -> None:
    with container.db.connect() as conn:
        documents.reject(conn, document_id=document_id, staff=staff, reason=reason, now=T0)


def audit_rows(container: Container, document_id: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(actor, action, details) of the document's audit rows; each is dated at the decision."""
    with container.db.connect(write=False) as conn:
        rows = conn.execute(
            select(AuditEntry.actor, AuditEntry.action, AuditEntry.details, AuditEntry.at)
            .where(
                AuditEntry.target_type == "buyer_document",
                AuditEntry.target_id == str(document_id),
            )
            .order_by(AuditEntry.id)
        ).all()
    decided_at = {get(container, document_id).reviewed_at}
    assert {r.at for r in rows} <= decided_at
    return [(r.actor, r.action, r.details) for r in rows]


def document_count(container: Container) -> int:
    with container.db.connect(write=False) as conn:
        return int(conn.execute(text("SELECT count(*) FROM buyer_documents")).scalar_one())


def require(container: Container, member_id: int | None, kind: str, now: datetime = T0) -> None:
    with container.db.connect(write=False) as conn:
        documents.require(conn, member_id=member_id, requires=True, kind=kind, now=now)


@pytest.fixture(scope="module")
def _migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("documents-template")
    factories.make_container(data_dir).close()  # disposing the engine checkpoints the WAL
    return data_dir / "kameng.db"


@pytest.fixture
def sqlite_container(_migrated_template: Path, tmp_path: Path) -> Iterator[Container]:
    """The shared fixture's migrated SQLite container, but copied from a database migrated
    once per module: running the migrations for every test would cost more than the tests."""
    shutil.copyfile(_migrated_template, tmp_path / "kameng.db")
    container = Container.build(factories.make_settings(tmp_path))
    yield container
    container.close()


@pytest.fixture
def member_id(sqlite_container: Container) -> int:
    return new_member(sqlite_container, "buyer@example.com")


# -- service -------------------------------------------------------------------------------------


def test_upload_review_and_expiry(sqlite_container: Container, member_id: int) -> None:
    c = sqlite_container
    other = new_member(c, "other@example.com")
    doc_id = upload(c, member_id, filename="C:\\scans\\licence.pdf")

    doc = get(c, doc_id)
    assert (doc.status, doc.kind, doc.filename) == ("pending", "business_license", "licence.pdf")
    assert doc.content is None and doc.size_bytes == len(PDF)
    assert doc.sha256 == hashlib.sha256(PDF).hexdigest()
    assert get(c, doc_id, with_content=True).content == PDF
    assert not has_valid(c, member_id, "business_license", T0)

    expires = T0 + timedelta(days=30)
    approve(c, doc_id, expires)
    doc = get(c, doc_id)
    assert (doc.status, doc.reviewed_by, doc.expires_at) == ("approved", "staff:amy", expires)
    assert doc.reviewed_at == T0
    assert has_valid(c, member_id, "business_license", T0)
    assert has_valid(c, member_id, "", T0)  # '' = any kind
    assert not has_valid(c, member_id, "id_card", T0)
    assert not has_valid(c, other, "business_license", T0)  # someone else's document
    assert has_valid(c, member_id, "business_license", expires - timedelta(microseconds=1))
    assert not has_valid(c, member_id, "business_license", expires)
    assert not has_valid(c, member_id, "business_license", expires + timedelta(days=1))

    [listed] = [d for d in _list(c, member_id) if d.id == doc_id]
    assert listed.content is None and listed.status == "approved"
    assert audit_rows(c, doc_id) == [
        (
            "staff:amy",
            "document.approved",
            {
                "member_id": member_id,
                "kind": "business_license",
                "sha256": hashlib.sha256(PDF).hexdigest(),
                "expires_at": expires.isoformat(),
            },
        )
    ]


def _list(c: Container, member_id: int) -> list[documents.DocumentInfo]:
    with c.db.connect(write=False) as conn:
        return documents.list_for_member(conn, member_id=member_id)


def test_approval_without_expiry_never_lapses(sqlite_container: Container, member_id: int) -> None:
    doc_id = upload(sqlite_container, member_id)
    approve(sqlite_container, doc_id, None)
    assert has_valid(sqlite_container, member_id, "business_license", T0 + timedelta(days=3650))


def test_approval_with_an_expiry_in_the_past_is_refused(
    sqlite_container: Container, member_id: int
) -> None:
    doc_id = upload(sqlite_container, member_id)
    with pytest.raises(KamengError) as exc:
        approve(sqlite_container, doc_id, T0)
    assert exc.value.code is ErrorCode.invalid_request
    assert get(sqlite_container, doc_id).status == "pending"


def test_reject_needs_a_reason(sqlite_container: Container, member_id: int) -> None:
    c = sqlite_container
    doc_id = upload(c, member_id)
    for blank in ("", "   \n"):
        with pytest.raises(KamengError) as exc:
            reject(c, doc_id, blank)
        assert exc.value.code is ErrorCode.reject_reason_required
    assert get(c, doc_id).status == "pending"
    assert audit_rows(c, doc_id) == []

    reject(c, doc_id, "  The scan is cut off at the bottom  ")
    doc = get(c, doc_id)
    assert (doc.status, doc.reason, doc.reviewed_by) == (
        "rejected",
        "The scan is cut off at the bottom",
        "staff:bo",
    )
    assert not has_valid(c, member_id, "business_license", T0)
    [(actor, action, details)] = audit_rows(c, doc_id)
    assert (actor, action, details["reason"]) == (
        "staff:bo",
        "document.rejected",
        "The scan is cut off at the bottom",
    )


def test_a_document_is_decided_once(sqlite_container: Container, member_id: int) -> None:
    """Two staff on the same document: the second decision, whichever it is, is refused and
    changes nothing (the decision is a compare-and-set on status = pending)."""
    c = sqlite_container
    doc_id = upload(c, member_id)
    approve(c, doc_id, T0 + timedelta(days=1), staff="staff:amy")
    with pytest.raises(KamengError) as late_reject:
        reject(c, doc_id, "blurry", staff="staff:bo")
    assert late_reject.value.code is ErrorCode.document_already_decided
    assert late_reject.value.http_status == 409
    assert "approved" in late_reject.value.message("en")
    with pytest.raises(KamengError) as late_approve:
        approve(c, doc_id, None, staff="staff:cy")
    assert late_approve.value.code is ErrorCode.document_already_decided

    doc = get(c, doc_id)
    assert (doc.status, doc.reviewed_by, doc.expires_at) == (
        "approved",
        "staff:amy",
        T0 + timedelta(days=1),
    )
    assert [a for _, a, _ in audit_rows(c, doc_id)] == ["document.approved"]

    rejected = upload(c, member_id, content=PDF + b"%2")
    reject(c, rejected, "wrong document")
    with pytest.raises(KamengError) as again:
        approve(c, rejected, None)
    assert again.value.code is ErrorCode.document_already_decided


def test_unknown_documents(sqlite_container: Container) -> None:
    for action in (
        lambda: get(sqlite_container, 999),
        lambda: approve(sqlite_container, 999, None),
        lambda: reject(sqlite_container, 999, "no"),
    ):
        with pytest.raises(KamengError) as exc:
            action()
        assert exc.value.code is ErrorCode.document_not_found
        assert exc.value.http_status == 404


def test_type_is_sniffed_and_disguised_files_are_not_stored(
    sqlite_container: Container, member_id: int
) -> None:
    c = sqlite_container
    png_id = upload(c, member_id, content=PNG, filename="photo", content_type="text/html")
    doc = get(c, png_id)
    assert doc.content_type == "image/png"  # what it is, not what the browser said
    assert doc.filename == "photo"
    with pytest.raises(KamengError) as exc:
        upload(c, member_id, content=b"<html>hi</html>", filename="x.pdf")
    assert exc.value.code is ErrorCode.document_invalid
    with pytest.raises(KamengError) as bad_kind:
        upload(c, member_id, kind="Business License")
    assert bad_kind.value.code is ErrorCode.document_invalid
    assert document_count(c) == 1


def test_pending_documents_are_capped(sqlite_container: Container, member_id: int) -> None:
    c = sqlite_container
    ids = [upload(c, member_id, content=PDF + b"%" + str(i).encode()) for i in range(20)]
    assert len(set(ids)) == documents.MAX_PENDING == 20
    # The same file again while it is pending is the same document, not a 21st.
    assert upload(c, member_id, content=PDF + b"%0") == ids[0]
    with pytest.raises(KamengError) as exc:
        upload(c, member_id, content=PDF + b"%new")
    assert exc.value.code is ErrorCode.too_many_pending_documents
    assert "20" in exc.value.message("zh-CN") and "20" in exc.value.message("en")
    assert document_count(c) == 20
    # Other members are not affected, and a decision makes room again.
    upload(c, new_member(c, "third@example.com"))
    reject(c, ids[0], "duplicate")
    upload(c, member_id, content=PDF + b"%new")
    assert document_count(c) == 22


def test_pending_queue_is_oldest_first(sqlite_container: Container, member_id: int) -> None:
    c = sqlite_container
    first = upload(c, member_id, content=PDF + b"%a", now=T0)
    second = upload(c, member_id, content=PDF + b"%b", now=T0 + timedelta(minutes=1))
    decided = upload(c, member_id, content=PDF + b"%c", now=T0 - timedelta(minutes=1))
    reject(c, decided, "unreadable")
    with c.db.connect(write=False) as conn:
        assert [d.id for d in documents.list_pending(conn)] == [first, second]
        assert [d.id for d in documents.list_pending(conn, limit=1)] == [first]
    assert [d.id for d in _list(c, member_id)] == [second, first, decided]


def test_require_gates_guests_and_members(sqlite_container: Container, member_id: int) -> None:
    c = sqlite_container
    with c.db.connect(write=False) as conn:
        documents.require(conn, member_id=None, requires=False, kind="x", now=T0)  # not needed

    for who in (None, member_id):
        with pytest.raises(KamengError) as exc:
            require(c, who, "business_license")
        err = exc.value
        assert err.code is ErrorCode.qualification_required and err.http_status == 403
        assert "/account/documents" in err.message("en") and "Log in" in err.message("en")
        assert err.to_dict("en")["error"]["logged_in"] is (who is not None)

    doc_id = upload(c, member_id)
    with pytest.raises(KamengError):
        require(c, member_id, "business_license")  # pending is not enough
    approve(c, doc_id, T0 + timedelta(days=1))
    require(c, member_id, "business_license")
    require(c, member_id, "")  # any kind
    with pytest.raises(KamengError) as wrong_kind:
        require(c, member_id, "id_card")
    assert "(id_card)" in wrong_kind.value.message("zh-CN")
    assert wrong_kind.value.to_dict("en")["error"]["kind"] == "id_card"
    with pytest.raises(KamengError):
        require(c, member_id, "business_license", now=T0 + timedelta(days=1))  # expired
    with pytest.raises(KamengError) as any_kind:
        require(c, None, "")
    assert "an approved, unexpired document on your account" in any_kind.value.message("en")
    assert "资质文件。" in any_kind.value.message("zh-CN")


# -- CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def cli(sqlite_container: Container, monkeypatch: pytest.MonkeyPatch) -> Any:
    from kameng.cli import app  # registers `documents` as the real entry point does

    for key, value in cli_env(sqlite_container).items():
        if key.startswith("KAMENG_"):
            monkeypatch.setenv(key, value)
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, ["documents", *args])

    return invoke


def test_cli_review(cli: Any, sqlite_container: Container, member_id: int, tmp_path: Path) -> None:
    c = sqlite_container
    doc_id = upload(c, member_id, content=PNG, filename="scan.png", now=datetime.now(UTC))

    listed = cli("list", "--pending", "--json")
    assert listed.exit_code == 0, listed.output
    [item] = json.loads(listed.stdout)
    assert (item["id"], item["member_id"], item["status"]) == (doc_id, member_id, "pending")
    assert "content" not in item

    target = tmp_path / "out.png"
    shown = cli("show", str(doc_id), "--save", str(target))
    assert shown.exit_code == 0, shown.output
    assert target.read_bytes() == PNG
    assert target.stat().st_mode & 0o077 == 0
    assert "scan.png" in shown.stdout and hashlib.sha256(PNG).hexdigest() in shown.stdout
    again = cli("show", str(doc_id), "--save", str(target))
    assert isinstance(again.exception, KamengError)
    assert again.exception.code is ErrorCode.invalid_request

    no_reason = cli("reject", str(doc_id), "--by", "bo")
    assert no_reason.exit_code == 2  # usage error: --reason is required
    blank = cli("reject", str(doc_id), "--by", "bo", "--reason", " ")
    assert isinstance(blank.exception, KamengError)
    assert blank.exception.code is ErrorCode.reject_reason_required

    approved = cli("approve", str(doc_id), "--by", "amy", "--expires", "2099-12-31")
    assert approved.exit_code == 0, approved.output
    doc = get(c, doc_id)
    assert doc.status == "approved" and doc.reviewed_by == "staff:amy"
    assert doc.expires_at == datetime(2100, 1, 1, tzinfo=UTC)
    assert [(a, act) for a, act, _ in audit_rows(c, doc_id)] == [("staff:amy", "document.approved")]

    late = cli("reject", str(doc_id), "--by", "bo", "--reason", "blurry")
    assert isinstance(late.exception, KamengError)
    assert late.exception.code is ErrorCode.document_already_decided
    assert get(c, doc_id).status == "approved"

    assert json.loads(cli("list", "--pending", "--json").stdout) == []
    everything = json.loads(cli("list", "--member", str(member_id), "--json").stdout)
    assert [(d["id"], d["status"]) for d in everything] == [(doc_id, "approved")]
    missing = cli("show", "424242")
    assert isinstance(missing.exception, KamengError)
    assert missing.exception.code is ErrorCode.document_not_found


# -- the member's page ---------------------------------------------------------------------------


@pytest.fixture
def site(sqlite_container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    """The real app on a loopback port, with the documents page included (a no-op once
    create_app includes it itself)."""
    import kameng.app
    from kameng.web import documents as web_documents

    real_create_app = kameng.app.create_app

    def create_app(container: Container, **kw: Any) -> Any:
        app = real_create_app(container, **kw)
        if not any(getattr(r, "path", "") == web_documents.PAGE for r in app.routes):
            app.include_router(web_documents.router)
        return app

    monkeypatch.setattr(kameng.app, "create_app", create_app)
    sqlite_container.clock = Clock(T0)
    with (
        factories.live_server(sqlite_container) as url,
        httpx.Client(base_url=url, follow_redirects=False, timeout=15) as client,
    ):
        yield client


def log_in(client: httpx.Client, container: Container, member_id: int) -> None:
    with container.db.connect() as conn:
        token = members.start_session(
            conn, member_id=member_id, previous_token=None, ip="127.0.0.1", now=T0
        )
    client.cookies.set("kameng_sid", token)


def csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match
    return match.group(1)


def post_file(
    client: httpx.Client, token: str, content: bytes, *, kind: str = "business_license"
) -> Any:
    return client.post(
        "/account/documents",
        data={"csrf_token": token, "kind": kind},
        files={"file": ("licence.pdf", content, "application/pdf")},
    )


def test_page_needs_a_member(site: httpx.Client, sqlite_container: Container) -> None:
    page = site.get("/account/documents")
    assert page.status_code == 303
    assert page.headers["location"] == "/login?next=/account/documents"
    token = csrf(site.get("/login").text)  # a guest's own valid token still does not do
    posted = post_file(site, token, PDF)
    assert posted.status_code == 401 and 'data-code="login_required"' in posted.text
    assert document_count(sqlite_container) == 0


def test_member_uploads_and_sees_the_decision(
    site: httpx.Client, sqlite_container: Container, member_id: int
) -> None:
    c = sqlite_container
    log_in(site, c, member_id)
    page = site.get("/account/documents")
    assert page.status_code == 200 and 'id="no-documents"' in page.text
    token = csrf(page.text)

    forged = post_file(site, "0" * 64, PDF)
    assert forged.status_code == 403 and 'data-code="csrf_failed"' in forged.text
    disguised = post_file(site, token, b"<html>x</html>", kind="id_card")
    assert disguised.status_code == 422 and 'data-code="document_invalid"' in disguised.text
    assert "文件内容不是 PDF、PNG 或 JPEG" in disguised.text
    assert 'value="id_card"' in disguised.text  # what the member typed is kept
    assert document_count(c) == 0

    done = post_file(site, token, PDF, kind=" Business_License ")
    assert done.status_code == 303
    assert done.headers["location"] == "/account/documents?uploaded=1"
    [doc] = _list(c, member_id)
    assert (doc.kind, doc.status, doc.filename) == ("business_license", "pending", "licence.pdf")
    listed = site.get(done.headers["location"])
    assert 'id="form-notice"' in listed.text and f'id="document-{doc.id}"' in listed.text
    assert 'data-status="pending"' in listed.text

    reject(c, doc.id, "Please upload all four corners <b>visible</b>")
    english = site.get("/account/documents?lang=en").text
    assert 'data-status="rejected"' in english and "Rejected" in english
    assert "all four corners &lt;b&gt;visible&lt;/b&gt;" in english  # shown, escaped

    second = upload(c, member_id, content=PDF + b"%2")
    approve(c, second, T0 + timedelta(days=2))
    assert f'id="document-{second}" data-status="approved"' in site.get("/account/documents").text
    sqlite_container.clock = Clock(T0 + timedelta(days=3))
    later = site.get("/account/documents?lang=zh-CN").text
    assert f'id="document-{second}" data-status="expired"' in later and "已过期" in later


def test_oversized_uploads_are_refused(
    site: httpx.Client, sqlite_container: Container, member_id: int
) -> None:
    log_in(site, sqlite_container, member_id)
    token = csrf(site.get("/account/documents").text)
    just_over = PDF + b"\0" * (documents.MAX_BYTES + 1 - len(PDF))
    refused = post_file(site, token, just_over)
    assert refused.status_code == 422 and 'data-code="document_invalid"' in refused.text
    assert "文件超过 5 MB 上限" in refused.text
    # Far over: refused from Content-Length, before the body is parsed.
    huge = post_file(site, token, just_over + b"\0" * (128 * 1024))
    assert huge.status_code == 422 and 'data-code="document_invalid"' in huge.text
    empty = post_file(site, token, b"")
    assert empty.status_code == 422 and "文件为空" in empty.text
    assert document_count(sqlite_container) == 0
