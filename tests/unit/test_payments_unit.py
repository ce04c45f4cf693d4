"""Pure parts of payments: the EPay signature, money text, notify checks, the query schedule,
reconciliation's classification and the late-payment doors of the order state table."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kameng.orders.state import LATE_PAYMENT, Status, TransitionError, check_transition
from kameng.payments.adapters.epay import EpayGateway
from kameng.payments.port import GatewayRecord, NotifyProblem, RecordState
from kameng.payments.reconcile import MismatchKind, classify
from kameng.payments.service import CheckPolicy
from kameng.security import epay

KEY = "k3y"


def test_signature_follows_the_epay_rule() -> None:
    params = {"pid": "1001", "money": "1.00", "out_trade_no": "A1", "sign_type": "MD5", "x": ""}
    expected = hashlib.md5(b"money=1.00&out_trade_no=A1&pid=1001k3y").hexdigest()
    assert epay.sign(params, KEY) == expected
    assert epay.verify({**params, "sign": expected}, KEY)
    assert epay.verify({**params, "sign": expected.upper()}, KEY)


@pytest.mark.parametrize(
    "tamper",
    [
        {"money": "1.01"},
        {"out_trade_no": "A2"},
        {"pid": "1002"},
        {"extra": "1"},
        {"sign": "0" * 32},
        {"sign": "short"},
    ],
)
def test_any_change_breaks_the_signature(tamper: dict[str, str]) -> None:
    signed = epay.signed({"pid": "1001", "money": "1.00", "out_trade_no": "A1"}, KEY)
    assert epay.verify(signed, KEY)
    assert not epay.verify({**signed, **tamper}, KEY)
    assert not epay.verify(signed, "other-key")


@given(st.integers(min_value=0, max_value=10**12))
def test_money_round_trips(cents: int) -> None:
    assert epay.parse_money(epay.format_money(cents)) == cents


@pytest.mark.parametrize(
    "text",
    ["", "1.234", "-1.00", "1e3", "１２", "²", "12.", ".5", "01.00", "1,00", "NaN", "9" * 30],
)
def test_unreadable_money_is_none(text: str) -> None:
    assert epay.parse_money(text) is None


def _gateway() -> EpayGateway:
    return EpayGateway(base_url="http://gw", merchant_id="1001", key=KEY)


def _notify(**over: str) -> dict[str, str]:
    base = {
        "pid": "1001",
        "trade_no": "T1",
        "out_trade_no": "K1",
        "type": "alipay",
        "name": "x",
        "money": "10.00",
        "trade_status": "TRADE_SUCCESS",
    }
    base.update(over)
    return epay.signed(base, KEY)


def test_a_good_notify_becomes_a_confirmation() -> None:
    check = _gateway().check_notify(_notify())
    assert check.problem is None and check.confirmation is not None
    assert (check.confirmation.amount_cents, check.confirmation.currency) == (1000, "CNY")


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({**_notify(), "money": "11.00"}, NotifyProblem.bad_signature),
        (_notify(pid="1002"), NotifyProblem.wrong_merchant),
        (_notify(trade_status="WAIT_BUYER_PAY"), NotifyProblem.not_success),
        (_notify(money="ten"), NotifyProblem.malformed),
        (_notify(out_trade_no=""), NotifyProblem.malformed),
    ],
)
def test_notify_problems(params: dict[str, str], problem: NotifyProblem) -> None:
    check = _gateway().check_notify(params)
    assert (check.confirmation, check.problem) == (None, problem)


def test_checkout_form_is_signed_and_names_the_currency_only_when_it_differs() -> None:
    form = _gateway().checkout(
        payment_no="K1",
        amount_cents=1234,
        subject="s",
        pay_type="alipay",
        notify_url="http://a/n",
        return_url="http://a/r",
        currency="CNY",
    )
    assert form.url == "http://gw/submit.php" and form.fields["money"] == "12.34"
    assert "currency" not in form.fields and epay.verify(form.fields, KEY)
    usd = _gateway().checkout(
        payment_no="K1",
        amount_cents=1,
        subject="s",
        pay_type="alipay",
        notify_url="n",
        return_url="r",
        currency="USD",
    )
    assert usd.fields["currency"] == "USD"


def test_query_schedule_backs_off_then_stops_a_day_after_the_window() -> None:
    policy = CheckPolicy(first_check_s=60, cap_s=300)
    opened = datetime(2026, 11, 26, tzinfo=UTC)
    expires = opened + timedelta(minutes=15)
    waits = []
    now, checks = opened + timedelta(seconds=60), 1
    while True:
        nxt = policy.next_check(checks=checks, expires_at=expires, now=now)
        if nxt is None:
            break
        waits.append((nxt - now).total_seconds())
        assert nxt > now
        now, checks = nxt, checks + 1
    assert waits[:3] == [60, 120, 240]
    assert max(waits[:6]) <= 300
    assert now - expires >= timedelta(days=1)
    assert 8 <= len(waits) <= 20


@pytest.mark.parametrize(
    ("ours", "record", "kind"),
    [
        (("paid", 1000), GatewayRecord(RecordState.paid, amount_cents=1000), None),
        (("pending", 0), GatewayRecord(RecordState.unpaid), None),
        (("pending", 0), GatewayRecord(RecordState.not_found), None),
        (
            ("pending", 0),
            GatewayRecord(RecordState.paid, amount_cents=1000),
            MismatchKind.paid_not_recorded,
        ),
        (None, GatewayRecord(RecordState.paid, amount_cents=5), MismatchKind.paid_not_recorded),
        (("paid", 1000), GatewayRecord(RecordState.unpaid), MismatchKind.recorded_not_paid),
        (("paid", 1000), GatewayRecord(RecordState.not_found), MismatchKind.recorded_not_paid),
        (
            ("paid", 1000),
            GatewayRecord(RecordState.paid, amount_cents=1200),
            MismatchKind.amount_differs,
        ),
        (("paid", 1000), GatewayRecord(RecordState.unreachable), MismatchKind.unchecked),
    ],
)
def test_reconciliation_classifies(
    ours: tuple[str, int] | None, record: GatewayRecord, kind: MismatchKind | None
) -> None:
    found = classify(payment_no="K1", gateway="g", ours=ours, record=record)
    assert (found.kind if found else None) is kind


def test_closed_orders_open_only_for_a_late_payment() -> None:
    for status, targets in LATE_PAYMENT.items():
        for target in targets:
            with pytest.raises(TransitionError):
                check_transition(status, target)
            assert check_transition(status, target, late_payment=True).to_status is target
    with pytest.raises(TransitionError):
        check_transition(Status.completed, Status.paid, late_payment=True)
    with pytest.raises(TransitionError):
        check_transition(Status.canceled, Status.paid, late_payment=True)


def test_reconcile_says_when_the_gateway_cannot_list_its_trades() -> None:
    import asyncio
    from types import SimpleNamespace

    from kameng.payments.reconcile import reconcile_gateway

    class NoListing:
        async def query(self, payment_no: str) -> GatewayRecord:
            return GatewayRecord(RecordState.paid, payment_no=payment_no, amount_cents=100)

        async def recent(self, *, limit: int, offset: int = 0) -> None:
            return None

    report = asyncio.run(
        reconcile_gateway(
            gateway=SimpleNamespace(id=1, code="g"),
            adapter=NoListing(),  # type: ignore[arg-type]
            read=lambda fn: {"K1": ("paid", 100)},
            clearing=(1,),
            since=datetime(2026, 1, 1, tzinfo=UTC),
            until=datetime(2026, 2, 1, tzinfo=UTC),
        )
    )
    assert report.checked == 1
    assert [m.kind for m in report.mismatches] == [MismatchKind.unchecked]
    assert "cannot list" in report.mismatches[0].detail
