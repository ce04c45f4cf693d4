"""The staff JSON API over real HTTP (one SQLite server for the module): bearer tokens and roles,
rule sets (save, activate as shadow, stop), lists, the review flow and the queue's figures.
Orders to review are placed through the order service on the same container, under a clock the
tests move (the server reads the same clock)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kameng.container import Container
from kameng.errors import MESSAGES, ErrorCode
from kameng.review import service as review
from kameng.risk.defaults import DEFAULT_RULES
from kameng.staff import service as staff
from tests.api.helpers import error_of
from tests.integration.test_risk_review import PROXY_IP, Shop, flagged
from tests.support import factories

STAFF = {
    "ada": "admin",
    "rita": "reviewer",
    "ron": "reviewer",
    "sam": "support",
    "fay": "finance",
}


@pytest.fixture(scope="module")
def shop(lite_db: Container) -> Shop:
    return Shop(lite_db)


@pytest.fixture(scope="module")
def tokens(shop: Shop) -> dict[str, str]:
    with shop.c.db.connect() as conn:
        made = {
            name: staff.create(conn, name=name, role=role, actor="staff:setup", now=shop.clock())
            for name, role in STAFF.items()
        }
        staff.create(conn, name="gone", role="admin", actor="staff:setup", now=shop.clock())
    return made


@pytest.fixture(scope="module")
def http(lite_url: str, shop: Shop) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lite_url, timeout=15) as client:
        yield client


class Api:
    def __init__(self, http: httpx.Client, tokens: dict[str, str]) -> None:
        self.http = http
        self.tokens = tokens

    def __call__(
        self,
        who: str | None,
        method: str,
        path: str,
        body: Any = None,
        *,
        language: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> httpx.Response:
        headers = {}
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens.get(who, who)}"
        if language:
            headers["Accept-Language"] = language
        return self.http.request(
            method, f"/api/staff{path}", json=body, headers=headers, params=params
        )

    def ok(
        self,
        who: str,
        method: str,
        path: str,
        body: Any = None,
        status: int = 200,
        *,
        params: dict[str, Any] | None = None,
    ) -> Any:
        resp = self(who, method, path, body, params=params)
        assert resp.status_code == status, resp.text
        return resp.json()


@pytest.fixture
def api(http: httpx.Client, tokens: dict[str, str]) -> Api:
    return Api(http, tokens)


def _rule_sets(api: Api) -> list[dict[str, Any]]:
    sets: list[dict[str, Any]] = api.ok("ada", "GET", "/risk/rule-sets")["rule_sets"]
    return sets


# -- authentication and roles -----------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer kst_",
        "bearer kst_wrong kst_wrong",
        "Basic a2FtZW5nOmthbWVuZw==",
        "Bearer kst_not-a-real-token",
        "Bearer not-even-the-prefix",
        "Bearer kst_" + "x" * 200,
    ],
)
def test_a_missing_or_invalid_token_is_refused_in_both_languages(
    http: httpx.Client, tokens: dict[str, str], header: str | None
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    zh, en = MESSAGES[ErrorCode.staff_auth_required]
    for language, expected in ((None, zh), ("zh-CN,zh;q=0.9", zh), ("en-US,en;q=0.8", en)):
        sent = dict(headers, **({"Accept-Language": language} if language else {}))
        resp = http.get("/api/staff/review/items", headers=sent)
        error = error_of(resp, 401, "staff_auth_required")
        assert error["message"] == expected
    # Writes are refused before their body is even looked at.
    resp = http.post("/api/staff/risk/rule-sets", headers=headers, json={"rules": "nonsense"})
    error_of(resp, 401, "staff_auth_required")


def test_a_disabled_token_stops_working(api: Api, shop: Shop, tokens: dict[str, str]) -> None:
    with shop.c.db.connect() as conn:
        token = staff.rotate(conn, name="gone", actor="staff:setup", now=shop.clock()).token
    assert api(token, "GET", "/review/figures").status_code == 200
    with shop.c.db.connect() as conn:
        staff.disable(conn, name="gone", actor="staff:setup", now=shop.clock())
    error_of(api(token, "GET", "/review/figures"), 401, "staff_auth_required")


def test_each_role_reaches_only_its_own_routes(api: Api) -> None:
    before = len(_rule_sets(api))
    rules = copy.deepcopy(DEFAULT_RULES)
    for who in ("rita", "sam", "fay"):
        refused = error_of(
            api(who, "POST", "/risk/rule-sets", {"rules": rules}), 403, "staff_forbidden"
        )
        assert STAFF[who] in refused["message"]
        error_of(
            api(who, "POST", "/risk/rule-sets/1/activate", {"mode": "live"}), 403, "staff_forbidden"
        )
        error_of(api(who, "POST", "/risk/shadow/stop"), 403, "staff_forbidden")
        body = {"list": "block", "kind": "ip", "value": "203.0.113.1"}
        error_of(api(who, "POST", "/risk/lists", body), 403, "staff_forbidden")
    en = api("rita", "POST", "/risk/rule-sets", {"rules": rules}, language="en")
    assert error_of(en, 403, "staff_forbidden")["message"] == "Your role (reviewer) may not do this"
    assert len(_rule_sets(api)) == before  # nothing was saved
    assert "203.0.113.1" not in {e["value"] for e in api.ok("ada", "GET", "/risk/lists")["entries"]}

    # Reviewers read rules and work the queue; support sees screenings only; finance neither.
    assert api("rita", "GET", "/risk/rule-sets").status_code == 200
    assert api("rita", "GET", "/review/items").status_code == 200
    error_of(api("sam", "GET", "/review/items"), 403, "staff_forbidden")
    error_of(api("fay", "GET", "/review/figures"), 403, "staff_forbidden")
    error_of(api("fay", "GET", "/risk/rule-sets"), 403, "staff_forbidden")
    # Support may look at an order's screenings (here: an unknown order).
    error_of(api("sam", "GET", "/orders/K0000000000/screenings"), 404, "order_not_found")
    error_of(api("fay", "GET", "/orders/K0000000000/screenings"), 403, "staff_forbidden")


# -- rule sets ----------------------------------------------------------------------------------


def test_an_invalid_rule_set_is_refused_naming_the_rule_and_nothing_is_saved(api: Api) -> None:
    before = _rule_sets(api)
    good = copy.deepcopy(DEFAULT_RULES[:3])
    bad_attr = {
        "code": "season_long",
        "action": "review",
        "when": {"attr": "ip_orders_91d", "op": ">=", "value": 3},
        "explain": {"zh-CN": "季度", "en": "A season"},
    }
    resp = api("ada", "POST", "/risk/rule-sets", {"rules": [*good, bad_attr]}, language="en")
    message = error_of(resp, 400, "invalid_request")["message"]
    assert "season_long" in message and "unknown attribute ip_orders_91d" in message

    no_explain = {k: v for k, v in bad_attr.items() if k != "explain"}
    no_explain["when"] = {"attr": "amount_cents", "op": ">=", "value": 1}
    resp = api("ada", "POST", "/risk/rule-sets", {"rules": [no_explain]})
    message = error_of(resp, 400, "invalid_request")["message"]
    assert "season_long" in message and "explain" in message
    assert message.startswith("请求无效")  # zh-CN unless asked otherwise

    bad_op = {**bad_attr, "code": "odd_op", "when": {"attr": "amount_cents", "op": "~", "value": 1}}
    error_of(api("ada", "POST", "/risk/rule-sets", {"rules": [bad_op]}), 400, "invalid_request")
    error_of(
        api("ada", "POST", "/risk/rule-sets", {"rules": "all of them"}), 400, "invalid_request"
    )
    assert _rule_sets(api) == before


def test_an_admin_saves_a_rule_set_and_runs_it_in_shadow(api: Api, shop: Shop) -> None:
    stricter = copy.deepcopy(DEFAULT_RULES)
    for rule in stricter:
        if rule["code"] == "velocity_ip":
            rule["when"]["all"][1]["value"] = 2
    saved = api.ok("ada", "POST", "/risk/rule-sets", {"rules": stricter, "note": "try 2"}, 201)
    version = saved["version"]
    assert (saved["status"], saved["created_by"], saved["note"]) == ("draft", "staff:ada", "try 2")
    assert saved["activated_at"] is None

    active = api.ok("ada", "POST", f"/risk/rule-sets/{version}/activate", {"mode": "shadow"})
    assert (active["status"], active["activated_by"]) == ("shadow", "staff:ada")
    listed = {s["version"]: s for s in _rule_sets(api)}
    assert listed[1]["status"] == "live"
    assert listed[version]["status"] == "shadow"
    assert listed[version]["rules"] == len(stricter)  # the list gives counts, not rules
    shown = api.ok("rita", "GET", f"/risk/rule-sets/{version}")
    assert shown["rules"] == stricter

    # The very next order is screened by both (the API refreshed the engine).
    sku = factories.add_product(shop.c, price_cents=1_000, stock=2)
    buyer = shop.member()
    placed = [shop.place(buyer, sku, ip="203.0.113.150") for _ in range(2)]
    assert {p.status.value for p in placed} == {"delivered"}
    order_no = placed[1].order_no
    screened = api.ok("sam", "GET", f"/orders/{order_no}/screenings")
    assert screened["order_no"] == order_no
    rows = screened["screenings"]
    assert [(r["mode"], r["rule_set_version"], r["action"]) for r in rows] == [
        ("live", 1, "allow"),
        ("shadow", version, "review"),
    ]
    report = api.ok("rita", "GET", "/risk/shadow/report", params=None)
    assert report["version"] == version and report["matrix"] == {
        "allow->allow": 1,
        "allow->review": 1,
    }

    error_of(
        api("ada", "POST", f"/risk/rule-sets/{version}/activate", {"mode": "draft"}),
        400,
        "invalid_request",
    )
    error_of(
        api("ada", "POST", "/risk/rule-sets/9999/activate", {"mode": "shadow"}),
        404,
        "rule_set_not_found",
    )
    assert api.ok("ada", "POST", "/risk/shadow/stop") == {"stopped": 1}
    assert api.ok("ada", "POST", "/risk/shadow/stop") == {"stopped": 0}
    later = shop.place(buyer, sku, ip="203.0.113.151")
    assert [
        r["mode"]
        for r in api.ok("sam", "GET", f"/orders/{later.order_no}/screenings")["screenings"]
    ] == ["live"]


# -- lists ----------------------------------------------------------------------------------------


def test_list_entries_are_checked_added_and_removed(api: Api, shop: Shop) -> None:
    added = api.ok(
        "ada", "POST", "/risk/lists", {"list": "proxy", "kind": "ip", "value": "192.0.2.77/24"}, 201
    )
    assert added == {"list": "proxy", "kind": "ip", "value": "192.0.2.0/24"}
    for body, fragment in (
        ({"list": "block", "kind": "ip", "value": "203.0.113.300"}, "not an IP address"),
        ({"list": "proxy", "kind": "ip", "value": "198.51.100.0/33"}, "not an IP address"),
        ({"list": "proxy", "kind": "email", "value": "a@b.cn"}, "IP addresses"),
        ({"list": "allow", "kind": "phone", "value": "13800138000"}, "list entries are one of"),
    ):
        resp = api("ada", "POST", "/risk/lists", body, language="en")
        assert fragment in error_of(resp, 400, "invalid_request")["message"], body
    error_of(
        api("ada", "POST", "/risk/lists", {"list": "grey", "kind": "ip", "value": "192.0.2.1"}),
        400,
        "invalid_request",
    )
    entries = api.ok("rita", "GET", "/risk/lists", params=None)["entries"]
    assert [(e["list"], e["kind"], e["value"]) for e in entries] == [
        ("proxy", "ip", "192.0.2.0/24")
    ]
    assert entries[0]["created_by"] == "staff:ada"

    # A block entry added over the API applies to the very next order.
    blocked = {"list": "block", "kind": "ip", "value": "203.0.113.160"}
    api.ok("ada", "POST", "/risk/lists", blocked, 201)
    sku = factories.add_product(shop.c, price_cents=1_000, stock=2)
    buyer = shop.member()
    assert shop.place(buyer, sku, ip="203.0.113.160").status.value == "rejected"
    assert api.ok("ada", "POST", "/risk/lists/remove", blocked) == {"removed": True}
    assert api.ok("ada", "POST", "/risk/lists/remove", blocked) == {"removed": False}
    assert shop.place(buyer, sku, ip="203.0.113.160").status.value == "delivered"
    remove = {"list": "proxy", "kind": "ip", "value": "192.0.2.0/24"}
    assert api.ok("ada", "POST", "/risk/lists/remove", remove) == {"removed": True}
    assert api.ok("ada", "GET", "/risk/lists")["entries"] == []


def test_removing_a_malformed_ip_is_refused(api: Api) -> None:
    resp = api(
        "ada", "POST", "/risk/lists/remove", {"list": "block", "kind": "ip", "value": "1.2.3"}
    )
    error_of(resp, 400, "invalid_request")


# -- the review queue -----------------------------------------------------------------------------


def test_a_reviewer_claims_and_approves_over_http(api: Api, shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=2)
    placed = flagged(shop, shop.member(), sku)
    open_items = api.ok("rita", "GET", "/review/items")["items"]
    item = next(i for i in open_items if i["order_id"] == placed.order_id)
    item_id = item["id"]
    assert (item["status"], item["category"], item["rule"], item["claimed_by"]) == (
        "open",
        "network",
        "proxy_amount",
        "",
    )

    shown = api.ok("ron", "GET", f"/review/items/{item_id}")
    assert shown["order"]["order_no"] == placed.order_no
    assert (shown["order"]["status"], shown["order"]["reason"]) == (
        "review",
        "risk_review_network",
    )
    assert shown["decisions"] == []
    assert shown["screenings"][0]["mode"] == "live"
    assert shown["screenings"][0]["attrs"]["ip_proxy"] is True
    assert shown["buyer_history"]["recent"][0]["ip"] == PROXY_IP
    # Every matching rule is on the record for the reviewer, the deciding one first.
    assert [r["code"] for r in shown["item"]["reasons"]] == [
        "proxy_amount",
        "proxy_young_member",
        "note_proxy",
    ]

    error_of(api("rita", "POST", f"/review/items/{item_id}/approve", {}), 409, "review_not_claimed")
    claimed = api.ok("rita", "POST", f"/review/items/{item_id}/claim")
    assert (claimed["status"], claimed["claimed_by"]) == ("claimed", "staff:rita")
    assert claimed["claim_expires_at"] is not None
    other = api("ron", "POST", f"/review/items/{item_id}/claim", language="en")
    assert "staff:rita" in error_of(other, 409, "review_claimed_by_other")["message"]
    error_of(
        api("ron", "POST", f"/review/items/{item_id}/approve", {"note": "mine"}),
        409,
        "review_claimed_by_other",
    )

    done = api.ok("rita", "POST", f"/review/items/{item_id}/approve", {"note": "regular buyer"})
    assert done == {"item": item_id, "status": "approved", "order": "delivered"}
    after = api.ok("ron", "GET", f"/review/items/{item_id}")
    assert after["order"]["status"] == "delivered"
    assert [(d["actor"], d["action"]) for d in after["decisions"]] == [
        ("staff:rita", "claim"),
        ("staff:rita", "approve"),
    ]
    assert after["item"]["note"] == "regular buyer"
    error_of(
        api("rita", "POST", f"/review/items/{item_id}/approve", {}), 409, "review_already_decided"
    )
    approved = api.ok("rita", "GET", "/review/items", params=None)
    assert item_id not in {i["id"] for i in approved["items"]}
    assert item_id in {
        i["id"]
        for i in api("rita", "GET", "/review/items", params={"status": "approved"}).json()["items"]
    }
    error_of(api("rita", "GET", "/review/items/999999"), 404, "review_item_not_found")
    factories.assert_books_clean(shop.c)


def test_a_rejection_over_http_needs_a_note_and_a_release_reopens(api: Api, shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=1)
    buyer = shop.member(balance=10_000)
    placed = flagged(shop, buyer, sku)
    item_id = next(
        i["id"]
        for i in api.ok("rita", "GET", "/review/items")["items"]
        if i["order_id"] == placed.order_id
    )
    api.ok("ron", "POST", f"/review/items/{item_id}/claim")
    released = api.ok("ron", "POST", f"/review/items/{item_id}/release")
    assert (released["status"], released["claimed_by"]) == ("open", "")
    error_of(api("rita", "POST", f"/review/items/{item_id}/release"), 409, "review_not_claimed")
    api.ok("rita", "POST", f"/review/items/{item_id}/claim")
    error_of(api("rita", "POST", f"/review/items/{item_id}/reject", {}), 400, "invalid_request")
    done = api.ok("rita", "POST", f"/review/items/{item_id}/reject", {"note": "chargeback risk"})
    assert done == {"item": item_id, "status": "rejected", "order": "rejected"}
    assert shop.balance(buyer) == (10_000, 0)
    assert shop.stock(sku) == {"available": 1}
    factories.assert_books_clean(shop.c)


def test_the_queue_figures(api: Api, shop: Shop) -> None:
    sku = factories.add_product(shop.c, price_cents=10_000, stock=2)
    decided, waiting = (flagged(shop, shop.member(), sku) for _ in range(2))
    decided_id = shop.item(decided.order_id).id
    api.ok("ron", "POST", f"/review/items/{decided_id}/claim")
    api.ok("ron", "POST", f"/review/items/{decided_id}/reject", {"note": "mule account"})
    shop.clock.advance(120)

    figures = api.ok("rita", "GET", "/review/figures")
    assert set(figures) >= {"depth", "oldest_age_s", "decisions_last_hour", "sla_breaches_total"}
    assert all(isinstance(v, int) for v in figures.values())
    open_items = api.ok("rita", "GET", "/review/items", params={"status": "open"})["items"]
    assert waiting.order_id in {i["order_id"] for i in open_items}
    assert decided.order_id not in {i["order_id"] for i in open_items}
    assert figures["depth"] == len(open_items) >= 1
    assert figures["oldest_age_s"] == max(i["age_s"] for i in open_items) >= 120
    assert figures["decisions_last_hour"] >= 1
    assert figures["sla_breaches_total"] == 0
    with shop.c.db.connect(write=False) as conn:
        assert figures == review.queue_figures(conn, now=shop.clock())
    # An hour on, the decision no longer counts as recent.
    shop.clock.advance(3600)
    assert api.ok("rita", "GET", "/review/figures")["decisions_last_hour"] == 0


def test_qualification_documents_are_decided_through_the_api(api: Api, shop: Shop) -> None:
    from kameng.documents import service as documents

    buyer = shop.member()
    assert buyer.member_id is not None
    png = b"\x89PNG\r\n\x1a\n" + b"\x01" * 32
    with shop.c.db.connect() as conn:
        first = documents.upload(
            conn,
            member_id=buyer.member_id,
            kind="business_license",
            filename="licence.png",
            content_type="application/octet-stream",
            content=png,
            now=shop.clock(),
        )
        second = documents.upload(
            conn,
            member_id=buyer.member_id,
            kind="id_card",
            filename="id.png",
            content_type="image/png",
            content=png + b"2",
            now=shop.clock(),
        )
    pending = api.ok("rita", "GET", "/documents")["documents"]
    assert {first, second} <= {d["id"] for d in pending}
    assert api("fay", "GET", "/documents").status_code == 403  # finance: not theirs
    file = api("sam", "GET", f"/documents/{first}/file")
    assert file.status_code == 200 and file.content == png
    assert file.headers["content-type"] == "image/png"  # sniffed, not as declared
    assert file.headers["cache-control"] == "no-store"
    assert api("sam", "POST", f"/documents/{first}/approve", {}).status_code == 403

    blank = api("rita", "POST", f"/documents/{second}/reject", {"reason": ""})
    assert blank.status_code == 400  # a request that fails validation, as everywhere
    rejected = api.ok("rita", "POST", f"/documents/{second}/reject", {"reason": "blurred"})
    assert (rejected["status"], rejected["reason"]) == ("rejected", "blurred")
    approved = api.ok(
        "ron", "POST", f"/documents/{first}/approve", {"expires_at": "2099-01-01T00:00:00Z"}
    )
    assert (approved["status"], approved["valid"], approved["reviewed_by"]) == (
        "approved",
        True,
        "staff:ron",
    )
    again = api("rita", "POST", f"/documents/{first}/reject", {"reason": "late"})
    error_of(again, 409, "document_already_decided")
    assert api("rita", "GET", "/documents/999999/file").status_code == 404
    with shop.c.db.connect(write=False) as conn:
        assert documents.has_valid(
            conn, member_id=buyer.member_id, kind="business_license", now=shop.clock()
        )
