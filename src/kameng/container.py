"""Composition root: builds the platform's long-lived parts once and hands them out.

The web app, the CLI, tests and benchmarks all build a `Container`; nothing else constructs
engines, vaults or caches, so there is exactly one place that decides how parts fit together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from kameng.catalog import service as catalog
from kameng.catalog.models import Sku
from kameng.catalog.service import SkuInfo
from kameng.config import Settings
from kameng.db import Database, utcnow
from kameng.idempotency.service import InFlight
from kameng.inventory.service import KeyDecryptor
from kameng.ledger import service as ledger
from kameng.orders.checkout import PaymentDeps
from kameng.orders.service import Policy
from kameng.payments.service import CheckPolicy
from kameng.pricing import service as pricing
from kameng.resellers.service import Authenticator
from kameng.review.service import ReviewPolicy
from kameng.risk import service as risk
from kameng.security.crypto import Vault
from kameng.suppliers import service as suppliers
from kameng.writer import TransactionRunner

CATALOG_TTL_S = 2.0


@dataclass
class _Cached:
    value: object
    expires: float


@dataclass
class Container:
    settings: Settings
    db: Database
    vault: Vault
    clock: Callable[[], datetime] = utcnow
    decryptor: KeyDecryptor = field(init=False)
    authenticator: Authenticator = field(init=False)
    inflight: InFlight = field(default_factory=InFlight)
    policy: Policy = field(init=False)
    review_policy: ReviewPolicy = field(init=False)
    writer: TransactionRunner = field(init=False)
    risk_engine: risk.Engine = field(default_factory=risk.Engine)
    _accounts: ledger.PlatformAccounts | None = None
    _cache: dict[tuple[str, object], _Cached] = field(default_factory=dict)
    _cache_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.decryptor = KeyDecryptor(self.vault)
        self.authenticator = Authenticator(self.vault)
        self.writer = TransactionRunner(self.db, threads=self.settings.db_pool_size)
        self.policy = Policy(
            duplicate_window_s=self.settings.duplicate_order_window_s,
            backorder_retry_s=self.settings.backorder_retry_s,
            default_sla_s=self.settings.default_sla_s,
            review_sla_s=self.settings.review_sla_s,
        )
        self.review_policy = ReviewPolicy(
            sla_s=self.settings.review_sla_s,
            claim_s=self.settings.review_claim_s,
            two_reviewers_from_cents=self.settings.review_two_reviewers_from_cents,
            auto_approve_below_cents=self.settings.review_auto_approve_below_cents,
        )

    @classmethod
    def build(cls, settings: Settings | None = None) -> Container:
        settings = settings or Settings()
        db = Database(
            settings.resolved_database_url,
            pool_size=settings.db_pool_size,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
        )
        return cls(settings=settings, db=db, vault=Vault(settings.master_key_bytes))

    @property
    def accounts(self) -> ledger.PlatformAccounts:
        """Platform account ids, created on first use (needs a migrated database)."""
        if self._accounts is None:
            with self.db.connect() as conn:
                self._accounts = ledger.ensure_platform_accounts(conn)
        return self._accounts

    def bootstrap(self) -> None:
        """Rows every installation needs: platform accounts and the default reseller tiers."""
        _ = self.accounts
        with self.db.unit_of_work() as session:
            pricing.ensure_default_tiers(session)
        with self.db.connect() as conn:
            risk.ensure_default_rules(conn, now=self.clock())

    def _cached(self, kind: str, key: object, load: Callable[[], object]) -> object:
        now = time.monotonic()
        hit = self._cache.get((kind, key))
        if hit is not None and hit.expires > now:
            return hit.value
        value = load()
        with self._cache_lock:
            self._cache[(kind, key)] = _Cached(value, now + CATALOG_TTL_S)
        return value

    @contextmanager
    def _read_session(self, conn: Connection | None) -> Iterator[Session]:
        """Read on the caller's connection when it has one: a transaction that opened a second
        connection from the pool could wait forever for a pool emptied by its peers."""
        if conn is None:
            with self.db.unit_of_work(write=False) as session:
                yield session
            return
        session = Session(bind=conn)
        try:
            yield session
        finally:
            session.close()

    def sku(self, code: str, *, conn: Connection | None = None) -> SkuInfo:
        """SKU facts for the hot path; catalog edits show up within CATALOG_TTL_S seconds."""

        def load() -> SkuInfo:
            with self._read_session(conn) as session:
                return catalog.get_sku_info(session, code=code)

        value = self._cached("sku", code, load)
        assert isinstance(value, SkuInfo)
        return value

    def sku_by_id(self, sku_id: int, *, conn: Connection | None = None) -> SkuInfo:
        """SKU facts by id (orders store the id), through the same cache as `sku`."""

        def load() -> str:
            with self._read_session(conn) as session:
                return str(session.execute(select(Sku.code).where(Sku.id == sku_id)).scalar_one())

        code = self._cached("sku_code", sku_id, load)
        assert isinstance(code, str)
        return self.sku(code, conn=conn)

    @property
    def payment_deps(self) -> PaymentDeps:
        return PaymentDeps(
            accounts=self.accounts,
            policy=self.policy,
            sku=lambda conn, sku_id: self.sku_by_id(sku_id, conn=conn),
            has_offers=lambda conn, sku_id: self.has_offers(sku_id, conn=conn),
            risk_engine=self.screening_engine,
        )

    @property
    def screening_engine(self) -> risk.Engine | None:
        """The engine orders are screened with, or None when screening is switched off."""
        return self.risk_engine if self.settings.risk_screening else None

    @property
    def payment_checks(self) -> CheckPolicy:
        s = self.settings
        return CheckPolicy(first_check_s=s.payment_first_check_s, cap_s=s.payment_check_cap_s)

    def unit_price(self, *, tier_id: int, sku_id: int, conn: Connection | None = None) -> int:
        def load() -> int:
            with self._read_session(conn) as session:
                return pricing.price_for(session, tier_id=tier_id, sku_id=sku_id)

        value = self._cached("price", (tier_id, sku_id), load)
        assert isinstance(value, int)
        return value

    def has_offers(self, sku_id: int, *, conn: Connection | None = None) -> bool:
        """Whether the SKU can be procured upstream (cached like the catalog)."""

        def load() -> frozenset[int]:
            if conn is not None:
                return frozenset(suppliers.skus_with_offers(conn))
            with self.db.connect(write=False) as c:
                return frozenset(suppliers.skus_with_offers(c))

        value = self._cached("offers", None, load)
        assert isinstance(value, frozenset)
        return sku_id in value

    def invalidate_caches(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def close(self) -> None:
        self.db.dispose()
