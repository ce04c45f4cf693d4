"""Request and webhook signatures (`security/signing.py`, DESIGN §7).

Resellers implement the scheme from the published vectors; if we drift from them, every
integration breaks at once. The vectors live in `shared/reference/signing-vectors.json`; a
verbatim copy sits next to this file so the test never silently skips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kameng.security.signing import (
    EMPTY_BODY_SHA256,
    body_sha256,
    sign_request,
    signature_matches,
    signed_headers,
    string_to_sign,
    verify_webhook,
    webhook_header,
    webhook_signature,
)

SHARED_VECTORS = (
    Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "signing-vectors.json"
)
LOCAL_VECTORS = Path(__file__).resolve().parent / "signing_vectors.json"


def _load_vectors() -> dict[str, Any]:
    path = SHARED_VECTORS if SHARED_VECTORS.is_file() else LOCAL_VECTORS
    return json.loads(path.read_text(encoding="utf-8"))


VECTORS = _load_vectors()
REQUEST_VECTORS: list[dict[str, str]] = VECTORS["request_vectors"]
WEBHOOK_VECTORS: list[dict[str, str]] = VECTORS["webhook_vectors"]
SECRET: str = VECTORS["secret"]


def test_vector_files_present_and_in_sync() -> None:
    """The local copy must match the shared reference whenever both exist."""
    local = json.loads(LOCAL_VECTORS.read_text(encoding="utf-8"))
    assert local["request_vectors"]
    assert local["webhook_vectors"]
    if SHARED_VECTORS.is_file():
        shared = json.loads(SHARED_VECTORS.read_text(encoding="utf-8"))
        assert shared == local, "tests/unit/signing_vectors.json is stale: copy it again"


def test_there_are_vectors_to_check() -> None:
    assert len(REQUEST_VECTORS) >= 4
    assert len(WEBHOOK_VECTORS) >= 1
    assert {v["method"] for v in REQUEST_VECTORS} >= {"GET", "POST"}


# -- request vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", REQUEST_VECTORS, ids=lambda v: v["nonce"])
def test_request_vector_string_to_sign(vector: dict[str, str]) -> None:
    body = vector["body_utf8"].encode("utf-8")
    got = string_to_sign(
        vector["method"],
        vector["path_with_query"],
        vector["timestamp"],
        vector["nonce"],
        body_sha256(body),
    )
    assert got == vector["string_to_sign"]


@pytest.mark.parametrize("vector", REQUEST_VECTORS, ids=lambda v: v["nonce"])
def test_request_vector_signature(vector: dict[str, str]) -> None:
    body = vector["body_utf8"].encode("utf-8")
    signature = sign_request(
        SECRET,
        vector["method"],
        vector["path_with_query"],
        vector["timestamp"],
        vector["nonce"],
        body,
    )
    assert signature == vector["signature"]
    assert signature_matches(signature, vector["signature"])


@pytest.mark.parametrize("vector", REQUEST_VECTORS, ids=lambda v: v["nonce"])
def test_request_vector_signed_headers(vector: dict[str, str]) -> None:
    """The headers our own CLI and adapter send must carry the reference signature."""
    headers = signed_headers(
        api_key=VECTORS["api_key"],
        secret=SECRET,
        method=vector["method"],
        path_with_query=vector["path_with_query"],
        body=vector["body_utf8"].encode("utf-8"),
        timestamp=int(vector["timestamp"]),
        nonce=vector["nonce"],
    )
    assert headers == {
        "X-Api-Key": VECTORS["api_key"],
        "X-Timestamp": vector["timestamp"],
        "X-Nonce": vector["nonce"],
        "X-Signature": vector["signature"],
    }


@pytest.mark.parametrize("vector", REQUEST_VECTORS, ids=lambda v: v["nonce"])
def test_lower_case_method_signs_the_same(vector: dict[str, str]) -> None:
    body = vector["body_utf8"].encode("utf-8")
    args = (vector["path_with_query"], vector["timestamp"], vector["nonce"], body)
    assert sign_request(SECRET, vector["method"].lower(), *args) == vector["signature"]


def test_empty_body_hash() -> None:
    assert body_sha256(b"") == EMPTY_BODY_SHA256
    assert EMPTY_BODY_SHA256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert body_sha256(b"x") != EMPTY_BODY_SHA256


@pytest.mark.parametrize(
    "change",
    ["secret", "method", "path", "query", "timestamp", "nonce", "body"],
)
def test_every_signed_part_matters(change: str) -> None:
    """Changing any one input must change the signature (nothing is left unsigned)."""
    vector = REQUEST_VECTORS[2]
    parts = {
        "secret": SECRET,
        "method": vector["method"],
        "path": vector["path_with_query"],
        "timestamp": vector["timestamp"],
        "nonce": vector["nonce"],
        "body": vector["body_utf8"].encode(),
    }
    altered = dict(parts)
    if change == "secret":
        altered["secret"] = SECRET + "x"
    elif change == "method":
        altered["method"] = "PUT"
    elif change == "path":
        altered["path"] = "/api/v1/order"
    elif change == "query":
        altered["path"] = vector["path_with_query"] + "?x=1"
    elif change == "timestamp":
        altered["timestamp"] = str(int(vector["timestamp"]) + 1)
    elif change == "nonce":
        altered["nonce"] = vector["nonce"] + "0"
    else:
        altered["body"] = vector["body_utf8"].replace("1", "2").encode()
    original = sign_request(*parts.values())  # type: ignore[arg-type]
    assert original == vector["signature"]
    assert sign_request(*altered.values()) != original  # type: ignore[arg-type]


def test_signature_matches_tolerates_case_and_whitespace_only() -> None:
    good = REQUEST_VECTORS[0]["signature"]
    assert signature_matches(good, good.upper())
    assert signature_matches(good, f"  {good}\n")
    assert not signature_matches(good, good[:-1] + ("0" if good[-1] != "0" else "1"))
    assert not signature_matches(good, good[:-1])
    assert not signature_matches(good, "")
    assert not signature_matches(good, REQUEST_VECTORS[1]["signature"])


# -- webhook vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", WEBHOOK_VECTORS, ids=lambda v: v["t"])
def test_webhook_vector_header(vector: dict[str, str]) -> None:
    body = vector["body_utf8"].encode("utf-8")
    assert webhook_header(vector["secret"], int(vector["t"]), body) == vector["header"]
    expected_v1 = vector["header"].split("v1=", 1)[1]
    assert webhook_signature(vector["secret"], vector["t"], body) == expected_v1
    assert webhook_signature(vector["secret"], int(vector["t"]), body) == expected_v1


@pytest.mark.parametrize("vector", WEBHOOK_VECTORS, ids=lambda v: v["t"])
def test_webhook_vector_verifies(vector: dict[str, str]) -> None:
    body = vector["body_utf8"].encode("utf-8")
    now = int(vector["t"])
    assert verify_webhook([vector["secret"]], vector["header"], body, now=now)


# -- verify_webhook -----------------------------------------------------------------------------

WH = WEBHOOK_VECTORS[0]
WH_SECRET = WH["secret"]
WH_BODY = WH["body_utf8"].encode("utf-8")
WH_T = int(WH["t"])
WH_HEADER = WH["header"]


def test_webhook_valid() -> None:
    assert verify_webhook([WH_SECRET], WH_HEADER, WH_BODY, now=WH_T + 5)
    assert verify_webhook((s for s in [WH_SECRET]), WH_HEADER, WH_BODY, now=WH_T)


def test_webhook_wrong_secret() -> None:
    assert not verify_webhook(["whsec_other"], WH_HEADER, WH_BODY, now=WH_T)
    assert not verify_webhook([], WH_HEADER, WH_BODY, now=WH_T)
    assert not verify_webhook([""], WH_HEADER, WH_BODY, now=WH_T)


@pytest.mark.parametrize(
    "body",
    [
        WH_BODY + b" ",
        WH_BODY.replace(b"evt_1", b"evt_2"),
        WH_BODY.replace(b"delivered", b"refunded"),
        b"",
        WH_BODY[:-1],
    ],
)
def test_webhook_tampered_body(body: bytes) -> None:
    assert not verify_webhook([WH_SECRET], WH_HEADER, body, now=WH_T)


def test_webhook_timestamp_is_signed() -> None:
    """Moving `t` forward to dodge the window must break the signature."""
    v1 = WH_HEADER.split("v1=", 1)[1]
    forged = f"t={WH_T + 1000},v1={v1}"
    assert not verify_webhook([WH_SECRET], forged, WH_BODY, now=WH_T + 1000)


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (0, True),
        (300, True),  # exactly at the edge: still inside
        (-300, True),
        (301, False),  # too old
        (3600, False),
        (-301, False),  # from the future beyond tolerance
        (-86400, False),
    ],
)
def test_webhook_tolerance_both_ways(offset: int, ok: bool) -> None:
    """Old timestamps are replays; future ones would stay valid too long (see docstring)."""
    assert verify_webhook([WH_SECRET], WH_HEADER, WH_BODY, now=WH_T + offset) is ok


def test_webhook_custom_tolerance() -> None:
    assert verify_webhook([WH_SECRET], WH_HEADER, WH_BODY, now=WH_T + 10, tolerance_s=10)
    assert not verify_webhook([WH_SECRET], WH_HEADER, WH_BODY, now=WH_T + 11, tolerance_s=10)
    assert not verify_webhook([WH_SECRET], WH_HEADER, WH_BODY, now=WH_T - 11, tolerance_s=10)


def test_webhook_rotation_several_v1_values() -> None:
    """During rotation the sender signs with old and new secret; either receiver accepts."""
    old, new = "whsec_old", "whsec_new"
    header = (
        f"t={WH_T},v1={webhook_signature(old, WH_T, WH_BODY)},"
        f"v1={webhook_signature(new, WH_T, WH_BODY)}"
    )
    assert verify_webhook([old], header, WH_BODY, now=WH_T)
    assert verify_webhook([new], header, WH_BODY, now=WH_T)
    assert verify_webhook(["whsec_unrelated", new], header, WH_BODY, now=WH_T)
    assert not verify_webhook(["whsec_unrelated"], header, WH_BODY, now=WH_T)
    assert not verify_webhook([old, new], header, WH_BODY + b"x", now=WH_T)


def test_webhook_receiver_with_several_secrets() -> None:
    assert verify_webhook(["whsec_next", WH_SECRET], WH_HEADER, WH_BODY, now=WH_T)


def test_webhook_header_tolerates_spacing_case_and_unknown_parts() -> None:
    v1 = WH_HEADER.split("v1=", 1)[1]
    header = f" t={WH_T} , v0=deadbeef , v1={v1.upper()} , x=1"
    assert verify_webhook([WH_SECRET], header, WH_BODY, now=WH_T)
    reordered = f"v1={v1},t={WH_T}"
    assert verify_webhook([WH_SECRET], reordered, WH_BODY, now=WH_T)


V1 = WH_HEADER.split("v1=", 1)[1]


@pytest.mark.parametrize(
    "header",
    [
        "",
        ",",
        "garbage",
        f"t={WH_T}",  # no signature
        f"v1={V1}",  # no timestamp
        f"t=,v1={V1}",
        f"t=abc,v1={V1}",
        f"t=-{WH_T},v1={V1}",
        f"t={WH_T}.0,v1={V1}",
        f"t=0x10,v1={V1}",
        f"t={WH_T},v1=",
        f"t={WH_T},v0={V1}",
        f"t={WH_T},V1={V1}",
        f"T={WH_T},v1={V1}",
        f"t={WH_T};v1={V1}",
        f"t={WH_T},v1={V1[:-2]}",
        f"{WH_T},{V1}",
        f"t={WH_T},v1=not-hex-at-all",
        f"t={WH_T},v1={V1}" + "0" * 10,
    ],
)
def test_webhook_malformed_headers_refused(header: str) -> None:
    assert verify_webhook([WH_SECRET], header, WH_BODY, now=WH_T) is False


@pytest.mark.parametrize("t", ["²", "¹⁷⁶⁴"])
def test_webhook_unicode_digit_timestamp_refused_not_crashing(t: str) -> None:
    """A hostile header must yield False, never an exception (a 500 in the receiver)."""
    assert verify_webhook([WH_SECRET], f"t={t},v1={V1}", WH_BODY, now=WH_T) is False


def test_webhook_header_round_trip_for_fresh_secret() -> None:
    body = b'{"event_id":"evt_9","type":"order.refunded"}'
    header = webhook_header("whsec_fresh", 1_800_000_000, body)
    assert header.startswith("t=1800000000,v1=")
    assert verify_webhook(["whsec_fresh"], header, body, now=1_800_000_000)
    assert not verify_webhook(["whsec_fresh"], header, body, now=1_800_000_301)
