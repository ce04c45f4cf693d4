"""A payment is confirmed only by the gateway it was opened at.

Every gateway row has its own merchant key, and a statement is checked against the key of the
gateway named in the URL. Without the gateway check in `apply_confirmation`, anyone with a
merchant account at a second configured gateway (or that gateway's own operator) could sign
"paid" for an order opened at the first one and be delivered goods never paid for there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.conftest import backend_container
from tests.support import factories
from tests.support.lab import OTHER_GATEWAY, Lab
from tests.support.shop import GATEWAY, KEY, PID, place_gateway_order, shop_rig

from kameng.payments import service as payments
from kameng.security import epay

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    with backend_container(request.param, tmp_path) as container:
        yield Lab(container)


def test_a_confirmation_through_another_gateway_moves_nothing(lab: Lab) -> None:
    sku = lab.product(stock=1)
    placed = lab.pending(sku)  # opened at GATEWAY

    assert lab.pay(placed, via=OTHER_GATEWAY) == "wrong_gateway"

    assert lab.status(placed) == "pending_payment"
    assert lab.moves(placed) == [(None, "pending_payment")]
    with lab.c.db.connect(write=False) as conn:
        pay = payments.find_payment(conn, payment_no=placed.order_no)
    assert (pay.state, pay.ledger_txn_id, pay.gateway_trade_no) == ("pending", None, "")
    assert lab.read("SELECT COUNT(*) FROM ledger_transactions WHERE kind = 'payment'") == [(0,)]
    assert lab.stock(sku) == {"available": 1}
    factories.assert_books_clean(lab.c)

    # The gateway it was opened at is still believed.
    assert lab.pay(placed) == "fulfilment_started"
    assert lab.status(placed) == "delivered"
    factories.assert_books_clean(lab.c)


def test_a_notify_signed_by_another_gateway_is_refused_over_http(tmp_path: Path) -> None:
    """The same through the notify endpoint: a statement correctly signed with the second
    gateway's key, about an order opened at the first, is answered `fail` and recorded."""
    other_key = "key-of-the-other-gateway"
    with shop_rig("sqlite", tmp_path) as rig:
        with rig.container.db.connect() as conn:
            payments.add_gateway(
                conn,
                vault=rig.container.vault,
                code="other-epay",
                name="another gateway",
                base_url=rig.gateway.url,
                merchant_id=PID,
                key=other_key,
                now=rig.clock(),
            )
        sku = factories.add_product(rig.container, stock=1, price_cents=1_000)
        order_no = place_gateway_order(rig.browser(), sku)

        def notify(code: str, key: str) -> str:
            params = epay.signed(
                {
                    "pid": PID,
                    "trade_no": "202611260000009",
                    "out_trade_no": order_no,
                    "type": "alipay",
                    "name": "test",
                    "money": "10.00",
                    "trade_status": "TRADE_SUCCESS",
                },
                key,
            )
            response = httpx.get(f"{rig.url}/pay/notify/{code}", params=params, timeout=10)
            assert response.status_code == 200
            return response.text

        assert notify("other-epay", other_key) == "fail"
        assert rig.statements(order_no) == [("notify", "wrong_gateway")]
        assert rig.payment(order_no).state == "pending"
        factories.assert_books_clean(rig.container)

        assert notify(GATEWAY, KEY) == "success"
        assert rig.statements(order_no)[-1] == ("notify", "fulfilment_started")
        assert rig.payment(order_no).state == "paid"
        factories.assert_books_clean(rig.container)
