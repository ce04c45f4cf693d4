"""A guest buys in a real browser: home -> order form -> our pay page -> the gateway's cashier
-> back on the order page, which follows the order by itself (htmx) until it is delivered.

Everything behind the browser is real: the app under uvicorn, the bundled EPay gateway
simulator and, for the top-up, a worker and the bundled supplier simulator that procures it
upstream. The checks read what the buyer sees.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kameng.catalog.models import DeliveryKind
from kameng.orders import queries as order_queries
from kameng.suppliers.simulator.runner import start_simulator
from tests.support import factories
from tests.support.pipeline import FAST, Rig, WorkerThread
from tests.support.shop import ShopRig, shop_rig

try:
    from playwright.sync_api import expect
except ImportError:  # the `chromium` fixture skips (or fails, where browser tests are required)
    expect = None

FIELDS = [{"name": "account", "type": "text", "label": "游戏账号", "label_en": "Game account"}]
SUPPLIER_SKU = "SIM-TOPUP"
# Answered by callback a while after it is accepted, so the buyer lands on a moving order.
SIM = {
    "skus": [
        {
            "sku": SUPPLIER_SKU,
            "kind": "direct_topup",
            "price_cents": 900,
            "mode": "callback",
            "callback_delay_ms": 1500,
        }
    ]
}


@dataclass
class Shop:
    rig: ShopRig
    sku: str
    keys: list[tuple[str, str]]  # the (card number, secret) pairs imported; none for a top-up


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[ShopRig]:
    with shop_rig("sqlite", tmp_path, **FAST) as r:
        yield r


@pytest.fixture
def card_key(rig: ShopRig) -> Shop:
    sku = factories.add_product(rig.container, price_cents=1_000, fields=FIELDS)
    keys = [(f"{sku}-{i}", secrets.token_hex(6).upper()) for i in range(3)]
    factories.add_stock(rig.container, sku, [f"{code},{secret}" for code, secret in keys])
    return Shop(rig, sku, keys)


@pytest.fixture
def topup(rig: ShopRig) -> Iterator[Shop]:
    """A direct top-up with no stock of ours: a worker buys it from the supplier simulator."""
    sku = factories.add_product(
        rig.container, price_cents=1_000, kind=DeliveryKind.direct_topup, fields=FIELDS
    )
    with ExitStack() as stack:
        sim = stack.enter_context(start_simulator(SIM, seed=7))
        upstream = Rig(rig.container, rig.url, sim)
        upstream.add_supplier("sim")
        upstream.add_offer(sku, "sim", SUPPLIER_SKU, cost_cents=900)
        stack.callback(WorkerThread(rig.container).start().stop)
        yield Shop(rig, sku, [])


# -- the buyer's steps -------------------------------------------------------------------------


def buy_as_guest(page: Any, shop: Shop, *, lang: str = "") -> str:
    """Click through from the home page to the order page; returns the order number."""
    page.goto(shop.rig.url + (f"/?lang={lang}" if lang else "/"))
    page.locator(f'#products a[data-sku="{shop.sku}"]').click()
    expect(page.locator("#buy-form")).to_be_visible()
    page.fill("#f_account", "player_one")
    page.check("#pay-sim-epay-alipay")
    page.click("#place-order")
    page.wait_for_url(re.compile(r"/pay/[^/?]+$"))
    order_no = page.url.rsplit("/", 1)[1]
    page.click("#go-pay")
    page.wait_for_url(f"{shop.rig.gateway.url}/**")  # the gateway's cashier page
    expect(page.locator("#money")).to_have_text("¥10.00")
    page.click("#pay")  # paid; the gateway sends the buyer back through /pay/return/...
    page.wait_for_url(f"{shop.rig.url}/orders/{order_no}")
    expect(page.locator("#order-no")).to_have_text(order_no)
    page.evaluate("window.__landed = true")  # gone if the page is ever reloaded
    return order_no


def wait_delivered(page: Any) -> None:
    """Wait until the panel says delivered — by itself, without a reload."""
    expect(page.locator('#order-panel[data-status="delivered"]')).to_be_attached(timeout=15_000)
    assert page.evaluate("window.__landed === true"), "the order page was reloaded"


def timeline(page: Any) -> list[str]:
    return [" ".join(row.split()) for row in page.locator("#timeline tr").all_inner_texts()]


def assert_rows_in_order(rows: list[str], *wanted: str) -> None:
    """Each wanted text is in some row, and in this order (payment before delivery)."""
    at = [next((i for i, row in enumerate(rows) if text in row), -1) for text in wanted]
    assert -1 not in at and at == sorted(at), f"want {wanted} in order in the timeline: {rows}"


def assert_lookup_secret(page: Any, shop: Shop, order_no: str) -> None:
    shown = page.locator("#lookup-secret")
    expect(shown).to_be_visible()
    with shop.rig.container.db.connect(write=False) as conn:
        found = order_queries.lookup(
            conn, order_no=order_no, secret=shown.inner_text(), vault=shop.rig.container.vault
        )
    assert found is not None, "the lookup secret shown does not open the order"


def assert_keys_heading(page: Any, text: str) -> None:
    heading = page.locator("#keys").locator("xpath=preceding-sibling::h3[1]")
    expect(heading).to_have_text(text)


# -- the tests ---------------------------------------------------------------------------------


def test_guest_buys_a_card_key_through_the_gateway(page: Any, card_key: Shop) -> None:
    order_no = buy_as_guest(page, card_key)
    wait_delivered(page)
    expect(page.locator("#order-status")).to_have_text("已发货")
    secret = page.locator("#keys .key-secret")
    expect(secret).to_have_count(1)
    expect(secret).to_be_visible()
    shown = (page.locator("#keys .key-code").inner_text(), secret.inner_text())
    assert shown in card_key.keys, f"{shown} is not one of the keys imported for {card_key.sku}"
    assert_rows_in_order(timeline(page), "已付款 在线支付已到账", "已发货 已从库存发放卡密")
    assert_lookup_secret(page, card_key, order_no)
    factories.assert_books_clean(card_key.rig.container)
    assert_keys_heading(page, "卡密")


def test_guest_buys_a_top_up_procured_upstream(page: Any, topup: Shop) -> None:
    order_no = buy_as_guest(page, topup)
    panel = page.locator("#order-panel")
    assert panel.get_attribute("data-status") != "delivered", "nothing left to wait for"
    expect(panel).to_have_attribute("hx-trigger", "every 2s")
    wait_delivered(page)
    expect(page.locator("#order-status")).to_have_text("已发货")
    expect(page.locator("#keys")).to_have_count(0)  # a top-up has nothing to show
    assert_rows_in_order(
        timeline(page),
        "已付款 在线支付已到账",
        "上游已受理，等待上游发货结果",
        "已发货 上游已发货",
    )
    assert_lookup_secret(page, topup, order_no)
    factories.assert_books_clean(topup.rig.container)


def test_the_order_page_speaks_english(page: Any, card_key: Shop) -> None:
    buy_as_guest(page, card_key, lang="en")  # the cookie keeps English across the gateway
    wait_delivered(page)
    expect(page.locator("html")).to_have_attribute("lang", "en")
    expect(page.locator("h2")).to_contain_text("Order")
    expect(page.locator("#order-status")).to_have_text("Delivered")
    expect(page.locator("main")).to_contain_text("Keep this lookup secret")
    expect(page.locator("#keys")).to_contain_text("Card number")
    expect(page.locator("#keys")).to_contain_text("Secret")
    assert_rows_in_order(
        timeline(page), "Paid Online payment received", "Delivered Keys delivered from stock"
    )
    heading = page.locator("#keys").locator("xpath=preceding-sibling::h3[1]")
    texts = page.locator("main").inner_text().replace(heading.inner_text(), "")
    assert not re.search(r"[\u4e00-\u9fff]", texts), f"Chinese left on the English page: {texts}"
    assert_keys_heading(page, "Card keys")


def test_a_member_registers_tops_up_and_buys_from_balance(page: Any, card_key: Shop) -> None:
    """The member flow: register, top up through the gateway, buy with the balance, and find
    the order in the history."""
    url = card_key.rig.url
    page.goto(f"{url}/register")
    page.fill("#email", "member@kameng.test")
    page.fill("#password", "a-good-password")
    page.click("#register-submit")
    expect(page).to_have_url(f"{url}/account")
    expect(page.locator("#balance")).to_have_text("¥0.00")

    page.fill("#amount", "25")
    page.click("#topup-submit")
    page.click("#go-pay")
    page.click("#pay")  # the gateway's cashier; it sends us back to the account page
    expect(page).to_have_url(f"{url}/account")
    # The signed return is applied before the redirect: the balance is there at once.
    expect(page.locator("#balance")).to_have_text("¥25.00")

    page.goto(f"{url}/buy/{card_key.sku}")
    page.fill("#f_account", "player-7")
    page.check("#pay-balance")
    page.click("#place-order")
    expect(page.locator("#order-panel")).to_have_attribute("data-status", "delivered")
    shown = page.locator("#keys .key-secret").first.inner_text()
    assert shown in {secret for _, secret in card_key.keys}
    expect(page.locator("#lookup-secret")).to_have_count(0)  # members need no secret

    page.goto(f"{url}/account")
    expect(page.locator("#balance")).to_have_text("¥15.00")
    order_no = page.locator("#order-history a").first.inner_text()
    assert order_no.startswith("K")
    factories.assert_books_clean(card_key.rig.container)
