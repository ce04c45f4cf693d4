"""Every text a storefront template asks for exists in both languages (a missing key would
render as an empty string, silently)."""

from __future__ import annotations

import re
from pathlib import Path

from kameng.web.i18n import TEXT

TEMPLATES = Path(__file__).parents[2] / "src" / "kameng" / "web" / "templates"
_KEY = re.compile(r"\bt\.([a-z_]+)|\bt\['([a-z_]+)'\]")


def test_both_languages_have_the_same_keys() -> None:
    assert set(TEXT["zh-CN"]) == set(TEXT["en"])
    assert all(v.strip() for lang in TEXT.values() for v in lang.values())


def test_every_key_used_by_a_template_exists() -> None:
    used: set[str] = set()
    for path in TEMPLATES.glob("*.html"):
        for a, b in _KEY.findall(path.read_text()):
            used.add(a or b)
    # Dynamic keys: pay_gateway_<type>, payment_state_<state>.
    dynamic = {k for k in TEXT["en"] if k.startswith(("pay_gateway_", "payment_state_"))}
    assert used, "no template texts found"
    missing = sorted(used - set(TEXT["en"]))
    assert not missing, missing
    assert dynamic <= set(TEXT["en"])


def test_no_text_key_is_shadowed_by_a_dict_method() -> None:
    """`{{ t.keys }}` would render dict.keys: such names must be looked up as t['...']."""
    shadowed = {k for k in TEXT["en"] if hasattr(dict, k)}
    for path in TEMPLATES.glob("*.html"):
        for name in shadowed:
            assert f"t.{name} " not in path.read_text() and f"t.{name}}}" not in path.read_text()


def test_guest_wording_exists_for_every_refund_to_balance() -> None:
    """Every reason that tells a buyer "refunded to balance" has a guest wording, and the guest
    wording never mentions a balance (a guest has none)."""
    from kameng.orders.explain import GUEST_REASON_TEXT, REASON_TEXT

    assert set(GUEST_REASON_TEXT) <= set(REASON_TEXT)
    for zh, en in GUEST_REASON_TEXT.values():
        assert "余额" not in zh and "balance" not in en
    mentions = {k for k, (zh, _) in REASON_TEXT.items() if "退回余额" in zh or "退回您的余额" in zh}
    missing = mentions - set(GUEST_REASON_TEXT) - {"canceled_by_buyer"}  # buyers cancel paid
    assert not missing, sorted(missing)
