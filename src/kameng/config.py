"""One `Settings` object for the whole platform, read from `KAMENG_*` environment variables.

Secrets (the app secret that keys HMACs and the master key that wraps card-key data keys) are
never committed: when they are not given they are generated into the data directory on first
start with mode 0600, so a fresh `make run` works and a restart keeps reading old stock.
"""

from __future__ import annotations

import base64
import os
import secrets
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAMENG_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path("var"), description="Where the SQLite file and keys live")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/kameng.db"
    )
    app_secret: SecretStr | None = None
    master_key: SecretStr | None = Field(
        default=None, description="base64 32-byte key-encryption key for card keys"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    default_language: str = "zh-CN"
    signature_window_s: int = 300
    duplicate_order_window_s: int = 600
    backorder_retry_s: int = 60
    default_sla_s: int = 1800
    lookup_rate_per_minute: int = 20
    db_pool_size: int = 4
    sqlite_busy_timeout_ms: int = 5000
    log_level: str = "INFO"
    public_url: str | None = Field(
        default=None,
        description="Base URL suppliers call back on; default http://<host>:<port>",
    )
    # The pipeline (DESIGN §6).
    embedded_worker: bool = Field(
        default=False, description="Run a pipeline worker inside each web process (`serve`)"
    )
    worker_batch: int = Field(default=64, description="Due orders claimed per round")
    worker_concurrency: int = Field(
        default=128,
        description="Steps in flight per worker (a restarted worker with a backlog opens this "
        "many supplier connections at once)",
    )
    worker_poll_s: float = Field(default=0.2, description="Idle wait between claims")
    worker_lease_s: int = Field(
        default=120, description="A claimed order is due again after this if its worker died"
    )
    worker_heartbeat_s: float = 5.0
    supplier_poll_s: int = Field(default=30, description="First poll after a supplier accepts")
    supplier_retry_cap_s: int = Field(default=300, description="Longest wait between retries")
    supplier_balance_check_s: int = 60
    supplier_reconcile_s: int = Field(
        default=3600,
        description="How often the worker reconciles each supplier's record of purchases "
        "against ours (0: never); each run covers the last supplier_reconcile_days",
    )
    supplier_reconcile_days: int = Field(default=2, ge=1, le=90)
    # Payments and the storefront (issue: payments).
    payment_window_s: int = Field(default=900, description="How long a buyer has to pay")
    payment_first_check_s: int = Field(
        default=60, description="First active query of a payment nobody told us about"
    )
    payment_check_cap_s: int = Field(
        default=300, description="Longest wait between queries while the window is open"
    )
    cookie_secure: bool = Field(
        default=False, description="Mark session cookies Secure (set it behind HTTPS)"
    )
    login_failures_per_window: int = Field(
        default=5, description="Failed logins per email or IP before 429"
    )
    login_window_s: int = 300
    registrations_per_hour: int = Field(default=10, description="Per IP")
    guest_auto_payout: bool = Field(
        default=True,
        description="Refund money owed to guests through their gateway without staff",
    )
    checkouts_per_minute: int = Field(
        default=20, description="Storefront orders and top-ups started per IP per minute"
    )
    prechecks_per_minute: int = Field(
        default=60,
        description="Supplier pre-checks of buyer information per reseller per minute (API); "
        "past it the order is placed unchecked, as when the supplier cannot answer",
    )
    # Risk screening and the review queue (issue: risk and review).
    risk_screening: bool = Field(default=True, description="Screen every paid order")
    review_sla_s: int = Field(default=1800, description="How long an order may wait in review")
    review_claim_s: int = Field(default=900, description="How long a reviewer's claim lasts")
    review_two_reviewers_from_cents: int = Field(
        default=100_000, description="Approvals at or above this amount need two reviewers"
    )
    review_auto_approve_below_cents: int = Field(
        default=10_000,
        description="At the review SLA, approve orders under this amount; refund the others",
    )
    review_escalation_url: str = Field(
        default="", description="POSTed (JSON) when a review breaches its SLA; empty: log only"
    )
    review_escalation_secret: str = Field(
        default="", description="Signs the escalation POSTs (X-Kameng-Signature), if set"
    )
    risk_facts_retention_days: int = Field(
        default=180,
        description="Days of per-order risk facts kept (counters read up to 90; backtests more)",
    )
    risk_screenings_retention_days: int = Field(
        default=400, description="Days of screening records (what matched, per order) kept"
    )
    buyer_action_sla_s: int = Field(
        default=86_400, description="How long a buyer has to correct rejected information"
    )

    @property
    def callback_base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'kameng.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    def _secret_file(self, name: str, make: bytes) -> bytes:
        """Read a secret from the data dir, creating it (0600) on first use."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / name
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(base64.b64encode(make) + b"\n")
        return base64.b64decode(path.read_bytes().strip())

    @cached_property
    def app_secret_bytes(self) -> bytes:
        if self.app_secret is not None:
            return self.app_secret.get_secret_value().encode()
        return self._secret_file("app_secret.key", secrets.token_bytes(32))

    @cached_property
    def master_key_bytes(self) -> bytes:
        if self.master_key is not None:
            raw = base64.b64decode(self.master_key.get_secret_value())
        else:
            raw = self._secret_file("master.key", secrets.token_bytes(32))
        if len(raw) != 32:
            raise ValueError("KAMENG_MASTER_KEY must be 32 bytes, base64-encoded")
        return raw


def get_settings() -> Settings:
    return Settings()
