"""Risk attributes without a database: counter names, which buyer field is the recharge account
or the contact email, proxy lists over single IPs and networks (v4 and v6), and the check that a
rule set only reads attributes screening provides."""

from __future__ import annotations

import copy
import ipaddress
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kameng.catalog.fields import validate_template
from kameng.catalog.service import SkuInfo
from kameng.errors import ErrorCode, KamengError
from kameng.orders import screening
from kameng.risk import attributes
from kameng.risk.attributes import (
    MAX_WINDOW_S,
    Counter,
    Lists,
    Subject,
    contact_email,
    known_attr,
    parse_counter,
    recharge_account,
)
from kameng.risk.defaults import DEFAULT_RULES
from kameng.risk.rules import attributes_used, parse_rules
from kameng.risk.service import check_rule_set

# -- counter names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "metric", "window_s"),
    [
        ("ip_orders_1h", "ip", "orders", 3600),
        ("buyer_amount_10m", "buyer", "amount", 600),
        ("account_buyers_24h", "account", "buyers", 86_400),
        ("device_failed_7d", "device", "failed", 7 * 86_400),
        ("email_orders_1m", "email", "orders", 60),
        ("ip_orders_90d", "ip", "orders", MAX_WINDOW_S),  # the longest window allowed
        ("ip_orders_2160h", "ip", "orders", MAX_WINDOW_S),  # the same, in hours
        ("ip_orders_129600m", None, None, None),  # five digits: not a counter name at all
    ],
)
def test_counter_names_parse_into_key_metric_and_window(
    name: str, key: str | None, metric: str | None, window_s: int | None
) -> None:
    parsed = parse_counter(name)
    if key is None:
        assert parsed is None
        return
    assert parsed == Counter(name, key, metric or "", window_s or 0)
    assert known_attr(name)


@pytest.mark.parametrize(
    "name",
    [
        "ip_orders_91d",  # longer than 90 days
        "ip_orders_2161h",  # 90 days and an hour
        "buyer_amount_9999d",
        "ip_orders_0m",  # an empty window
        "ip_orders_0d",
        "ip_orders_1w",  # weeks are not a unit
        "ip_orders_30s",  # nor are seconds
        "ip_orders_1H",  # units are lower case
        "ip_orders_h",  # no number
        "ip_orders_1",  # no unit
        "phone_orders_1h",  # not a key
        "ip_visits_1h",  # not a metric
        "ip-orders-1h",
        "orders_1h",
        "ip_orders_1h_extra",
        "xip_orders_1h",
        "",
    ],
)
def test_bad_counter_names_are_not_counters(name: str) -> None:
    assert parse_counter(name) is None
    assert not known_attr(name)


def test_a_counter_name_with_a_trailing_newline_is_not_a_counter() -> None:
    assert parse_counter("ip_orders_1h\n") is None


def test_static_attributes_are_known_and_counters_are_not_static() -> None:
    for name in attributes.STATIC_ATTRS:
        assert known_attr(name)
        assert parse_counter(name) is None
    for name in attributes.HISTORY_ATTRS:
        assert known_attr(name) and name not in attributes.STATIC_ATTRS
    assert not known_attr("amount")  # close to amount_cents, but not it
    assert not known_attr("ip_new")


# -- the recharge account and the contact email -----------------------------------------------

PHONE = {"name": "mobile", "type": "phone_cn"}
QQ = {"name": "qq", "type": "qq"}
ZONE = {"name": "zone", "type": "text"}
PLAYER = {"name": "player", "type": "text", "role": "account"}
MAIL = {"name": "contact", "type": "email"}


def test_a_field_marked_as_the_account_wins_over_phone_and_qq_fields() -> None:
    template = [PHONE, QQ, PLAYER]
    fields = {"mobile": "13800138000", "qq": "123456", "player": "hero-42"}
    assert recharge_account(template, fields) == "hero-42"


def test_an_empty_marked_field_falls_back_to_the_first_phone_or_qq_field() -> None:
    assert recharge_account([PLAYER, QQ, PHONE], {"qq": "123456", "mobile": "13800138000"}) == (
        "123456"
    )
    assert recharge_account([PHONE, QQ], {"mobile": "13800138000", "qq": "123456"}) == (
        "13800138000"
    )
    # An empty phone field is skipped: the QQ after it is the account.
    assert recharge_account([PHONE, QQ], {"mobile": "", "qq": "123456"}) == "123456"


def test_without_a_typed_field_a_field_named_like_an_account_is_used() -> None:
    assert recharge_account([ZONE], {"zone": "s1", "game_account": "g-7"}) == "g-7"
    assert recharge_account([], {"uid": "u1", "account": "a1"}) == "a1"  # account comes first
    assert recharge_account([], {"phone": "13800138000"}) == "13800138000"
    assert recharge_account([ZONE], {"zone": "s1"}) == ""
    assert recharge_account([], {}) == ""


def test_the_recharge_account_is_cut_to_128_characters() -> None:
    long = "9" * 300
    assert recharge_account([QQ], {"qq": long}) == "9" * 128
    assert recharge_account([], {"account": long}) == "9" * 128


def test_a_stored_template_keeps_the_account_role() -> None:
    stored = validate_template([ZONE, {**PLAYER}, {**QQ}])
    assert stored[1]["role"] == "account"
    assert recharge_account(stored, {"zone": "s1", "player": "hero-42", "qq": "123456"}) == (
        "hero-42"
    )
    with pytest.raises(KamengError) as refused:
        validate_template([{**PLAYER, "role": "email"}])
    assert refused.value.code is ErrorCode.invalid_field_template


def test_the_contact_email_is_the_first_email_field_trimmed_and_lower_cased() -> None:
    template = [ZONE, MAIL, {"name": "backup", "type": "email"}]
    assert contact_email(template, {"contact": "  Buyer@Example.COM "}) == "buyer@example.com"
    assert contact_email(template, {"contact": "", "backup": "B@x.cn"}) == "b@x.cn"
    assert contact_email([ZONE, QQ], {"zone": "a@b.c", "qq": "1"}) == ""
    assert contact_email(template, {}) == ""


def test_the_subject_takes_the_email_from_the_context_before_the_fields() -> None:
    sku = SkuInfo(
        id=1,
        code="S1",
        name="S1",
        product_id=1,
        product_name="P1",
        delivery_kind="card_key",
        price_cents=500,
        cost_cents=400,
        currency="CNY",
        on_sale=True,
        min_quantity=1,
        max_quantity=10,
        field_template=(MAIL, QQ),
        sla_seconds=None,
        allow_below_cost=False,
        risk_level=2,
    )
    fields = {"contact": "Form@Example.com", "qq": "123456"}

    def subject(context: screening.Context) -> Subject:
        return screening.subject_for(
            order_id=7,
            owner="m3",
            buyer_kind="member",
            channel="storefront",
            sku=sku,
            quantity=2,
            unit_price_cents=500,
            fields=fields,
            context=context,
        )

    from_form = subject(screening.Context(ip="203.0.113.9"))
    assert (from_form.email, from_form.account, from_form.ip) == (
        "form@example.com",
        "123456",
        "203.0.113.9",
    )
    assert (from_form.amount_cents, from_form.product_risk) == (1000, 2)
    member = subject(screening.Context(ip="127.0.0.1", email="member@example.com"))
    assert (member.email, member.ip) == ("member@example.com", "")


# -- lists and proxies ------------------------------------------------------------------------


def _nets(*cidrs: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


PROXIES = Lists(
    proxy_ips=frozenset({"192.0.2.10", "2001:db8:ffff::1"}),
    proxy_nets=_nets("198.51.100.0/24", "2001:db8::/48", "10.8.0.0/16"),
)


@pytest.mark.parametrize(
    ("ip", "proxy"),
    [
        ("192.0.2.10", True),  # listed on its own
        ("192.0.2.11", False),  # its neighbour is not
        ("198.51.100.0", True),  # first of the network
        ("198.51.100.255", True),  # last of the network
        ("198.51.101.0", False),  # just past it
        ("10.8.200.3", True),
        ("2001:db8::1", True),  # inside the v6 network
        ("2001:db8:0:ffff::abcd", True),
        ("2001:db8:1::1", False),  # the next /48
        ("2001:db8:ffff::1", True),  # a single v6 address
        ("2001:db9::1", False),
        ("::ffff:198.51.100.7", False),  # v4-mapped v6 is a v6 address, not in the v4 net
        ("", False),
        ("not an ip", False),
        ("198.51.100.300", False),
    ],
)
def test_proxy_list_matches_single_addresses_and_networks(ip: str, proxy: bool) -> None:
    assert PROXIES.is_proxy(ip) is proxy


def test_an_empty_proxy_list_matches_nothing() -> None:
    assert not Lists().is_proxy("198.51.100.7")
    assert not Lists(proxy_ips=frozenset({"192.0.2.10"})).is_proxy("198.51.100.7")


def test_an_ipv6_address_spelled_differently_is_still_the_listed_one() -> None:
    ip = screening.public_ip("2001:DB8:FFFF:0:0:0:0:1")
    assert PROXIES.is_proxy(ip)
    blocked = Lists(block=frozenset({("ip", "2001:db8:ffff::1")}))
    subject = Subject(1, "g1", "guest", "storefront", 100, 1, 100, 0, "card_key", ip=ip)
    assert blocked.on(blocked.block, subject)


def test_allow_and_block_lists_match_any_key_the_order_has() -> None:
    subject = Subject(
        1,
        "m3",
        "member",
        "storefront",
        100,
        1,
        100,
        0,
        "card_key",
        ip="203.0.113.5",
        email="a@b.cn",
        account="123456",
    )
    lists = Lists(
        allow=frozenset({("buyer", "m3")}),
        block=frozenset({("account", "123456"), ("device", "")}),
    )
    assert lists.on(lists.allow, subject)
    assert lists.on(lists.block, subject)
    # An empty key (no device) never matches, even an entry with an empty value.
    assert not Lists(block=frozenset({("device", "")})).on(frozenset({("device", "")}), subject)
    assert not lists.on(frozenset({("buyer", "m4"), ("ip", "203.0.113.6")}), subject)


def test_static_attributes_say_what_the_order_is_and_its_account_age() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    subject = Subject(
        1,
        "m3",
        "member",
        "storefront",
        30_000,
        3,
        10_000,
        4,
        "card_key",
        ip="198.51.100.7",
        buyer_since=now - timedelta(hours=2),
    )
    attrs = attributes.static_attrs(subject, PROXIES, now)
    assert attrs["account_age_s"] == 7200
    assert attrs["ip_proxy"] is True
    assert (attrs["has_email"], attrs["has_account"]) == (False, False)
    assert (attrs["listed_allow"], attrs["listed_block"]) == (False, False)
    guest = Subject(2, "gx", "guest", "storefront", 100, 1, 100, 0, "card_key")
    assert "account_age_s" not in attributes.static_attrs(guest, PROXIES, now)
    # A clock behind the account's creation never gives a negative age.
    ahead = Subject(
        3, "m4", "member", "api", 1, 1, 1, 0, "manual", buyer_since=now + timedelta(minutes=5)
    )
    assert attributes.static_attrs(ahead, Lists(), now)["account_age_s"] == 0


# -- checking rule sets -----------------------------------------------------------------------


def _rule(when: dict[str, Any], code: str = "r1") -> dict[str, Any]:
    return {
        "code": code,
        "action": "review",
        "when": when,
        "explain": {"zh-CN": "测试", "en": "test"},
    }


def _cmp(attr: str, op: str = ">=", value: Any = 1) -> dict[str, Any]:
    return {"attr": attr, "op": op, "value": value}


def test_the_bundled_rules_pass_the_check() -> None:
    rules = check_rule_set(copy.deepcopy(DEFAULT_RULES))
    assert len(rules) == len(DEFAULT_RULES)
    assert [r.priority for r in rules] == sorted(r.priority for r in rules)


@pytest.mark.parametrize(
    ("when", "unknown"),
    [
        (_cmp("ip_orders_91d"), "ip_orders_91d"),
        (_cmp("amount"), "amount"),
        ({"all": [_cmp("amount_cents"), {"not": _cmp("phone_orders_1h")}]}, "phone_orders_1h"),
        ({"any": [_cmp("ip_orders_1h"), _cmp("zz_top"), _cmp("aa_first")]}, "aa_first"),
    ],
)
def test_a_rule_reading_an_unknown_attribute_is_refused_naming_rule_and_attribute(
    when: dict[str, Any], unknown: str
) -> None:
    parse_rules([_rule(when, "strict_one")])  # well formed: only the attribute is wrong
    with pytest.raises(KamengError) as refused:
        check_rule_set([_rule(_cmp("amount_cents"), "fine"), _rule(when, "strict_one")])
    assert refused.value.code is ErrorCode.invalid_request
    message = refused.value.message("en")
    assert "strict_one" in message
    assert f"unknown attribute {unknown}" in message
    assert "fine" not in message


def test_rules_reading_known_counters_and_static_attributes_pass() -> None:
    rules = check_rule_set(
        [
            _rule(
                {
                    "all": [
                        _cmp("channel", "==", "storefront"),
                        _cmp("ip_orders_90d", ">=", 100),
                        {"not": _cmp("listed_allow", "==", True)},
                    ]
                },
                "long_window",
            ),
            _rule({"any": [_cmp("email_buyers_10m"), _cmp("account_amount_24h")]}, "mix"),
        ]
    )
    assert [r.code for r in rules] == ["long_window", "mix"]


def test_attributes_used_collects_every_attribute_through_all_any_and_not() -> None:
    when = {
        "all": [
            _cmp("channel", "==", "storefront"),
            {
                "any": [
                    _cmp("ip_orders_1h"),
                    {"not": {"all": [_cmp("amount_cents"), _cmp("ip_orders_1h")]}},
                ]
            },
            {"not": _cmp("device_buyers_24h")},
        ]
    }
    assert attributes_used(when) == {
        "channel",
        "ip_orders_1h",
        "amount_cents",
        "device_buyers_24h",
    }
    assert attributes_used(_cmp("quantity")) == {"quantity"}


def test_the_bundled_rules_read_these_counters() -> None:
    used: set[str] = set()
    for rule in parse_rules(copy.deepcopy(DEFAULT_RULES)):
        used |= attributes_used(rule.when)
    counters = {n for n in used if parse_counter(n) is not None}
    assert counters == {
        "ip_orders_1h",
        "device_orders_1h",
        "ip_orders_10m",
        "device_orders_10m",
        "buyer_orders_1h",
        "account_buyers_24h",
        "device_buyers_24h",
        "buyer_failed_24h",
        "ip_failed_1h",
    }
    assert used - counters <= attributes.STATIC_ATTRS | attributes.HISTORY_ATTRS
