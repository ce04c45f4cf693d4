"""The bundled rule set: what a fresh installation screens with (version 1).

Storefront traffic (`channel` storefront) is where card fraud shows up: stolen payment accounts
bought in bursts from one IP or browser, many buyers topping up one account (a laundering
pattern), new accounts with large amounts, anonymising proxies. Resellers order through the
signed API from prepaid balances, so bursts from one IP are their normal business: only the
lists and very large orders apply to them. Rules that only add to the score (action allow) come
last, since the first matching rule decides. Measured on `bench/risk_dataset.py`
(docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any


def _cmp(attr: str, op: str, value: Any) -> dict[str, Any]:
    return {"attr": attr, "op": op, "value": value}


WEB = _cmp("channel", "==", "storefront")
NOT_RESELLER = _cmp("buyer_kind", "!=", "reseller")

DEFAULT_RULES: list[dict[str, Any]] = [
    {
        "code": "allow_listed",
        "priority": 0,
        "action": "allow",
        "when": _cmp("listed_allow", "==", True),
        "explain": {"zh-CN": "在白名单中", "en": "On the allow list"},
    },
    {
        "code": "block_listed",
        "priority": 1,
        "action": "block",
        "score": 1000,
        "when": _cmp("listed_block", "==", True),
        "explain": {"zh-CN": "在黑名单中", "en": "On the block list"},
    },
    {
        "code": "ip_flood",
        "priority": 10,
        "action": "block",
        "score": 500,
        "category": "velocity",
        "when": {"all": [WEB, _cmp("ip_orders_1h", ">=", 30)]},
        "explain": {
            "zh-CN": "同一 IP 一小时内下单超过 30 笔",
            "en": "More than 30 orders from one IP within an hour",
        },
    },
    {
        "code": "velocity_ip",
        "priority": 20,
        "action": "review",
        "score": 200,
        "category": "velocity",
        "when": {"all": [WEB, _cmp("ip_orders_1h", ">=", 6)]},
        "explain": {
            "zh-CN": "同一 IP 一小时内下单 6 笔及以上",
            "en": "Six or more orders from one IP within an hour",
        },
    },
    {
        "code": "velocity_device",
        "priority": 21,
        "action": "review",
        "score": 200,
        "category": "velocity",
        "when": {"all": [WEB, _cmp("device_orders_1h", ">=", 6)]},
        "explain": {
            "zh-CN": "同一浏览器一小时内下单 6 笔及以上",
            "en": "Six or more orders from one browser within an hour",
        },
    },
    {
        "code": "velocity_buyer",
        "priority": 22,
        "action": "review",
        "score": 150,
        "category": "velocity",
        "when": {"all": [NOT_RESELLER, _cmp("buyer_orders_1h", ">=", 8)]},
        "explain": {
            "zh-CN": "同一买家一小时内下单 8 笔及以上",
            "en": "Eight or more orders by one buyer within an hour",
        },
    },
    {
        "code": "velocity_guest",
        "priority": 23,
        "action": "review",
        "score": 150,
        "category": "velocity",
        "when": {
            "all": [
                WEB,
                _cmp("buyer_kind", "==", "guest"),
                {"any": [_cmp("device_orders_1h", ">=", 4), _cmp("ip_orders_1h", ">=", 4)]},
            ]
        },
        "explain": {
            "zh-CN": "未登录买家一小时内在同一浏览器或 IP 下单 4 笔及以上",
            "en": "Four or more guest orders from one browser or IP within an hour",
        },
    },
    {
        "code": "guest_quick_repeat",
        "priority": 24,
        "action": "review",
        "score": 150,
        "category": "velocity",
        "when": {
            "all": [
                WEB,
                _cmp("buyer_kind", "==", "guest"),
                {"any": [_cmp("device_orders_10m", ">=", 3), _cmp("ip_orders_10m", ">=", 3)]},
            ]
        },
        "explain": {
            "zh-CN": "未登录买家十分钟内在同一浏览器或 IP 下单 3 笔及以上",
            "en": "Three or more guest orders from one browser or IP within ten minutes",
        },
    },
    {
        "code": "account_many_buyers",
        "priority": 30,
        "action": "review",
        "score": 250,
        "category": "recharge_account",
        "when": {"all": [WEB, _cmp("account_buyers_24h", ">=", 3)]},
        "explain": {
            "zh-CN": "同一充值账号 24 小时内被 3 个及以上买家充值",
            "en": "One recharge account topped up by three or more buyers within 24 hours",
        },
    },
    {
        "code": "account_second_guest",
        "priority": 32,
        "action": "review",
        "score": 150,
        "category": "recharge_account",
        "when": {
            "all": [
                WEB,
                _cmp("buyer_kind", "==", "guest"),
                _cmp("account_buyers_24h", ">=", 2),
            ]
        },
        "explain": {
            "zh-CN": "未登录买家为 24 小时内已被他人充值的账号充值",
            "en": "A guest topping up an account another buyer topped up within 24 hours",
        },
    },
    {
        "code": "device_many_buyers",
        "priority": 31,
        "action": "review",
        "score": 200,
        "category": "account",
        "when": {"all": [WEB, _cmp("device_buyers_24h", ">=", 3)]},
        "explain": {
            "zh-CN": "同一浏览器 24 小时内登录了 3 个及以上买家账户",
            "en": "Three or more buyer accounts used one browser within 24 hours",
        },
    },
    {
        "code": "new_account_big",
        "priority": 40,
        "action": "review",
        "score": 200,
        "category": "account",
        "when": {
            "all": [
                _cmp("buyer_kind", "==", "member"),
                _cmp("account_age_s", "<", 3 * 86400),
                _cmp("amount_cents", ">=", 30000),
            ]
        },
        "explain": {
            "zh-CN": "注册不足 3 天的账户下单 300 元及以上",
            "en": "An account under three days old ordering 300 or more",
        },
    },
    {
        "code": "fresh_account_order",
        "priority": 42,
        "action": "review",
        "score": 100,
        "category": "account",
        "when": {
            "all": [
                _cmp("buyer_kind", "==", "member"),
                _cmp("account_age_s", "<", 2 * 3600),
                _cmp("amount_cents", ">=", 15000),
            ]
        },
        "explain": {
            "zh-CN": "注册不足 2 小时的账户下单 150 元及以上",
            "en": "An account under two hours old ordering 150 or more",
        },
    },
    {
        "code": "guest_big",
        "priority": 41,
        "action": "review",
        "score": 150,
        "category": "amount",
        "when": {"all": [_cmp("buyer_kind", "==", "guest"), _cmp("amount_cents", ">=", 100000)]},
        "explain": {
            "zh-CN": "未登录买家下单 1000 元及以上",
            "en": "A guest ordering 1,000 or more",
        },
    },
    {
        "code": "proxy_amount",
        "priority": 50,
        "action": "review",
        "score": 150,
        "category": "network",
        "when": {"all": [WEB, _cmp("ip_proxy", "==", True), _cmp("amount_cents", ">=", 10000)]},
        "explain": {
            "zh-CN": "通过代理或匿名网络下单 100 元及以上",
            "en": "An order of 100 or more through a proxy or anonymising network",
        },
    },
    {
        # A VPN is normal for an old account; an account under a month old that hides where it
        # is has neither history nor a place to vouch for it, whatever the amount.
        "code": "proxy_young_member",
        "priority": 51,
        "action": "review",
        "score": 150,
        "category": "network",
        "when": {
            "all": [
                WEB,
                _cmp("ip_proxy", "==", True),
                _cmp("buyer_kind", "==", "member"),
                _cmp("account_age_s", "<", 30 * 86400),
            ]
        },
        "explain": {
            "zh-CN": "注册不足 30 天的账户通过代理网络下单",
            "en": "An account under 30 days old ordering through a proxy",
        },
    },
    {
        "code": "proxy_new_ip",
        "priority": 902,  # score only: a returning buyer's VPN changing exit is common
        "action": "allow",
        "score": 100,
        "category": "network",
        "when": {"all": [WEB, _cmp("ip_proxy", "==", True), _cmp("ip_new_for_buyer", "==", True)]},
        "explain": {
            "zh-CN": "老买家首次从代理网络下单",
            "en": "A returning buyer ordering from a proxy for the first time",
        },
    },
    {
        "code": "failed_payments",
        "priority": 60,
        "action": "review",
        "score": 150,
        "category": "velocity",
        "when": {
            "any": [
                {"all": [NOT_RESELLER, _cmp("buyer_failed_24h", ">=", 3)]},
                {"all": [WEB, _cmp("ip_failed_1h", ">=", 4)]},
            ]
        },
        "explain": {
            "zh-CN": "近期多笔订单未完成支付",
            "en": "Several recent orders were never paid",
        },
    },
    {
        # Score only: a fresh guest is always "not seen before", so as a review rule it flagged
        # ordinary first gift-card purchases and decided no fraud the other rules missed.
        "code": "risky_product_first_order",
        "priority": 903,
        "action": "allow",
        "score": 100,
        "category": "product",
        "when": {
            "all": [
                NOT_RESELLER,
                _cmp("product_risk", ">=", 3),
                _cmp("amount_cents", ">=", 20000),
                _cmp("buyer_seen_before", "==", False),
            ]
        },
        "explain": {
            "zh-CN": "高风险商品的首次大额订单",
            "en": "A first large order of a high-risk product",
        },
    },
    {
        "code": "reseller_very_large",
        "priority": 80,
        "action": "review",
        "score": 100,
        "category": "amount",
        "when": {
            "all": [_cmp("buyer_kind", "==", "reseller"), _cmp("amount_cents", ">=", 2_000_000)]
        },
        "explain": {
            "zh-CN": "代理商单笔订单 2 万元及以上",
            "en": "A reseller order of 20,000 or more",
        },
    },
    {
        "code": "note_proxy",
        "priority": 900,
        "action": "allow",
        "score": 30,
        "category": "network",
        "when": _cmp("ip_proxy", "==", True),
        "explain": {"zh-CN": "代理网络", "en": "Proxy network"},
    },
    {
        "code": "note_new_ip",
        "priority": 901,
        "action": "allow",
        "score": 10,
        "category": "network",
        "when": {"all": [WEB, _cmp("ip_new_for_buyer", "==", True)]},
        "explain": {"zh-CN": "买家的新 IP", "en": "A new IP for this buyer"},
    },
]
