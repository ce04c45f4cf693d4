"""The pre-check of buyer information, over real HTTP: the simulator's `POST /v1/precheck`, the
simulator adapter's mapping of every answer (and non-answer), the purchase refusing exactly
what the pre-check refuses, and `precheck_order` choosing which supplier to ask.

One simulator serves the module; it is reset before every test and each test configures a SKU
of its own (SKU settings and missing accounts survive a reset, so names and accounts are unique
per test).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from kameng.pipeline.apply import BUYER_INFO_REASONS
from kameng.suppliers.adapters.kameng import KamengSupplier
from kameng.suppliers.adapters.signed_http import SignedHttp
from kameng.suppliers.adapters.simulator import SimulatorSupplier
from kameng.suppliers.port import Outcome, Precheck, SupplierPort
from kameng.suppliers.precheck import precheck_order
from kameng.suppliers.service import Offer
from kameng.suppliers.simulator.runner import RunningSimulator, start_simulator

pytestmark = pytest.mark.timeout(60)

KEY, SECRET = "precheck-merchant", "precheck-merchant-secret"
GOOD, NOT_THERE = "13912345678", "13800000000"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
T = TypeVar("T")

_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    running = start_simulator(merchant_key=KEY, merchant_secret=SECRET, seed=0)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _fresh(sim: RunningSimulator) -> None:
    sim.reset()


@pytest.fixture
def topup(sim: RunningSimulator) -> str:
    """A synchronous direct top-up SKU of this test's own that checks its `account` field."""
    sku = f"PC-TOPUP-{next(_numbers)}"
    sim.configure_sku(sku, price_cents=1000, kind="direct_topup", account_field="account")
    return sku


def unique_account() -> str:
    return f"1391234{next(_numbers):04d}"


def with_adapter(
    sim: RunningSimulator,
    call: Callable[[SimulatorSupplier], Awaitable[T]],
    *,
    secret: str = SECRET,
    precheck_timeout_s: float = 3.0,
) -> T:
    async def go() -> T:
        http = SignedHttp(base_url=sim.url, api_key=KEY, secret=secret, timeout_s=5.0)
        adapter = SimulatorSupplier(http, precheck_timeout_s=precheck_timeout_s)
        try:
            return await call(adapter)
        finally:
            await adapter.aclose()

    return asyncio.run(go())


def precheck(sim: RunningSimulator, sku: str, fields: dict[str, str], **kw: Any) -> Precheck:
    return with_adapter(sim, lambda a: a.precheck(sku=sku, fields=fields), **kw)


def buy(sim: RunningSimulator, sku: str, fields: dict[str, str]) -> Any:
    order_no = f"PC-{next(_numbers)}"
    return with_adapter(
        sim,
        lambda a: a.purchase(
            order_no=order_no, sku=sku, quantity=1, fields=fields, callback_url=None
        ),
    )


# -- the simulator's pre-check through the adapter ------------------------------------------------


def test_an_existing_account_passes(sim: RunningSimulator, topup: str) -> None:
    answer = precheck(sim, topup, {"account": GOOD})
    assert answer.ok and answer.decisive and answer.reason == "" and answer.field == ""
    assert answer.message_zh and answer.message_en
    assert sim.state()["stats"]["prechecks"] == 1
    assert sim.state()["orders"] == {}  # a pre-check records nothing


def test_an_account_ending_in_0000_does_not_exist(sim: RunningSimulator, topup: str) -> None:
    answer = precheck(sim, topup, {"account": NOT_THERE})
    assert not answer.ok and answer.decisive
    assert (answer.reason, answer.field) == ("account_not_found", "account")
    assert "不存在" in answer.message_zh and "does not exist" in answer.message_en
    # ... and the purchase refuses it with the reason that sends an order to the buyer.
    result = buy(sim, topup, {"account": NOT_THERE})
    assert result.outcome is Outcome.rejected and result.reason in BUYER_INFO_REASONS
    assert sim.state()["stats"]["bought"] == 0


def test_an_account_added_through_the_control_api(sim: RunningSimulator, topup: str) -> None:
    account = unique_account()
    assert precheck(sim, topup, {"account": account}).ok
    assert account in sim.missing_accounts(add=[account])
    answer = precheck(sim, topup, {"account": account})
    assert (answer.ok, answer.reason, answer.field) == (False, "account_not_found", "account")
    result = buy(sim, topup, {"account": account})
    assert result.outcome is Outcome.rejected and result.reason in BUYER_INFO_REASONS
    sim.reset()  # configuration, not state: a reset keeps it
    assert account in sim.state()["missing_accounts"]
    assert account not in sim.missing_accounts(remove=[account])
    assert precheck(sim, topup, {"account": account}).ok
    assert buy(sim, topup, {"account": account}).outcome is Outcome.delivered


def test_a_closed_denomination(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(topup, denomination_closed=True)
    answer = precheck(sim, topup, {"account": GOOD})
    assert (answer.ok, answer.decisive) == (False, True)
    assert (answer.reason, answer.field) == ("denomination_closed", "")
    catalog = with_adapter(sim, lambda a: a.catalog())
    assert next(i for i in catalog if i.sku == topup).open is False
    # Not the buyer's fault, not the whole supplier's: the pipeline tries another source.
    result = buy(sim, topup, {"account": GOOD})
    assert (result.outcome, result.reason) == (Outcome.rejected, "denomination_closed")
    assert result.reason not in BUYER_INFO_REASONS
    sim.configure_sku(topup, denomination_closed=False)
    assert precheck(sim, topup, {"account": GOOD}).ok


def test_maintenance_reads_as_closed(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(topup, maintenance_now=True)
    assert precheck(sim, topup, {"account": GOOD}).reason == "denomination_closed"


def test_field_rules_refuse_the_same_at_both(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(
        topup, required_fields=["account", "zone"], reject_field_values={"zone": ["moon"]}
    )
    cases = [
        ({"zone": "earth"}, "invalid_fields", "account"),
        ({"account": "  ", "zone": "earth"}, "invalid_fields", "account"),
        ({"account": GOOD}, "invalid_fields", "zone"),
        ({"account": GOOD, "zone": "moon"}, "invalid_fields", "zone"),
        ({"account": NOT_THERE, "zone": "earth"}, "account_not_found", "account"),
    ]
    for fields, reason, field in cases:
        answer = precheck(sim, topup, fields)
        assert (answer.ok, answer.reason, answer.field) == (False, reason, field), fields
        result = buy(sim, topup, fields)
        assert (result.outcome, result.reason) == (Outcome.rejected, "invalid_fields"), fields
    assert precheck(sim, topup, {"account": GOOD, "zone": "earth"}).ok


def test_skus_without_an_account_field_accept_any_account(sim: RunningSimulator) -> None:
    # What the simulator did before the pre-check existed, for SKUs that do not opt in.
    sku = f"PC-PLAIN-{next(_numbers)}"
    sim.configure_sku(sku, price_cents=100, kind="direct_topup", required_fields=["account"])
    assert precheck(sim, sku, {"account": NOT_THERE}).ok
    assert buy(sim, sku, {"account": NOT_THERE}).outcome is Outcome.delivered


def test_the_default_mobile_topup_checks_its_account(sim: RunningSimulator) -> None:
    assert precheck(sim, "SIM-MOBILE-50", {"account": GOOD}).ok
    assert precheck(sim, "SIM-MOBILE-50", {"account": NOT_THERE}).reason == "account_not_found"


# -- no answer is never a refusal -----------------------------------------------------------------


def assert_unavailable(answer: Precheck) -> None:
    assert answer.ok and not answer.decisive and answer.reason == "unavailable"
    assert answer.message_zh and answer.message_en and answer.detail


def test_a_500_is_unavailable(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(topup, precheck_error_rate=1.0)
    assert_unavailable(precheck(sim, topup, {"account": NOT_THERE}))
    assert sim.state()["stats"]["faults"] == {"precheck_error": 1}
    # The pre-check's faults are its own: purchases still work.
    assert buy(sim, topup, {"account": GOOD}).outcome is Outcome.delivered


def test_a_hang_is_unavailable(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(topup, precheck_hang_rate=1.0, hang_ms=20_000)
    assert_unavailable(precheck(sim, topup, {"account": NOT_THERE}, precheck_timeout_s=0.3))
    assert sim.state()["stats"]["faults"] == {"precheck_hang": 1}


def test_slow_answers_past_the_timeout_are_unavailable(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(topup, precheck_latency_ms={"dist": "fixed", "ms": 2000})
    assert_unavailable(precheck(sim, topup, {"account": NOT_THERE}, precheck_timeout_s=0.3))


def test_unknown_sku_bad_signature_and_no_server_are_unavailable(sim: RunningSimulator) -> None:
    assert_unavailable(precheck(sim, "NO-SUCH-SKU", {"account": GOOD}))
    assert_unavailable(precheck(sim, "SIM-MOBILE-50", {"account": NOT_THERE}, secret="wrong"))

    async def nowhere() -> Precheck:
        http = SignedHttp(base_url="http://127.0.0.1:9", api_key=KEY, secret=SECRET, timeout_s=1)
        adapter = SimulatorSupplier(http)
        try:
            return await adapter.precheck(sku="SIM-MOBILE-50", fields={"account": GOOD})
        finally:
            await adapter.aclose()

    assert_unavailable(asyncio.run(nowhere()))


def test_the_kameng_adapter_has_no_precheck() -> None:
    async def ask() -> Precheck:
        http = SignedHttp(base_url="http://127.0.0.1:9", api_key=KEY, secret=SECRET, timeout_s=1)
        adapter = KamengSupplier(http)
        try:
            return await adapter.precheck(sku="X", fields={"account": NOT_THERE})
        finally:
            await adapter.aclose()

    assert_unavailable(asyncio.run(ask()))


# -- precheck_order: which supplier is asked ------------------------------------------------------


def offer(
    supplier_id: int,
    supplier_sku: str,
    *,
    priority: int = 0,
    circuit_open_until: datetime | None = None,
) -> Offer:
    return Offer(
        id=supplier_id * 10,
        supplier_id=supplier_id,
        supplier_code=f"s{supplier_id}",
        supplier_sku=supplier_sku,
        cost_cents=900,
        priority=priority,
        circuit_state="closed" if circuit_open_until is None else "open",
        circuit_open_until=circuit_open_until,
        balance_cents=None,
        low_balance_cents=0,
    )


class Scripted:
    """A supplier adapter whose pre-check answers from a script (or raises, or was not to be
    called at all), recording the SKUs it was asked about."""

    def __init__(self, answer: Precheck | Exception) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def precheck(self, *, sku: str, fields: dict[str, str]) -> Precheck:
        self.asked.append(sku)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class NoPrecheck:
    """An adapter without the capability at all (like any adapter written before it)."""


def order_check(
    sim: RunningSimulator,
    offers: list[Offer],
    others: dict[int, Any],
    fields: dict[str, str],
    *,
    timeout_s: float = 3.0,
) -> Precheck:
    """`precheck_order` with supplier 1 being the simulator (when an offer names it)."""

    async def go() -> Precheck:
        http = SignedHttp(base_url=sim.url, api_key=KEY, secret=SECRET, timeout_s=5.0)
        real = SimulatorSupplier(http)
        adapters: dict[int, SupplierPort] = {1: real, **others}
        try:
            return await precheck_order(
                offers=offers, adapters=adapters, fields=fields, now=NOW, timeout_s=timeout_s
            )
        finally:
            await real.aclose()

    return asyncio.run(go())


def test_order_asks_the_first_routable_supplier_that_can_answer(
    sim: RunningSimulator, topup: str
) -> None:
    kameng_like = Scripted(Precheck.unavailable("no pre-check"))
    late = Scripted(Precheck.passed())
    offers = [
        offer(3, "LATE", priority=5),
        offer(1, topup, priority=2),
        offer(2, "K", priority=1),
        offer(4, "ABSENT", priority=0),  # no adapter built for it: passed over
    ]
    others = {2: kameng_like, 3: late, 5: NoPrecheck()}
    answer = order_check(sim, offers, others, {"account": NOT_THERE})
    assert (answer.reason, answer.field) == ("account_not_found", "account")
    assert answer.detail.startswith("s1:")
    assert kameng_like.asked == ["K"] and late.asked == []


def test_order_skips_resting_suppliers(sim: RunningSimulator, topup: str) -> None:
    resting = Scripted(AssertionError("a resting supplier must not be asked"))
    offers = [offer(2, "R", circuit_open_until=NOW + timedelta(minutes=5)), offer(1, topup)]
    assert order_check(sim, offers, {2: resting}, {"account": GOOD}).ok
    assert resting.asked == []


def test_order_closed_only_when_every_supplier_says_so(sim: RunningSimulator, topup: str) -> None:
    sim.configure_sku(topup, denomination_closed=True)
    closed_too = Scripted(Precheck.refused("denomination_closed"))
    open_elsewhere = Scripted(Precheck.passed())
    both = [offer(1, topup, priority=0), offer(2, "B", priority=1)]
    assert order_check(sim, both, {2: open_elsewhere}, {"account": GOOD}).decisive
    assert order_check(sim, both, {2: open_elsewhere}, {"account": GOOD}).ok
    answer = order_check(sim, both, {2: closed_too}, {"account": GOOD})
    assert (answer.ok, answer.reason) == (False, "denomination_closed")
    # One supplier cannot say: it may well be open there, so nothing decisive.
    assert_unavailable(order_check(sim, both, {2: NoPrecheck()}, {"account": GOOD}))
    failing = Scripted(RuntimeError("a bug in an adapter"))
    assert_unavailable(order_check(sim, both, {2: failing}, {"account": GOOD}))


def test_order_without_an_answer_is_unavailable(sim: RunningSimulator, topup: str) -> None:
    assert_unavailable(order_check(sim, [], {}, {"account": NOT_THERE}))
    assert_unavailable(
        order_check(sim, [offer(2, "X")], {2: Scripted(RuntimeError("bug"))}, {"account": "1"})
    )
    sim.configure_sku(topup, precheck_hang_rate=1.0, hang_ms=20_000)
    never_asked = Scripted(Precheck.refused("account_not_found", field="account"))
    offers = [offer(1, topup, priority=0), offer(2, "B", priority=1)]
    # The simulator hangs past the whole budget; the next supplier is not asked after it.
    answer = order_check(sim, offers, {2: never_asked}, {"account": NOT_THERE}, timeout_s=0.3)
    assert_unavailable(answer)
    assert never_asked.asked == []
