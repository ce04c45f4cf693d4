"""`kameng staff|risk|review …` in process (typer's CliRunner) on a real migrated database.

Each command is checked by what it prints, what it refuses (the stable ErrorCode) and above all
by what it wrote, or for a refusal did not write. Orders reach review as in test_risk_review.py:
100 or more from an IP on the proxy list (documentation addresses) is held by the bundled rule
`proxy_amount`. The CLI runs on the real clock; nothing here waits or times anything.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.integration._helpers import cli_env
from tests.support import factories
from typer.testing import CliRunner, Result

from kameng.container import Container
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.orders import screening
from kameng.orders import service as orders
from kameng.risk.defaults import DEFAULT_RULES
from kameng.staff import service as staff

PROXY_IP = "198.51.100.7"
TOKEN = re.compile(r"kst_[A-Za-z0-9_-]{43}")
ME = "staff:integration-test"  # KAMENG_ACTOR as cli_env sets it: the default --actor
# `review approve|reject` once read `container.accounts` (its own write transaction on first
# use) inside the decision's transaction, which SQLite's one writer refused: both backends.
BOTH = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]


class Cli:
    """`kameng …` in this process, against the test's database."""

    def __init__(self, container: Container) -> None:
        from kameng.cli import app  # the entry point's tree: its groups, as `kameng` sees them

        groups = {group.name: group.typer_instance for group in app.registered_groups}
        self.c, self.runner, self.groups = container, CliRunner(), groups

    def __call__(self, group: str, *args: str) -> Result:
        # The group alone (`kameng` has no callback of its own): typer builds the click tree
        # of what it invokes on every call, and the whole tree costs ~50 ms a time.
        return self.runner.invoke(self.groups[group], list(args))

    def ok(self, *args: str) -> str:
        result = self(*args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # with its own traceback
        assert result.exit_code == 0, result.output
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args))

    def table(self, *args: str) -> list[list[str]]:
        """The body rows of the rich table a command prints, cell by cell."""
        lines = self.ok(*args).splitlines()
        return [[cell.strip() for cell in ln[1:-1].split("│")] for ln in lines if ln[:1] == "│"]

    def refused(self, code: ErrorCode, *args: str) -> KamengError:
        result = self(*args)
        if not isinstance(result.exception, KamengError | SystemExit | None):
            raise result.exception  # not a refusal: a crash, with its own traceback
        assert isinstance(result.exception, KamengError), result.output
        assert result.exception.code is code, result.exception.params
        assert result.stdout == ""  # `main` turns it into exit 2 with the code on stderr
        return result.exception

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.c.db.connect(write=False) as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def rule_sets(self) -> list[tuple[int, str]]:
        return self.rows("SELECT version, status FROM risk_rule_sets ORDER BY version")

    def audit(self, target_type: str) -> list[tuple[str, str, str]]:
        sql = "SELECT actor, action, target_id FROM audit_log WHERE target_type = :t ORDER BY id"
        return self.rows(sql, t=target_type)


@pytest.fixture
def db_container(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    """SQLite, unless a test asks for PostgreSQL (indirect parametrization)."""
    with backend_container(getattr(request, "param", "sqlite"), tmp_path) as container:
        yield container


@pytest.fixture
def cli(db_container: Container, monkeypatch: pytest.MonkeyPatch) -> Cli:
    for key, value in cli_env(db_container).items():
        if key.startswith("KAMENG_"):
            monkeypatch.setenv(key, value)
    # One line per table row, as on a wide terminal. The console's width is fixed when it is
    # made if COLUMNS is set then (pytest-xdist workers set it to 80), so set the width itself.
    from kameng.cli.base import console

    monkeypatch.setattr(console, "_width", 200)
    return Cli(db_container)


def authenticate(c: Container, token: str) -> tuple[str, str]:
    with c.db.connect(write=False) as conn:
        found = staff.authenticate(conn, token=token)
    return found.name, found.role.value


def rv(verb: str, item: int | str, actor: str, *more: str) -> tuple[str, ...]:
    """`kameng review VERB ITEM --actor ACTOR …`"""
    return ("review", verb, str(item), "--actor", actor, *more)


def rules_file(tmp_path: Path, rules: Any) -> str:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules, ensure_ascii=False), encoding="utf-8")
    return str(path)


# -- staff ----------------------------------------------------------------------------------------


def test_staff_add_prints_a_working_token_once_and_refuses_bad_input(cli: Cli) -> None:
    out = cli.ok("staff", "add", "alice", "--role", "admin", "--actor", "boss")
    [token] = TOKEN.findall(out)
    assert out == f"staff alice (admin) token: {token}\n"
    assert authenticate(cli.c, token) == ("alice", "admin")
    [bob] = TOKEN.findall(cli.ok("staff", "add", "bob"))  # reviewer unless told otherwise
    assert authenticate(cli.c, bob) == ("bob", "reviewer") and bob != token

    everything = "SELECT name, role, disabled, token_hash, created_at FROM staff ORDER BY name"
    before = cli.rows(everything)
    assert [r[:3] for r in before] == [("alice", "admin", False), ("bob", "reviewer", False)]
    cli.refused(ErrorCode.already_exists, "staff", "add", "alice", "--role", "support")
    for args in (("carol", "--role", "superuser"), ("Carol",), ("c",), ("carol one",)):
        cli.refused(ErrorCode.invalid_request, "staff", "add", *args)
    assert cli.rows(everything) == before
    created = [("staff:boss", "staff_created", "alice"), (ME, "staff_created", "bob")]
    assert cli.audit("staff") == created


def test_staff_rotate_disable_and_list(cli: Cli) -> None:
    [old] = TOKEN.findall(cli.ok("staff", "add", "alice", "--role", "finance"))
    [bob] = TOKEN.findall(cli.ok("staff", "add", "bob"))

    out = cli.ok("staff", "rotate", "alice", "--actor", "boss")
    [new] = TOKEN.findall(out)
    assert out == f"new token for alice: {new}\n" and new != old
    assert authenticate(cli.c, new) == ("alice", "finance")  # the role is kept
    assert cli.ok("staff", "disable", "bob") == "disabled bob\n"
    for gone in (old, bob):  # the replaced token and the disabled member's stop working
        with pytest.raises(KamengError) as caught:
            authenticate(cli.c, gone)
        assert caught.value.code is ErrorCode.staff_auth_required
    cli.refused(ErrorCode.not_found, "staff", "rotate", "nobody")
    cli.refused(ErrorCode.not_found, "staff", "disable", "nobody")
    disabled = cli.rows("SELECT name, disabled FROM staff ORDER BY name")
    assert disabled == [("alice", False), ("bob", True)]
    listed = cli.table("staff", "list")
    assert [r[:3] for r in listed] == [["alice", "finance", "False"], ["bob", "reviewer", "True"]]
    changed = [("staff:boss", "staff_token_rotated", "alice"), (ME, "staff_disabled", "bob")]
    assert cli.audit("staff")[2:] == changed

    # Rotating a disabled member's token is how access comes back, and it says so.
    back = cli.ok("staff", "rotate", "bob")
    [fresh] = TOKEN.findall(back)
    assert back.endswith("bob was disabled and is enabled again with this token\n")
    assert authenticate(cli.c, fresh) == ("bob", "reviewer")
    assert cli.rows("SELECT disabled FROM staff WHERE name = 'bob'") == [(False,)]
    details = cli.rows(
        "SELECT details FROM audit_log WHERE action = 'staff_token_rotated' ORDER BY id"
    )
    assert [json.loads(d) if isinstance(d, str) else d for (d,) in details] == [
        {"re_enabled": False},
        {"re_enabled": True},
    ]


# -- risk rules -----------------------------------------------------------------------------------


def test_bundled_rules_print_as_json_and_save_back_as_a_new_draft(cli: Cli, tmp_path: Path) -> None:
    printed = cli.ok("risk", "bundled")
    assert json.loads(printed) == DEFAULT_RULES
    (bundled := tmp_path / "bundled.json").write_text(printed, encoding="utf-8")
    saved = cli.ok("risk", "save", str(bundled), "--note", "adopt", "--actor", "a")
    assert saved == "saved version 2\n"
    assert cli.rule_sets() == [(1, "live"), (2, "draft")]  # saved, not active
    sql = "SELECT rules, note, created_by, activated_at FROM risk_rule_sets WHERE version = 2"
    [(rules, note, by, activated)] = cli.rows(sql)
    assert (json.loads(rules), note, by, activated) == (DEFAULT_RULES, "adopt", "staff:a", None)
    assert cli.json("risk", "show", "2") == DEFAULT_RULES == cli.json("risk", "show", "1")
    assert cli.refused(ErrorCode.rule_set_not_found, "risk", "show", "3").params == {"version": 3}

    listed = cli.table("risk", "rules")
    n = str(len(DEFAULT_RULES))
    assert [r[:4] + r[5:] for r in listed] == [
        ["2", "draft", n, "staff:a", "", "adopt"],
        ["1", "live", n, "system", listed[1][5], "bundled default rules"],
    ]
    assert listed[1][5] != ""  # the bundled set was activated at bootstrap
    assert cli.audit("risk_rule_set")[-1] == ("staff:a", "risk_rules_saved", "2")


def _rule(**changes: Any) -> list[dict[str, Any]]:
    rule = copy.deepcopy(DEFAULT_RULES[-1])
    rule.update(changes)
    return [rule]


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        (_rule(when={"attr": "ip_colour", "op": "==", "value": "red"}), "unknown attribute"),
        (_rule(when={"attr": "ip_orderz_1h", "op": ">=", "value": 3}), "unknown attribute"),
        (_rule(explain={"zh-CN": "只有中文"}), "explain needs zh-CN and en"),
        ([{k: v for k, v in DEFAULT_RULES[0].items() if k != "explain"}], "explain needs"),
        (_rule(action="maybe"), "action must be"),
        ([], "at least one rule"),
        (DEFAULT_RULES + DEFAULT_RULES[:1], "duplicate code allow_listed"),
        ({"rules": DEFAULT_RULES}, "a rule set is a list"),
        ("[{not json", "Expecting property name"),
        (None, "No such file"),
    ],
    ids=[
        "attr",
        "counter",
        "no-en",
        "no-explain",
        "action",
        "empty",
        "dup",
        "object",
        "json",
        "gone",
    ],
)
def test_a_bad_rule_set_saves_nothing(cli: Cli, tmp_path: Path, content: Any, detail: str) -> None:
    path = tmp_path / "rules.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        rules_file(tmp_path, content)
    bad = cli.refused(ErrorCode.invalid_request, "risk", "save", str(path), "--activate", "live")
    assert detail in bad.params["detail"]
    assert cli.rule_sets() == [(1, "live")]
    # The bootstrap's own two audit rows, nothing more.
    assert [a for _, a, _ in cli.audit("risk_rule_set")] == ["risk_rules_saved", "risk_rules_live"]


def test_activate_live_and_shadow_and_stop_the_shadow(cli: Cli, tmp_path: Path) -> None:
    path = rules_file(tmp_path, DEFAULT_RULES[:5])
    # A mode that is neither live nor shadow is refused, and the save it came with undone.
    cli.refused(ErrorCode.invalid_request, "risk", "save", path, "--activate", "draft")
    assert cli.rule_sets() == [(1, "live")]

    assert cli.ok("risk", "save", path, "--activate", "shadow") == "saved version 2 as shadow\n"
    assert cli.rule_sets() == [(1, "live"), (2, "shadow")]
    assert cli.ok("risk", "save", path) == "saved version 3\n"
    out = cli.ok("risk", "activate", "3", "--mode", "shadow", "--actor", "amy")
    assert out.startswith("version 3 is now shadow")
    assert cli.rule_sets() == [(1, "live"), (2, "retired"), (3, "shadow")]  # one shadow at most
    sql = "SELECT activated_by FROM risk_rule_sets WHERE version = 3"
    assert cli.rows(sql) == [("staff:amy",)]

    # The live set cannot leave by becoming the shadow; unknown versions and modes are refused.
    cli.refused(ErrorCode.invalid_request, "risk", "activate", "1", "--mode", "shadow")
    cli.refused(ErrorCode.invalid_request, "risk", "activate", "2", "--mode", "retired")
    cli.refused(ErrorCode.rule_set_not_found, "risk", "activate", "9")
    assert cli.rule_sets() == [(1, "live"), (2, "retired"), (3, "shadow")]

    assert cli.ok("risk", "shadow-stop", "--actor", "amy") == "shadow stopped\n"
    assert cli.rule_sets() == [(1, "live"), (2, "retired"), (3, "retired")]
    assert cli.ok("risk", "shadow-stop") == "no shadow rule set was running\n"

    assert cli.ok("risk", "activate", "2").startswith("version 2 is now live")  # the default
    assert cli.rule_sets() == [(1, "retired"), (2, "live"), (3, "retired")]
    assert cli.audit("risk_rule_set")[2:] == [
        (ME, "risk_rules_saved", "2"), (ME, "risk_rules_shadow", "2"),
        (ME, "risk_rules_saved", "3"), ("staff:amy", "risk_rules_shadow", "3"),
        ("staff:amy", "risk_rules_shadow_stopped", "shadow"), (ME, "risk_rules_live", "2"),
    ]  # fmt: skip


# -- lists ----------------------------------------------------------------------------------------


def test_list_add_and_remove_store_canonical_values_and_refuse_bad_entries(cli: Cli) -> None:
    entries = "SELECT list, kind, value, note, created_by FROM risk_lists ORDER BY id"
    for args, printed in [
        (("proxy", "ip", " 198.51.100.9/24 ", "--note", "vpn"), "proxy ip 198.51.100.0/24"),
        (("proxy", "ip", "2001:DB8::1"), "proxy ip 2001:db8::1"),
        (("block", "email", "Bad@Example.COM", "--actor", "amy"), "block email bad@example.com"),
        (("allow", "buyer", "r12"), "allow buyer r12"),
        (("block", "email", "bad@example.com"), "block email bad@example.com"),  # no copy
    ]:
        assert cli.ok("risk", "list-add", *args) == printed + "\n"
    expected = [
        ("proxy", "ip", "198.51.100.0/24", "vpn", ME),
        ("proxy", "ip", "2001:db8::1", "", ME),
        ("block", "email", "bad@example.com", "", "staff:amy"),
        ("allow", "buyer", "r12", "", ME),
    ]
    assert cli.rows(entries) == expected

    # No such list or kind; the proxy list holds IPs and networks only, the others no networks.
    for args in [
        ("grey", "ip", "203.0.113.1"), ("block", "phone", "13800000000"),
        ("proxy", "email", "x@example.com"), ("proxy", "ip", "198.51.100.0/33"),
        ("proxy", "ip", "not-an-ip"), ("block", "ip", "203.0.113.0/24"),
        ("block", "ip", "300.1.1.1"), ("block", "account", " "), ("block", "account", "x" * 201),
    ]:  # fmt: skip
        cli.refused(ErrorCode.invalid_request, "risk", "list-add", *args)
    cli.refused(ErrorCode.invalid_request, "risk", "list-remove", "grey", "ip", "203.0.113.1")
    cli.refused(ErrorCode.invalid_request, "risk", "list-remove", "proxy", "ip", "nope")
    assert cli.rows(entries) == expected

    assert [tuple(r[:5]) for r in cli.table("risk", "lists")] == sorted(
        expected
    )  # by list, kind, value
    proxies = cli.table("risk", "lists", "--list", "proxy")
    assert [r[2] for r in proxies] == ["198.51.100.0/24", "2001:db8::1"]
    cli.refused(ErrorCode.invalid_request, "risk", "lists", "--list", "grey")

    # Removal matches the canonical value, however it is typed.
    assert cli.ok("risk", "list-remove", "block", "email", "BAD@example.com") == "removed\n"
    assert cli.ok("risk", "list-remove", "proxy", "ip", "198.51.100.200/24") == "removed\n"
    gone = cli.ok("risk", "list-remove", "block", "email", "bad@example.com")
    assert gone == "not on that list\n"
    assert cli.rows(entries) == [expected[1], expected[3]]
    assert [(act, t) for _, act, t in cli.audit("risk_list")] == [
        ("risk_list_added", "proxy:ip"), ("risk_list_added", "proxy:ip"),
        ("risk_list_added", "block:email"), ("risk_list_added", "allow:buyer"),
        ("risk_list_removed", "block:email"), ("risk_list_removed", "proxy:ip"),
    ]  # fmt: skip


def test_list_values_and_rule_notes_are_printed_as_typed(cli: Cli, tmp_path: Path) -> None:
    assert cli.ok("risk", "list-add", "block", "account", "[abc]") == "block account [abc]\n"
    cli.ok("risk", "save", rules_file(tmp_path, DEFAULT_RULES), "--note", "[/] undo")
    assert cli.table("risk", "lists")[0][2] == "[abc]"
    assert cli.table("risk", "rules")[0][6] == "[/] undo"


# -- orders in review -----------------------------------------------------------------------------


@dataclass
class Held:
    """Two member orders of 100.00 through a listed proxy (in review) and a clean one."""

    wallet: int
    flagged: list[orders.Placed]
    clean: orders.Placed
    items: list[int]


@pytest.fixture
def held(cli: Cli, db_container: Container, tmp_path: Path) -> Held:
    c = db_container
    sku = c.sku(factories.add_product(c, price_cents=10_000, cost_cents=9_000, stock=3))
    with c.db.connect() as conn:
        email, since = f"{secrets.token_hex(4)}@example.com", c.clock()
        member_id = members.register(
            conn, email=email, password_hash="$argon2id$placeholder", language="zh-CN", now=since
        )
        wallet = ledger.wallet_account(conn, owner_type="member", owner_id=member_id)
        ledger.topup(
            conn, wallet_id=wallet, accounts=c.accounts, amount=50_000, now=since, actor="t"
        )
    buyer = orders.Buyer(None, wallet, f"member:{member_id}", member_id=member_id)
    # The CLI's list entry and shadow set reach this container's screening once it reloads.
    cli.ok("risk", "list-add", "proxy", "ip", "198.51.100.0/24")
    lenient = [r for r in DEFAULT_RULES if not r["code"].startswith("proxy_")]
    cli.ok("risk", "save", rules_file(tmp_path, lenient), "--activate", "shadow")
    c.risk_engine.invalidate()

    def place(ip: str) -> orders.Placed:
        cmd = orders.PlaceOrder(
            sku=sku, unit_price_cents=10_000, quantity=1, fields={}, channel="storefront",
            customer_ref=secrets.token_hex(4),
        )  # fmt: skip
        with c.db.connect() as conn:
            return orders.place_order(
                conn, buyer=buyer, cmd=cmd, accounts=c.accounts, vault=c.vault, policy=c.policy,
                now=c.clock(), engine=c.screening_engine,
                context=screening.Context(ip=ip, buyer_since=since),
            )  # fmt: skip

    flagged = [place(PROXY_IP), place(PROXY_IP)]
    assert [(p.status.value, p.reason) for p in flagged] == [("review", "risk_review_network")] * 2
    clean = place("203.0.113.5")
    assert clean.status.value == "delivered"
    items = [r[0] for r in cli.rows("SELECT id FROM review_items ORDER BY order_id")]
    return Held(wallet, flagged, clean, items)


def order_state(cli: Cli, order_id: int) -> tuple[str, str]:
    [state] = cli.rows("SELECT status, reason FROM orders WHERE id = :o", o=order_id)
    return state


def item_row(cli: Cli, item_id: int, columns: str) -> tuple[Any, ...]:
    [row] = cli.rows(f"SELECT {columns} FROM review_items WHERE id = :i", i=item_id)
    return row


def test_screenings_and_the_queue_as_a_reviewer_sees_them(cli: Cli, held: Held) -> None:
    first = held.flagged[0]
    shown = cli.json("risk", "screenings", first.order_no)
    assert [(s["mode"], s["rule_set_version"], s["action"], s["rule"]) for s in shown] == [
        ("live", 1, "review", "proxy_amount"),
        ("shadow", 2, "allow", "note_proxy"),  # a score-only rule: it allows
    ]
    assert shown[0]["matched"] == ["proxy_amount", "proxy_young_member", "note_proxy"]
    assert shown[1]["matched"] == ["note_proxy"]
    assert (shown[0]["attrs"]["ip_proxy"], shown[0]["attrs"]["amount_cents"]) == (True, 10_000)
    clean = cli.json("risk", "screenings", held.clean.order_no)
    assert [(s["mode"], s["action"]) for s in clean] == [("live", "allow"), ("shadow", "allow")]
    cli.refused(ErrorCode.order_not_found, "risk", "screenings", "NO-SUCH-ORDER")

    a = held.items[0]
    out = cli.ok("review", "list")
    assert [r[:6] + r[8:] for r in cli.table("review", "list")] == [
        [str(i), str(p.order_id), "open", "network", "proxy_amount", "100.00 CNY", ""]
        for i, p in zip(held.items, held.flagged, strict=True)
    ]
    assert "depth 2 · " in out and "decided last hour 0 · SLA breaches 0" in out
    assert cli.table("review", "list", "--status", "approved") == []

    detail = cli.json("review", "show", str(a))
    item = detail["item"]
    assert (item["id"], item["order_id"], item["status"], item["rule"]) == (
        a, first.order_id, "open", "proxy_amount",
    )  # fmt: skip
    assert (item["amount_cents"], item["claimed_by"], item["decided_by"]) == (10_000, "", "")
    assert [r["code"] for r in item["reasons"]] == shown[0]["matched"]  # explained to reviewers
    assert detail["decisions"] == []
    recent = sorted(o["order_no"] for o in detail["buyer_history"]["recent"])
    assert recent == sorted([first.order_no, held.flagged[1].order_no, held.clean.order_no])
    cli.refused(ErrorCode.review_item_not_found, "review", "show", "999")
    cli.refused(ErrorCode.review_item_not_found, "review", "claim", "999")


@pytest.mark.parametrize("db_container", BOTH, indirect=True)
def test_approve_delivers_and_reject_refunds(cli: Cli, held: Held) -> None:
    (a, b), (one, two) = held.items, held.flagged
    cli.refused(ErrorCode.review_not_claimed, *rv("approve", a, "alice"))  # a claim comes first
    assert cli.ok(*rv("claim", a, "alice")).startswith(f"claimed {a} until")
    assert item_row(cli, a, "status, claimed_by") == ("claimed", "staff:alice")
    taken = cli.refused(ErrorCode.review_claimed_by_other, *rv("claim", a, "bob"))
    assert taken.params["reviewer"] == "staff:alice"
    for verb in ("approve", "reject"):
        cli.refused(ErrorCode.review_claimed_by_other, *rv(verb, a, "bob", "--note", "x"))
    # A rejection needs a note: a missing one is a usage error, a blank one is refused.
    missing = cli(*rv("reject", a, "alice"))
    assert missing.exit_code == 2 and "--note" in missing.output
    cli.refused(ErrorCode.invalid_request, *rv("reject", a, "alice", "--note", " "))
    assert item_row(cli, a, "status, claimed_by, decided_by") == ("claimed", "staff:alice", "")
    assert order_state(cli, one.order_id) == ("review", "risk_review_network")

    approved = cli.json(*rv("approve", a, "alice", "--note", "ok"))
    assert approved == {"item": a, "status": "approved", "order": "delivered"}
    assert order_state(cli, one.order_id)[0] == "delivered"
    keys = "SELECT state FROM card_keys WHERE order_line_id = :l"
    assert cli.rows(keys, l=one.line_id) == [("sold",)]
    decided = ("approved", "staff:alice", "ok")
    assert item_row(cli, a, "status, decided_by, decision_note") == decided
    cli.refused(ErrorCode.review_already_decided, *rv("approve", a, "alice"))
    cli.refused(ErrorCode.review_already_decided, *rv("claim", a, "bob"))

    cli.ok(*rv("claim", b, "bob"))
    rejected = cli.json(*rv("reject", b, "bob", "--note", "stolen"))
    assert rejected == {"item": b, "status": "rejected", "order": "rejected"}
    assert order_state(cli, two.order_id) == ("rejected", "review_rejected")
    assert cli.rows(keys, l=two.line_id) == []  # its key is back on sale
    with cli.c.db.connect(write=False) as conn:  # its money is back; two orders stay paid
        assert ledger.balances(conn, wallet_id=held.wallet) == (50_000 - 2 * 10_000, 0)
    by_state = "SELECT state, COUNT(*) FROM card_keys GROUP BY state ORDER BY state"
    assert cli.rows(by_state) == [("available", 1), ("sold", 2)]
    decisions = cli.json("review", "show", str(b))["decisions"]
    assert [(d["actor"], d["action"], d["note"]) for d in decisions] == [
        ("staff:bob", "claim", ""),
        ("staff:bob", "reject", "stolen"),
    ]
    assert cli.table("review", "list") == []
    assert [r[0] for r in cli.table("review", "list", "--status", "rejected")] == [str(b)]
    factories.assert_books_clean(cli.c)


@pytest.mark.parametrize("db_container", BOTH, indirect=True)
def test_above_the_two_reviewer_amount_a_second_reviewer_decides(
    cli: Cli, held: Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAMENG_REVIEW_TWO_REVIEWERS_FROM_CENTS", "10000")
    a = held.items[0]
    cli.ok(*rv("claim", a, "alice"))
    assert cli.json(*rv("approve", a, "alice")) == {"item": a, "status": "second", "order": None}
    assert order_state(cli, held.flagged[0].order_id)[0] == "review"
    again = cli.refused(ErrorCode.review_second_reviewer_required, *rv("claim", a, "alice"))
    assert again.params == {"first": "staff:alice"}
    cli.ok(*rv("claim", a, "bob"))
    done = cli.json(*rv("approve", a, "bob"))
    assert done == {"item": a, "status": "approved", "order": "delivered"}
    assert item_row(cli, a, "first_approver, decided_by") == ("staff:alice", "staff:bob")
    factories.assert_books_clean(cli.c)


def test_backtest_and_shadow_report_count_what_reviewers_decided(cli: Cli, held: Held) -> None:
    a, b = held.items
    for item, verb in ((a, "approve"), (b, "reject")):
        cli.ok(*rv("claim", item, "alice"))
        cli.ok(*rv(verb, item, "alice", "--note", "decided"))

    assert cli.json("risk", "backtest", "1") == {
        "version": 1, "screened": 3, "allow": 1, "review": 2, "block": 0, "flagged": 2,
        "review_rate": 0.6667,
        "by_rule": {"proxy_amount": 2, "proxy_young_member": 2, "note_proxy": 2, "note_new_ip": 1},
        "changed_vs_live": {},
        "flagged_reviewed": 2, "flagged_then_approved": 1, "flagged_then_rejected": 1,
        "false_positive_rate": 0.5,  # one of the two flagged orders was approved
    }  # fmt: skip
    lenient = cli.json("risk", "backtest", "2")
    assert (lenient["allow"], lenient["flagged"], lenient["false_positive_rate"]) == (3, 0, None)
    assert lenient["changed_vs_live"] == {"review->allow": 2}
    assert lenient["by_rule"] == {"note_proxy": 2, "note_new_ip": 1}
    assert cli.json("risk", "backtest", "1", "--limit", "1")["screened"] == 1
    assert cli.json("risk", "backtest", "1", "--until", "2001-01-01")["screened"] == 0
    assert cli.json("risk", "backtest", "1", "--since", "2999-01-01")["screened"] == 0
    cli.refused(ErrorCode.rule_set_not_found, "risk", "backtest", "7")

    report = cli.json("risk", "shadow-report")
    assert report == {
        "version": 2, "orders": 3, "matrix": {"review->allow": 2, "allow->allow": 1},
        "agreement": 0.3333, "would_flag_reviewer_approved": 0, "would_allow_reviewer_rejected": 1,
    }  # fmt: skip
    assert cli.json("risk", "shadow-report", "--version", "2") == report
    assert cli.json("risk", "shadow-report", "--version", "1")["orders"] == 0


def test_backtest_reads_times_without_a_zone_as_utc(cli: Cli, held: Held) -> None:
    """`--until` says UTC; on a server set to UTC+8 an hour from now must still be ahead."""
    hour_on = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()
    before = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Shanghai"
    time.tzset()
    try:
        result = cli.json("risk", "backtest", "1", "--until", hour_on)
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()
    assert result["screened"] == 3
