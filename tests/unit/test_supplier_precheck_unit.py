"""`Precheck`, the supplier pre-check answer: only a yes or a no is decisive, and no answer can
never read as a refusal. Plus the simulator adapter's mapping of pre-check bodies."""

from __future__ import annotations

from dataclasses import FrozenInstanceError

import pytest

from kameng.suppliers.adapters.kameng import KamengSupplier
from kameng.suppliers.adapters.simulator import SimulatorSupplier, precheck_from_body
from kameng.suppliers.port import PRECHECK_REFUSALS, Precheck, PrecheckPort


def test_passed_is_decisive_and_ok() -> None:
    answer = Precheck.passed()
    assert (answer.ok, answer.decisive, answer.reason, answer.field) == (True, True, "", "")
    assert answer.message_zh != answer.message_en


@pytest.mark.parametrize("reason", sorted(PRECHECK_REFUSALS))
def test_each_refusal_has_its_own_texts(reason: str) -> None:
    answer = Precheck.refused(reason, field="account")
    assert (answer.ok, answer.decisive, answer.field) == (False, True, "account")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in answer.message_zh)
    assert answer.message_en.isascii() and answer.message_en
    others = {Precheck.refused(r).message_en for r in PRECHECK_REFUSALS if r != reason}
    assert answer.message_en not in others


def test_unavailable_is_ok_but_not_decisive() -> None:
    answer = Precheck.unavailable("timeout")
    assert (answer.ok, answer.decisive, answer.reason, answer.detail) == (
        True,
        False,
        "unavailable",
        "timeout",
    )
    assert answer.message_zh and answer.message_en


@pytest.mark.parametrize(
    ("ok", "reason"),
    [(False, ""), (False, "unavailable"), (True, "account_not_found"), (True, "whatever")],
)
def test_contradictions_cannot_be_built(ok: bool, reason: str) -> None:
    with pytest.raises(ValueError):
        Precheck(ok=ok, reason=reason)


def test_it_is_frozen() -> None:
    answer = Precheck.passed()
    with pytest.raises(FrozenInstanceError):
        setattr(answer, "ok", False)


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"status": "ok", "sku": "S"}, 200, (True, "", "")),
        (
            {"status": "refused", "reason": "account_not_found", "field": "account"},
            200,
            (False, "account_not_found", "account"),
        ),
        (
            {"status": "refused", "reason": "denomination_closed"},
            200,
            (False, "denomination_closed", ""),
        ),
        (
            {"status": "refused", "reason": "invalid_fields", "field": 7},
            200,
            (False, "invalid_fields", ""),
        ),
        # A refusal we do not understand must never turn a buyer away.
        ({"status": "refused", "reason": "moon_phase"}, 200, (True, "unavailable", "")),
        ({"status": "maybe"}, 200, (True, "unavailable", "")),
        (None, 200, (True, "unavailable", "")),
        ({"status": "ok"}, 500, (True, "unavailable", "")),
        ({"status": "rejected", "reason": "unknown_sku"}, 404, (True, "unavailable", "")),
    ],
)
def test_simulator_body_mapping(
    body: dict[str, object] | None, status: int, expected: tuple[bool, str, str]
) -> None:
    answer = precheck_from_body(body, http_status=status)
    assert (answer.ok, answer.reason, answer.field) == expected


def test_both_adapters_offer_the_capability_by_structure() -> None:
    assert issubclass(SimulatorSupplier, PrecheckPort)
    assert issubclass(KamengSupplier, PrecheckPort)
    assert not isinstance(object(), PrecheckPort)
