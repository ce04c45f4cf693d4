"""The risk rule language: validation of rule sets and their evaluation (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kameng.errors import KamengError
from kameng.risk.rules import Action, evaluate, matches, parse_rules

EXPLAIN = {"zh-CN": "说明", "en": "explanation"}


def rule(code: str, action: str, when: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"code": code, "action": action, "when": when, "explain": EXPLAIN, **kw}


RULES = parse_rules(
    [
        rule(
            "blocklisted_ip",
            "block",
            {"attr": "ip_blocked", "op": "==", "value": True},
            priority=1,
            score=100,
        ),
        rule(
            "big_new_account",
            "review",
            {
                "all": [
                    {"attr": "amount_cents", "op": ">=", "value": 50_000},
                    {"attr": "account_age_s", "op": "<", "value": 86_400},
                ]
            },
            priority=20,
            score=40,
        ),
        rule(
            "velocity",
            "review",
            {"attr": "orders_per_hour", "op": ">", "value": 10},
            priority=30,
            score=30,
        ),
        rule("trusted", "allow", {"attr": "buyer", "op": "in", "value": ["vip-1"]}, priority=50),
    ]
)


def test_first_match_by_priority_decides_and_every_match_scores() -> None:
    verdict = evaluate(RULES, {"amount_cents": 60_000, "account_age_s": 10, "orders_per_hour": 20})
    assert verdict.action is Action.review and verdict.rule is not None
    assert verdict.rule.code == "big_new_account"
    assert (verdict.score, verdict.matched) == (70, ("big_new_account", "velocity"))
    assert verdict.rule.explain("en") == "explanation"


def test_nothing_matching_is_allowed_with_no_score() -> None:
    verdict = evaluate(RULES, {"amount_cents": 100})
    assert (verdict.action, verdict.rule, verdict.score, verdict.matched) == (
        Action.allow,
        None,
        0,
        (),
    )


def test_block_outranks_by_priority() -> None:
    verdict = evaluate(RULES, {"ip_blocked": True, "buyer": "vip-1"})
    assert verdict.action is Action.block and verdict.matched == ("blocklisted_ip", "trusted")


@pytest.mark.parametrize(
    "attrs",
    [{}, {"amount_cents": "a lot", "account_age_s": 1}, {"amount_cents": True, "account_age_s": 1}],
)
def test_missing_or_wrongly_typed_facts_never_match(attrs: dict[str, Any]) -> None:
    assert not matches(RULES[1].when, attrs)


def test_not_and_any() -> None:
    cond = {
        "not": {
            "any": [{"attr": "x", "op": "==", "value": 1}, {"attr": "y", "op": "==", "value": 2}]
        }
    }
    parse_rules([rule("n", "review", cond)])
    assert matches(cond, {"x": 0, "y": 0}) and not matches(cond, {"x": 1})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("nope", "a rule set is a list"),
        ([1], "a rule is an object"),
        ([rule("bad code", "review", {"attr": "x", "op": "==", "value": 1})], "code must be"),
        ([rule("a", "maybe", {"attr": "x", "op": "==", "value": 1})], "action must be"),
        ([rule("a", "review", {"attr": "x", "op": "~", "value": 1})], "op must be"),
        ([rule("a", "review", {"attr": "x", "op": ">", "value": "5"})], "compares with a number"),
        ([rule("a", "review", {"attr": "x", "op": "in", "value": 5})], "compares with a list"),
        ([rule("a", "review", {"all": []})], "non-empty list"),
        ([rule("a", "review", {"attr": "x", "op": "==", "value": 1, "extra": 1})], "comparison"),
        ([rule("a", "review", {"attr": "x", "op": "==", "value": 1}, score=-1)], "score"),
        ([rule("a", "review", {"attr": "x", "op": "==", "value": 1}, priority="1")], "priority"),
        (
            [
                {
                    "code": "a",
                    "action": "review",
                    "when": {"attr": "x", "op": "==", "value": 1},
                    "explain": {"zh-CN": "只有中文"},
                }
            ],
            "explain needs",
        ),
        (
            [
                rule("a", "review", {"attr": "x", "op": "==", "value": 1}),
                rule("a", "block", {"attr": "x", "op": "==", "value": 1}),
            ],
            "duplicate code",
        ),
    ],
)
def test_bad_rule_sets_are_refused_with_a_clear_message(raw: Any, fragment: str) -> None:
    with pytest.raises(KamengError) as refused:
        parse_rules(raw)
    assert refused.value.code == "invalid_request"
    assert fragment in refused.value.message("en")


def test_deep_nesting_is_refused() -> None:
    cond: dict[str, Any] = {"attr": "x", "op": "==", "value": 1}
    for _ in range(10):
        cond = {"not": cond}
    with pytest.raises(KamengError):
        parse_rules([rule("deep", "review", cond)])


@given(
    amount=st.integers(min_value=0, max_value=10**7),
    age=st.integers(min_value=0, max_value=10**7),
    rate=st.integers(min_value=0, max_value=100),
)
def test_verdict_is_the_first_matching_rule(amount: int, age: int, rate: int) -> None:
    attrs = {"amount_cents": amount, "account_age_s": age, "orders_per_hour": rate}
    verdict = evaluate(RULES, attrs)
    expected = [r for r in RULES if matches(r.when, attrs)]
    assert verdict.matched == tuple(r.code for r in expected)
    assert verdict.action is (expected[0].action if expected else Action.allow)


def test_compiled_rules_decide_exactly_as_the_interpreter() -> None:
    """The compiled form (used on the hot path) against `evaluate`/`could_match` on many
    attribute combinations, including missing and wrongly typed values."""
    import itertools

    from kameng.risk.defaults import DEFAULT_RULES
    from kameng.risk.rules import Compiled, compile_could_match, could_match, evaluate

    rules = parse_rules(DEFAULT_RULES)
    compiled = Compiled.of(rules)
    lazy = frozenset({"ip_orders_1h", "device_orders_10m", "account_buyers_24h"})
    choices = {
        "channel": ["storefront", "api", None],
        "buyer_kind": ["guest", "member", "reseller"],
        "amount_cents": [0, 15_000, 120_000, "x"],
        "ip_orders_1h": [1, 6, 40, None],
        "device_orders_10m": [1, 3, None],
        "account_buyers_24h": [1, 2, 5, None],
        "account_age_s": [10, 10**7, None],
        "ip_proxy": [True, False],
    }
    names = list(choices)
    for values in itertools.product(*choices.values()):
        attrs = {n: v for n, v in zip(names, values, strict=True) if v is not None}
        assert compiled.evaluate(attrs) == evaluate(rules, attrs)
        static = {k: v for k, v in attrs.items() if k not in lazy}
        for rule in rules:
            assert compile_could_match(rule.when, lazy)(static) == could_match(
                rule.when, static, lazy
            )
