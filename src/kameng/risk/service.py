"""Risk use cases: rule-set versions, lists, facts, and screening an order.

Rule sets are immutable once saved: a change is a new version (who, when, why), and activating
one as `live` or `shadow` retires the one it replaces, so what decided any past order can always
be looked up by its version. Screening reads only the database (no outbound calls) and runs in
the transaction that takes the payment, so an order is never paid and unscreened.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from kameng.audit import service as audit
from kameng.db import MultiInsert, RawSQL, db_time, table
from kameng.errors import ErrorCode, KamengError
from kameng.risk import attributes
from kameng.risk import lists as risk_lists
from kameng.risk.attributes import Lists, Subject
from kameng.risk.defaults import DEFAULT_RULES
from kameng.risk.models import RiskListEntry, RiskRuleSet, RiskScreening, RuleSetStatus
from kameng.risk.rules import (
    Action,
    Compiled,
    Maybe,
    Rule,
    Verdict,
    attributes_used,
    compile_could_match,
    parse_rules,
)

_sets = table(RiskRuleSet)
_lists = table(RiskListEntry)
_screenings = table(RiskScreening)

SCREEN_SECONDS = Histogram(
    "kameng_risk_screening_seconds",
    "Time to screen one order (attributes + rules), in seconds",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
SCREEN_DECISIONS = Counter(
    "kameng_risk_decisions_total", "Screening decisions, by mode and action", ["mode", "action"]
)

LIST_KEYS = attributes.KEYS


def _bad(detail: str) -> KamengError:
    return KamengError(ErrorCode.invalid_request, detail=detail)


def check_rule_set(raw: Any) -> list[Rule]:
    """Parse a rule set and check that every attribute it reads is one screening provides."""
    rules = parse_rules(raw)
    if not rules:
        # Made live, an empty set would allow every order while screening looked switched on.
        raise _bad(
            "a rule set needs at least one rule "
            "(to stop screening, set KAMENG_RISK_SCREENING=false)"
        )
    for rule in rules:
        unknown = sorted(a for a in attributes_used(rule.when) if not attributes.known_attr(a))
        if unknown:
            raise _bad(
                f"risk rule: {rule.code}: unknown attribute {unknown[0]} (see docs/risk.md "
                "for the attributes and the <key>_<metric>_<window> counters)"
            )
    return rules


# -- rule-set versions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleSetView:
    version: int
    status: str
    rules: list[dict[str, Any]]
    note: str
    created_by: str
    created_at: datetime
    activated_by: str
    activated_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "rules": self.rules,
            "note": self.note,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "activated_by": self.activated_by,
            "activated_at": self.activated_at.isoformat() if self.activated_at else None,
        }


def _view(row: Any) -> RuleSetView:
    return RuleSetView(
        version=int(row.version),
        status=str(row.status),
        rules=list(row.rules),
        note=str(row.note),
        created_by=str(row.created_by),
        created_at=row.created_at,
        activated_by=str(row.activated_by),
        activated_at=row.activated_at,
    )


def save_rule_set(
    conn: Connection, *, rules: Any, note: str, actor: str, now: datetime
) -> RuleSetView:
    """Save a new version as a draft (checked first; nothing is saved if a rule is bad)."""
    check_rule_set(rules)
    latest = conn.execute(select(_sets.c.version).order_by(_sets.c.version.desc()).limit(1))
    version = int(latest.scalar() or 0) + 1
    conn.execute(
        insert(_sets).values(
            version=version,
            status=RuleSetStatus.draft.value,
            rules=rules,
            note=note[:2000],
            created_by=actor,
            created_at=now,
            activated_by="",
        )
    )
    audit.record_on(
        conn,
        actor=actor,
        action="risk_rules_saved",
        target_type="risk_rule_set",
        target_id=version,
        now=now,
        details={"rules": len(rules), "note": note[:200]},
    )
    return get_rule_set(conn, version=version)


def get_rule_set(conn: Connection, *, version: int) -> RuleSetView:
    row = conn.execute(select(_sets).where(_sets.c.version == version)).first()
    if row is None:
        raise KamengError(ErrorCode.rule_set_not_found, version=version)
    return _view(row)


def list_rule_sets(conn: Connection) -> list[RuleSetView]:
    return [_view(r) for r in conn.execute(select(_sets).order_by(_sets.c.version.desc()))]


def activate(
    conn: Connection, *, version: int, mode: RuleSetStatus, actor: str, now: datetime
) -> RuleSetView:
    """Make a version the live set or the shadow set; the one it replaces is retired."""
    if mode not in (RuleSetStatus.live, RuleSetStatus.shadow):
        raise _bad("a rule set is activated as live or shadow")
    target = get_rule_set(conn, version=version)
    if target.status == RuleSetStatus.live.value and mode is RuleSetStatus.shadow:
        # There is always exactly one live set: it cannot leave by becoming the shadow.
        raise _bad(f"version {version} is live: make another version live first")
    check_rule_set(target.rules)  # rules saved by an older release must still parse
    conn.execute(
        update(_sets)
        .where(_sets.c.status == mode.value, _sets.c.version != version)
        .values(status=RuleSetStatus.retired.value)
    )
    conn.execute(
        update(_sets)
        .where(_sets.c.version == version)
        .values(status=mode.value, activated_by=actor, activated_at=now)
    )
    audit.record_on(
        conn,
        actor=actor,
        action=f"risk_rules_{mode.value}",
        target_type="risk_rule_set",
        target_id=version,
        now=now,
        details={"previous_status": target.status},
    )
    return get_rule_set(conn, version=version)


def stop_shadow(conn: Connection, *, actor: str, now: datetime) -> int:
    stopped = conn.execute(
        update(_sets)
        .where(_sets.c.status == RuleSetStatus.shadow.value)
        .values(status=RuleSetStatus.retired.value)
    ).rowcount
    if stopped:
        audit.record_on(
            conn,
            actor=actor,
            action="risk_rules_shadow_stopped",
            target_type="risk_rule_set",
            target_id="shadow",
            now=now,
        )
    return int(stopped)


def ensure_default_rules(conn: Connection, *, now: datetime) -> None:
    """A fresh installation screens with the bundled rule set (version 1, live)."""
    if conn.execute(select(_sets.c.id).limit(1)).first() is not None:
        return
    saved = save_rule_set(
        conn, rules=DEFAULT_RULES, note="bundled default rules", actor="system", now=now
    )
    activate(conn, version=saved.version, mode=RuleSetStatus.live, actor="system", now=now)


# -- the engine: what screening needs, cached ---------------------------------------------------


Gates = tuple[tuple[Maybe, frozenset[str]], ...]


@dataclass(frozen=True, slots=True)
class Loaded:
    live_version: int
    live: list[Rule]
    shadow_version: int | None
    shadow: list[Rule]
    lists: Lists
    needed: frozenset[str]
    live_compiled: Compiled = field(default_factory=lambda: Compiled.of([]))
    shadow_compiled: Compiled | None = None
    # Per rule that reads counters: (could it still match?, the counters it reads).
    gates: Gates = ()


def _gates(
    rules: Iterable[Rule], needed: frozenset[str]
) -> tuple[tuple[Maybe, frozenset[str]], ...]:
    lazy = frozenset(n for n in needed if n not in attributes.STATIC_ATTRS)
    out = []
    for rule in rules:
        used = frozenset(attributes_used(rule.when)) & lazy
        if used:
            out.append((compile_could_match(rule.when, lazy), used))
    return tuple(out)


def _needed(*rule_sets: Iterable[Rule]) -> frozenset[str]:
    out: set[str] = set()
    for rules in rule_sets:
        for rule in rules:
            out |= attributes_used(rule.when)
    return frozenset(out)


@dataclass
class Engine:
    """The live and shadow rule sets and the lists, reloaded at most every `ttl_s` seconds:
    a rule or list change reaches screening within that time, and screening itself reads no
    rule rows. One per process (the container owns it)."""

    ttl_s: float = 2.0
    _loaded: Loaded | None = None
    _expires: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def invalidate(self) -> None:
        self._expires = 0.0

    def current(self, conn: Connection) -> Loaded:
        now = time.monotonic()
        loaded = self._loaded
        if loaded is not None and self._expires > now:
            return loaded
        with self._lock:
            if self._loaded is not None and self._expires > time.monotonic():
                return self._loaded
            loaded = self._load(conn)
            self._loaded, self._expires = loaded, time.monotonic() + self.ttl_s
            return loaded

    @staticmethod
    def _load(conn: Connection) -> Loaded:
        rows = conn.execute(
            select(_sets.c.version, _sets.c.status, _sets.c.rules).where(
                _sets.c.status.in_((RuleSetStatus.live.value, RuleSetStatus.shadow.value))
            )
        ).all()
        live = next((r for r in rows if r.status == RuleSetStatus.live.value), None)
        shadow = next((r for r in rows if r.status == RuleSetStatus.shadow.value), None)
        live_rules = parse_rules(live.rules) if live is not None else []
        shadow_rules = parse_rules(shadow.rules) if shadow is not None else []
        needed = _needed(live_rules, shadow_rules)
        return Loaded(
            live_version=int(live.version) if live is not None else 0,
            live=live_rules,
            shadow_version=int(shadow.version) if shadow is not None else None,
            shadow=shadow_rules,
            lists=risk_lists.load_lists(conn),
            needed=needed,
            live_compiled=Compiled.of(live_rules),
            shadow_compiled=Compiled.of(shadow_rules) if shadow is not None else None,
            gates=_gates((*live_rules, *shadow_rules), needed),
        )


# -- facts and screening ----------------------------------------------------------------------

_INSERT_FACT = RawSQL(
    "INSERT INTO risk_facts (order_id, buyer, ip, device, email, account, amount_cents, failed, "
    "created_at) VALUES (:order_id, :buyer, :ip, :device, :email, :account, :amount_cents, "
    ":failed, :created_at)"
)
_MARK_FAILED = RawSQL("UPDATE risk_facts SET failed = :yes WHERE order_id = :order_id")
INSERT_SCREENINGS = MultiInsert(
    "risk_screenings",
    (
        "order_id",
        "rule_set_version",
        "mode",
        "action",
        "rule_code",
        "score",
        "matched",
        "attrs",
        "latency_us",
        "at",
    ),
)


def record_facts(conn: Connection, *, subject: Subject, now: datetime) -> None:
    """What velocity counters count; written when the order is placed, paid or not."""
    _INSERT_FACT.run(
        conn,
        {
            "order_id": subject.order_id,
            "buyer": subject.buyer[:80],
            "ip": subject.ip[:45],
            "device": subject.device[:64],
            "email": subject.email[:254],
            "account": subject.account[:128],
            "amount_cents": subject.amount_cents,
            "failed": False,
            "created_at": db_time(conn, now),
        },
    ).close()


_LOCK_KEYS = RawSQL(
    "SELECT pg_advisory_xact_lock(k) FROM "
    "(SELECT k FROM unnest(CAST(:keys AS bigint[])) AS t(k) ORDER BY k) AS s"
)


def needed_for(
    loaded: Loaded, subject: Subject, now: datetime, static: dict[str, Any] | None = None
) -> frozenset[str]:
    """The counters (and history) this order really needs: those of rules its own facts do not
    already decide. A reseller's API order, which the storefront rules rule out by channel,
    counts nothing at all, however many orders that reseller places."""
    if not loaded.gates:
        return frozenset()
    if static is None:
        static = attributes.static_attrs(subject, loaded.lists, now)
    out: set[str] = set()
    for could, used in loaded.gates:
        if could(static) is None:
            out |= used
    return frozenset(out)


def serialise_counters(
    conn: Connection,
    *,
    engine: Engine,
    subject: Subject,
    now: datetime,
    loaded: Loaded | None = None,
) -> None:
    """PostgreSQL: orders sharing a counted key (an IP, a browser, an account…) are screened one
    after the other. Counters only see committed orders, so a burst placed in parallel would
    otherwise count none of its own. Locks are taken in one sorted batch (no deadlock between
    two screenings) and held to commit; SQLite has one writer anyway."""
    if conn.dialect.name != "postgresql":
        return
    needed = needed_for(loaded or engine.current(conn), subject, now)
    keys = {c.key for c in (attributes.parse_counter(n) for n in needed) if c}
    if needed & attributes.HISTORY_ATTRS:
        keys.add("buyer")
    ids = sorted(
        {
            int.from_bytes(
                hashlib.sha256(f"risk|{key}|{subject.key_value(key)}".encode()).digest()[:8],
                "big",
                signed=True,
            )
            for key in keys
            if subject.key_value(key)
        }
    )
    if ids:
        _LOCK_KEYS.run(conn, {"keys": ids}).close()


def mark_payment_failed(conn: Connection, *, order_id: int) -> None:
    _MARK_FAILED.run(conn, {"yes": True, "order_id": order_id}).close()


@dataclass(frozen=True, slots=True)
class Screening:
    verdict: Verdict
    rule_set_version: int
    attrs: dict[str, Any]
    shadow: Verdict | None
    latency_us: int

    @property
    def action(self) -> Action:
        return self.verdict.action

    def reasons(self, rules: list[Rule]) -> list[dict[str, Any]]:
        """Every matching rule with its explanation, for reviewers (never shown to buyers)."""
        by_code = {r.code: r for r in rules}
        return [
            {
                "code": code,
                "category": by_code[code].category,
                "score": by_code[code].score,
                "zh-CN": by_code[code].explain_zh,
                "en": by_code[code].explain_en,
            }
            for code in self.verdict.matched
            if code in by_code
        ]


def _row(
    conn: Connection,
    order_id: int,
    version: int,
    mode: str,
    verdict: Verdict,
    attrs: dict[str, Any],
    latency_us: int,
    now: datetime,
) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "rule_set_version": version,
        "mode": mode,
        "action": verdict.action.value,
        "rule_code": verdict.rule.code if verdict.rule else "",
        "score": verdict.score,
        "matched": json.dumps(list(verdict.matched)),
        "attrs": json.dumps(attrs, ensure_ascii=False, default=str),
        "latency_us": latency_us,
        "at": db_time(conn, now),
    }


def screen(
    conn: Connection,
    *,
    engine: Engine,
    subject: Subject,
    now: datetime,
    loaded: Loaded | None = None,
) -> tuple[Screening, list[Rule]]:
    """Screen one order whose facts are already recorded; stores the live (and shadow) result.
    Returns the screening and the live rules it was decided by (for the reviewer's reasons)."""
    started = time.perf_counter()
    loaded = loaded or engine.current(conn)
    static = attributes.static_attrs(subject, loaded.lists, now)
    attrs = attributes.gather(
        conn,
        subject=subject,
        lists=loaded.lists,
        needed=needed_for(loaded, subject, now, static),
        now=now,
        static=static,
    )
    verdict = loaded.live_compiled.evaluate(attrs)
    shadow = loaded.shadow_compiled.evaluate(attrs) if loaded.shadow_compiled is not None else None
    elapsed = time.perf_counter() - started
    latency_us = int(elapsed * 1_000_000)
    rows = [
        _row(conn, subject.order_id, loaded.live_version, "live", verdict, attrs, latency_us, now)
    ]
    if shadow is not None and loaded.shadow_version is not None:
        rows.append(
            _row(conn, subject.order_id, loaded.shadow_version, "shadow", shadow, attrs, 0, now)
        )
        SCREEN_DECISIONS.labels("shadow", shadow.action.value).inc()
    INSERT_SCREENINGS.run(conn, rows)
    SCREEN_SECONDS.observe(elapsed)
    SCREEN_DECISIONS.labels("live", verdict.action.value).inc()
    return Screening(verdict, loaded.live_version, attrs, shadow, latency_us), loaded.live


def screenings_of(conn: Connection, *, order_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(_screenings).where(_screenings.c.order_id == order_id).order_by(_screenings.c.id)
    )
    return [
        {
            "mode": r.mode,
            "rule_set_version": r.rule_set_version,
            "action": r.action,
            "rule": r.rule_code,
            "score": r.score,
            "matched": r.matched,
            "attrs": r.attrs,
            "latency_us": r.latency_us,
            "at": r.at.isoformat(),
        }
        for r in rows
    ]
