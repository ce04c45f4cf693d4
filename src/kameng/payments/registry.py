"""Live gateway adapters, one per gateway row, built from the stored (sealed) merchant key.

Each event loop that queries gateways (the web app, a worker, a CLI run) keeps its own
`Gateways`: an adapter owns an HTTP client, which belongs to the loop that created it.
"""

from __future__ import annotations

from typing import Any

from kameng.payments.adapters.epay import EpayGateway
from kameng.payments.port import GatewayPort
from kameng.payments.service import key_context
from kameng.security.crypto import Vault


def build_gateway(row: Any, vault: Vault) -> GatewayPort:
    return EpayGateway(
        base_url=row.base_url,
        merchant_id=row.merchant_id,
        key=vault.unseal(bytes(row.sealed_key), key_context(row.code)),
        currency=row.currency,
    )


class Gateways:
    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._by_id: dict[int, tuple[tuple[Any, ...], GatewayPort]] = {}

    def get(self, row: Any) -> GatewayPort:
        fingerprint = (row.base_url, row.merchant_id, bytes(row.sealed_key), row.currency)
        hit = self._by_id.get(row.id)
        if hit is not None and hit[0] == fingerprint:
            return hit[1]
        adapter = build_gateway(row, self.vault)
        self._by_id[row.id] = (fingerprint, adapter)
        return adapter

    async def aclose(self) -> None:
        for _, adapter in self._by_id.values():
            await adapter.aclose()
        self._by_id.clear()
