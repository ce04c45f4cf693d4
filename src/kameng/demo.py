"""`kameng demo`: a small, realistic catalog with stock and a funded demo reseller.

Safe to run again: existing products are kept, stock is topped up to the requested level, and
the demo reseller gets a fresh key (a secret can only be shown when it is issued). A bundled
supplier simulator is connected behind the top-ups and, when own stock runs out, the card keys;
`kameng serve --demo-supplier` runs it.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kameng.catalog import service as catalog
from kameng.catalog.models import DeliveryKind, Product
from kameng.container import Container
from kameng.inventory import service as inventory
from kameng.inventory.flows import import_lines
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.payments import service as payments
from kameng.resellers import service as resellers
from kameng.resellers.models import Reseller
from kameng.resellers.service import IssuedCredential
from kameng.suppliers import service as suppliers

DEMO_RESELLER = "demo"
DEMO_BALANCE_CENTS = 1_000_000  # ¥10,000.00

PRODUCTS: list[dict[str, Any]] = [
    {
        "slug": "steam-wallet",
        "name": "Steam 钱包充值卡",
        "category": "游戏点卡",
        "kind": DeliveryKind.card_key,
        "fields": [],
        "skus": [
            ("STEAM-50", "Steam 50 元", "50元", 4850, 4700),
            ("STEAM-100", "Steam 100 元", "100元", 9650, 9400),
        ],
    },
    {
        "slug": "netease-points",
        "name": "网易一卡通",
        "category": "游戏点卡",
        "kind": DeliveryKind.card_key,
        "fields": [],
        "skus": [("NETEASE-30", "网易一卡通 30 元", "30元", 2880, 2790)],
    },
    {
        "slug": "mobile-topup",
        "name": "手机话费直充",
        "category": "话费充值",
        "kind": DeliveryKind.direct_topup,
        "fields": [
            {"name": "phone", "type": "phone_cn", "label": "手机号", "label_en": "Mobile number"}
        ],
        "skus": [
            ("PHONE-50", "话费 50 元", "50元", 4980, 4900),
            ("PHONE-100", "话费 100 元", "100元", 9950, 9800),
        ],
    },
    {
        "slug": "game-direct",
        "name": "游戏账号直充",
        "category": "游戏直充",
        "kind": DeliveryKind.manual,
        "fields": [
            {
                "name": "account",
                "type": "text",
                "label": "游戏账号",
                "label_en": "Game account",
                "pattern": "[A-Za-z0-9_@.]{4,32}",
            },
            {
                "name": "region",
                "type": "select",
                "label": "大区",
                "label_en": "Region",
                "options": ["华东", "华南"],
            },
            {
                "name": "server",
                "type": "select",
                "label": "服务器",
                "label_en": "Server",
                "options_by": {
                    "field": "region",
                    "options": {"华东": ["华东一区", "华东二区"], "华南": ["华南一区"]},
                },
            },
        ],
        "skus": [("GAME-60", "60 钻石", "60钻", 600, 560)],
    },
    {
        "slug": "bulk-gift-cards",
        "name": "企业礼品卡（批发，需资质）",
        "category": "企业采购",
        "kind": DeliveryKind.card_key,
        "fields": [],
        "qualification": "business_license",
        "risk_level": 2,
        "skus": [("GIFT-1000", "礼品卡 1000 元", "1000元", 98000, 96000)],
    },
]
DEMO_STAFF = "demo-admin"


DEMO_SUPPLIER = "demo-sim"
DEMO_SUPPLIER_PORT = 8701
DEMO_MERCHANT = ("demo-merchant", "demo-merchant-secret")  # the simulator's published demo pair
# The bundled simulator behind the demo: top-ups are always procured upstream (one by callback,
# one answered at once), and card keys fall back to it when our own stock runs out. Latencies
# are real enough to watch an order move through its stages.
DEMO_SUPPLIER_CONFIG: dict[str, Any] = {
    "balance_cents": 50_000_000,
    "skus": [
        {
            "sku": "SIM-PHONE-50",
            "name": "话费 50",
            "kind": "direct_topup",
            "price_cents": 4900,
            "required_fields": ["phone"],
            "account_field": "phone",  # its pre-check: a number ending in 0000 does not exist
            "mode": "callback",
            "callback_delay_ms": 1500,
            "latency_ms": {"dist": "uniform", "min": 150, "max": 600},
        },
        {
            "sku": "SIM-PHONE-100",
            "name": "话费 100",
            "kind": "direct_topup",
            "price_cents": 9800,
            "required_fields": ["phone"],
            "account_field": "phone",
            "latency_ms": {"dist": "uniform", "min": 300, "max": 900},
        },
        {
            "sku": "SIM-STEAM-50",
            "name": "Steam 50",
            "kind": "card_key",
            "price_cents": 4750,
            "stock": 50,
            "restock": {"every_s": 60, "amount": 10},
            "latency_ms": {"dist": "lognormal", "p50": 250, "p99": 1200},
        },
        {
            "sku": "SIM-STEAM-100",
            "name": "Steam 100",
            "kind": "card_key",
            "price_cents": 9450,
            "mode": "callback",
            "callback_delay_ms": 2000,
        },
        {
            "sku": "SIM-NETEASE-30",
            "name": "网易 30",
            "kind": "card_key",
            "price_cents": 2800,
            "stock": 5,
            "restock": {"every_s": 120, "amount": 5},
        },
    ],
}
DEMO_OFFERS = [
    ("PHONE-50", "SIM-PHONE-50", 4900),
    ("PHONE-100", "SIM-PHONE-100", 9800),
    ("STEAM-50", "SIM-STEAM-50", 4750),
    ("STEAM-100", "SIM-STEAM-100", 9450),
    ("NETEASE-30", "SIM-NETEASE-30", 2800),
]


def demo_supplier_config_path(container: Container) -> Path:
    return Path(container.settings.data_dir) / "demo-supplier.json"


def seed_supplier(container: Container) -> None:
    """Connect the demo simulator as a supplier and offer it behind the demo SKUs."""
    path = demo_supplier_config_path(container)
    path.write_text(json.dumps(DEMO_SUPPLIER_CONFIG, ensure_ascii=False, indent=2))
    now = container.clock()
    with container.db.connect() as conn:
        existing = {row.code: row for row in suppliers.all_suppliers(conn)}
        if DEMO_SUPPLIER in existing:
            supplier_id = existing[DEMO_SUPPLIER].id
        else:
            supplier_id = suppliers.create_supplier(
                conn,
                container.vault,
                code=DEMO_SUPPLIER,
                name="演示上游 (simulator)",
                adapter="simulator",
                base_url=f"http://127.0.0.1:{DEMO_SUPPLIER_PORT}",
                api_key=DEMO_MERCHANT[0],
                secret=DEMO_MERCHANT[1],
                timeout_ms=5000,
                now=now,
            )
        for ours, theirs, cost in DEMO_OFFERS:
            suppliers.add_offer(
                conn,
                sku_id=container.sku(ours, conn=conn).id,
                supplier_id=supplier_id,
                supplier_sku=theirs,
                cost_cents=cost,
                now=now,
            )
    container.invalidate_caches()


DEMO_GATEWAY = "demo-epay"
DEMO_GATEWAY_PORT = 8702
DEMO_GATEWAY_MERCHANT = ("1001", "demo-epay-key")  # the gateway simulator's published demo pair
DEMO_MEMBER = ("buyer@kameng.test", "kameng-demo")
DEMO_MEMBER_BALANCE_CENTS = 10_000  # ¥100.00


def seed_gateway(container: Container) -> None:
    """The bundled EPay simulator as the demo's payment gateway (`kameng serve --demo-gateway`)."""
    with container.db.connect() as conn:
        if any(g.code == DEMO_GATEWAY for g in payments.list_gateways(conn)):
            return
        payments.add_gateway(
            conn,
            vault=container.vault,
            code=DEMO_GATEWAY,
            name="易支付（演示网关）",
            base_url=f"http://127.0.0.1:{DEMO_GATEWAY_PORT}",
            merchant_id=DEMO_GATEWAY_MERCHANT[0],
            key=DEMO_GATEWAY_MERCHANT[1],
            pay_types="alipay,wxpay",
            now=container.clock(),
        )


def seed_member(container: Container) -> None:
    """A demo buyer account with a little balance, so both ways of paying can be tried."""
    email, password = DEMO_MEMBER
    with container.db.connect() as conn:
        member_id = members.find_member(conn, email=email)
        if member_id is None:
            member_id = members.register(
                conn, email=email, password=password, language="zh-CN", now=container.clock()
            )
        wallet = ledger.wallet_account(conn, owner_type="member", owner_id=member_id)
        available, _ = ledger.balances(conn, wallet_id=wallet)
        if available < DEMO_MEMBER_BALANCE_CENTS:
            ledger.topup(
                conn,
                wallet_id=wallet,
                accounts=container.accounts,
                amount=DEMO_MEMBER_BALANCE_CENTS - available,
                now=container.clock(),
                actor="system:demo",
                memo="demo member balance",
            )


def seed_staff(container: Container) -> str:
    """An admin token for the staff API (review queue, risk rules); a new one on each seed."""
    from kameng.staff import service as staff

    with container.db.connect() as conn:
        now = container.clock()
        if any(r["name"] == DEMO_STAFF for r in staff.list_staff(conn)):
            return staff.rotate(conn, name=DEMO_STAFF, actor="system:demo", now=now).token
        return staff.create(conn, name=DEMO_STAFF, role="admin", actor="system:demo", now=now)


def seed(container: Container, *, keys_per_sku: int = 200) -> IssuedCredential:
    container.bootstrap()
    with container.db.unit_of_work() as session:
        for spec in PRODUCTS:
            if session.scalar(select(Product.id).where(Product.slug == spec["slug"])):
                continue
            product = catalog.create_product(
                session,
                slug=spec["slug"],
                name=spec["name"],
                category=spec["category"],
                delivery_kind=spec["kind"],
                field_template=spec["fields"],
            )
            if spec.get("qualification"):
                product.requires_qualification = True
                product.qualification_kind = spec["qualification"]
            product.risk_level = int(spec.get("risk_level", 0))
            for code, name, denom, price, cost in spec["skus"]:
                catalog.add_sku(
                    session,
                    product=product,
                    code=code,
                    name=name,
                    denomination=denom,
                    price_cents=price,
                    cost_cents=cost,
                )
    container.invalidate_caches()
    with container.db.connect(write=False) as conn:
        counts = inventory.available_counts(conn)
    for spec in PRODUCTS:
        if spec["kind"] is not DeliveryKind.card_key:
            continue
        for code, *_ in spec["skus"]:
            sku = container.sku(code)
            missing = keys_per_sku - counts.get(sku.id, 0)
            if missing > 0:
                lines = (
                    f"{code}-{secrets.token_hex(8).upper()},{secrets.token_hex(4)}"
                    for _ in range(missing)
                )
                import_lines(
                    container,
                    sku_code=code,
                    lines=lines,
                    source="demo",
                    unit_cost_cents=sku.cost_cents,
                    actor="system:demo",
                )
    seed_supplier(container)
    seed_gateway(container)
    seed_member(container)
    with container.db.unit_of_work() as session:
        exists = session.scalar(select(Reseller.id).where(Reseller.name == DEMO_RESELLER))
        if exists:
            issued = resellers.rotate_credentials(
                session, container.vault, name=DEMO_RESELLER, actor="system:demo"
            )
        else:
            issued = resellers.create_reseller(
                session,
                container.vault,
                name=DEMO_RESELLER,
                tier_code="silver",
                actor="system:demo",
            )
        conn = session.connection()
        wallet = resellers.reseller_wallet(conn, reseller_id=issued.reseller_id)
        available, _ = ledger.balances(conn, wallet_id=wallet)
        if available < DEMO_BALANCE_CENTS:
            ledger.topup(
                conn,
                wallet_id=wallet,
                accounts=container.accounts,
                amount=DEMO_BALANCE_CENTS - available,
                now=container.clock(),
                actor="system:demo",
                memo="demo balance",
            )
    return issued
