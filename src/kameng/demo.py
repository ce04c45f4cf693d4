"""`kameng demo`: a small, realistic catalog with stock and a funded demo reseller.

Safe to run again on its own database: existing products are kept, stock is topped up to the
requested level, and the demo reseller and admin get fresh credentials (a secret can only be
shown when it is issued). A bundled supplier simulator is connected behind the top-ups and, when
own stock runs out, the card keys; `kameng serve --demo-supplier` runs it.

It refuses a database that holds anything it did not create (see `kameng.demo_census`): its
gateway and supplier are simulators anyone can "pay" through. Every secret it sets up (the
gateway's merchant key, the supplier's signing secret, the buyer's password, the reseller's
API secret, the admin token) is generated for this installation, never taken from the source:
the gateway key and supplier secret live sealed in the database, where `kameng serve
--demo-gateway --demo-supplier` reads them, and what a developer needs is printed and saved to
`<data_dir>/demo-credentials.json` (0600).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from sqlalchemy import select, update

from kameng import demo_census
from kameng.catalog import service as catalog
from kameng.catalog.models import DeliveryKind, Product
from kameng.container import Container
from kameng.db import table
from kameng.errors import ErrorCode, KamengError
from kameng.inventory import service as inventory
from kameng.inventory.flows import import_lines
from kameng.ledger import service as ledger
from kameng.members import service as members
from kameng.payments import service as payments
from kameng.payments.gateway_sim.app import DEFAULT_KEY as SIM_PUBLISHED_GATEWAY_KEY
from kameng.resellers import service as resellers
from kameng.resellers.models import Reseller
from kameng.resellers.service import IssuedCredential
from kameng.suppliers import service as suppliers
from kameng.suppliers.models import Supplier
from kameng.suppliers.simulator.app import DEFAULT_MERCHANT_SECRET as SIM_PUBLISHED_SECRET

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
DEMO_SUPPLIER_API_KEY = "demo-merchant"  # an account name at the simulator, not a secret
# Secrets printed in the simulators' source and docs: an older `kameng demo` configured them, so
# a database that still holds one gets a generated secret instead.
PUBLISHED_SECRETS = frozenset({SIM_PUBLISHED_GATEWAY_KEY, SIM_PUBLISHED_SECRET})
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


def credentials_path(container: Container) -> Path:
    return Path(container.settings.data_dir) / "demo-credentials.json"


def _supplier_secret(container: Container, row: Any) -> str:
    return container.vault.unseal(bytes(row.sealed_secret), suppliers.secret_context(row.code))


def seed_supplier(container: Container) -> tuple[str, str]:
    """Connect the demo simulator as a supplier and offer it behind the demo SKUs; returns the
    (api key, secret) the simulator must be started with."""
    path = demo_supplier_config_path(container)
    path.write_text(json.dumps(DEMO_SUPPLIER_CONFIG, ensure_ascii=False, indent=2))
    now = container.clock()
    with container.db.connect() as conn:
        existing = {row.code: row for row in suppliers.all_suppliers(conn)}
        if DEMO_SUPPLIER in existing:
            row = existing[DEMO_SUPPLIER]
            supplier_id, api_key = row.id, row.api_key
            secret = _supplier_secret(container, row)
            if secret in PUBLISHED_SECRETS:
                secret = secrets.token_urlsafe(32)
                # The suppliers service has no way to change a secret yet; only the demo
                # needs one, for its own row.
                conn.execute(
                    update(table(Supplier))
                    .where(table(Supplier).c.id == supplier_id)
                    .values(
                        sealed_secret=container.vault.seal(
                            secret, suppliers.secret_context(DEMO_SUPPLIER)
                        )
                    )
                )
        else:
            api_key, secret = DEMO_SUPPLIER_API_KEY, secrets.token_urlsafe(32)
            supplier_id = suppliers.create_supplier(
                conn,
                container.vault,
                code=DEMO_SUPPLIER,
                name="演示上游 (simulator)",
                adapter="simulator",
                base_url=f"http://127.0.0.1:{DEMO_SUPPLIER_PORT}",
                api_key=api_key,
                secret=secret,
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
    return api_key, secret


DEMO_GATEWAY = "demo-epay"
DEMO_GATEWAY_PORT = 8702
DEMO_GATEWAY_PID = "1001"  # the merchant number at the simulator, not a secret
DEMO_MEMBER_EMAIL = "buyer@kameng.test"
DEMO_MEMBER_BALANCE_CENTS = 10_000  # ¥100.00


def seed_gateway(container: Container) -> tuple[str, str]:
    """The bundled EPay simulator as the demo's payment gateway (`kameng serve --demo-gateway`);
    returns the (pid, merchant key) the simulator must be started with."""
    with container.db.connect() as conn:
        row = next((g for g in payments.list_gateways(conn) if g.code == DEMO_GATEWAY), None)
        if row is None:
            key = secrets.token_hex(16)
            payments.add_gateway(
                conn,
                vault=container.vault,
                code=DEMO_GATEWAY,
                name="易支付（演示网关）",
                base_url=f"http://127.0.0.1:{DEMO_GATEWAY_PORT}",
                merchant_id=DEMO_GATEWAY_PID,
                key=key,
                pay_types="alipay,wxpay",
                now=container.clock(),
            )
            return DEMO_GATEWAY_PID, key
        key = payments.gateway_key(container.vault, row)
        if key in PUBLISHED_SECRETS:
            key = secrets.token_hex(16)
            payments.set_gateway_key(conn, vault=container.vault, code=DEMO_GATEWAY, key=key)
        return str(row.merchant_id), key


def _saved_member_password(container: Container) -> str | None:
    try:
        saved = json.loads(credentials_path(container).read_text())
    except (OSError, ValueError):
        return None
    password = saved.get("member_password") if isinstance(saved, dict) else None
    return password if isinstance(password, str) else None


def seed_member(container: Container) -> str:
    """A demo buyer account with a little balance, so both ways of paying can be tried; returns
    its password. The password saved by the last run is kept while it still opens the account
    (a developer's browser remembers it); otherwise a new one is generated."""
    saved = _saved_member_password(container)
    with container.db.connect() as conn:
        member_id = members.find_member(conn, email=DEMO_MEMBER_EMAIL)
        password = saved
        if member_id is not None and saved is not None:
            try:
                members.authenticate(conn, email=DEMO_MEMBER_EMAIL, password=saved)
            except KamengError:
                password = None
        if member_id is None or password is None:
            password = secrets.token_urlsafe(12)
            password_hash = members.hash_password(password)
            if member_id is None:
                member_id = members.register(
                    conn,
                    email=DEMO_MEMBER_EMAIL,
                    password_hash=password_hash,
                    language="zh-CN",
                    now=container.clock(),
                )
            else:
                members.set_password_hash(conn, member_id=member_id, password_hash=password_hash)
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
    return password


def seed_staff(container: Container) -> str:
    """An admin token for the staff API (review queue, risk rules); a new one on each seed."""
    from kameng.staff import service as staff

    with container.db.connect() as conn:
        now = container.clock()
        if any(r["name"] == DEMO_STAFF for r in staff.list_staff(conn)):
            return staff.rotate(conn, name=DEMO_STAFF, actor="system:demo", now=now).token
        return staff.create(conn, name=DEMO_STAFF, role="admin", actor="system:demo", now=now)


@dataclass(frozen=True)
class DemoCredentials:
    """Everything a developer needs to use the demo; shown once and saved 0600."""

    reseller: IssuedCredential
    staff_token: str
    member_password: str
    gateway_pid: str
    gateway_key: str
    supplier_api_key: str
    supplier_secret: str

    def as_dict(self) -> dict[str, str]:
        return {
            "reseller": self.reseller.name,
            "api_key": self.reseller.api_key,
            "api_secret": self.reseller.api_secret,
            "staff": DEMO_STAFF,
            "staff_token": self.staff_token,
            "member_email": DEMO_MEMBER_EMAIL,
            "member_password": self.member_password,
            "gateway": DEMO_GATEWAY,
            "gateway_pid": self.gateway_pid,
            "gateway_key": self.gateway_key,
            "supplier": DEMO_SUPPLIER,
            "supplier_api_key": self.supplier_api_key,
            "supplier_secret": self.supplier_secret,
        }


def own_rows() -> dict[str, frozenset[str]]:
    """The names of the rows the demo creates, per kind `demo_census` checks."""
    return {
        "products": frozenset(spec["slug"] for spec in PRODUCTS),
        "skus": frozenset(sku[0] for spec in PRODUCTS for sku in spec["skus"]),
        "suppliers": frozenset({DEMO_SUPPLIER}),
        "gateways": frozenset({DEMO_GATEWAY}),
        "resellers": frozenset({DEMO_RESELLER}),
        "staff": frozenset({DEMO_STAFF}),
    }


def _seeded_by_older_demo(container: Container, conn: Any) -> bool:
    """A database an older `kameng demo` seeded, before it marked its databases: its gateway
    still takes the merchant key printed in the simulator's source."""
    try:
        row = payments.get_gateway(conn, code=DEMO_GATEWAY)
        return payments.gateway_key(container.vault, row) in PUBLISHED_SECRETS
    except (KamengError, InvalidTag):  # no such gateway, or sealed under another master key
        return False


def census(container: Container) -> demo_census.Census:
    """What in the database the demo did not create (nothing is written)."""
    with container.db.connect(write=False) as conn:
        owned = demo_census.is_marked(conn) or _seeded_by_older_demo(container, conn)
        return demo_census.take(conn, own=own_rows(), demo_owned=owned)


def seed(
    container: Container,
    *,
    keys_per_sku: int = 200,
    force: bool = False,
    on_forced: Callable[[str], None] | None = None,
) -> DemoCredentials:
    """Seed the demo and save its credentials. A database holding anything the demo did not
    create is refused (`demo_database_in_use`) before anything is written, unless `force`;
    `on_forced` then hears what is being overridden, before the work starts."""
    found = census(container)
    if found.foreign:
        if not force:
            raise KamengError(ErrorCode.demo_database_in_use, found=found.summary())
        if on_forced is not None:
            on_forced(found.summary())
    container.bootstrap()
    _seed_catalog(container, keys_per_sku=keys_per_sku)
    supplier_api_key, supplier_secret = seed_supplier(container)
    gateway_pid, gateway_key = seed_gateway(container)
    member_password = seed_member(container)
    issued = _seed_reseller(container)
    staff_token = seed_staff(container)
    with container.db.connect() as conn:
        demo_census.mark(conn, census=found, now=container.clock())
    credentials = DemoCredentials(
        reseller=issued,
        staff_token=staff_token,
        member_password=member_password,
        gateway_pid=gateway_pid,
        gateway_key=gateway_key,
        supplier_api_key=supplier_api_key,
        supplier_secret=supplier_secret,
    )
    _save(credentials_path(container), credentials.as_dict())
    return credentials


def _save(path: Path, data: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def _seed_catalog(container: Container, *, keys_per_sku: int) -> None:
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


def _seed_reseller(container: Container) -> IssuedCredential:
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


def demo_gateway_merchant(container: Container) -> tuple[str, str]:
    """The (pid, key) the gateway simulator of `kameng serve --demo-gateway` accepts: the demo
    gateway's own, from the database."""
    with container.db.connect(write=False) as conn:
        row = payments.get_gateway(conn, code=DEMO_GATEWAY)
    return str(row.merchant_id), _not_published(payments.gateway_key(container.vault, row))


def demo_supplier_credentials(container: Container) -> tuple[str, str]:
    """The (api key, secret) the supplier simulator of `kameng serve --demo-supplier` accepts:
    the demo supplier's own, from the database."""
    with container.db.connect(write=False) as conn:
        row = suppliers.supplier_by_code(conn, DEMO_SUPPLIER)
    return str(row.api_key), _not_published(_supplier_secret(container, row))


def _not_published(secret: str) -> str:
    if secret in PUBLISHED_SECRETS:
        raise KamengError(
            ErrorCode.invalid_request,
            detail="the demo still uses a secret published in the source: run `kameng demo`",
        )
    return secret
