"""`kameng demo`: a small, realistic catalog with stock and a funded demo reseller.

Safe to run again: existing products are kept, stock is topped up to the requested level, and
the demo reseller gets a fresh key (a secret can only be shown when it is issued).
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select

from kameng.catalog import service as catalog
from kameng.catalog.models import DeliveryKind, Product
from kameng.container import Container
from kameng.inventory import service as inventory
from kameng.inventory.flows import import_lines
from kameng.ledger import service as ledger
from kameng.resellers import service as resellers
from kameng.resellers.models import Reseller
from kameng.resellers.service import IssuedCredential

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
                "name": "server",
                "type": "select",
                "label": "区服",
                "label_en": "Server",
                "options": ["华东一区", "华南一区", "华北一区"],
            },
        ],
        "skus": [("GAME-60", "60 钻石", "60钻", 600, 560)],
    },
]


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
