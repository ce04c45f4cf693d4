"""Checks every money invariant of DESIGN §5.1 against the database; used by the CLI and tests.

Each check is one query that returns offending rows, so a report names exactly what is wrong.
Run inside a single read transaction so the figures are one consistent snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.engine import Connection

CHECKS: dict[str, str] = {
    "transactions_balance": """
        SELECT t.id, COALESCE(SUM(e.amount_cents), 0) AS total, COUNT(e.id) AS legs
        FROM ledger_transactions t LEFT JOIN ledger_entries e ON e.transaction_id = t.id
        GROUP BY t.id HAVING COALESCE(SUM(e.amount_cents), 0) <> 0 OR COUNT(e.id) < 2
    """,
    "accounts_sum_to_zero": """
        SELECT currency, SUM(balance_cents) AS total FROM ledger_accounts
        GROUP BY currency HAVING SUM(balance_cents) <> 0
    """,
    "balance_equals_entries": """
        SELECT a.id, a.balance_cents, COALESCE(s.total, 0) AS entries_total, a.version,
               COALESCE(s.n, 0) AS entries
        FROM ledger_accounts a
        LEFT JOIN (SELECT account_id, SUM(amount_cents) AS total, COUNT(*) AS n
                   FROM ledger_entries GROUP BY account_id) s ON s.account_id = a.id
        WHERE a.balance_cents <> COALESCE(s.total, 0) OR a.version <> COALESCE(s.n, 0)
    """,
    "no_negative_wallets": """
        SELECT id, kind, balance_cents FROM ledger_accounts
        WHERE NOT allow_negative AND balance_cents < 0
    """,
    "entry_chains": """
        SELECT account_id, account_version, amount_cents, balance_after_cents, prev_balance, rn
        FROM (
          SELECT account_id, account_version, amount_cents, balance_after_cents,
                 LAG(balance_after_cents) OVER w AS prev_balance,
                 ROW_NUMBER() OVER w AS rn
          FROM ledger_entries WINDOW w AS (PARTITION BY account_id ORDER BY account_version)
        ) chain
        WHERE account_version <> rn
           OR balance_after_cents <> COALESCE(prev_balance, 0) + amount_cents
    """,
    "holds_resolved_once": """
        SELECT h.id, h.state, h.resolve_txn_id FROM ledger_holds h
        WHERE (h.state = 'pending' AND h.resolve_txn_id IS NOT NULL)
           OR (h.state <> 'pending' AND h.resolve_txn_id IS NULL)
           OR h.state NOT IN ('pending', 'captured', 'voided')
    """,
    "holds_match_their_transactions": """
        SELECT h.id, h.amount_cents, p.amount_cents AS placed, r.amount_cents AS resolved
        FROM ledger_holds h
        JOIN ledger_entries p ON p.transaction_id = h.place_txn_id AND p.account_id = h.account_id
        LEFT JOIN ledger_entries r ON r.transaction_id = h.resolve_txn_id AND r.amount_cents < 0
        WHERE p.amount_cents <> -h.amount_cents
           OR (h.resolve_txn_id IS NOT NULL AND COALESCE(r.amount_cents, 0) <> -h.amount_cents)
    """,
    "holds_account_equals_pending_holds": """
        SELECT a.currency, SUM(a.balance_cents) AS held_total
        FROM ledger_accounts a
        WHERE a.kind = 'holds'
        GROUP BY a.currency
        HAVING SUM(a.balance_cents) <>
               (SELECT COALESCE(SUM(h.amount_cents), 0) FROM ledger_holds h
                JOIN ledger_accounts w ON w.id = h.account_id
                WHERE h.state = 'pending' AND w.currency = a.currency)
    """,
    "refund_not_above_paid": """
        SELECT o.id, o.order_no, o.paid_cents, o.refunded_cents FROM orders o
        WHERE o.refunded_cents > o.paid_cents OR o.refunded_cents < 0
    """,
    "order_money_matches_ledger": """
        SELECT o.id, o.order_no, o.paid_cents, o.refunded_cents, COALESCE(w.net, 0) AS wallet_net
        FROM orders o
        LEFT JOIN (
          SELECT t.ref_id AS order_id, SUM(e.amount_cents) AS net
          FROM ledger_transactions t
          JOIN ledger_entries e ON e.transaction_id = t.id
          JOIN ledger_accounts a ON a.id = e.account_id AND a.kind = 'wallet'
          WHERE t.ref_type = 'order' GROUP BY t.ref_id
        ) w ON w.order_id = o.id
        WHERE COALESCE(w.net, 0) <> o.refunded_cents - o.paid_cents
    """,
    "held_orders_have_pending_hold": """
        SELECT o.id, o.order_no, o.status, h.state FROM orders o
        LEFT JOIN ledger_holds h ON h.id = o.hold_id
        WHERE (o.status IN ('paid', 'screening', 'review', 'fulfilling', 'backordered',
                            'needs_buyer_action')
               AND o.paid_cents > 0 AND (h.id IS NULL OR h.state <> 'pending'))
           OR (o.status IN ('delivered', 'completed', 'canceled', 'refunded', 'rejected',
                            'expired')
               AND h.id IS NOT NULL AND h.state = 'pending')
    """,
}

STOCK_CHECKS: dict[str, str] = {
    # A delivered line has exactly the keys its delivery row counts (fewer than ordered only when
    # a supplier delivered part and the rest was refunded); an undelivered line may hold keys
    # bought from a supplier while it waits for the rest, but never sold ones.
    "delivered_lines_have_their_keys": """
        SELECT l.id, l.quantity, d.key_count,
               SUM(CASE WHEN k.state = 'sold' THEN 1 ELSE 0 END) AS sold,
               SUM(CASE WHEN k.state = 'held' THEN 1 ELSE 0 END) AS held
        FROM order_lines l
        JOIN orders o ON o.id = l.order_id
        JOIN skus s ON s.id = l.sku_id JOIN products p ON p.id = s.product_id
        LEFT JOIN deliveries d ON d.order_line_id = l.id
        LEFT JOIN card_keys k ON k.order_line_id = l.id AND k.state IN ('sold', 'held')
        WHERE p.delivery_kind = 'card_key'
        GROUP BY l.id, l.quantity, o.status, d.key_count
        HAVING (o.status IN ('delivered', 'completed')
                AND ((d.key_count IS NOT NULL
                      AND SUM(CASE WHEN k.state = 'sold' THEN 1 ELSE 0 END) <> d.key_count)
                     OR COALESCE(d.key_count, 0) > l.quantity
                     OR SUM(CASE WHEN k.state = 'held' THEN 1 ELSE 0 END) <> 0))
            OR (o.status NOT IN ('delivered', 'completed', 'disputed', 'replaced')
                AND SUM(CASE WHEN k.state = 'sold' THEN 1 ELSE 0 END) <> 0)
            OR SUM(CASE WHEN k.state = 'held' THEN 1 ELSE 0 END) > l.quantity
    """,
    "sold_keys_belong_to_a_line": """
        SELECT id FROM card_keys WHERE (state IN ('sold', 'held')) <> (order_line_id IS NOT NULL)
    """,
    "one_delivery_per_delivered_line": """
        SELECT l.id FROM order_lines l JOIN orders o ON o.id = l.order_id
        LEFT JOIN deliveries d ON d.order_line_id = l.id
        WHERE (o.status IN ('delivered', 'completed')) <> (d.id IS NOT NULL)
    """,
    "key_sku_matches_line": """
        SELECT k.id FROM card_keys k JOIN order_lines l ON l.id = k.order_line_id
        WHERE k.sku_id <> l.sku_id
    """,
    # DESIGN §5.4: nothing paid is forgotten — every undelivered paid order is due some time.
    "undelivered_orders_are_due": """
        SELECT id, order_no, status, stage FROM orders
        WHERE status IN ('paid', 'screening', 'review', 'fulfilling', 'backordered',
                         'needs_buyer_action')
          AND next_action_at IS NULL
    """,
    # DESIGN §5.3: at most one upstream purchase per line (a rejection bought nothing).
    "one_purchase_per_line": """
        SELECT order_line_id, COUNT(*) FROM procurements WHERE state <> 'rejected'
        GROUP BY order_line_id HAVING COUNT(*) > 1
    """,
    # ... and at most one *charged* one, counting every row: a purchase refused, given up as
    # never arrived or abandoned at the deadline whose success arrived late counts too.
    "one_charged_purchase_per_line": """
        SELECT order_line_id, COUNT(*) FROM procurements WHERE charged_at IS NOT NULL
        GROUP BY order_line_id HAVING COUNT(*) > 1
    """,
    # A late success is never lost: its keys went to stock or its cost is a claim on record.
    # (An abandoned purchase whose part was delivered to its order at the deadline served it.)
    "late_successes_claimed": """
        SELECT p.id, p.out_trade_no, p.state FROM procurements p
        LEFT JOIN supplier_claims c ON c.procurement_id = p.id
        WHERE p.charged_at IS NOT NULL AND c.id IS NULL
          AND (p.state = 'rejected' OR (p.state = 'abandoned' AND p.keys_received = 0))
    """,
    # A gateway payment is in the ledger exactly when it is paid, once, for the amount the
    # gateway reported (its own amount, unless staff accepted a different one).
    "payments_posted_once": """
        SELECT p.payment_no, p.state, p.amount_cents, p.reported_cents, COUNT(t.id) AS posted,
               COALESCE(SUM(e.amount_cents), 0) AS credited
        FROM payments p
        LEFT JOIN ledger_transactions t ON t.kind = 'payment' AND t.ref_type = 'payment'
             AND t.ref_id = p.id
        LEFT JOIN ledger_entries e ON e.transaction_id = t.id AND e.amount_cents > 0
        GROUP BY p.id, p.payment_no, p.state, p.amount_cents, p.reported_cents
        HAVING (p.state = 'paid'
                AND (COUNT(t.id) <> 1
                     OR COALESCE(SUM(e.amount_cents), 0)
                        <> COALESCE(p.reported_cents, p.amount_cents)))
            OR (p.state <> 'paid' AND COUNT(t.id) > 0)
    """,
    "payment_transactions_have_payments": """
        SELECT t.id FROM ledger_transactions t
        WHERE t.kind = 'payment'
          AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.id = t.ref_id AND t.ref_type = 'payment')
    """,
}


@dataclass
class Report:
    violations: dict[str, list[tuple[object, ...]]] = field(default_factory=dict)
    figures: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def verify(conn: Connection, *, include_stock: bool = True) -> Report:
    report = Report()
    checks = dict(CHECKS)
    if include_stock:
        checks.update(STOCK_CHECKS)
    for name, sql in checks.items():
        rows = conn.execute(text(sql)).fetchmany(20)
        report.violations[name] = [tuple(r) for r in rows]
    for name, sql in {
        "accounts": "SELECT COUNT(*) FROM ledger_accounts",
        "transactions": "SELECT COUNT(*) FROM ledger_transactions",
        "entries": "SELECT COUNT(*) FROM ledger_entries",
        "pending_holds": "SELECT COUNT(*) FROM ledger_holds WHERE state = 'pending'",
        "orders": "SELECT COUNT(*) FROM orders",
        "procurements": "SELECT COUNT(*) FROM procurements",
    }.items():
        report.figures[name] = int(conn.execute(text(sql)).scalar_one())
    return report
