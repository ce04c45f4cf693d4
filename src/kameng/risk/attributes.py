"""What screening knows about an order: its own facts plus velocity counters over sliding windows.

Counters are named `<key>_<metric>_<window>` and computed only when some rule (live or shadow)
uses them, so a rule set pays for what it asks:

- key: `buyer`, `ip`, `account` (the recharge account), `device` (the browser's cookie id),
  `email`;
- metric: `orders` (orders placed, paid or not), `amount` (their total, in cents), `failed`
  (orders whose payment never came), `buyers` (distinct buyers among them);
- window: a number and `m`, `h` or `d` (`10m`, `1h`, `24h`, `7d`), at most 90 days.

Every counter of one key is one statement: an index range scan of `(key, created_at)` over the
longest window, with a conditional aggregate per window. The order being screened is counted
(its facts are written first), so `ip_orders_1h >= 5` means "this is at least the fifth".

A scan reads at most the newest `SCAN_CAP` facts of a key, so one very busy key (a carrier NAT
address, a 90-day window) cannot make every order behind it slow. A counter is exact while its
window holds at most `SCAN_CAP` facts; beyond that it reads what the newest `SCAN_CAP` give,
which is still at least the cap for `orders`, far above any sensible threshold.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection

from kameng.db import RawSQL, db_time

KEYS = ("buyer", "ip", "account", "device", "email")
SCAN_CAP = 10_000  # facts read per key and screening (see the module docstring)
METRICS = ("orders", "amount", "failed", "buyers")
_COUNTER = re.compile(
    r"^(buyer|ip|account|device|email)_(orders|amount|failed|buyers)_(\d{1,4})(m|h|d)$"
)
_UNIT_S = {"m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 90 * 86400

# Attributes that need no counting: the order itself, its buyer, the lists.
STATIC_ATTRS = frozenset(
    {
        "amount_cents",
        "quantity",
        "unit_price_cents",
        "product_risk",
        "delivery_kind",
        "channel",
        "buyer_kind",
        "account_age_s",
        "ip_proxy",
        "listed_allow",
        "listed_block",
        "has_email",
        "has_account",
    }
)


@dataclass(frozen=True, slots=True)
class Counter:
    name: str
    key: str
    metric: str
    window_s: int


def parse_counter(name: str) -> Counter | None:
    m = _COUNTER.fullmatch(name)
    if m is None:
        return None
    window_s = int(m.group(3)) * _UNIT_S[m.group(4)]
    if not 0 < window_s <= MAX_WINDOW_S:
        return None
    return Counter(name, m.group(1), m.group(2), window_s)


def known_attr(name: str) -> bool:
    return name in STATIC_ATTRS or name in HISTORY_ATTRS or parse_counter(name) is not None


# Attributes read from the buyer's stored facts (one query), computed only when a rule that could
# still match needs them, like counters. They are not static: screening must not assume them.
HISTORY_ATTRS = frozenset({"ip_new_for_buyer", "buyer_seen_before"})


@dataclass(frozen=True, slots=True)
class Subject:
    """The facts of one order that screening looks at (all plain data, no I/O)."""

    order_id: int
    buyer: str  # "r<reseller id>", "m<member id>" or "g<browser id>"
    buyer_kind: str  # reseller | member | guest
    channel: str
    amount_cents: int
    quantity: int
    unit_price_cents: int
    product_risk: int
    delivery_kind: str
    ip: str = ""
    device: str = ""
    email: str = ""
    account: str = ""
    buyer_since: datetime | None = None  # when the reseller or member account was created

    def key_value(self, key: str) -> str:
        return str(getattr(self, key))


def recharge_account(template: Iterable[Mapping[str, Any]], fields: Mapping[str, str]) -> str:
    """The buyer field that names the account being topped up: the field a template marks
    `"role": "account"`, else the first phone / QQ field, else a field named like an account."""
    specs = list(template)
    for spec in specs:
        if spec.get("role") == "account" and fields.get(spec["name"]):
            return str(fields[spec["name"]])[:128]
    for spec in specs:
        if spec.get("type") in ("phone_cn", "qq") and fields.get(spec["name"]):
            return str(fields[spec["name"]])[:128]
    for name in ("account", "game_account", "uid", "user_id", "qq", "phone", "mobile"):
        if fields.get(name):
            return str(fields[name])[:128]
    return ""


def contact_email(template: Iterable[Mapping[str, Any]], fields: Mapping[str, str]) -> str:
    for spec in template:
        if spec.get("type") == "email" and fields.get(spec["name"]):
            return str(fields[spec["name"]]).strip().lower()[:254]
    return ""


# -- counting ---------------------------------------------------------------------------------

_STATEMENTS: dict[tuple[str, tuple[tuple[str, int], ...]], RawSQL] = {}


def _statement(key: str, wanted: tuple[tuple[str, int], ...]) -> RawSQL:
    """One SELECT for every (metric, window) of one key; built once per shape, then reused."""
    cached = _STATEMENTS.get((key, wanted))
    if cached is not None:
        return cached
    parts = []
    for i, (metric, _) in enumerate(wanted):
        inside = f"created_at >= :s{i}"
        if metric == "orders":
            parts.append(f"SUM(CASE WHEN {inside} THEN 1 ELSE 0 END)")
        elif metric == "amount":
            parts.append(f"SUM(CASE WHEN {inside} THEN amount_cents ELSE 0 END)")
        elif metric == "failed":
            parts.append(f"SUM(CASE WHEN {inside} AND failed THEN 1 ELSE 0 END)")
        else:
            parts.append(f"COUNT(DISTINCT CASE WHEN {inside} THEN buyer END)")
    sql = (
        f"SELECT {', '.join(parts)} FROM (SELECT created_at, amount_cents, failed, buyer "
        f"FROM risk_facts WHERE {key} = :v AND created_at >= :since AND created_at <= :now "
        "ORDER BY created_at DESC LIMIT :cap) AS f"
    )
    return _STATEMENTS.setdefault((key, wanted), RawSQL(sql))


def count(
    conn: Connection, *, subject: Subject, counters: Iterable[Counter], now: datetime
) -> dict[str, int]:
    """The values of the given counters for this subject. A key the order does not have (a
    guest has no email) yields no values: a rule on it simply does not match."""
    by_key: dict[str, list[Counter]] = {}
    for c in counters:
        by_key.setdefault(c.key, []).append(c)
    out: dict[str, int] = {}
    for key, group in by_key.items():
        value = subject.key_value(key)
        if not value:
            continue
        group.sort(key=lambda c: (c.metric, c.window_s))
        wanted = tuple((c.metric, c.window_s) for c in group)
        params: dict[str, Any] = {
            "v": value,
            "since": db_time(conn, now - timedelta(seconds=max(w for _, w in wanted))),
            "now": db_time(conn, now),
            "cap": SCAN_CAP,
        }
        for i, (_, window_s) in enumerate(wanted):
            params[f"s{i}"] = db_time(conn, now - timedelta(seconds=window_s))
        row = _statement(key, wanted).one(conn, params)
        for c, v in zip(group, row, strict=True):
            out[c.name] = int(v or 0)
    return out


_SEEN = RawSQL(
    "SELECT COUNT(*), SUM(CASE WHEN ip = :ip THEN 1 ELSE 0 END) FROM (SELECT ip FROM risk_facts "
    "WHERE buyer = :buyer AND created_at >= :since AND created_at <= :now AND order_id <> :oid "
    "ORDER BY created_at DESC LIMIT :cap) AS f"
)


def buyer_history(conn: Connection, *, subject: Subject, now: datetime) -> dict[str, Any]:
    """Whether the buyer ordered before (90 days) and whether this IP is new for them."""
    row = _SEEN.one(
        conn,
        {
            "ip": subject.ip,
            "buyer": subject.buyer,
            "since": db_time(conn, now - timedelta(seconds=MAX_WINDOW_S)),
            "now": db_time(conn, now),
            "oid": subject.order_id,
            "cap": SCAN_CAP,
        },
    )
    before, same_ip = int(row[0] or 0), int(row[1] or 0)
    out: dict[str, Any] = {"buyer_seen_before": before > 0}
    if subject.ip and before > 0:
        out["ip_new_for_buyer"] = same_ip == 0
    return out


# -- lists ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lists:
    """Allow, block and proxy lists as sets (loaded once and cached by the engine)."""

    allow: frozenset[tuple[str, str]] = frozenset()
    block: frozenset[tuple[str, str]] = frozenset()
    proxy_ips: frozenset[str] = frozenset()
    proxy_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def on(self, which: frozenset[tuple[str, str]], subject: Subject) -> bool:
        return any((key, subject.key_value(key)) in which for key in KEYS if subject.key_value(key))

    def is_proxy(self, ip: str) -> bool:
        if not ip:
            return False
        if ip in self.proxy_ips:
            return True
        if not self.proxy_nets:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.proxy_nets)


def static_attrs(subject: Subject, lists: Lists, now: datetime) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "amount_cents": subject.amount_cents,
        "quantity": subject.quantity,
        "unit_price_cents": subject.unit_price_cents,
        "product_risk": subject.product_risk,
        "delivery_kind": subject.delivery_kind,
        "channel": subject.channel,
        "buyer_kind": subject.buyer_kind,
        "ip_proxy": lists.is_proxy(subject.ip),
        "listed_allow": lists.on(lists.allow, subject),
        "listed_block": lists.on(lists.block, subject),
        "has_email": bool(subject.email),
        "has_account": bool(subject.account),
    }
    if subject.buyer_since is not None:
        attrs["account_age_s"] = max(0, int((now - subject.buyer_since).total_seconds()))
    return attrs


def gather(
    conn: Connection,
    *,
    subject: Subject,
    lists: Lists,
    needed: frozenset[str],
    now: datetime,
    static: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every attribute some rule needs (and the cheap static ones, for the record)."""
    attrs = dict(static) if static is not None else static_attrs(subject, lists, now)
    counters = [c for c in (parse_counter(n) for n in needed) if c is not None]
    if counters:
        attrs.update(count(conn, subject=subject, counters=counters, now=now))
    if needed & HISTORY_ATTRS:
        attrs.update(buyer_history(conn, subject=subject, now=now))
    return attrs
