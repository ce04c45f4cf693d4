"""Ledger actions: post balanced transactions, place/capture/void holds, top up wallets.

Everything here takes a Core `Connection` that is already inside the caller's transaction and
never commits. Posting locks accounts in one global order (descending id: wallets before the
platform's few busy accounts), so two transactions touching the same accounts never deadlock
and the busiest rows are held for the shortest time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Connection

from kameng.db import MultiInsert, RawSQL, db_time, table, utcnow
from kameng.errors import ErrorCode, KamengError
from kameng.ledger.models import Account, AccountKind, Entry, Hold, HoldState, LedgerTransaction
from kameng.money import format_cents

_acc = table(Account)
_txn = table(LedgerTransaction)
_entry = table(Entry)
_hold = table(Hold)

PLATFORM_ACCOUNTS: dict[AccountKind, bool] = {
    AccountKind.revenue: False,
    AccountKind.holds: False,
    AccountKind.funding: True,  # mirrors money received outside the platform
    AccountKind.gateway_clearing: True,
    AccountKind.refunds: True,
}


class InsufficientFunds(KamengError):
    def __init__(self, *, needed: int, available: int) -> None:
        super().__init__(
            ErrorCode.insufficient_balance,
            needed=format_cents(needed),
            available=format_cents(available),
            extra={"needed": format_cents(needed), "available": format_cents(available)},
        )


# Every sale credits revenue, every backorder credits holds and every gateway payment debits
# clearing: with one row each, concurrent orders on PostgreSQL would queue on those rows'
# locks. Spreading them over a few rows (the sum is the figure) removes that queue; on SQLite
# it costs nothing.
SHARDED = (AccountKind.revenue, AccountKind.holds, AccountKind.gateway_clearing)
SHARDS = 8


@dataclass(frozen=True, slots=True)
class PlatformAccounts:
    revenue: int  # shard 0 of each sharded kind
    holds: int
    funding: int
    gateway_clearing: int
    refunds: int
    revenue_shards: tuple[int, ...] = ()
    holds_shards: tuple[int, ...] = ()
    gateway_clearing_shards: tuple[int, ...] = ()

    def revenue_for(self, n: int) -> int:
        return (
            self.revenue_shards[n % len(self.revenue_shards)]
            if self.revenue_shards
            else self.revenue
        )

    def holds_for(self, n: int) -> int:
        return self.holds_shards[n % len(self.holds_shards)] if self.holds_shards else self.holds

    def clearing_for(self, n: int) -> int:
        """Every gateway payment debits clearing: spread like revenue and holds."""
        shards = self.gateway_clearing_shards
        return shards[n % len(shards)] if shards else self.gateway_clearing

    @property
    def clearing_accounts(self) -> tuple[int, ...]:
        return self.gateway_clearing_shards or (self.gateway_clearing,)


def ensure_platform_accounts(conn: Connection, currency: str = "CNY") -> PlatformAccounts:
    ids: dict[str, int] = {}
    shards: dict[str, tuple[int, ...]] = {}
    for kind, allow_negative in PLATFORM_ACCOUNTS.items():
        count = SHARDS if kind in SHARDED else 1
        made = tuple(
            ensure_account(
                conn,
                kind=kind,
                owner_type="platform",
                owner_id=shard,
                currency=currency,
                allow_negative=allow_negative,
            )
            for shard in range(count)
        )
        ids[kind.value] = made[0]
        shards[kind.value] = made
    return PlatformAccounts(
        **ids,
        revenue_shards=shards["revenue"],
        holds_shards=shards["holds"],
        gateway_clearing_shards=shards["gateway_clearing"],
    )


def ensure_account(
    conn: Connection,
    *,
    kind: AccountKind,
    owner_type: str,
    owner_id: int,
    currency: str = "CNY",
    allow_negative: bool = False,
) -> int:
    where = and_(
        _acc.c.kind == kind.value,
        _acc.c.owner_type == owner_type,
        _acc.c.owner_id == owner_id,
        _acc.c.currency == currency,
    )
    existing = conn.execute(select(_acc.c.id).where(where)).scalar()
    if existing is not None:
        return int(existing)
    result = conn.execute(
        insert(_acc)
        .values(
            kind=kind.value,
            owner_type=owner_type,
            owner_id=owner_id,
            currency=currency,
            balance_cents=0,
            version=0,
            allow_negative=allow_negative,
            created_at=utcnow(),
        )
        .returning(_acc.c.id)
    )
    return int(result.scalar_one())


def wallet_account(conn: Connection, *, owner_type: str, owner_id: int) -> int:
    return ensure_account(conn, kind=AccountKind.wallet, owner_type=owner_type, owner_id=owner_id)


_RAW_TXN = RawSQL(
    "INSERT INTO ledger_transactions (kind, ref_type, ref_id, actor, memo, created_at) "
    "VALUES (:kind, :ref_type, :ref_id, :actor, :memo, :created_at) RETURNING id"
)
_RAW_MOVE = RawSQL(
    "UPDATE ledger_accounts SET balance_cents = balance_cents + :amt, version = version + 1 "
    "WHERE id = :acc_id AND (allow_negative OR balance_cents + :amt >= 0) "
    "RETURNING balance_cents, version"
)
_RAW_BALANCE = RawSQL("SELECT balance_cents FROM ledger_accounts WHERE id = :acc_id")
_RAW_ENTRIES = MultiInsert(
    "ledger_entries",
    (
        "transaction_id",
        "account_id",
        "amount_cents",
        "balance_after_cents",
        "account_version",
        "created_at",
    ),
)


def post(
    conn: Connection,
    *,
    kind: str,
    legs: list[tuple[int, int]],
    now: datetime,
    ref_type: str = "",
    ref_id: int = 0,
    actor: str = "system",
    memo: str = "",
) -> int:
    """Write one balanced transaction. Raises InsufficientFunds if a wallet would go negative."""
    if len(legs) < 2 or sum(a for _, a in legs) != 0 or any(a == 0 for _, a in legs):
        raise ValueError(f"unbalanced or empty legs: {legs}")
    at = db_time(conn, now)
    txn_id = int(
        _RAW_TXN.one(
            conn,
            {
                "kind": kind,
                "ref_type": ref_type,
                "ref_id": ref_id,
                "actor": actor,
                "memo": memo,
                "created_at": at,
            },
        )[0]
    )
    rows = []
    for account_id, amount in sorted(legs, key=lambda leg: -leg[0]):
        moved = _RAW_MOVE.one(conn, {"acc_id": account_id, "amt": amount})
        if moved is None:
            available = _RAW_BALANCE.one(conn, {"acc_id": account_id})
            raise InsufficientFunds(needed=-amount, available=int(available[0] if available else 0))
        rows.append(
            {
                "transaction_id": txn_id,
                "account_id": account_id,
                "amount_cents": amount,
                "balance_after_cents": moved[0],
                "account_version": moved[1],
                "created_at": at,
            }
        )
    _RAW_ENTRIES.run(conn, rows)
    return txn_id


_RAW_HOLD = RawSQL(
    "INSERT INTO ledger_holds (account_id, amount_cents, state, ref_type, ref_id, place_txn_id, "
    "created_at, details) VALUES (:account_id, :amount_cents, 'pending', :ref_type, :ref_id, "
    ":place_txn_id, :created_at, '{}') RETURNING id"
)


def place_hold(
    conn: Connection,
    *,
    wallet_id: int,
    holds_account: int,
    amount: int,
    ref_type: str,
    ref_id: int,
    now: datetime,
    actor: str = "system",
) -> int:
    txn_id = post(
        conn,
        kind="hold",
        legs=[(wallet_id, -amount), (holds_account, amount)],
        now=now,
        ref_type=ref_type,
        ref_id=ref_id,
        actor=actor,
    )
    row = _RAW_HOLD.one(
        conn,
        {
            "account_id": wallet_id,
            "amount_cents": amount,
            "ref_type": ref_type,
            "ref_id": ref_id,
            "place_txn_id": txn_id,
            "created_at": db_time(conn, now),
        },
    )
    return int(row[0])


def _resolve_hold(
    conn: Connection,
    *,
    hold_id: int,
    to_state: HoldState,
    counter_account: int | None,
    holds_account: int,
    now: datetime,
    actor: str,
    memo: str,
    returned_cents: int = 0,
) -> int:
    """Capture or void a pending hold exactly once.

    The hold row is locked before its state is read (PostgreSQL; SQLite has one writer), so a
    second, racing resolution waits and then sees the first one's outcome instead of moving
    money it no longer has.
    """
    # Release from the holds row that received the money (holds are spread over shards):
    # read in the same statement as the hold itself.
    placed_on = (
        select(_entry.c.account_id)
        .where(_entry.c.transaction_id == _hold.c.place_txn_id, _entry.c.amount_cents > 0)
        .limit(1)
        .scalar_subquery()
    )
    stmt = select(
        _hold.c.amount_cents,
        _hold.c.state,
        _hold.c.ref_type,
        _hold.c.ref_id,
        _hold.c.account_id,
        placed_on.label("placed_on"),
    ).where(_hold.c.id == hold_id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=_hold)
    hold = conn.execute(stmt).first()
    if counter_account is None and hold is not None:
        counter_account = int(hold.account_id)  # a void returns money where it came from
    if hold is not None and hold.placed_on is not None:
        holds_account = int(hold.placed_on)
    if hold is None or hold.state != HoldState.pending.value or counter_account is None:
        raise KamengError(
            ErrorCode.invalid_transition,
            from_status=f"hold:{hold.state if hold else 'missing'}",
            to_status=f"hold:{to_state.value}",
        )
    amount = int(hold.amount_cents)
    if returned_cents:
        # A partial capture: what was not delivered goes back to the wallet it came from.
        if not 0 < returned_cents < amount:
            raise KamengError(ErrorCode.invalid_amount, detail="partial return out of range")
        legs = [
            (holds_account, -amount),
            (counter_account, amount - returned_cents),
            (int(hold.account_id), returned_cents),
        ]
    else:
        legs = [(holds_account, -amount), (counter_account, amount)]
    txn_id = post(
        conn,
        kind="capture" if to_state is HoldState.captured else "void",
        legs=legs,
        now=now,
        ref_type=hold.ref_type,
        ref_id=hold.ref_id,
        actor=actor,
        memo=memo,
    )
    changed = conn.execute(
        update(_hold)
        .where(_hold.c.id == hold_id, _hold.c.state == HoldState.pending.value)
        .values(state=to_state.value, resolve_txn_id=txn_id, resolved_at=now)
    ).rowcount
    if changed != 1:
        raise KamengError(ErrorCode.concurrent_update)
    return txn_id


def capture_hold(
    conn: Connection,
    *,
    hold_id: int,
    accounts: PlatformAccounts,
    now: datetime,
    actor: str = "system",
    returned_cents: int = 0,
    memo: str = "",
) -> int:
    """Take a held payment as revenue; `returned_cents` of it (an undelivered part) goes back
    to the buyer's wallet in the same transaction."""
    return _resolve_hold(
        conn,
        hold_id=hold_id,
        to_state=HoldState.captured,
        counter_account=accounts.revenue_for(hold_id),
        holds_account=accounts.holds,
        now=now,
        actor=actor,
        memo=memo,
        returned_cents=returned_cents,
    )


def void_hold(
    conn: Connection,
    *,
    hold_id: int,
    wallet_id: int | None = None,
    accounts: PlatformAccounts,
    now: datetime,
    actor: str = "system",
    memo: str = "",
) -> int:
    return _resolve_hold(
        conn,
        hold_id=hold_id,
        to_state=HoldState.voided,
        counter_account=None,  # back to the wallet it was held from, whatever `wallet_id` says
        holds_account=accounts.holds,
        now=now,
        actor=actor,
        memo=memo,
    )


def topup(
    conn: Connection,
    *,
    wallet_id: int,
    accounts: PlatformAccounts,
    amount: int,
    now: datetime,
    actor: str,
    memo: str = "",
) -> int:
    if amount <= 0:
        raise KamengError(ErrorCode.invalid_amount, detail="must be positive")
    return post(
        conn,
        kind="topup",
        legs=[(accounts.funding, -amount), (wallet_id, amount)],
        now=now,
        ref_type="wallet",
        ref_id=wallet_id,
        actor=actor,
        memo=memo,
    )


def balances(conn: Connection, *, wallet_id: int) -> tuple[int, int]:
    """(available, held) for a wallet."""
    available = conn.execute(
        select(_acc.c.balance_cents).where(_acc.c.id == wallet_id)
    ).scalar_one()
    held = (
        conn.execute(
            select(_hold.c.amount_cents).where(
                _hold.c.account_id == wallet_id, _hold.c.state == HoldState.pending.value
            )
        )
        .scalars()
        .all()
    )
    return int(available), int(sum(held))
