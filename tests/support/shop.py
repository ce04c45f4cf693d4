"""A storefront rig: the real app on a loopback port, the bundled EPay gateway simulator as a
real HTTP server, a gateway row pointing at it, and a browser-like HTTP client (cookies,
CSRF tokens scraped from the forms) — the same parts a buyer's browser talks to."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from kameng.container import Container
from kameng.payments import service as payments
from kameng.payments.gateway_sim.runner import GatewaySimHandle, start_gateway_sim
from kameng.payments.registry import Gateways
from kameng.pipeline import payment_checks
from tests.conftest import backend_container
from tests.support import factories

GATEWAY = "sim-epay"
PID, KEY = "1001", "test-epay-key"

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Clock:
    """A controllable clock for the container (starts at real now)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class ShopRig:
    container: Container
    url: str
    gateway: GatewaySimHandle
    clock: Clock

    def browser(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=15)

    def check_payments(self) -> int:
        """One round of active payment queries, as the worker runs it."""
        import asyncio

        async def run() -> int:
            gateways = Gateways(self.container.vault)
            try:
                return await payment_checks.check_due(self.container, gateways)
            finally:
                await gateways.aclose()

        return asyncio.run(run())

    def payment(self, payment_no: str) -> Any:
        with self.container.db.connect(write=False) as conn:
            return payments.find_payment(conn, payment_no=payment_no)

    def statements(self, payment_no: str) -> list[tuple[str, str]]:
        from sqlalchemy import text

        with self.container.db.connect(write=False) as conn:
            rows = conn.execute(
                text(
                    "SELECT channel, outcome FROM payment_notifies WHERE payment_no = :n "
                    "ORDER BY id"
                ),
                {"n": payment_no},
            )
            return [(r[0], r[1]) for r in rows]


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def place_gateway_order(
    client: httpx.Client, sku: str, *, pay: str = f"{GATEWAY}:alipay", **fields: str
) -> str:
    """Fill the order form like a buyer; returns the order number (the payment number)."""
    page = client.get(f"/buy/{sku}")
    assert page.status_code == 200, page.text
    data = {"csrf_token": csrf_of(page.text), "quantity": "1", "pay": pay}
    data.update({f"f_{k}": v for k, v in fields.items()})
    placed = client.post(f"/buy/{sku}", data=data)
    assert placed.status_code == 303, placed.text
    location = placed.headers["location"]
    assert location.startswith("/pay/"), location
    return location.removeprefix("/pay/")


def submit_to_gateway(client: httpx.Client, payment_no: str) -> httpx.Response:
    """Open the pay page and post its signed form to the gateway (the cashier page)."""
    page = client.get(f"/pay/{payment_no}")
    assert page.status_code == 200, page.text
    action = re.search(r'action="([^"]+)" id="gateway-form"', page.text)
    assert action
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    fields.pop("csrf_token", None)
    return httpx.post(action.group(1), data=fields, timeout=15)


@contextmanager
def shop_rig(
    backend: str, data_dir: Path, *, notify_retry_s: list[float] | None = None, **overrides: Any
) -> Iterator[ShopRig]:
    port = factories.free_port()
    clock = Clock()
    with ExitStack() as stack:
        gateway = stack.enter_context(
            start_gateway_sim(merchants={PID: KEY}, notify_retry_s=notify_retry_s or [0, 0.2, 0.5])
        )
        container = stack.enter_context(
            backend_container(
                backend,
                data_dir,
                public_url=f"http://127.0.0.1:{port}",
                payment_first_check_s=30,
                **overrides,
            )
        )
        container.clock = clock
        with container.db.connect() as conn:
            payments.add_gateway(
                conn,
                vault=container.vault,
                code=GATEWAY,
                name="test gateway",
                base_url=gateway.url,
                merchant_id=PID,
                key=KEY,
                pay_types="alipay,wxpay",
                now=clock(),
            )
        url = stack.enter_context(factories.live_server(container, port=port))
        yield ShopRig(container=container, url=url, gateway=gateway, clock=clock)
