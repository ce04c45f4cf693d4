"""Pure parts of qualification documents: what a file really is (by its bytes), size bounds,
kind and file-name rules, validity at the expiry boundary, the page's texts and the CLI's
`--expires` date."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kameng.cli.documents import expiry_of
from kameng.documents import service as documents
from kameng.documents.service import DocumentInfo
from kameng.errors import HTTP_STATUS, MESSAGES, ErrorCode, KamengError
from kameng.web import documents as web_documents

PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 13
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 8

TEMPLATE = (
    Path(__file__).parents[2] / "src" / "kameng" / "web" / "templates" / "account_documents.html"
)


def _refusal(exc: pytest.ExceptionInfo[KamengError]) -> tuple[str, str]:
    """The specific problem of a `document_invalid` refusal, in zh-CN and en."""
    assert exc.value.code is ErrorCode.document_invalid
    assert exc.value.http_status == 422
    return documents.problem(exc.value, "zh-CN"), documents.problem(exc.value, "en")


# -- file type by magic bytes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "mime"),
    [
        (PDF, "application/pdf"),
        (b"%PDF-", "application/pdf"),  # the bare signature is enough
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
    ],
)
def test_the_three_accepted_types_are_recognised_by_their_first_bytes(
    content: bytes, mime: str
) -> None:
    assert documents.sniff_type(content) == mime
    assert documents.check_content(content) == mime


@pytest.mark.parametrize(
    "content",
    [
        b"GIF89a\x01\x00\x01\x00",  # an image, but not one we accept
        b"<html><script>alert(1)</script></html>",  # a page dressed up as a .pdf
        b" %PDF-1.7\n",  # the signature, but not at the start
        b"%PDF1.7\n",  # no dash
        b"\x89PNG\r\n\x1a\x00" + b"\x00" * 16,  # last signature byte wrong
        b"\x89PNG",  # a truncated PNG signature
        b"\xff\xd8\xfe\x00",  # SOI without a marker after it
        b"PK\x03\x04" + b"\x00" * 26,  # a zip (docx, odt, ...)
        b"MZ\x90\x00" + b"\x00" * 60,  # an executable
    ],
)
def test_anything_else_is_refused_whatever_its_name(content: bytes) -> None:
    assert documents.sniff_type(content) is None
    with pytest.raises(KamengError) as exc:
        documents.check_content(content)
    assert _refusal(exc) == ("文件内容不是 PDF、PNG 或 JPEG", "the file is not a PDF, PNG or JPEG")


def test_a_fake_name_or_declared_type_does_not_make_a_file_acceptable() -> None:
    """The service never looks at the name or declared type: only the content decides."""
    with pytest.raises(KamengError) as exc:
        documents.upload(
            None,  # type: ignore[arg-type]  # refused before any database access
            member_id=1,
            kind="licence",
            filename="licence.pdf",
            content_type="application/pdf",
            content=b"<html>not a pdf</html>",
            now=datetime.now(UTC),
        )
    _refusal(exc)


# -- size bounds ---------------------------------------------------------------------------------


def test_size_bounds_are_one_byte_to_max_bytes() -> None:
    assert documents.MAX_BYTES == 5 * 1024 * 1024
    documents.check_size(1)
    documents.check_size(documents.MAX_BYTES)
    with pytest.raises(KamengError) as empty:
        documents.check_size(0)
    assert _refusal(empty) == ("文件为空", "the file is empty")
    with pytest.raises(KamengError) as big:
        documents.check_size(documents.MAX_BYTES + 1)
    zh, en = _refusal(big)
    assert "5 MB" in zh and "5 MB" in en and "larger" in en


def test_content_at_the_size_limits() -> None:
    assert documents.check_content(b"\xff\xd8\xff") == "image/jpeg"  # 3 bytes: the signature
    at_limit = PDF + b"\0" * (documents.MAX_BYTES - len(PDF))
    assert documents.check_content(at_limit) == "application/pdf"
    with pytest.raises(KamengError) as exc:
        documents.check_content(at_limit + b"\0")
    assert "larger" in _refusal(exc)[1]
    with pytest.raises(KamengError) as empty:
        documents.check_content(b"")
    assert "empty" in _refusal(empty)[1]


def test_a_refusal_states_the_rules_and_names_the_problem_in_both_languages() -> None:
    with pytest.raises(KamengError) as exc:
        documents.check_content(b"")
    zh_body = exc.value.to_dict("zh-CN")["error"]
    en_body = exc.value.to_dict("en")["error"]
    assert zh_body["code"] == "document_invalid"
    assert zh_body["fields"] == [{"field": "file", "code": "invalid", "message": "文件为空"}]
    assert en_body["fields"][0]["message"] == "the file is empty"
    assert "不超过 5 MB" in zh_body["message"] and "at most 5 MB" in en_body["message"]
    assert "{" not in zh_body["message"] and "{" not in en_body["message"]
    assert documents.problem(KamengError(ErrorCode.not_found), "en") == ""


# -- kind ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["a", "business_license", "id_card_2", "a" + "b" * 31])
def test_valid_kinds(kind: str) -> None:
    assert documents.check_kind(kind) == kind


@pytest.mark.parametrize(
    "kind",
    ["", "A", "Business", "1licence", "_licence", "a" + "b" * 32, "id-card", "id card", "id\n"],
)
def test_invalid_kinds(kind: str) -> None:
    with pytest.raises(KamengError) as exc:
        documents.check_kind(kind)
    assert exc.value.code is ErrorCode.document_invalid
    assert exc.value.extra["fields"][0]["field"] == "kind"


# -- file names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "mime", "expected"),
    [
        ("scan.pdf", "application/pdf", "scan.pdf"),
        ("C:\\Users\\li\\Desktop\\营业执照.png", "image/png", "营业执照.png"),
        ("../../etc/passwd", "application/pdf", "passwd"),
        ("..", "application/pdf", "document.pdf"),
        ("", "image/png", "document.png"),
        ("   ", "image/jpeg", "document.jpg"),
        (".hidden.jpg", "image/jpeg", "hidden.jpg"),
        ("a\x00b\r\nc.pdf", "application/pdf", "abc.pdf"),
        ("invoice\u202egpj.exe", "image/jpeg", "invoicegpj.exe"),  # no right-to-left override
        ("dir/", "application/pdf", "document.pdf"),
    ],
)
def test_file_names_are_reduced_to_a_safe_basename(given: str, mime: str, expected: str) -> None:
    assert documents.clean_filename(given, mime) == expected


def test_long_file_names_keep_their_extension() -> None:
    name = documents.clean_filename("x" * 300 + ".jpeg", "image/jpeg")
    assert len(name) == documents.MAX_FILENAME
    assert name.endswith("x.jpeg")
    bare = documents.clean_filename("y" * 300, "image/png")
    assert bare == "y" * documents.MAX_FILENAME
    exact = "z" * (documents.MAX_FILENAME - 4) + ".pdf"
    assert documents.clean_filename(exact, "application/pdf") == exact


# -- validity ------------------------------------------------------------------------------------


def _doc(status: str, expires_at: datetime | None) -> DocumentInfo:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    return DocumentInfo(
        id=1,
        member_id=1,
        kind="k",
        filename="f.pdf",
        content_type="application/pdf",
        size_bytes=10,
        sha256="0" * 64,
        status=status,
        reason="",
        reviewed_by="",
        reviewed_at=None,
        expires_at=expires_at,
        created_at=now,
    )


def test_validity_ends_exactly_at_the_expiry() -> None:
    now = datetime(2030, 6, 1, 12, tzinfo=UTC)
    tick = timedelta(microseconds=1)
    assert _doc("approved", None).is_valid(now)
    assert _doc("approved", now + tick).is_valid(now)
    assert not _doc("approved", now).is_valid(now)
    assert not _doc("pending", None).is_valid(now)
    assert not _doc("rejected", None).is_valid(now)
    assert web_documents.display_status(_doc("approved", now), now) == "expired"
    assert web_documents.display_status(_doc("approved", now + tick), now) == "approved"
    assert web_documents.display_status(_doc("rejected", now), now) == "rejected"


def test_cli_expiry_date_covers_the_whole_day() -> None:
    assert expiry_of("2030-12-31") == datetime(2031, 1, 1, tzinfo=UTC)
    with pytest.raises(KamengError) as exc:
        expiry_of("31/12/2030")
    assert exc.value.code is ErrorCode.invalid_request


# -- texts and codes -----------------------------------------------------------------------------


def test_page_texts_exist_in_both_languages_and_cover_the_template() -> None:
    zh, en = web_documents.TEXT["zh-CN"], web_documents.TEXT["en"]
    assert set(zh) == set(en)
    assert all(v.strip() for v in (*zh.values(), *en.values()))
    source = TEMPLATE.read_text()
    used = set(re.findall(r"\bdtext\.([a-z_]+)", source))
    assert {"title", "upload", "kind"} <= used
    assert used <= set(en), sorted(used - set(en))
    # Status labels are looked up as 'status_' ~ status: every status the page can show.
    assert {"status_pending", "status_approved", "status_rejected", "status_expired"} <= set(en)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.qualification_required, 403),
        (ErrorCode.document_invalid, 422),
        (ErrorCode.document_not_found, 404),
        (ErrorCode.document_already_decided, 409),
        (ErrorCode.too_many_pending_documents, 409),
        (ErrorCode.reject_reason_required, 422),
    ],
)
def test_document_error_codes(code: ErrorCode, status: int) -> None:
    assert HTTP_STATUS[code] == status
    zh, en = MESSAGES[code]
    assert zh.strip() and en.strip() and zh != en


def test_qualification_message_says_what_and_where_in_both_languages() -> None:
    conn = None  # a guest is refused before anything is read
    with pytest.raises(KamengError) as exc:
        documents.require(
            conn,  # type: ignore[arg-type]
            member_id=None,
            requires=True,
            kind="business_license",
            now=datetime.now(UTC),
        )
    zh, en = exc.value.message("zh-CN"), exc.value.message("en")
    assert "business_license" in zh and "business_license" in en
    assert "/account/documents" in zh and "/account/documents" in en
    assert "登录" in zh and "Log in" in en
    assert exc.value.http_status == 403
    assert exc.value.to_dict("en")["error"]["upload_path"] == "/account/documents"
