"""The staff CLI end to end on SQLite: what an operator types, what they see, what changes."""

from __future__ import annotations

import json

from tests.integration._helpers import run_cli
from tests.support import factories

from kameng.container import Container


def test_refusals_exit_2_with_their_code_and_no_traceback(sqlite_container: Container) -> None:
    for args, code in [
        (("reseller", "topup", "nobody", "5"), "reseller_not_found"),
        (("reseller", "create", "x", "--tier", "platinum"), "tier_not_found"),
        (("stock", "count", "--sku", "NOPE"), None),
    ]:
        result = run_cli(sqlite_container, *args)
        assert "Traceback" not in result.stderr, result.stderr
        if code is None:
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            assert code in result.stderr


def test_amounts_are_refused_rather_than_rounded(sqlite_container: Container) -> None:
    creds = factories.add_reseller(sqlite_container)
    for amount in ("abc", "0", "1.005", "1e30", "NaN"):
        result = run_cli(sqlite_container, "reseller", "topup", creds.name, amount)
        assert result.returncode == 2, (amount, result.stdout, result.stderr)
        assert "invalid_amount" in result.stderr
    negative = run_cli(sqlite_container, "reseller", "topup", creds.name, "--", "-5")
    assert negative.returncode == 2 and "invalid_amount" in negative.stderr
    assert factories.wallet_balance(sqlite_container, creds.reseller_id) == (0, 0)
    assert run_cli(sqlite_container, "reseller", "topup", creds.name, "12.34").returncode == 0
    assert factories.wallet_balance(sqlite_container, creds.reseller_id) == (1234, 0)
    factories.assert_books_clean(sqlite_container)


def test_product_reseller_and_tier_price_round_trip(sqlite_container: Container) -> None:
    made = run_cli(
        sqlite_container,
        "product", "create", "qq-vip", "--name", "QQ 会员", "--sku", "QQVIP-1M",
        "--price", "10.00", "--cost", "9.00", "--delivery", "manual",
        "--fields", '[{"name": "qq", "type": "qq", "label": "QQ号"}]',
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    bad = run_cli(
        sqlite_container,
        "product", "create", "broken", "--name", "b", "--sku", "B-1", "--price", "1",
        "--fields", '[{"name": "Bad Name"}]',
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid_field_template" in bad.stderr
    below = run_cli(sqlite_container, "tier", "price", "gold", "QQVIP-1M", "--fixed", "8.00")
    assert below.returncode == 2 and "price_below_cost" in below.stderr
    assert run_cli(sqlite_container, "tier", "price", "gold", "QQVIP-1M", "--fixed", "9.50")
    created = run_cli(sqlite_container, "reseller", "create", "acme", "--tier", "gold", "--json")
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    assert issued["api_key"].startswith("ak_") and issued["api_secret"].startswith("sk_")
    listed = run_cli(sqlite_container, "product", "list", "--json")
    assert "QQVIP-1M" in listed.stdout
    sqlite_container.invalidate_caches()
    from kameng.pricing import service as pricing

    with sqlite_container.db.unit_of_work(write=False) as session:
        tier = pricing.get_tier(session, code="gold")
        sku = sqlite_container.sku("QQVIP-1M")
        assert pricing.price_for(session, tier_id=tier.id, sku_id=sku.id) == 950


def test_product_risk_sets_level_and_qualification(sqlite_container: Container) -> None:
    """`kameng product risk` sets what screening and checkout read, and refuses nonsense."""
    c = sqlite_container
    sku = factories.add_product(c)
    done = run_cli(
        c, "product", "risk", sku.lower(), "--level", "3", "--qualification", "business_license"
    )
    assert done.returncode == 0, done.stderr
    c.invalidate_caches()
    info = c.sku(sku)
    assert (info.risk_level, info.requires_qualification, info.qualification_kind) == (
        3,
        True,
        "business_license",
    )
    assert run_cli(c, "product", "risk", sku.lower(), "--level", "7").returncode != 0
    assert run_cli(c, "product", "risk", sku.lower(), "--qualification", "a b").returncode != 0
    off = run_cli(c, "product", "risk", sku.lower(), "--qualification", "none")
    assert off.returncode == 0, off.stderr
    c.invalidate_caches()
    assert c.sku(sku).requires_qualification is False
    assert c.sku(sku).risk_level == 3
