"""SKU and simulator configuration: the knobs that make the simulated supplier misbehave.

Every fault an upstream supplier can commit (latency, errors before and after committing,
dropped connections, hangs, garbage bodies, maintenance, late, duplicated or reordered
callbacks, partial deliveries) is a per-SKU setting, so one simulator process can offer a
well-behaved SKU next to a nasty one. Models refuse unknown keys: a typo in a fault setting
would otherwise silently test the happy path.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# z-score of the 99th percentile of a standard normal: lognormal sigma = ln(p99/p50) / Z99.
_Z99 = 2.3263478740408408

Rate = Annotated[float, Field(ge=0.0, le=1.0)]
Millis = Annotated[float, Field(ge=0.0)]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending setting."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FixedLatency(_Strict):
    dist: Literal["fixed"] = "fixed"
    ms: Millis = 0.0

    def sample_ms(self, rng: random.Random) -> float:
        return self.ms


class UniformLatency(_Strict):
    dist: Literal["uniform"]
    min: Millis
    max: Millis

    @model_validator(mode="after")
    def _ordered(self) -> UniformLatency:
        if self.min > self.max:
            raise ValueError("uniform latency needs min <= max")
        return self

    def sample_ms(self, rng: random.Random) -> float:
        return rng.uniform(self.min, self.max)


class LognormalLatency(_Strict):
    """Heavy-tailed latency given by its median and 99th percentile, clamped to 10×p99."""

    dist: Literal["lognormal"]
    p50: Annotated[float, Field(gt=0.0)]
    p99: Annotated[float, Field(gt=0.0)]

    @model_validator(mode="after")
    def _ordered(self) -> LognormalLatency:
        if self.p50 > self.p99:
            raise ValueError("lognormal latency needs p50 <= p99")
        return self

    def sample_ms(self, rng: random.Random) -> float:
        sigma = math.log(self.p99 / self.p50) / _Z99
        value = rng.lognormvariate(math.log(self.p50), sigma) if sigma > 0 else self.p50
        return min(max(value, 0.0), 10 * self.p99)


Latency = Annotated[FixedLatency | UniformLatency | LognormalLatency, Field(discriminator="dist")]


class Restock(_Strict):
    every_s: Annotated[float, Field(gt=0.0)]
    amount: Annotated[int, Field(ge=1)]


class MaintenanceWindow(_Strict):
    start: float
    end: float

    def covers(self, now: float) -> bool:
        return self.start <= now < self.end


class SkuConfig(_Strict):
    """One SKU: its price and stock, and every fault it injects (all off by default)."""

    sku: Annotated[str, Field(min_length=1, max_length=64)]
    name: str | None = None
    kind: Literal["card_key", "direct_topup"] = "card_key"
    price_cents: Annotated[int, Field(ge=0)]
    stock: Annotated[int, Field(ge=0)] | None = None
    restock: Restock | None = None
    required_fields: list[str] = Field(default_factory=list)
    reject_field_values: dict[str, list[str]] = Field(default_factory=dict)
    latency_ms: Latency = Field(default_factory=FixedLatency)
    error_rate: Rate = 0.0
    error_after_commit_rate: Rate = 0.0
    reset_rate: Rate = 0.0
    hang_rate: Rate = 0.0
    hang_ms: Millis = 30_000.0
    malformed_rate: Rate = 0.0
    maintenance: list[MaintenanceWindow] = Field(default_factory=list)
    maintenance_now: bool = False
    mode: Literal["sync", "callback"] = "sync"
    callback_delay_ms: Millis = 50.0
    late_callback_ms: Millis = 0.0
    duplicate_callbacks: Annotated[int, Field(ge=0, le=20)] = 0
    out_of_order: bool = False
    callback_before_response: bool = False
    drop_callbacks: bool = False
    partial: Annotated[int, Field(ge=0)] = 0
    partial_rest_ms: Millis | None = None
    callback_retries: Annotated[int, Field(ge=0, le=20)] = 3
    # Extensions beyond the written protocol (defaults keep the protocol's behaviour):
    callback_backoff_ms: Millis = 500.0
    callback_reject_rate: Rate = 0.0
    # Pre-check of buyer information (`POST /v1/precheck`). `account_field` names the field
    # holding the recharge account; only then are accounts checked for existence (see
    # SimState.account_exists), so SKUs created before the pre-check existed behave as before.
    account_field: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    denomination_closed: bool = False
    precheck_latency_ms: Latency | None = None  # None: the SKU's `latency_ms`
    precheck_error_rate: Rate = 0.0
    precheck_hang_rate: Rate = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> SkuConfig:
        if self.name is None:
            self.name = self.sku
        post_commit = (
            self.error_after_commit_rate + self.reset_rate + self.hang_rate + self.malformed_rate
        )
        if post_commit > 1.0 + 1e-9:
            raise ValueError(
                "error_after_commit_rate + reset_rate + hang_rate + malformed_rate must be <= 1"
            )
        if self.precheck_error_rate + self.precheck_hang_rate > 1.0 + 1e-9:
            raise ValueError("precheck_error_rate + precheck_hang_rate must be <= 1")
        return self

    def is_open(self, now: float) -> bool:
        """False while in maintenance (the switch or any window covering `now`)."""
        return not (self.maintenance_now or any(w.covers(now) for w in self.maintenance))

    def orderable(self, now: float) -> bool:
        """What the catalog and quote call `open`: not in maintenance, denomination not closed."""
        return self.is_open(now) and not self.denomination_closed

    @property
    def partial_count(self) -> int:
        """Keys held back per order; partial delivery only makes sense for card keys."""
        return self.partial if self.kind == "card_key" else 0


class SimConfig(_Strict):
    """The whole simulator: the merchant's opening balance, the catalog, and the recharge
    accounts that do not exist (besides those ending in MISSING_ACCOUNT_SUFFIX)."""

    balance_cents: Annotated[int, Field(ge=0)] = 10_000_000
    skus: list[SkuConfig] = Field(default_factory=list)
    missing_accounts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> SimConfig:
        seen: set[str] = set()
        for item in self.skus:
            if item.sku in seen:
                raise ValueError(f"duplicate sku {item.sku!r}")
            seen.add(item.sku)
        return self


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_config(data: Any) -> SimConfig:
    try:
        return SimConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def load_config(path: Path) -> SimConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(data)


def merge_sku(current: SkuConfig | None, sku: str, patch: dict[str, Any]) -> SkuConfig:
    """`current` with the top-level keys of `patch` replaced (nested objects are replaced whole,
    so a new `latency_ms` never inherits fields from a different distribution)."""
    if patch.get("sku", sku) != sku:
        raise ConfigError("sku in the body differs from the sku in the path")
    data: dict[str, Any] = current.model_dump() if current is not None else {}
    data.update(patch)
    data["sku"] = sku
    try:
        return SkuConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


def default_config() -> SimConfig:
    """The catalog served when no file is given: two card-key SKUs answered synchronously and a
    mobile top-up that needs an existing account and is confirmed by callback."""
    fixed_50 = {"dist": "fixed", "ms": 50}
    return parse_config(
        {
            "balance_cents": 10_000_000,
            "skus": [
                {
                    "sku": "SIM-STEAM-50",
                    "name": "Steam wallet 50 (simulated)",
                    "kind": "card_key",
                    "price_cents": 4800,
                    "latency_ms": fixed_50,
                },
                {
                    "sku": "SIM-GAME-100",
                    "name": "Game card 100 (simulated)",
                    "kind": "card_key",
                    "price_cents": 9500,
                    "latency_ms": fixed_50,
                },
                {
                    "sku": "SIM-MOBILE-50",
                    "name": "Mobile top-up 50 (simulated)",
                    "kind": "direct_topup",
                    "price_cents": 4950,
                    "required_fields": ["account"],
                    "account_field": "account",
                    "latency_ms": fixed_50,
                    "mode": "callback",
                },
            ],
        }
    )
