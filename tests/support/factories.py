"""Building blocks for tests: migrated databases, containers, catalog, stock and resellers.

Everything goes through the real services and the real migrations — no fixtures that write
rows behind the platform's back.
"""

from __future__ import annotations

import atexit
import secrets
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from kameng.apiclient import ResellerClient
from kameng.catalog import service as catalog
from kameng.catalog.models import DeliveryKind
from kameng.config import Settings
from kameng.container import Container
from kameng.inventory.flows import import_lines
from kameng.ledger import service as ledger
from kameng.ledger.verify import Report, verify
from kameng.migrate import upgrade
from kameng.resellers import service as resellers

MASTER_KEY_B64 = "a2FtZW5nLXRlc3QtbWFzdGVyLWtleS0zMi1ieXRlcyE="  # 32 bytes, tests only


def make_settings(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        master_key=MASTER_KEY_B64,
        app_secret="test-app-secret",
        **overrides,
    )


_sqlite_template: Path | None = None


def _migrated_sqlite(url: str) -> None:
    """Put a migrated database at the SQLite `url`: a copy of one migrated once per process.

    Running the migrations takes about 0.3 s; a copy of their result takes a millisecond, and
    most tests need a fresh database. The template is made by the real migrations (tests of
    the migrations themselves call `upgrade` directly), and an existing file is migrated in
    place instead, so a test that reopens its data directory keeps its rows.
    """
    global _sqlite_template
    target = Path(url.removeprefix("sqlite:///"))
    if target.exists():
        upgrade(url)
        return
    if _sqlite_template is None:
        folder = tempfile.mkdtemp(prefix="kameng-sqlite-template-")
        atexit.register(shutil.rmtree, folder, True)
        template = Path(folder) / "template.db"
        upgrade(f"sqlite:///{template}")
        _sqlite_template = template
    target.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(_sqlite_template)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def make_container(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Container:
    settings = make_settings(data_dir, database_url, **overrides)
    url = settings.resolved_database_url
    if url.startswith("sqlite:///"):
        _migrated_sqlite(url)
    else:
        upgrade(url)
    container = Container.build(settings)
    container.bootstrap()
    return container


@dataclass
class ResellerCreds:
    name: str
    reseller_id: int
    api_key: str
    api_secret: str


def add_product(
    container: Container,
    *,
    sku: str | None = None,
    price_cents: int = 1000,
    cost_cents: int = 800,
    kind: DeliveryKind = DeliveryKind.card_key,
    fields: list[dict[str, Any]] | None = None,
    stock: int = 0,
    max_quantity: int = 10,
    sla_seconds: int | None = None,
) -> str:
    """Create a product with one SKU (and `stock` random keys); returns the SKU code."""
    code = sku or f"SKU-{secrets.token_hex(3).upper()}"
    with container.db.unit_of_work() as session:
        product = catalog.create_product(
            session,
            slug=code.lower(),
            name=f"Product {code}",
            category="test",
            delivery_kind=kind,
            field_template=fields or [],
            max_quantity=max_quantity,
            sla_seconds=sla_seconds,
        )
        catalog.add_sku(
            session,
            product=product,
            code=code,
            name=code,
            price_cents=price_cents,
            cost_cents=cost_cents,
        )
    container.invalidate_caches()
    if stock:
        add_stock(container, code, [f"{code}-{i:06d}-{secrets.token_hex(6)}" for i in range(stock)])
    return code


def add_stock(container: Container, sku: str, keys: list[str]) -> Any:
    return import_lines(
        container, sku_code=sku, lines=keys, source="test", unit_cost_cents=None, actor="staff:test"
    )


def add_reseller(
    container: Container,
    *,
    name: str | None = None,
    tier: str = "normal",
    balance_cents: int = 0,
) -> ResellerCreds:
    name = name or f"r-{secrets.token_hex(4)}"
    with container.db.unit_of_work() as session:
        issued = resellers.create_reseller(
            session, container.vault, name=name, tier_code=tier, actor="staff:test"
        )
    if balance_cents:
        topup(container, issued.reseller_id, balance_cents)
    return ResellerCreds(name, issued.reseller_id, issued.api_key, issued.api_secret)


def topup(container: Container, reseller_id: int, cents: int) -> None:
    with container.db.connect() as conn:
        wallet = resellers.reseller_wallet(conn, reseller_id=reseller_id)
        ledger.topup(
            conn,
            wallet_id=wallet,
            accounts=container.accounts,
            amount=cents,
            now=container.clock(),
            actor="staff:test",
        )


def wallet_balance(container: Container, reseller_id: int) -> tuple[int, int]:
    with container.db.connect(write=False) as conn:
        wallet = resellers.reseller_wallet(conn, reseller_id=reseller_id)
        return ledger.balances(conn, wallet_id=wallet)


def verify_all(container: Container) -> Report:
    with container.db.connect(write=False) as conn:
        return verify(conn, include_stock=True)


def assert_books_clean(container: Container) -> Report:
    report = verify_all(container)
    bad = {k: v for k, v in report.violations.items() if v}
    assert not bad, f"invariant violations: {bad}"
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def live_server(container: Container, *, port: int | None = None) -> Iterator[str]:
    """The real app on a real loopback port (uvicorn in a thread); yields its base URL."""
    from kameng.app import create_app

    port = port or free_port()
    config = uvicorn.Config(
        create_app(container),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def client_for(base_url: str, creds: ResellerCreds, language: str = "zh-CN") -> ResellerClient:
    return ResellerClient(base_url, creds.api_key, creds.api_secret, language=language)
