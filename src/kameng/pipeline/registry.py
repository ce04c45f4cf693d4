"""Live adapter instances, one per supplier row, built from the stored (sealed) credentials."""

from __future__ import annotations

from typing import Any

from kameng.security.crypto import Vault
from kameng.suppliers.adapters.kameng import KamengSupplier
from kameng.suppliers.adapters.signed_http import SignedHttp
from kameng.suppliers.adapters.simulator import SimulatorSupplier
from kameng.suppliers.models import AdapterKind
from kameng.suppliers.port import SupplierPort
from kameng.suppliers.service import secret_context


def build_adapter(row: Any, vault: Vault) -> SupplierPort:
    http = SignedHttp(
        base_url=row.base_url,
        api_key=row.api_key,
        secret=vault.unseal(bytes(row.sealed_secret), secret_context(row.code)),
        timeout_s=row.timeout_ms / 1000,
    )
    if row.adapter == AdapterKind.kameng.value:
        return KamengSupplier(http)
    return SimulatorSupplier(http)


class Adapters:
    """Per-process cache: an adapter owns a pooled HTTP client, so build each once. A changed
    row (new URL, key or timeout) gets a fresh adapter."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._by_id: dict[int, tuple[tuple[Any, ...], SupplierPort]] = {}

    def get(self, row: Any) -> SupplierPort:
        fingerprint = (
            row.base_url,
            row.api_key,
            bytes(row.sealed_secret),
            row.timeout_ms,
            row.adapter,
        )
        hit = self._by_id.get(row.id)
        if hit is not None and hit[0] == fingerprint:
            return hit[1]
        adapter = build_adapter(row, self.vault)
        self._by_id[row.id] = (fingerprint, adapter)
        return adapter

    async def aclose(self) -> None:
        for _, adapter in self._by_id.values():
            await adapter.aclose()
        self._by_id.clear()
