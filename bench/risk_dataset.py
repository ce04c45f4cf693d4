"""Risk screening on a labelled synthetic data set: how well the bundled rules judge orders.

1. A data set is generated from a fixed seed (`--seed`, default 7): `--orders` screened orders
   (default 2,000) over `--days` simulated days (default 4), about `--fraud-share` of them fraud
   (default 5 %), each order labelled fraud or legit and tagged with its family (fraud) or
   persona (legit). Nothing waits in real time: every service takes `now`.

   Fraud families:
   - `velocity_burst`: stolen payment accounts emptied from one place: 6-40 card-key orders, one
     every 25-150 s, from one IP and one browser (half of the bursts), one IP with the cookie
     cleared before each order (a quarter), or one browser behind rotating residential IPs (a
     quarter); about one payment attempt in five is declined (an unpaid order);
   - `account_many_buyers`: one game account, QQ number or phone topped up by 3-8 different
     payers (guests, each with their own browser and IP) within 30 min - 8 h;
   - `new_account_big`: a member registered 2-120 min before ordering, 1-3 orders; 80 % of
     them 300 yuan or more (648 diamonds, a 500 gift card, 4-10 x 100), 20 % 190-290;
   - `proxy_ip`: orders from IPs on the proxy list (half single listed IPs, half inside listed
     networks), from guests or members registered 5-30 days earlier; 80 % of them 100 yuan or
     more, 20 % under 100.

   Legit personas (the confounders the rules must leave alone): `returning_member` (old accounts
   with order history before the window; a third of them also order from a phone on carrier
   NAT, and some got a new home IP from their ISP), `guest` (a fresh browser each, on carrier
   NAT, home broadband or an internet cafe's shared IP; 12 % come back with the same cookie;
   7 % of checkouts are abandoned once and retried), `reseller_api` (six resellers ordering in
   bursts of 5-60 through the API channel from their servers' IPs), `new_member` (registered
   during the window, first order 2 min - 2 days later; 10 % buy 300 yuan or more),
   `vpn_user` (guests and members on IPs of the proxy list, amounts under 100; a member's VPN
   exit varies among three addresses), `heavy_buyer` (five old accounts buying 2-5 large orders
   per session), `family_shared_account` (two members, often on one home IP and computer,
   topping up one child's game account or phone).

   Members, resellers, products (with a product risk level: gift cards 3, Steam 2, top-ups 1,
   NetEase 0), stock, a gateway and the proxy list are created through the services first; the
   returning personas' history (1 h - 28 days before the window) is placed like any order and
   screened, but not counted.

2. Every order then goes through the real path on a SQLite file, in time order, exactly as the
   platform runs it: storefront balance orders and Reseller API orders through
   `orders.place_order(engine=..., context=...)` (facts recorded and screened in the placing
   transaction); storefront gateway orders through `checkout.place_pending` (facts recorded at
   placement) + `payments.open_payment`, then `payments.apply_confirmation` when the simulated
   payment arrives 15-240 s later (screened then, with the counters of that moment), or
   `checkout.expire_unpaid` when it never does (the fact is marked failed). The rule set is the
   live one `Container.bootstrap()` seeds (`kameng.risk.defaults.DEFAULT_RULES`).

3. Reported: the confusion matrix (fraud/legit x allow/review/block), false-positive rate
   (legit flagged / legit), recall (fraud flagged / fraud), review rate (reviewed / all), block
   precision, recall per fraud family (and the share of incidents with at least one flagged
   order), flag rate per legit persona, hits per rule (deciding and matching), and latency: the
   screening itself (`risk_screenings.latency_us`, p50/p99) and the order's transactions
   (placement + payment) against a baseline measured in the same run: the same data set on a
   second database with screening switched off (`risk_screening=False`), driven in lockstep
   with the first (which one goes first alternates per event, so both see the same machine).
   `--rules FILE` screens with another rule set (saved and made live like a staff edit) to
   compare candidates on the same data.

Targets (issue): FPR <= 2 %, recall >= 90 %, review rate <= 10 %; PASS/FAIL for each and exit 1
if one is missed. One `key=value` line at the end:
  orders=… fraud=… legit=… fpr=… recall=… review_rate=… block_precision=… screen_p50_us=…
  screen_p99_us=… order_p50_ms=… order_p99_ms=… off_p50_ms=… off_p99_ms=… ratio_mean=…
  screening_cost_ms=… targets_met=…
"""

from __future__ import annotations

import argparse
import base64
import heapq
import ipaddress
import itertools
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from _common import MASTER_KEY_B64, ROOT, machine

sys.path.insert(0, str(ROOT / "src"))

START = datetime(2026, 11, 16, tzinfo=UTC)  # a Monday, 08:00 in Beijing
CURRENCY = "CNY"
GATEWAY = "bench-epay"

# code -> (product slug, price in cents, product risk level, delivery kind, max quantity)
CATALOG: dict[str, tuple[str, int, int, str, int]] = {
    "STEAM-50": ("steam-wallet", 4850, 2, "card_key", 10),
    "STEAM-100": ("steam-wallet", 9650, 2, "card_key", 10),
    "NETEASE-30": ("netease-points", 2880, 0, "card_key", 10),
    "APPLE-100": ("app-store", 10000, 3, "card_key", 10),
    "APPLE-500": ("app-store", 50000, 3, "card_key", 10),
    "PHONE-50": ("mobile-topup", 4980, 1, "direct_topup", 1),
    "PHONE-100": ("mobile-topup", 9950, 1, "direct_topup", 1),
    "QB-10": ("qq-coins", 1000, 1, "direct_topup", 1),
    "QB-100": ("qq-coins", 10000, 1, "direct_topup", 1),
    "GAME-30": ("game-direct", 3000, 1, "direct_topup", 1),
    "GAME-68": ("game-direct", 6800, 1, "direct_topup", 1),
    "GAME-648": ("game-direct", 64800, 1, "direct_topup", 1),
}
PRODUCT_FIELDS: dict[str, list[dict[str, Any]]] = {
    "mobile-topup": [
        {"name": "phone", "type": "phone_cn", "label": "手机号", "label_en": "Mobile number"}
    ],
    "qq-coins": [{"name": "qq", "type": "qq", "label": "QQ 号", "label_en": "QQ number"}],
    "game-direct": [
        {
            "name": "account",
            "type": "text",
            "label": "游戏账号",
            "label_en": "Game account",
            "pattern": "[A-Za-z0-9_@.]{4,32}",
        },
        {
            "name": "server",
            "type": "select",
            "label": "区服",
            "label_en": "Server",
            "options": ["华东一区", "华南一区", "华北一区"],
        },
    ],
}
SERVERS = ("华东一区", "华南一区", "华北一区")

# What ordinary buyers buy (weights) and how many card keys at once.
LEGIT_MIX = {
    "STEAM-50": 18,
    "STEAM-100": 11,
    "NETEASE-30": 12,
    "APPLE-100": 4,
    "APPLE-500": 1,
    "PHONE-50": 15,
    "PHONE-100": 10,
    "QB-10": 6,
    "QB-100": 3,
    "GAME-30": 9,
    "GAME-68": 8,
    "GAME-648": 3,
}
LEGIT_QTY = {1: 80, 2: 12, 3: 4, 5: 3, 10: 1}
SMALL_MIX = {
    "STEAM-50": 4,
    "STEAM-100": 2,
    "NETEASE-30": 3,
    "PHONE-50": 3,
    "QB-10": 2,
    "GAME-30": 2,
    "GAME-68": 2,
}
# Large legit baskets (heavy buyers, the odd new member): (sku, quantities)
BIG_BASKETS: list[tuple[str, tuple[int, ...], int]] = [
    ("APPLE-500", (1, 1, 2), 3),
    ("GAME-648", (1,), 4),
    ("STEAM-100", (3, 4, 5, 10), 3),
    ("APPLE-100", (3, 5), 2),
    ("QB-100", (1,), 1),
]
# Beijing-time hour of day -> relative traffic (legit buyers shop in the evening).
LOCAL_HOUR_WEIGHT = (3, 2, 1, 1, 1, 1, 1, 2, 3, 4, 5, 5, 6, 5, 5, 5, 5, 6, 7, 9, 10, 10, 9, 6)

LEGIT_SHARES = {  # of the legit screened orders
    "returning_member": 0.33,
    "guest": 0.28,
    "reseller_api": 0.22,
    "new_member": 0.07,
    "vpn_user": 0.04,
    "heavy_buyer": 0.03,
    "family_shared_account": 0.03,
}
FRAUD_SHARES = {  # of the fraud orders
    "velocity_burst": 0.40,
    "account_many_buyers": 0.20,
    "new_account_big": 0.20,
    "proxy_ip": 0.20,
}
RESELLERS = ("shop-a", "shop-b", "shop-c", "shop-d", "shop-e", "shop-f")
PROXY_NETS = ("203.0.113.0/24", "198.51.100.0/25", "185.220.100.0/22")
MOBILE_PREFIXES = ("223.104", "39.144", "117.136", "112.97", "111.55")  # carrier NAT
HOME_FIRST_OCTETS = (27, 36, 58, 60, 61, 101, 106, 113, 114, 115, 116, 121, 122, 180, 183, 218)
MAIL_DOMAINS = ("qq.com", "163.com", "126.com", "foxmail.com", "gmail.com", "outlook.com")


@dataclass(frozen=True, slots=True)
class MemberSpec:
    key: str
    email: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OrderSpec:
    at: datetime
    label: str  # fraud | legit
    family: str  # the fraud family or the legit persona
    incident: str  # one actor's (legit) or one attack's (fraud) orders share this
    buyer_kind: str  # member | guest | reseller
    buyer: str  # member key, the guest's browser id, or the reseller's name
    pay: str  # balance | gateway | api
    sku: str
    quantity: int
    fields: tuple[tuple[str, str], ...] = ()
    ip: str = ""
    device: str = ""
    pay_after_s: int | None = 60  # gateway: when the payment arrives; None: never paid
    scored: bool = True  # False: history before the window (screened, not counted)

    @property
    def amount_cents(self) -> int:
        return CATALOG[self.sku][1] * self.quantity

    @property
    def paid(self) -> bool:
        return self.pay != "gateway" or self.pay_after_s is not None

    @property
    def counted(self) -> bool:
        """Screened and counted in the figures."""
        return self.scored and self.paid

    @property
    def account(self) -> str:
        return next((v for k, v in self.fields if k in ("phone", "qq", "account")), "")


@dataclass
class Dataset:
    seed: int
    start: datetime
    end: datetime
    members: dict[str, MemberSpec]
    resellers: tuple[str, ...]
    proxy_list: list[str]  # IPs and networks, as added to the proxy list
    orders: list[OrderSpec]  # in time order

    @property
    def counted(self) -> list[OrderSpec]:
        return [o for o in self.orders if o.counted]

    def is_proxy(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(
            addr in ipaddress.ip_network(e) if "/" in e else ip == e for e in self.proxy_list
        )


# -- generating ---------------------------------------------------------------------------------


class _Gen:
    def __init__(self, seed: int, start: datetime, days: float) -> None:
        self.rng = random.Random(seed)
        self.start = start
        self.end = start + timedelta(days=days)
        self.members: dict[str, MemberSpec] = {}
        self.orders: list[OrderSpec] = []
        self._ids = itertools.count(1)
        rng = self.rng
        self.mobile_pool = [
            f"{rng.choice(MOBILE_PREFIXES)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            for _ in range(600)
        ]
        self.cafes = [self.home_ip() for _ in range(4)]
        self.proxy_singles = [
            f"{rng.choice((45, 104, 149, 167))}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
            f"{rng.randint(1, 254)}"
            for _ in range(40)
        ]
        self.proxy_nets = [ipaddress.ip_network(n) for n in PROXY_NETS]

    # building blocks
    def next_id(self) -> int:
        return next(self._ids)

    def home_ip(self) -> str:
        r = self.rng
        return (
            f"{r.choice(HOME_FIRST_OCTETS)}.{r.randint(0, 255)}.{r.randint(0, 255)}."
            f"{r.randint(1, 254)}"
        )

    def mobile_ip(self) -> str:
        return self.rng.choice(self.mobile_pool)

    def proxy_ip(self) -> str:
        """An IP on the proxy list: half listed one by one, half inside a listed network."""
        if self.rng.random() < 0.5:
            return self.rng.choice(self.proxy_singles)
        net = self.rng.choice(self.proxy_nets)
        return str(net[self.rng.randint(1, net.num_addresses - 2)])

    def device(self) -> str:
        return base64.urlsafe_b64encode(self.rng.randbytes(18)).decode()  # like a browser's id

    def phone(self) -> str:
        return f"1{self.rng.choice('356789')}{self.rng.randint(0, 999_999_999):09d}"

    def qq(self) -> str:
        return str(self.rng.randint(10_000, 3_999_999_999))

    def game_account(self) -> str:
        stem = "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz", k=self.rng.randint(4, 9)))
        return f"{stem}{self.rng.randint(1, 99999)}"

    def target_fields(self, sku: str, mine: dict[str, str] | None = None) -> tuple:
        """The buyer fields of a top-up: the actor's own phone/QQ/game account when given."""
        slug = CATALOG[sku][0]
        mine = mine if mine is not None else {}
        if slug == "mobile-topup":
            return (("phone", mine.setdefault("phone", self.phone())),)
        if slug == "qq-coins":
            return (("qq", mine.setdefault("qq", self.qq())),)
        if slug == "game-direct":
            account = mine.setdefault("account", self.game_account())
            server = mine.setdefault("server", self.rng.choice(SERVERS))
            return (("account", account), ("server", server))
        return ()

    def pick(self, mix: dict[str, int]) -> str:
        return self.rng.choices(list(mix), weights=list(mix.values()))[0]

    def basket(self, mix: dict[str, int], *, below_cents: int | None = None) -> tuple[str, int]:
        for _ in range(100):
            sku = self.pick(mix)
            qty = 1
            if CATALOG[sku][3] == "card_key":
                qty = self.rng.choices(list(LEGIT_QTY), weights=list(LEGIT_QTY.values()))[0]
            if below_cents is None or CATALOG[sku][1] * qty < below_cents:
                return sku, qty
        raise AssertionError("no basket under the limit")

    def big_basket(self) -> tuple[str, int]:
        sku, qtys, _ = self.rng.choices(BIG_BASKETS, weights=[b[2] for b in BIG_BASKETS])[0]
        return sku, self.rng.choice(qtys)

    def moment(self, lo: datetime | None = None, hi: datetime | None = None) -> datetime:
        """A moment in [lo, hi), weighted by the hour of day buyers shop at (Beijing time)."""
        lo, hi = lo or self.start, hi or self.end
        span = (hi - lo).total_seconds()
        top = max(LOCAL_HOUR_WEIGHT)
        while True:
            t = lo + timedelta(seconds=self.rng.random() * span)
            if self.rng.random() * top < LOCAL_HOUR_WEIGHT[(t.hour + 8) % 24]:
                return t

    def uniform_moment(self, lo: datetime, hi: datetime) -> datetime:
        return lo + timedelta(seconds=self.rng.random() * (hi - lo).total_seconds())

    def history_moment(self) -> datetime:
        return self.moment(self.start - timedelta(days=28), self.start - timedelta(hours=1))

    def member(self, persona: str, created_at: datetime) -> str:
        n = self.next_id()
        key = f"{persona}-{n}"
        self.members[key] = MemberSpec(
            key, f"{persona.replace('_', '')}{n}@{self.rng.choice(MAIL_DOMAINS)}", created_at
        )
        return key

    def pay_after(self, fraud: bool = False) -> int:
        return self.rng.randint(15, 60) if fraud else self.rng.randint(20, 240)

    def order(self, **kw: Any) -> OrderSpec:
        kw.setdefault("scored", kw["at"] >= self.start)
        spec = OrderSpec(**kw)
        self.orders.append(spec)
        return spec


def _take(gen: _Gen, planned: list[OrderSpec], budget: int) -> int:
    """Keep an actor's orders while the persona's budget of counted orders lasts."""
    kept = 0
    for spec in sorted(planned, key=lambda o: o.at):
        if spec.counted:
            if kept >= budget:
                continue
            kept += 1
        gen.orders.append(spec)
    return kept


def _planner(gen: _Gen) -> tuple[list[OrderSpec], Any]:
    """Collect an actor's orders before they are kept (so a budget can trim them)."""
    planned: list[OrderSpec] = []

    def add(**kw: Any) -> None:
        kw.setdefault("scored", kw["at"] >= gen.start)
        planned.append(OrderSpec(**kw))

    return planned, add


def _storefront(
    gen: _Gen,
    add: Any,
    *,
    pay_balance_p: float,
    abandon_p: float = 0.07,
    fraud: bool = False,
    **kw: Any,
) -> None:
    if kw["buyer_kind"] == "member" and gen.rng.random() < pay_balance_p:
        add(pay="balance", **kw)
        return
    if gen.rng.random() < abandon_p:
        before = kw["at"] - timedelta(seconds=gen.rng.randint(60, 600))
        add(pay="gateway", pay_after_s=None, **{**kw, "at": before})
    add(pay="gateway", pay_after_s=gen.pay_after(fraud), **kw)


# legit personas: each adds one actor's orders and returns how many counted ones it kept


def _returning_member(gen: _Gen, budget: int) -> int:
    r = gen.rng
    key = gen.member("returning", gen.start - timedelta(days=r.uniform(10, 900)))
    home, desktop = gen.home_ip(), gen.device()
    phone_user = r.random() < 0.35
    mobile_device = gen.device()
    new_home = gen.home_ip() if r.random() < 0.3 else home  # the ISP renewed the address
    mine: dict[str, str] = {}
    planned, add = _planner(gen)

    def one(at: datetime, in_window: bool) -> None:
        on_phone = phone_user and r.random() < 0.5
        ip = gen.mobile_ip() if on_phone else (new_home if in_window else home)
        sku, qty = gen.basket(LEGIT_MIX)
        _storefront(
            gen,
            add,
            pay_balance_p=0.5,
            at=at,
            label="legit",
            family="returning_member",
            incident=key,
            buyer_kind="member",
            buyer=key,
            sku=sku,
            quantity=qty,
            fields=gen.target_fields(sku, mine),
            ip=ip,
            device=mobile_device if on_phone else desktop,
        )

    for _ in range(r.randint(1, 4)):
        one(gen.history_moment(), False)
    for _ in range(r.randint(1, 3)):
        at = gen.moment()
        one(at, True)
        if r.random() < 0.2:  # a second purchase in the same visit
            one(at + timedelta(seconds=r.randint(120, 1200)), True)
    return _take(gen, planned, budget)


def _guest(gen: _Gen, budget: int) -> int:
    r = gen.rng
    device = gen.device()
    where = r.random()
    base_ip = gen.cafes[r.randrange(len(gen.cafes))] if where < 0.10 else gen.home_ip()
    on_mobile = 0.10 <= where < 0.65
    mine: dict[str, str] = {}
    planned, add = _planner(gen)

    def one(at: datetime) -> None:
        sku, qty = gen.basket(LEGIT_MIX)
        _storefront(
            gen,
            add,
            pay_balance_p=0.0,
            at=at,
            label="legit",
            family="guest",
            incident=device,
            buyer_kind="guest",
            buyer=device,
            sku=sku,
            quantity=qty,
            fields=gen.target_fields(sku, mine),
            ip=gen.mobile_ip() if on_mobile else base_ip,
            device=device,
        )

    if r.random() < 0.12:  # a returning guest: same cookie, ordered before
        for _ in range(r.randint(1, 2)):
            one(gen.history_moment())
    at = gen.moment()
    for _ in range(r.choices((1, 2, 3), weights=(75, 18, 7))[0]):
        one(at)
        at += timedelta(seconds=r.randint(60, 900))
    return _take(gen, planned, budget)


def _new_member(gen: _Gen, budget: int) -> int:
    r = gen.rng
    created = gen.moment(gen.start - timedelta(days=1), gen.end - timedelta(hours=2))
    key = gen.member("newmember", created)
    ip, device = (gen.mobile_ip() if r.random() < 0.5 else gen.home_ip()), gen.device()
    mine: dict[str, str] = {}
    planned, add = _planner(gen)
    at = created + timedelta(seconds=r.randint(120, 6 * 3600))
    for _ in range(r.randint(1, 3)):
        if at >= gen.end:
            break
        big = r.random() < 0.10
        sku, qty = gen.big_basket() if big else gen.basket(LEGIT_MIX, below_cents=30000)
        _storefront(
            gen,
            add,
            pay_balance_p=0.3,
            at=at,
            label="legit",
            family="new_member",
            incident=key,
            buyer_kind="member",
            buyer=key,
            sku=sku,
            quantity=qty,
            fields=gen.target_fields(sku, mine),
            ip=ip,
            device=device,
        )
        at += timedelta(seconds=r.randint(600, 2 * 86400))
    return _take(gen, planned, budget)


def _vpn_user(gen: _Gen, budget: int) -> int:
    r = gen.rng
    planned, add = _planner(gen)
    mine: dict[str, str] = {}
    device = gen.device()
    if r.random() < 0.6:  # a guest behind a VPN
        ip = gen.proxy_ip()
        at = gen.moment()
        for _ in range(r.choice((1, 1, 2))):
            sku, qty = gen.pick(SMALL_MIX), 1
            _storefront(
                gen,
                add,
                pay_balance_p=0.0,
                at=at,
                label="legit",
                family="vpn_user",
                incident=device,
                buyer_kind="guest",
                buyer=device,
                sku=sku,
                quantity=qty,
                fields=gen.target_fields(sku, mine),
                ip=ip,
                device=device,
            )
            at += timedelta(seconds=r.randint(120, 1800))
        return _take(gen, planned, budget)
    # a member who always orders through their VPN; its exit is one of three addresses
    key = gen.member("vpn", gen.start - timedelta(days=r.uniform(30, 700)))
    exits = [gen.proxy_ip() for _ in range(3)]
    moments = [gen.history_moment() for _ in range(r.randint(1, 3))]
    moments += [gen.moment() for _ in range(r.randint(1, 3))]
    for at in moments:
        sku = gen.pick(SMALL_MIX)
        _storefront(
            gen,
            add,
            pay_balance_p=0.5,
            at=at,
            label="legit",
            family="vpn_user",
            incident=key,
            buyer_kind="member",
            buyer=key,
            sku=sku,
            quantity=1,
            fields=gen.target_fields(sku, mine),
            ip=r.choice(exits),
            device=device,
        )
    return _take(gen, planned, budget)


def _heavy_buyer(gen: _Gen, budget: int) -> int:
    r = gen.rng
    key = gen.member("heavy", gen.start - timedelta(days=r.uniform(200, 1500)))
    ip, device = gen.home_ip(), gen.device()
    mine: dict[str, str] = {}
    planned, add = _planner(gen)

    def session(at: datetime, n: int) -> None:
        for _ in range(n):
            sku, qty = gen.big_basket()
            _storefront(
                gen,
                add,
                pay_balance_p=0.7,
                at=at,
                label="legit",
                family="heavy_buyer",
                incident=key,
                buyer_kind="member",
                buyer=key,
                sku=sku,
                quantity=qty,
                fields=gen.target_fields(sku, mine),
                ip=ip,
                device=device,
            )
            at += timedelta(seconds=r.randint(120, 900))

    for _ in range(r.randint(2, 4)):
        session(gen.history_moment(), r.randint(1, 4))
    for _ in range(r.randint(2, 4)):
        session(gen.moment(), r.randint(2, 5))
    return _take(gen, planned, budget)


def _family(gen: _Gen, budget: int) -> int:
    """Two members (a parent and a child) topping up the child's game account or phone."""
    r = gen.rng
    home = gen.home_ip()
    shared_computer = r.random() < 0.5
    parent = gen.member("parent", gen.start - timedelta(days=r.uniform(60, 900)))
    child = gen.member("child", gen.start - timedelta(days=r.uniform(20, 400)))
    devices = {parent: gen.device(), child: gen.device()}
    if shared_computer:
        devices[child] = devices[parent]
    target_sku = ("GAME-68", "GAME-30", "GAME-648") if r.random() < 0.6 else ("PHONE-50",)
    mine: dict[str, str] = {}
    planned, add = _planner(gen)
    for who in (parent, child):
        moments = [gen.history_moment()] + [gen.moment() for _ in range(r.randint(1, 2))]
        for at in moments:
            sku = r.choice(target_sku)
            _storefront(
                gen,
                add,
                pay_balance_p=0.5,
                at=at,
                label="legit",
                family="family_shared_account",
                incident=parent,
                buyer_kind="member",
                buyer=who,
                sku=sku,
                quantity=1,
                fields=gen.target_fields(sku, mine),
                ip=home,
                device=devices[who],
            )
    return _take(gen, planned, budget)


def _reseller_burst(gen: _Gen, budget: int) -> int:
    r = gen.rng
    name = r.choice(RESELLERS)
    ip = _RESELLER_IPS[name]
    at = gen.moment()
    n = min(budget, int(math.exp(r.uniform(math.log(5), math.log(60)))))
    for i in range(n):
        sku = gen.pick(LEGIT_MIX)
        qty = r.randint(1, 10) if CATALOG[sku][3] == "card_key" else 1
        gen.order(
            at=at,
            label="legit",
            family="reseller_api",
            incident=f"{name}@{at:%d%H%M}",
            buyer_kind="reseller",
            buyer=name,
            pay="api",
            sku=sku,
            quantity=qty,
            fields=gen.target_fields(sku),
            ip=ip if i % 7 else _RESELLER_IPS2.get(name, ip),
            device="",
            scored=True,
        )
        at += timedelta(seconds=r.randint(2, 20))
    return n


_RESELLER_IPS = {name: f"47.{96 + i}.{10 * i + 3}.{20 + i}" for i, name in enumerate(RESELLERS)}
_RESELLER_IPS2 = {"shop-b": "47.100.8.9", "shop-e": "120.55.7.41"}  # a second server

LEGIT = {
    "returning_member": _returning_member,
    "guest": _guest,
    "reseller_api": _reseller_burst,
    "new_member": _new_member,
    "vpn_user": _vpn_user,
    "heavy_buyer": _heavy_buyer,
    "family_shared_account": _family,
}


# fraud families: each adds one incident's orders and returns how many counted ones it added


def _fraud_order(gen: _Gen, **kw: Any) -> OrderSpec:
    return gen.order(label="fraud", pay_after_s=gen.pay_after(fraud=True), **kw)


def _velocity_burst(gen: _Gen, budget: int) -> int:
    r = gen.rng
    size = int(math.exp(r.uniform(math.log(6), math.log(40))))
    size = max(6, min(size, budget))
    variant = r.choices(("one_ip_one_browser", "cookie_cleared", "rotating_ip"), (2, 1, 1))[0]
    incident = f"burst-{gen.next_id()}-{variant}"
    ip, device = (gen.mobile_ip() if r.random() < 0.3 else gen.home_ip()), gen.device()
    skus = {"STEAM-100": 4, "APPLE-100": 3, "STEAM-50": 2}
    at = gen.uniform_moment(gen.start, gen.end - timedelta(hours=2))
    paid = 0
    while paid < size:
        if variant == "cookie_cleared":
            device = gen.device()
        elif variant == "rotating_ip":
            ip = gen.home_ip()
        sku, qty = gen.pick(skus), r.choices((1, 2, 3), (7, 2, 1))[0]
        common = {
            "family": "velocity_burst",
            "incident": incident,
            "buyer_kind": "guest",
            "buyer": device,
            "pay": "gateway",
            "sku": sku,
            "quantity": qty,
            "ip": ip,
            "device": device,
        }
        if r.random() < 0.2:  # a stolen account the payer declines: never paid
            gen.order(at=at, label="fraud", pay_after_s=None, **common)
            at += timedelta(seconds=r.randint(25, 150))
            continue
        _fraud_order(gen, at=at, **common)
        paid += 1
        at += timedelta(seconds=r.randint(25, 150))
    return paid


def _account_many_buyers(gen: _Gen, budget: int) -> int:
    r = gen.rng
    kind = r.choices(("game", "qq", "phone"), (5, 3, 2))[0]
    sku = {"game": r.choice(("GAME-648", "GAME-68")), "qq": "QB-100", "phone": "PHONE-100"}[kind]
    fields = gen.target_fields(sku)
    incident = f"account-{gen.next_id()}-{kind}"
    t0 = gen.uniform_moment(gen.start, gen.end - timedelta(hours=9))
    span = r.uniform(1800, 8 * 3600)
    planned: list[tuple[datetime, str, str]] = []
    for _ in range(r.randint(3, 8)):
        device, ip = gen.device(), (gen.mobile_ip() if r.random() < 0.5 else gen.home_ip())
        for _ in range(r.choice((1, 1, 1, 1, 2))):
            planned.append((t0 + timedelta(seconds=r.random() * span), device, ip))
    planned.sort()
    planned = planned[: max(3, budget)]
    for at, device, ip in planned:
        _fraud_order(
            gen,
            at=at,
            family="account_many_buyers",
            incident=incident,
            buyer_kind="guest",
            buyer=device,
            pay="gateway",
            sku=sku,
            quantity=1,
            fields=fields,
            ip=ip,
            device=device,
        )
    return len(planned)


def _new_account_big(gen: _Gen, budget: int) -> int:
    r = gen.rng
    created = gen.uniform_moment(gen.start, gen.end - timedelta(hours=4))
    key = gen.member("fresh", created)
    ip, device = (gen.mobile_ip() if r.random() < 0.5 else gen.home_ip()), gen.device()
    at = created + timedelta(seconds=r.randint(120, 7200))
    n = min(budget, r.randint(1, 3))
    for _ in range(n):
        if r.random() < 0.8:
            sku, qty = r.choice(
                (
                    ("GAME-648", 1),
                    ("APPLE-500", 1),
                    ("STEAM-100", r.randint(4, 10)),
                    ("APPLE-100", r.randint(3, 10)),
                )
            )
        else:
            sku, qty = r.choice((("APPLE-100", 2), ("STEAM-100", 2), ("STEAM-100", 3)))
        _fraud_order(
            gen,
            at=at,
            family="new_account_big",
            incident=key,
            buyer_kind="member",
            buyer=key,
            pay="balance" if r.random() < 0.2 else "gateway",
            sku=sku,
            quantity=qty,
            fields=gen.target_fields(sku),
            ip=ip,
            device=device,
        )
        at += timedelta(seconds=r.randint(180, 1800))
    return n


def _proxy_fraud(gen: _Gen, budget: int) -> int:
    r = gen.rng
    ip, device = gen.proxy_ip(), gen.device()
    if r.random() < 0.7:
        kind, buyer, incident = "guest", device, f"proxy-{gen.next_id()}"
    else:
        buyer = gen.member("proxied", gen.start - timedelta(days=r.uniform(5, 30)))
        kind, incident = "member", buyer
    at = gen.uniform_moment(gen.start, gen.end - timedelta(hours=1))
    n = min(budget, r.randint(1, 3))
    for _ in range(n):
        if r.random() < 0.8:
            sku, qty = r.choice(
                (
                    ("APPLE-100", r.randint(1, 3)),
                    ("STEAM-100", r.randint(2, 5)),
                    ("QB-100", 1),
                    ("GAME-648", 1),
                    ("APPLE-500", 1),
                )
            )
        else:
            sku, qty = r.choice((("STEAM-50", 1), ("PHONE-50", 1), ("NETEASE-30", 3)))
        _fraud_order(
            gen,
            at=at,
            family="proxy_ip",
            incident=incident,
            buyer_kind=kind,
            buyer=buyer,
            pay="gateway",
            sku=sku,
            quantity=qty,
            fields=gen.target_fields(sku),
            ip=ip,
            device=device,
        )
        at += timedelta(seconds=r.randint(60, 600))
    return n


FRAUD = {
    "velocity_burst": _velocity_burst,
    "account_many_buyers": _account_many_buyers,
    "new_account_big": _new_account_big,
    "proxy_ip": _proxy_fraud,
}


def _budgets(total: int, shares: dict[str, float]) -> dict[str, int]:
    out = {k: round(total * v) for k, v in shares.items()}
    first = next(iter(shares))
    out[first] += total - sum(out.values())
    return out


def generate(
    *,
    seed: int = 7,
    orders: int = 2000,
    fraud_share: float = 0.05,
    days: float = 4.0,
    start: datetime = START,
) -> Dataset:
    """The labelled data set: `orders` counted (screened) orders, about `fraud_share` fraud,
    plus history before `start` and unpaid checkouts. Deterministic for a seed."""
    gen = _Gen(seed, start, days)
    fraud_target = round(orders * fraud_share)
    fraud = 0
    for family, budget in _budgets(fraud_target, FRAUD_SHARES).items():
        made = 0
        while made < budget:
            made += FRAUD[family](gen, budget - made)
        fraud += made
    for persona, budget in _budgets(orders - fraud, LEGIT_SHARES).items():
        made = 0
        while made < budget:
            made += LEGIT[persona](gen, budget - made)
    gen.orders.sort(key=lambda o: o.at)
    proxy_list = [*dict.fromkeys(gen.proxy_singles), *PROXY_NETS]
    return Dataset(
        seed=seed,
        start=gen.start,
        end=gen.end,
        members=gen.members,
        resellers=RESELLERS,
        proxy_list=proxy_list,
        orders=gen.orders,
    )


# -- running it through the platform --------------------------------------------------------------


def _kameng() -> SimpleNamespace:
    """The platform's modules, imported only when a run needs them (the generator does not)."""
    from sqlalchemy import select, text

    from kameng.catalog import service as catalog
    from kameng.catalog.fields import validate_fields
    from kameng.catalog.models import DeliveryKind
    from kameng.config import Settings
    from kameng.container import Container
    from kameng.db import table
    from kameng.errors import ErrorCode, KamengError
    from kameng.inventory.flows import import_lines
    from kameng.ledger import service as ledger
    from kameng.ledger.verify import verify
    from kameng.members import service as members
    from kameng.migrate import upgrade
    from kameng.orders import checkout
    from kameng.orders import screening as order_screening
    from kameng.orders import service as orders
    from kameng.orders.models import Order
    from kameng.payments import service as payments
    from kameng.payments.models import PaymentPurpose
    from kameng.payments.port import Confirmation
    from kameng.resellers import service as resellers
    from kameng.resellers.models import Reseller
    from kameng.risk import lists as risk_lists
    from kameng.risk import service as risk
    from kameng.risk.models import RuleSetStatus

    return SimpleNamespace(
        select=select,
        text=text,
        catalog=catalog,
        validate_fields=validate_fields,
        DeliveryKind=DeliveryKind,
        Settings=Settings,
        Container=Container,
        table=table,
        ErrorCode=ErrorCode,
        KamengError=KamengError,
        import_lines=import_lines,
        ledger=ledger,
        verify=verify,
        members=members,
        upgrade=upgrade,
        checkout=checkout,
        order_screening=order_screening,
        orders=orders,
        risk_lists=risk_lists,
        Order=Order,
        payments=payments,
        PaymentPurpose=PaymentPurpose,
        Confirmation=Confirmation,
        resellers=resellers,
        Reseller=Reseller,
        risk=risk,
        RuleSetStatus=RuleSetStatus,
    )


@dataclass
class RunResult:
    screening: bool
    order_ids: dict[int, int] = field(default_factory=dict)  # data set index -> order id
    txn_s: dict[int, float] = field(default_factory=dict)  # index -> placement + payment time
    outcomes: Counter[str] = field(default_factory=Counter)
    busy_s: float = 0.0  # time spent in this platform's transactions
    screenings: dict[int, dict[str, Any]] = field(default_factory=dict)  # order id -> live row
    books_clean: bool = False


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Platform:
    """One SQLite database with the data set's catalog, buyers, gateway and proxy list, taking
    the data set's events (placement, payment, expiry) through the real services."""

    def __init__(
        self,
        ds: Dataset,
        data_dir: Path,
        *,
        screening: bool,
        rules: list[dict[str, Any]] | None = None,
    ) -> None:
        k = self.k = _kameng()
        self.ds = ds
        data_dir.mkdir(parents=True, exist_ok=True)
        self.settings = k.Settings(
            data_dir=data_dir,
            master_key=MASTER_KEY_B64,
            app_secret="bench-app-secret",
            risk_screening=screening,
        )
        k.upgrade(self.settings.resolved_database_url)
        c = self.container = k.Container.build(self.settings)
        c.bootstrap()  # seeds the bundled rule set as version 1, live
        setup_at = ds.start - timedelta(days=1000)
        if rules is not None:
            with c.db.connect() as conn:
                saved = k.risk.save_rule_set(
                    conn, rules=rules, note="bench candidate", actor="staff:bench", now=setup_at
                )
                k.risk.activate(
                    conn,
                    version=saved.version,
                    mode=k.RuleSetStatus.live,
                    actor="staff:bench",
                    now=setup_at,
                )
        self._seed_catalog()
        self._seed_buyers(setup_at)
        with c.db.connect() as conn:
            k.payments.add_gateway(
                conn,
                vault=c.vault,
                code=GATEWAY,
                name="bench gateway",
                base_url="http://127.0.0.1:9",
                merchant_id="1001",
                key="bench-epay-key",
                now=setup_at,
            )
            self.gateway = k.payments.get_gateway(conn, code=GATEWAY)
            for entry in ds.proxy_list:
                k.risk_lists.add_list_entry(
                    conn,
                    which="proxy",
                    kind="ip",
                    value=entry,
                    note="bench: hosting / VPN exit",
                    actor="staff:bench",
                    now=setup_at,
                )
        self.engine = c.screening_engine  # None when screening is switched off
        assert (self.engine is not None) == screening, "risk_screening setting not honoured"
        self.deps = c.payment_deps
        self.result = RunResult(screening=screening)
        self.placed: dict[int, Any] = {}
        self._order = k.table(k.Order)

    def _seed_catalog(self) -> None:
        k, c, ds = self.k, self.container, self.ds
        # the product risk level is set on the product row: no staff tool sets it yet
        with c.db.unit_of_work() as session:
            products: dict[str, Any] = {}
            for code, (slug, price, level, kind, max_qty) in CATALOG.items():
                if slug not in products:
                    products[slug] = k.catalog.create_product(
                        session,
                        slug=slug,
                        name=slug,
                        category="bench",
                        delivery_kind=k.DeliveryKind(kind),
                        field_template=PRODUCT_FIELDS.get(slug, []),
                        max_quantity=max_qty,
                    )
                    products[slug].risk_level = level
                k.catalog.add_sku(
                    session,
                    product=products[slug],
                    code=code,
                    name=code,
                    price_cents=price,
                    cost_cents=price * 95 // 100,
                )
        c.invalidate_caches()
        need: Counter[str] = Counter()
        for o in ds.orders:
            if CATALOG[o.sku][3] == "card_key":
                need[o.sku] += o.quantity
        for code, n in need.items():
            k.import_lines(
                c,
                sku_code=code,
                lines=(f"{code}-{i:07d}-{ds.seed}" for i in range(n + 50)),
                source="bench",
                unit_cost_cents=CATALOG[code][1] * 95 // 100,
                actor="staff:bench",
            )
        self.skus = {code: c.sku(code) for code in CATALOG}

    def _seed_buyers(self, setup_at: datetime) -> None:
        k, c, ds = self.k, self.container, self.ds
        # one password hash for every member (argon2 is slow on purpose)
        password_hash = k.members.hash_password("bench-password-1")
        self.member_ids: dict[str, int] = {}
        self.wallets: dict[str, int] = {}
        balance_need: Counter[str] = Counter()
        for o in ds.orders:
            if o.pay == "balance":
                balance_need[o.buyer] += o.amount_cents
        with c.db.connect() as conn:
            for m in ds.members.values():
                mid = k.members.register(
                    conn,
                    email=m.email,
                    password_hash=password_hash,
                    language="zh-CN",
                    now=m.created_at,
                )
                self.member_ids[m.key] = mid
                self.wallets[m.key] = k.ledger.wallet_account(
                    conn, owner_type="member", owner_id=mid
                )
                if balance_need[m.key]:
                    k.ledger.topup(
                        conn,
                        wallet_id=self.wallets[m.key],
                        accounts=c.accounts,
                        amount=balance_need[m.key] + 10_000,
                        now=m.created_at,
                        actor="staff:bench",
                    )
        self.resellers: dict[str, tuple[int, int, int]] = {}  # name -> id, tier, wallet
        for name in ds.resellers:
            with c.db.unit_of_work() as session:
                issued = k.resellers.create_reseller(
                    session, c.vault, name=name, tier_code="normal", actor="staff:bench"
                )
                tier = session.scalar(
                    k.select(k.Reseller.tier_id).where(k.Reseller.id == issued.reseller_id)
                )
            with c.db.connect() as conn:
                wallet = k.resellers.reseller_wallet(conn, reseller_id=issued.reseller_id)
                k.ledger.topup(
                    conn,
                    wallet_id=wallet,
                    accounts=c.accounts,
                    amount=10**10,
                    now=setup_at,
                    actor="staff:bench",
                )
            self.resellers[name] = (issued.reseller_id, int(tier or 0), wallet)

    def handle(self, now: datetime, what: str, i: int) -> tuple[datetime, str] | None:
        """One event; returns the order's next event (its payment or its expiry), if any."""
        t0 = time.perf_counter()
        try:
            if what == "place":
                return self._place(now, i)
            if what == "pay":
                self._pay(now, i)
            else:
                self._expire(now, i)
            return None
        finally:
            self.result.busy_s += time.perf_counter() - t0

    def _place(self, now: datetime, i: int) -> tuple[datetime, str] | None:
        k, c, o, res = self.k, self.container, self.ds.orders[i], self.result
        sku = self.skus[o.sku]
        fields = k.validate_fields(list(sku.field_template), dict(o.fields))
        member_id = self.member_ids.get(o.buyer) if o.buyer_kind == "member" else None
        member = self.ds.members.get(o.buyer) if member_id else None
        if o.buyer_kind == "reseller":
            rid, tier, wallet = self.resellers[o.buyer]
            buyer = k.orders.Buyer(rid, wallet, f"reseller:{o.buyer}")
            price = c.unit_price(tier_id=tier, sku_id=sku.id)
            context = k.order_screening.Context(ip=o.ip)  # what the Reseller API passes
            channel, ref = "api", f"bench-{i}"
        else:
            actor = f"member:{member_id}" if member_id else "guest"
            if o.pay == "balance":
                buyer = k.orders.Buyer(None, self.wallets[o.buyer], actor, member_id=member_id)
            else:
                buyer = k.orders.Buyer(None, 0, actor, member_id=member_id, guest_key=o.device)
            price = sku.price_cents
            context = k.order_screening.Context(  # what the storefront passes
                ip=o.ip,
                device=o.device,
                email=member.email if member else "",
                buyer_since=member.created_at if member else None,
            )
            channel, ref = "storefront", ""
        confirm = False
        while True:
            cmd = k.orders.PlaceOrder(
                sku=sku,
                unit_price_cents=price,
                quantity=o.quantity,
                fields=fields,
                customer_ref=ref,
                confirm_duplicate=confirm,
                channel=channel,
            )
            t0 = time.perf_counter()
            try:
                with c.db.connect() as conn:
                    if o.pay in ("balance", "api"):
                        p = k.orders.place_order(
                            conn,
                            buyer=buyer,
                            cmd=cmd,
                            accounts=c.accounts,
                            vault=c.vault,
                            policy=c.policy,
                            now=now,
                            engine=self.engine,
                            context=context,
                        )
                    else:
                        p = k.checkout.place_pending(
                            conn,
                            buyer=buyer,
                            cmd=cmd,
                            vault=c.vault,
                            policy=c.policy,
                            now=now,
                            pay_window_s=self.settings.payment_window_s,
                            context=context,
                        )
                        k.payments.open_payment(
                            conn,
                            gateway=self.gateway,
                            purpose=k.PaymentPurpose.order,
                            pay_type="alipay",
                            amount_cents=p.amount_cents,
                            currency=CURRENCY,
                            expires_at=p.sla_deadline or now,
                            now=now,
                            checks=c.payment_checks,
                            order_id=p.order_id,
                            order_no=p.order_no,
                            member_id=member_id,
                        )
            except k.KamengError as exc:
                # The storefront asks "order the same again?"; the buyer confirms.
                if exc.code is k.ErrorCode.duplicate_order_suspected and not confirm:
                    res.outcomes["duplicate_prompt_confirmed"] += 1
                    confirm = True
                    continue
                raise
            res.txn_s[i] = time.perf_counter() - t0
            break
        self.placed[i] = p
        res.order_ids[i] = p.order_id
        res.outcomes[f"placed:{p.status.value}"] += 1
        if o.pay != "gateway":
            return None
        if o.pay_after_s is not None:
            return now + timedelta(seconds=o.pay_after_s), "pay"
        return p.sla_deadline, "expire"

    def _pay(self, now: datetime, i: int) -> None:
        k, c, p = self.k, self.container, self.placed[i]
        t0 = time.perf_counter()
        with c.db.connect() as conn:
            outcome = k.payments.apply_confirmation(
                conn,
                gateway=self.gateway,
                confirmation=k.Confirmation(
                    payment_no=p.order_no,
                    gateway_trade_no=f"GW{p.order_id:010d}",
                    amount_cents=p.amount_cents,
                    currency=CURRENCY,
                    pay_type="alipay",
                ),
                channel="notify",
                deps=self.deps,
                now=now,
            )
        self.result.txn_s[i] += time.perf_counter() - t0
        self.result.outcomes[f"paid:{outcome.value}"] += 1

    def _expire(self, now: datetime, i: int) -> None:
        k, c = self.k, self.container
        with c.db.connect() as conn:
            row = conn.execute(
                k.select(self._order).where(self._order.c.id == self.placed[i].order_id)
            ).one()
            expired = k.checkout.expire_unpaid(conn, order=row, now=now)
        self.result.outcomes[f"expired:{expired}"] += 1

    def finish(self) -> RunResult:
        k, c = self.k, self.container
        with c.db.connect(write=False) as conn:
            for row in conn.execute(
                k.text(
                    "SELECT order_id, action, rule_code, matched, latency_us "
                    "FROM risk_screenings WHERE mode = 'live'"
                )
            ):
                matched = row.matched
                if isinstance(matched, str):
                    matched = json.loads(matched)
                self.result.screenings[int(row.order_id)] = {
                    "action": row.action,
                    "rule": row.rule_code,
                    "matched": tuple(matched),
                    "latency_us": int(row.latency_us),
                }
            self.result.books_clean = bool(k.verify(conn).ok)
        c.close()
        return self.result


def run(ds: Dataset, platforms: list[Platform]) -> list[RunResult]:
    """Every event of the data set, in time order, on every platform in lockstep (which one
    goes first alternates, so both see the same machine load and cache warmth)."""
    events: list[tuple[datetime, int, str, int]] = []
    seq = itertools.count()
    for i, o in enumerate(ds.orders):
        heapq.heappush(events, (o.at, next(seq), "place", i))
    n = 0
    while events:
        now, _, what, i = heapq.heappop(events)
        turn = platforms if n % 2 == 0 else platforms[::-1]
        nexts = {p.handle(now, what, i) for p in turn}
        assert len(nexts) == 1, f"the platforms disagree about order {i}'s next event: {nexts}"
        follow = nexts.pop()
        if follow is not None:
            heapq.heappush(events, (follow[0], next(seq), follow[1], i))
        n += 1
    return [p.finish() for p in platforms]


# -- reporting ----------------------------------------------------------------------------------


def pct(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) / 100)))
    return ordered[rank - 1]


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def _fmt_pct(a: int, b: int) -> str:
    return f"{100 * _ratio(a, b):.1f} % ({a:,} / {b:,})"


@dataclass
class Scores:
    matrix: dict[tuple[str, str], int]
    fraud: int
    legit: int
    fpr: float
    recall: float
    review_rate: float
    block_precision: float
    targets: dict[str, tuple[str, bool]]


def evaluate_run(ds: Dataset, res: RunResult, rules: list[dict[str, Any]]) -> Scores:
    counted = [(i, o) for i, o in enumerate(ds.orders) if o.counted]
    decision: dict[int, dict[str, Any]] = {}
    missing = 0
    for i, _ in counted:
        row = res.screenings.get(res.order_ids.get(i, -1))
        if row is None:
            missing += 1
            continue
        decision[i] = row
    if missing:
        raise SystemExit(f"{missing} counted orders have no screening row: the run is broken")

    matrix: Counter[tuple[str, str]] = Counter()
    for i, o in counted:
        matrix[(o.label, decision[i]["action"])] += 1
    fraud = sum(v for (lab, _), v in matrix.items() if lab == "fraud")
    legit = sum(v for (lab, _), v in matrix.items() if lab == "legit")
    fraud_flagged = matrix[("fraud", "review")] + matrix[("fraud", "block")]
    legit_flagged = matrix[("legit", "review")] + matrix[("legit", "block")]
    reviewed = matrix[("fraud", "review")] + matrix[("legit", "review")]
    blocked = matrix[("fraud", "block")] + matrix[("legit", "block")]
    total = fraud + legit

    history = [o for o in ds.orders if not o.scored]
    unpaid = [o for o in ds.orders if o.scored and not o.paid]
    print(
        f"data set: seed {ds.seed}, {total:,} screened orders over "
        f"{(ds.end - ds.start).total_seconds() / 86400:g} days "
        f"({ds.start:%Y-%m-%d %H:%M} - {ds.end:%Y-%m-%d %H:%M} UTC): fraud {fraud:,} "
        f"({100 * fraud / total:.1f} %), legit {legit:,}; plus {len(history):,} history orders "
        f"before the window (screened, not counted) and {len(unpaid):,} checkouts never paid "
        f"(not screened; {sum(o.label == 'fraud' for o in unpaid)} of them fraud declines)"
    )
    print(
        f"members {len(ds.members):,}, resellers {len(ds.resellers)}, proxy list "
        f"{len(ds.proxy_list)} entries ({sum('/' in e for e in ds.proxy_list)} networks)"
    )
    print()
    print("confusion matrix (rows: truth; columns: decision)")
    print(f"  {'':8}{'allow':>8}{'review':>8}{'block':>8}{'total':>8}")
    for lab in ("fraud", "legit"):
        cells = [matrix[(lab, a)] for a in ("allow", "review", "block")]
        print(f"  {lab:8}" + "".join(f"{c:>8,}" for c in cells) + f"{sum(cells):>8,}")
    print()
    fpr = _ratio(legit_flagged, legit)
    recall = _ratio(fraud_flagged, fraud)
    review_rate = _ratio(reviewed, total)
    block_precision = _ratio(matrix[("fraud", "block")], blocked)
    targets = {
        "fpr": ("<= 2 %", fpr <= 0.02),
        "recall": (">= 90 %", recall >= 0.90),
        "review_rate": ("<= 10 %", review_rate <= 0.10),
    }
    print(
        f"false-positive rate  {_fmt_pct(legit_flagged, legit):<28} target <= 2 %   "
        f"{'PASS' if targets['fpr'][1] else 'FAIL'}"
    )
    print(
        f"recall               {_fmt_pct(fraud_flagged, fraud):<28} target >= 90 %  "
        f"{'PASS' if targets['recall'][1] else 'FAIL'}"
    )
    print(
        f"review rate          {_fmt_pct(reviewed, total):<28} target <= 10 %  "
        f"{'PASS' if targets['review_rate'][1] else 'FAIL'}"
    )
    print(
        "block precision      "
        + (_fmt_pct(matrix[("fraud", "block")], blocked) if blocked else "n/a (nothing blocked)")
    )
    precision = _ratio(fraud_flagged, fraud_flagged + legit_flagged)
    print(f"flag precision       {100 * precision:.1f} % of flagged orders are fraud")
    print()

    print("recall per fraud family (orders; incidents with at least one flagged order)")
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, o in counted:
        by_family[o.family].append(i)
    for family in FRAUD:
        idx = by_family.get(family, [])
        flagged = [i for i in idx if decision[i]["action"] != "allow"]
        incidents = {ds.orders[i].incident for i in idx}
        hit = {ds.orders[i].incident for i in flagged}
        print(
            f"  {family:<24}{_fmt_pct(len(flagged), len(idx)):<24}"
            f"incidents {len(hit)}/{len(incidents)}"
        )
    print("flag rate per legit persona (review / block)")
    for persona in LEGIT:
        idx = by_family.get(persona, [])
        rev = sum(decision[i]["action"] == "review" for i in idx)
        blk = sum(decision[i]["action"] == "block" for i in idx)
        print(f"  {persona:<24}{_fmt_pct(rev + blk, len(idx)):<24}({rev} / {blk})")
    print()

    print("rules: deciding (fraud / legit)  and  matching (fraud / legit)")
    deciding: Counter[tuple[str, str]] = Counter()
    matching: Counter[tuple[str, str]] = Counter()
    for i, o in counted:
        d = decision[i]
        if d["rule"]:
            deciding[(d["rule"], o.label)] += 1
        for code in d["matched"]:
            matching[(code, o.label)] += 1
    for rule in sorted(rules, key=lambda r: (r.get("priority", 100), r["code"])):
        code = rule["code"]
        print(
            f"  {code:<28}{rule['action']:<8}"
            f"{deciding[(code, 'fraud')]:>5} / {deciding[(code, 'legit')]:<6}"
            f"{matching[(code, 'fraud')]:>8} / {matching[(code, 'legit')]:<6}"
        )
    fp_by_rule = Counter(
        decision[i]["rule"]
        for i, o in counted
        if o.label == "legit" and decision[i]["action"] != "allow"
    )
    fn_families = Counter(
        o.family for i, o in counted if o.label == "fraud" and decision[i]["action"] == "allow"
    )
    print(f"legit flagged, by deciding rule: {dict(fp_by_rule.most_common())}")
    print(f"fraud allowed, by family: {dict(fn_families.most_common())}")
    # An attack's first paid order has nothing before it to count: screening at order time
    # sees a fresh guest or a first payer, like a legit one (a small proxy order also looks like
    # a VPN user's). How many misses are those says how far recall is from what order-time
    # screening can reach on this data set.
    first_of_incident: set[int] = set()
    seen_incidents: set[str] = set()
    for i, o in sorted(counted, key=lambda io: io[1].at):
        if o.label == "fraud" and o.incident not in seen_incidents:
            seen_incidents.add(o.incident)
            first_of_incident.add(i)
    missed_first = sum(1 for i in first_of_incident if decision[i]["action"] == "allow")
    missed = sum(fn_families.values())
    later_flagged = fraud_flagged - (len(first_of_incident) - missed_first)
    print(
        f"fraud allowed that was its attack's first order: {missed_first} of {missed}; "
        f"recall on the attacks' later orders "
        f"{_fmt_pct(later_flagged, fraud - len(first_of_incident))}"
    )
    print()
    return Scores(
        matrix=dict(matrix),
        fraud=fraud,
        legit=legit,
        fpr=fpr,
        recall=recall,
        review_rate=review_rate,
        block_precision=block_precision,
        targets=targets,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--orders", type=int, default=2000, help="screened orders (>= 1,000)")
    parser.add_argument("--days", type=float, default=4.0)
    parser.add_argument("--fraud-share", type=float, default=0.05)
    parser.add_argument(
        "--rules",
        type=Path,
        help="screen with this rule set (a JSON list, saved and made live like a staff edit) "
        "instead of the bundled one",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the screening-off run (no latency ratio)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (SQLite files)")
    args = parser.parse_args()
    if args.orders < 1000:
        parser.error("--orders: at least 1,000")

    from kameng.risk.defaults import DEFAULT_RULES

    rules = json.loads(args.rules.read_text()) if args.rules else None
    t0 = time.perf_counter()
    ds = generate(seed=args.seed, orders=args.orders, fraud_share=args.fraud_share, days=args.days)
    _log(f"generated {len(ds.orders):,} orders in {time.perf_counter() - t0:.2f} s")
    tmp = Path(tempfile.mkdtemp(prefix="kameng-risk-bench-"))
    try:
        t0 = time.perf_counter()
        platforms = [Platform(ds, tmp / "on", screening=True, rules=rules)]
        if not args.no_baseline:
            platforms.append(Platform(ds, tmp / "off", screening=False))
        _log(f"seeded {len(platforms)} database(s) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        results = run(ds, platforms)
        _log(f"ran every event in {time.perf_counter() - t0:.1f} s")
        on = results[0]
        off = results[1] if len(results) > 1 else None
        for r in results:
            _log(f"screening {'on ' if r.screening else 'off'}: {dict(sorted(r.outcomes.items()))}")

        print(f"machine: {machine()}")
        print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
        print(f"rule set: {args.rules or 'bundled (kameng.risk.defaults.DEFAULT_RULES)'}")
        print()
        scores = evaluate_run(ds, on, rules if rules is not None else DEFAULT_RULES)

        counted = [i for i, o in enumerate(ds.orders) if o.counted]
        lat_us = [on.screenings[on.order_ids[i]]["latency_us"] for i in counted]
        on_ms = [on.txn_s[i] * 1000 for i in counted]
        print("latency (SQLite file, one process, one transaction at a time)")
        print(
            f"  screening itself (risk_screenings.latency_us): p50 {pct(lat_us, 50):,.0f} us, "
            f"p99 {pct(lat_us, 99):,.0f} us, max {max(lat_us):,} us"
        )
        print(
            f"  an order's transactions (placement + payment), screening on:  p50 "
            f"{pct(on_ms, 50):.2f} ms, p99 {pct(on_ms, 99):.2f} ms, mean "
            f"{sum(on_ms) / len(on_ms):.2f} ms"
        )
        kv_lat = (
            f"screen_p50_us={pct(lat_us, 50):.0f} screen_p99_us={pct(lat_us, 99):.0f} "
            f"order_p50_ms={pct(on_ms, 50):.2f} order_p99_ms={pct(on_ms, 99):.2f}"
        )
        if off is not None:
            off_ms = [off.txn_s[i] * 1000 for i in counted]
            mean_on, mean_off = sum(on_ms) / len(on_ms), sum(off_ms) / len(off_ms)
            print(
                f"  baseline, the same orders with screening off (same run, in lockstep): p50 "
                f"{pct(off_ms, 50):.2f} ms, p99 {pct(off_ms, 99):.2f} ms, mean {mean_off:.2f} ms"
            )
            print(
                f"  ratio on/off: p50 {pct(on_ms, 50) / pct(off_ms, 50):.2f}, p99 "
                f"{pct(on_ms, 99) / pct(off_ms, 99):.2f}, mean {mean_on / mean_off:.2f}: "
                f"screening costs {mean_on - mean_off:.2f} ms per order; all transactions "
                f"{on.busy_s:.1f} s against {off.busy_s:.1f} s"
            )
            kv_lat += (
                f" off_p50_ms={pct(off_ms, 50):.2f} off_p99_ms={pct(off_ms, 99):.2f} "
                f"ratio_mean={mean_on / mean_off:.2f} screening_cost_ms={mean_on - mean_off:.2f}"
            )
        books = all(r.books_clean for r in results)
        print(f"books clean: {books}")
        met = all(ok for _, ok in scores.targets.values())
        print()
        for name, (want, ok) in scores.targets.items():
            print(f"{name}: {'PASS' if ok else 'FAIL'} (target {want})")
        print(
            f"orders={scores.fraud + scores.legit} fraud={scores.fraud} legit={scores.legit} "
            f"seed={args.seed} fpr={scores.fpr:.4f} recall={scores.recall:.4f} "
            f"review_rate={scores.review_rate:.4f} block_precision={scores.block_precision:.4f} "
            f"{kv_lat} books_clean={int(books)} targets_met={int(met)}"
        )
        if not met or not books:
            sys.exit(1)
    finally:
        if args.keep:
            _log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
