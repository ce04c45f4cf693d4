"""What the worker does with an order it cannot move: it leaves it as it is, says so, and the
claim's lease brings it back (DESIGN §5.4: nothing paid is forgotten, and nothing is guessed).

Two ways to get there: a due order in a status no step drives, and a step that raises.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import backend_container
from tests.support.lab import Lab

from kameng.catalog.models import DeliveryKind
from kameng.pipeline import worker as worker_module
from kameng.pipeline.metrics import STEPS
from kameng.pipeline.steps import run_step
from kameng.pipeline.worker import Worker, claim_due

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]
LEASE_S = 30


@pytest.fixture(params=BACKENDS)
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    with backend_container(request.param, tmp_path) as container:
        yield Lab(container)


def _claim(lab: Lab, after_s: float = 0) -> list[int]:
    with lab.c.db.connect() as conn:
        return claim_due(
            conn, now=lab.clock() + timedelta(seconds=after_s), lease_s=LEASE_S, limit=10
        )


def _run(worker: Worker, job: Any) -> Any:
    async def go() -> Any:
        try:
            return await job
        finally:
            await worker.adapters.aclose()
            await worker.gateways.aclose()

    return asyncio.run(go())


def test_a_due_order_in_a_status_no_step_drives_is_left_alone_and_logged(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    """`paid` never commits (placing and paying move on in the same transaction), so a due
    order resting in it is something no step knows: the worker must not guess (buying upstream
    for an order in an unknown state could buy twice). It logs the order and leaves it; the
    claim's lease makes it due again, so the warning repeats until someone looks."""
    sku = lab.product(DeliveryKind.direct_topup, offer=True)  # a step would buy upstream
    placed = lab.place(lab.member(), sku)
    with lab.c.db.connect() as conn:
        conn.exec_driver_sql(
            "UPDATE orders SET status = 'paid', stage = 'payment_received' "
            f"WHERE id = {int(placed.order_id)}"
        )
    before = lab.order(placed)
    assert _claim(lab) == [placed.order_id]

    worker = Worker(lab.c)
    with caplog.at_level(logging.WARNING, logger="kameng.pipeline"):
        label = _run(worker, run_step(worker.ctx, placed.order_id))

    assert label == "not_driven"
    assert placed.order_no in caplog.text and "does not drive" in caplog.text
    after = lab.order(placed)
    assert (after.status, after.stage) == ("paid", "payment_received")
    assert after.version == before.version  # nothing written to the order
    assert lab.read("SELECT COUNT(*) FROM procurements") == [(0,)]
    assert lab.moves(placed) == [(None, "paid"), ("paid", "fulfilling")]
    assert _claim(lab, LEASE_S - 1) == []
    assert _claim(lab, LEASE_S + 1) == [placed.order_id]


def test_a_step_that_raises_keeps_its_lease_and_the_worker_going(
    lab: Lab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one step must not stop the worker, and must not lose the order: the step is
    logged and counted as an error, the order keeps the lease its claim gave it (so it comes
    back when the lease runs out), and the worker is woken to claim again."""
    sku = lab.product(DeliveryKind.direct_topup, offer=True)
    placed = lab.place(lab.member(), sku)
    assert _claim(lab) == [placed.order_id]
    leased = lab.order(placed)

    async def broken_step(ctx: Any, order_id: int) -> str:
        raise RuntimeError(f"bug while stepping {order_id}")

    monkeypatch.setattr(worker_module, "run_step", broken_step)
    worker = Worker(lab.c)
    errors = STEPS.labels("error")._value.get()
    with caplog.at_level(logging.ERROR, logger="kameng.worker"):
        _run(worker, worker._step(placed.order_id))  # returns: the error stays inside

    assert worker.steps_done == 1
    assert STEPS.labels("error")._value.get() == errors + 1
    assert f"step failed for order id {placed.order_id}" in caplog.text
    assert "RuntimeError" in caplog.text
    assert worker._wake.is_set()  # claim again at once
    assert not worker._inflight
    after = lab.order(placed)
    assert (after.status, after.version, after.next_action_at) == (
        leased.status,
        leased.version,
        leased.next_action_at,
    )
    assert _claim(lab, LEASE_S - 1) == []
    assert _claim(lab, LEASE_S + 1) == [placed.order_id]
