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
