"""`kameng demo` seeds only its own database, with secrets generated for each installation.

A demo seeded into a live shop used to add an enabled gateway whose key was printed in the
source: a guest checkout and a notify signed with that key delivered card keys without paying.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, inspect, select, table
from tests.integration._helpers import run_cli
from tests.support import factories
from tests.support.pipeline import wait_for
from tests.support.shop import place_gateway_order

from kameng import demo
from kameng.audit.models import AuditEntry
from kameng.container import Container
from kameng.demo_census import FORCED_ACTION, MARKER_ACTION
from kameng.errors import KamengError
from kameng.members import service as members
from kameng.orders import queries as order_queries
from kameng.payments import service as payments
from kameng.security import epay
from kameng.staff import service as staff
from kameng.suppliers import service as suppliers

# What the simulators and an older `kameng demo` published; none may open this installation.
PUBLISHED = {"demo-epay-key", "demo-merchant-secret", "kameng-demo"}
SECRETS = ("api_secret", "staff_token", "member_password", "gateway_key", "supplier_secret")


def table_counts(container: Container) -> dict[str, int]:
    with container.db.connect(write=False) as conn:
        names = inspect(conn).get_table_names()
        return {
            name: int(conn.execute(select(func.count()).select_from(table(name))).scalar_one())
            for name in names
        }


def audit_actions(container: Container) -> list[str]:
    with container.db.connect(write=False) as conn:
        return [str(a) for a in conn.execute(select(AuditEntry.action)).scalars()]


def demo_json(container: Container, *args: str) -> dict[str, str]:
    done = run_cli(container, "demo", "--keys-per-sku", "2", "--json", *args)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _product(c: Container) -> str:
    factories.add_product(c, sku="MY-SHOP-1")
    return "my-shop-1"


def _member(c: Container) -> str:
    with c.db.connect() as conn:
        members.register(
            conn, email="real@buyer.cn", password="a real password", language="zh-CN", now=c.clock()
        )
    return "members: 1"


def _gateway(c: Container) -> str:
    with c.db.connect() as conn:
        payments.add_gateway(
            conn,
            vault=c.vault,
            code="epay-live",
            name="live",
            base_url="https://pay.example.com",
            merchant_id="2001",
            key="a-live-merchant-key",
            now=c.clock(),
        )
    return "epay-live"


def _staff(c: Container) -> str:
    with c.db.connect() as conn:
        staff.create(conn, name="alice", role="admin", actor="staff:test", now=c.clock())
    return "alice"


@pytest.mark.parametrize("add_foreign", [_product, _member, _gateway, _staff])
def test_demo_refuses_a_database_holding_rows_it_did_not_create(
    sqlite_container: Container, add_foreign: Callable[[Container], str]
) -> None:
    c = sqlite_container
    named = add_foreign(c)
    before = table_counts(c)
    refused = run_cli(c, "demo", "--keys-per-sku", "2")
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "demo_database_in_use" in refused.stderr and "Traceback" not in refused.stderr
    assert named in refused.stderr and "--force" in refused.stderr
    assert table_counts(c) == before  # nothing written
    assert not demo.credentials_path(c).exists()
    assert not demo.demo_supplier_config_path(c).exists()


def test_force_seeds_a_foreign_database_with_a_warning_and_does_not_adopt_it(
    sqlite_container: Container,
) -> None:
    c = sqlite_container
    factories.add_product(c, sku="MY-SHOP-1")
    forced = run_cli(c, "demo", "--keys-per-sku", "2", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning" in forced.stderr and "my-shop-1" in forced.stderr
    with c.db.connect(write=False) as conn:
        assert payments.get_gateway(conn, code=demo.DEMO_GATEWAY).enabled
    actions = audit_actions(c)
    assert FORCED_ACTION in actions and MARKER_ACTION not in actions
    # Forcing once is not consent for ever: the next run asks again.
    again = run_cli(c, "demo", "--keys-per-sku", "2")
    assert again.returncode == 2 and "demo_database_in_use" in again.stderr


def test_demo_runs_again_on_its_own_database(sqlite_container: Container) -> None:
    c = sqlite_container
    first = demo_json(c)
    # What people do with a demo (register, buy) does not make it someone else's shop.
    _member(c)
    second = demo_json(c)
    assert second["member_password"] == first["member_password"]  # the browser remembers it
    assert second["gateway_key"] == first["gateway_key"]
    assert second["supplier_secret"] == first["supplier_secret"]
    assert second["api_secret"] != first["api_secret"]  # rotated, as before
    assert second["staff_token"] != first["staff_token"]
    mode = stat.S_IMODE(demo.credentials_path(c).stat().st_mode)
    assert mode == 0o600
    # A product the demo did not create, added later, is refused even on its own database.
    factories.add_product(c, sku="MY-SHOP-1")
    refused = run_cli(c, "demo", "--keys-per-sku", "2")
    assert refused.returncode == 2 and "my-shop-1" in refused.stderr


def test_two_installations_get_their_own_secrets(tmp_path: Path) -> None:
    made = []
    for name in ("a", "b"):
        c = factories.make_container(tmp_path / name)
        try:
            creds = demo_json(c)
            with c.db.connect(write=False) as conn:
                gateway = payments.get_gateway(conn, code=demo.DEMO_GATEWAY)
                supplier = suppliers.supplier_by_code(conn, demo.DEMO_SUPPLIER)
                assert payments.gateway_key(c.vault, gateway) == creds["gateway_key"]
                assert demo.demo_supplier_credentials(c) == (
                    supplier.api_key,
                    creds["supplier_secret"],
                )
                members.authenticate(
                    conn, email=creds["member_email"], password=creds["member_password"]
                )
                with pytest.raises(KamengError):
                    members.authenticate(conn, email=creds["member_email"], password="kameng-demo")
            made.append(creds)
        finally:
            c.close()
    a, b = made
    for field in SECRETS:
        assert a[field] != b[field], field
        assert a[field] not in PUBLISHED and b[field] not in PUBLISHED, field
        assert len(a[field]) >= 16, field


def test_a_database_seeded_by_an_older_demo_gets_new_secrets(sqlite_container: Container) -> None:
    """An older demo's gateway and supplier took the simulators' published secrets: seeding it
    again keeps it (it is the demo's own) but replaces them."""
    c = sqlite_container
    now = c.clock()
    with c.db.connect() as conn:
        payments.add_gateway(
            conn,
            vault=c.vault,
            code=demo.DEMO_GATEWAY,
            name="old demo",
            base_url="http://127.0.0.1:8702",
            merchant_id="1001",
            key="demo-epay-key",
            now=now,
        )
        suppliers.create_supplier(
            conn,
            c.vault,
            code=demo.DEMO_SUPPLIER,
            name="old demo",
            adapter="simulator",
            base_url="http://127.0.0.1:8701",
            api_key="demo-merchant",
            secret="demo-merchant-secret",
            now=now,
        )
    with pytest.raises(KamengError):
        demo.demo_gateway_merchant(c)  # the simulator is never started with a published key
    creds = demo_json(c)
    assert creds["gateway_key"] not in PUBLISHED and creds["supplier_secret"] not in PUBLISHED
    assert demo.demo_gateway_merchant(c) == ("1001", creds["gateway_key"])
    assert demo.demo_supplier_credentials(c) == ("demo-merchant", creds["supplier_secret"])
    assert MARKER_ACTION in audit_actions(c)


def test_a_notify_signed_with_the_published_demo_key_is_refused(
    sqlite_container: Container,
) -> None:
    c = sqlite_container
    creds = demo.seed(c, keys_per_sku=2)
    with factories.live_server(c) as url, httpx.Client(base_url=url, timeout=15) as browser:
        order_no = place_gateway_order(browser, "STEAM-50", pay=f"{demo.DEMO_GATEWAY}:alipay")
        params = {
            "pid": creds.gateway_pid,
            "trade_no": "2026120800001",
            "out_trade_no": order_no,
            "type": "alipay",
            "name": "Steam 50",
            "money": "48.50",
            "trade_status": "TRADE_SUCCESS",
        }

        def notify(key: str) -> str:
            signed = epay.signed(params, key)
            answer = httpx.get(f"{url}/pay/notify/{demo.DEMO_GATEWAY}", params=signed, timeout=10)
            return answer.text

        def status() -> str:
            with c.db.connect(write=False) as conn:
                found = order_queries.find_order(conn, order_no=order_no, reseller_id=None)
                return str(found.status)

        assert notify("demo-epay-key") == "fail"
        assert status() == "pending_payment"
        # The installation's own key is what the gateway simulator signs with.
        assert notify(creds.gateway_key) == "success"
        wait_for(lambda: status() != "pending_payment")
    factories.assert_books_clean(c)
