"""Risk rules as data, and their evaluation: pure functions, no I/O.

A rule is `action if condition`:

    {"code": "big_new_account", "priority": 20, "action": "review", "score": 40,
     "when": {"all": [{"attr": "amount_cents", "op": ">=", "value": 50000},
                      {"attr": "account_age_s", "op": "<", "value": 86400}]},
     "explain": {"zh-CN": "新账户大额订单", "en": "A large order from a new account"}}

Conditions are `all` / `any` / `not` over comparisons of one attribute (`==`, `!=`, `<`, `<=`,
`>`, `>=`, `in`, `not_in`). A rule set is checked once when it is saved (`parse_rules`), so a
bad rule is refused with a clear message instead of failing while screening orders. Screening
(`evaluate`) takes the first matching rule by priority as the decision, and adds up the scores
of every matching rule: the decision is explainable (which rule, in the buyer's words) and the
score shows what else contributed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kameng.errors import ErrorCode, KamengError

MAX_RULES = 500
MAX_DEPTH = 8


# What a buyer is told about why their order is being checked: a plain category, never the rule.
CATEGORIES: dict[str, tuple[str, str]] = {
    "velocity": ("短时间内下单较多", "many orders in a short time"),
    "amount": ("订单金额较大", "a large order amount"),
    "account": ("账户较新或信息待核实", "a new account or details to verify"),
    "network": ("网络环境异常", "an unusual network"),
    "recharge_account": ("充值账号需核实", "the recharge account needs checking"),
    "product": ("该商品需额外核验", "this product needs an extra check"),
    "general": ("常规安全核验", "a routine safety check"),
}


class Action(StrEnum):
    allow = "allow"
    review = "review"
    block = "block"


_COMPARE = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b,
}
_ORDERED = frozenset({"<", "<=", ">", ">="})


@dataclass(frozen=True, slots=True)
class Rule:
    code: str
    priority: int
    action: Action
    score: int
    when: dict[str, Any]
    explain_zh: str
    explain_en: str
    category: str = "general"

    def explain(self, language: str) -> str:
        return self.explain_en if language == "en" else self.explain_zh


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: Rule | None  # the deciding rule; None when nothing matched (allowed by default)
    score: int
    matched: tuple[str, ...]  # codes of every matching rule, in priority order

    @property
    def category(self) -> str:
        return self.rule.category if self.rule is not None else "general"


def _bad(detail: str) -> KamengError:
    return KamengError(ErrorCode.invalid_request, detail=f"risk rule: {detail}")


def _check_condition(cond: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _bad(f"{where}: conditions nest deeper than {MAX_DEPTH}")
    if not isinstance(cond, dict) or len(cond) == 0:
        raise _bad(f"{where}: a condition is an object")
    if "all" in cond or "any" in cond:
        key = "all" if "all" in cond else "any"
        parts = cond[key]
        if len(cond) != 1 or not isinstance(parts, list) or not parts:
            raise _bad(f"{where}: '{key}' takes a non-empty list and nothing else")
        for i, part in enumerate(parts):
            _check_condition(part, f"{where}.{key}[{i}]", depth + 1)
        return
    if "not" in cond:
        if len(cond) != 1:
            raise _bad(f"{where}: 'not' takes one condition and nothing else")
        _check_condition(cond["not"], f"{where}.not", depth + 1)
        return
    if set(cond) != {"attr", "op", "value"}:
        raise _bad(f"{where}: a comparison is {{attr, op, value}}")
    attr, op, value = cond["attr"], cond["op"], cond["value"]
    if not isinstance(attr, str) or not attr.isidentifier():
        raise _bad(f"{where}: attr must be a name")
    if op not in _COMPARE:
        raise _bad(f"{where}: op must be one of {sorted(_COMPARE)}")
    if op in ("in", "not_in") and not isinstance(value, list):
        raise _bad(f"{where}: '{op}' compares with a list")
    if op in _ORDERED and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise _bad(f"{where}: '{op}' compares with a number")


def parse_rules(raw: Any) -> list[Rule]:
    """Check a rule set (a list of rule objects) and return it sorted by priority. Codes are
    unique; every rule explains itself in both languages."""
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise _bad(f"a rule set is a list of at most {MAX_RULES} rules")
    rules: list[Rule] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"#{i}"
        if not isinstance(item, dict):
            raise _bad(f"{where}: a rule is an object")
        code = item.get("code")
        if not isinstance(code, str) or not code.isidentifier() or len(code) > 64:
            raise _bad(f"{where}: code must be a name of at most 64 characters")
        if code in seen:
            raise _bad(f"{where}: duplicate code {code}")
        seen.add(code)
        try:
            action = Action(str(item.get("action")))
        except ValueError:
            raise _bad(f"{code}: action must be allow, review or block") from None
        priority, score = item.get("priority", 100), item.get("score", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise _bad(f"{code}: priority must be a whole number")
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 1000:
            raise _bad(f"{code}: score must be a whole number 0-1000")
        explain = item.get("explain")
        if not (
            isinstance(explain, dict)
            and all(isinstance(explain.get(k), str) and explain[k].strip() for k in ("zh-CN", "en"))
        ):
            raise _bad(f"{code}: explain needs zh-CN and en texts")
        _check_condition(item.get("when"), code)
        category = item.get("category", "general")
        if category not in CATEGORIES:
            raise _bad(f"{code}: category must be one of {sorted(CATEGORIES)}")
        rules.append(
            Rule(
                code,
                priority,
                action,
                score,
                item["when"],
                explain["zh-CN"],
                explain["en"],
                category,
            )
        )
    return sorted(rules, key=lambda r: (r.priority, r.code))


def attributes_used(cond: Mapping[str, Any]) -> set[str]:
    """Every attribute a (checked) condition reads."""
    if "all" in cond or "any" in cond:
        return set().union(*(attributes_used(c) for c in cond["all" if "all" in cond else "any"]))
    if "not" in cond:
        return attributes_used(cond["not"])
    return {str(cond["attr"])}


def could_match(
    cond: Mapping[str, Any], attrs: Mapping[str, Any], pending: frozenset[str]
) -> bool | None:
    """Three-valued: whether a condition can still match when the attributes in `pending` are
    not computed yet (True / False when already decided, None when it depends on them). Lets
    screening skip counting for rules the order's own facts already rule out."""
    if "all" in cond or "any" in cond:
        parts = [could_match(c, attrs, pending) for c in cond["all" if "all" in cond else "any"]]
        if "all" in cond:
            return False if False in parts else (True if all(parts) else None)
        return True if True in parts else (False if all(p is False for p in parts) else None)
    if "not" in cond:
        inner = could_match(cond["not"], attrs, pending)
        return None if inner is None else not inner
    if cond["attr"] in pending:
        return None
    return matches(cond, attrs)


def matches(cond: Mapping[str, Any], attrs: Mapping[str, Any]) -> bool:
    """Whether `attrs` satisfy a (checked) condition. A missing attribute, or one of a type
    the comparison cannot take, never matches (so an absent fact cannot block an order)."""
    if "all" in cond:
        return all(matches(c, attrs) for c in cond["all"])
    if "any" in cond:
        return any(matches(c, attrs) for c in cond["any"])
    if "not" in cond:
        return not matches(cond["not"], attrs)
    if cond["attr"] not in attrs:
        return False
    value = attrs[cond["attr"]]
    if cond["op"] in _ORDERED and (isinstance(value, bool) or not isinstance(value, int | float)):
        return False
    try:
        return bool(_COMPARE[cond["op"]](value, cond["value"]))
    except TypeError:
        return False


Test = Callable[[Mapping[str, Any]], bool]
Maybe = Callable[[Mapping[str, Any]], "bool | None"]
_MISSING = object()


def compile_condition(cond: Mapping[str, Any]) -> Test:
    """The same truth as `matches`, as nested closures built once per rule set: screening runs
    on the order hot path, where walking the JSON tree for every order costs more than the
    database work it decides about."""
    if "all" in cond or "any" in cond:
        parts = tuple(compile_condition(c) for c in cond["all" if "all" in cond else "any"])
        if "all" in cond:
            return lambda a: all(p(a) for p in parts)
        return lambda a: any(p(a) for p in parts)
    if "not" in cond:
        inner = compile_condition(cond["not"])
        return lambda a: not inner(a)
    name, op, value = cond["attr"], cond["op"], cond["value"]
    compare = _COMPARE[op]
    ordered = op in _ORDERED
    if op in ("in", "not_in"):
        value = list(value)

    def test(a: Mapping[str, Any]) -> bool:
        got = a.get(name, _MISSING)
        if got is _MISSING:
            return False
        if ordered and (isinstance(got, bool) or not isinstance(got, int | float)):
            return False
        try:
            return bool(compare(got, value))
        except TypeError:
            return False

    return test


def compile_could_match(cond: Mapping[str, Any], pending: frozenset[str]) -> Maybe:
    """`could_match` compiled for a fixed set of pending attributes."""
    if "all" in cond or "any" in cond:
        parts = [compile_could_match(c, pending) for c in cond["all" if "all" in cond else "any"]]
        if "all" in cond:

            def all_of(a: Mapping[str, Any]) -> bool | None:
                unknown = False
                for p in parts:
                    got = p(a)
                    if got is False:
                        return False
                    if got is None:
                        unknown = True
                return None if unknown else True

            return all_of

        def any_of(a: Mapping[str, Any]) -> bool | None:
            unknown = False
            for p in parts:
                got = p(a)
                if got is True:
                    return True
                if got is None:
                    unknown = True
            return None if unknown else False

        return any_of
    if "not" in cond:
        inner = compile_could_match(cond["not"], pending)

        def negate(a: Mapping[str, Any]) -> bool | None:
            got = inner(a)
            return None if got is None else not got

        return negate
    if cond["attr"] in pending:
        return lambda a: None
    test = compile_condition(cond)
    return test


@dataclass(frozen=True, slots=True)
class Compiled:
    """A checked rule set ready for screening: each rule with its compiled condition."""

    rules: tuple[Rule, ...]
    tests: tuple[Test, ...]

    @classmethod
    def of(cls, rules: list[Rule]) -> Compiled:
        return cls(tuple(rules), tuple(compile_condition(r.when) for r in rules))

    def evaluate(self, attrs: Mapping[str, Any]) -> Verdict:
        hits = [r for r, t in zip(self.rules, self.tests, strict=True) if t(attrs)]
        decider = hits[0] if hits else None
        return Verdict(
            action=decider.action if decider else Action.allow,
            rule=decider,
            score=sum(r.score for r in hits),
            matched=tuple(r.code for r in hits),
        )


def evaluate(rules: list[Rule], attrs: Mapping[str, Any]) -> Verdict:
    """The first matching rule (by priority) decides; every matching rule adds its score."""
    hits = [r for r in rules if matches(r.when, attrs)]
    decider = hits[0] if hits else None
    return Verdict(
        action=decider.action if decider else Action.allow,
        rule=decider,
        score=sum(r.score for r in hits),
        matched=tuple(r.code for r in hits),
    )
