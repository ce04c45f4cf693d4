"""Housekeeping prunes what is past its retention, and only that (one kind at a time).

A prune that deleted every row of a kind would pass a test that only looks at old rows, and
would quietly break what those rows are for: a nonce forgotten early lets a replay through, an
idempotency record forgotten early lets a retried order be placed twice, a supplier event id
forgotten early applies a duplicate callback again. So every kind gets an old row (gone), a
row just inside its retention (kept) and a fresh one (kept). Risk facts and screening records
are covered by tests/integration/test_risk_review.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from tests.conftest import backend_container
from tests.support import factories
from tests.support.shop import Clock

from kameng import housekeeping
from kameng.container import Container
from kameng.idempotency import service as idem
from kameng.members import service as members
from kameng.notify import service as notify
from kameng.suppliers import service as suppliers

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)]
RETENTION = housekeeping.IDEMPOTENCY_RETENTION
assert housekeeping.EVENT_RETENTION == RETENTION  # the layout below relies on one retention


@pytest.fixture(params=BACKENDS)
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Container]:
    with backend_container(request.param, tmp_path) as container:
        container.clock = Clock()
        yield container


class Rows:
    """One row of every kind housekeeping prunes, written by the services that write them."""

    def __init__(self, container: Container) -> None:
        self.c = container
        creds = factories.add_reseller(container)
        self.api_key = creds.api_key
        with container.db.connect() as conn:
            self.supplier_id = suppliers.create_supplier(
                conn,
                container.vault,
                code="hk",
                name="hk",
                adapter="simulator",
                base_url="http://127.0.0.1:9",
                api_key="k",
                secret="s",
                now=container.clock(),
            )
            self.member_id = members.register(
                conn,
                email="hk@example.com",
                password_hash="not-a-real-hash",
                language="en",
                now=container.clock(),
            )

    def write(self, tag: str, *, session: bool = True, nonce: bool = True) -> None:
        now = self.c.clock()
        with self.c.db.connect() as conn:
            if nonce:
                _, fresh = self.c.authenticator.caller_and_nonce(
                    conn,
                    self.api_key,
                    nonce=f"nonce-{tag}",
                    now=now,
                    window_s=self.c.settings.signature_window_s,
                )
                assert fresh
            idem.store(
                conn,
                scope="reseller:hk",
                key=f"idem-{tag}",
                req_hash=b"h" * 32,
                status_code=201,
                response={"tag": tag},
                now=now,
            )
            assert suppliers.remember_event(
                conn,
                supplier_id=self.supplier_id,
                event_id=f"evt-{tag}",
                out_trade_no=f"K{tag}",
                outcome="delivered",
                now=now,
            )
            # Sent by the worker (the sender is not under test here: its outcome is).
            sent = notify.enqueue(
                conn,
                topic="test",
                target_url="http://127.0.0.1:9/h",
                payload={},
                now=now,
                event_id=f"sent-{tag}",
            )
            conn.execute(
                text("UPDATE outbox SET state = 'sent', sent_at = :t WHERE event_id = :e"),
                {"t": now, "e": sent},
            )
            # Never sent: kept whatever its age (the worker still owes it).
            notify.enqueue(
                conn,
                topic="test",
                target_url="http://127.0.0.1:9/h",
                payload={"pending": tag},
                now=now,
                event_id=f"pending-{tag}",
            )
            if session:
                members.start_session(
                    conn, member_id=self.member_id, previous_token=None, ip=tag, now=now
                )

    def left(self) -> dict[str, list[str]]:
        queries = {
            "nonces": "SELECT nonce FROM api_nonces",
            "idempotency": "SELECT key FROM idempotency_keys WHERE scope = 'reseller:hk'",
            "events": "SELECT event_id FROM supplier_events",
            "sent": "SELECT event_id FROM outbox WHERE state = 'sent'",
            "pending": "SELECT event_id FROM outbox WHERE state = 'pending'",
            "sessions": "SELECT ip FROM member_sessions",
        }
        with self.c.db.connect(write=False) as conn:
            return {
                kind: sorted(str(r[0]) for r in conn.execute(text(sql)))
                for kind, sql in queries.items()
            }


def test_each_kind_loses_only_its_rows_past_retention(clocked: Container) -> None:
    c = clocked
    clock = c.clock
    assert isinstance(clock, Clock)
    rows = Rows(c)
    rows.write("old")
    clock.advance(timedelta(days=8).total_seconds())
    # Just inside the 7-day retention when housekeeping runs (no session or nonce: theirs is
    # their own expiry, checked with the fresh rows).
    rows.write("edge", session=False, nonce=False)
    clock.advance((RETENTION - timedelta(seconds=120)).total_seconds())
    rows.write("fresh")
    clock.advance(60)
    # old: 15 days less a minute; edge: 7 days less a minute; fresh: a minute.
    assert rows.left()["sessions"] == ["fresh", "old"]

    pruned = housekeeping.prune(c)

    assert {k: pruned[k] for k in ("nonces", "idempotency_records", "supplier_events")} == {
        "nonces": 1,
        "idempotency_records": 1,
        "supplier_events": 1,
    }
    assert (pruned["outbox_sent"], pruned["member_sessions"]) == (1, 1)
    left = rows.left()
    assert left["nonces"] == ["nonce-fresh"]
    assert left["idempotency"] == ["idem-edge", "idem-fresh"]
    assert left["events"] == ["evt-edge", "evt-fresh"]
    assert left["sent"] == ["sent-edge", "sent-fresh"]
    assert left["pending"] == ["pending-edge", "pending-fresh", "pending-old"]
    assert left["sessions"] == ["fresh"]
    # A second run finds nothing more to do.
    again = housekeeping.prune(c)
    assert {k: v for k, v in again.items() if v} == {}


def test_a_nonce_is_kept_until_it_expires(clocked: Container) -> None:
    """A nonce outlives the signature window (twice it): a replay inside the window is
    refused by its nonce, one outside by its timestamp; pruning never opens a gap between."""
    c = clocked
    clock = c.clock
    assert isinstance(clock, Clock)
    rows = Rows(c)
    rows.write("n", session=False)
    window = c.settings.signature_window_s
    clock.advance(2 * window - 1)
    assert housekeeping.prune(c)["nonces"] == 0
    assert rows.left()["nonces"] == ["nonce-n"]
    clock.advance(2)
    assert housekeeping.prune(c)["nonces"] == 1
    assert rows.left()["nonces"] == []
