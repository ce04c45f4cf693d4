"""supplier promises, charged purchases, late-success claims and supplier reconciliation

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import kameng.db

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("suppliers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("request_ttl_s", sa.Integer(), nullable=False, server_default="300")
        )
        batch_op.add_column(sa.Column("dedup_window_s", sa.Integer(), nullable=True))
    # A kameng site deduplicates on the Idempotency-Key for as long as it keeps the record (7
    # days); the bundled simulator for as long as it runs (None).
    op.execute("UPDATE suppliers SET dedup_window_s = 604800 WHERE adapter = 'kameng'")
    with op.batch_alter_table("procurements", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_sent_at", kameng.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("settles_at", kameng.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("charged_at", kameng.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("charged_cents", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("late_check_at", kameng.db.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_procurements_late_check_at", ["late_check_at"], unique=False)
    op.execute("UPDATE procurements SET last_sent_at = updated_at")
    op.execute(
        "UPDATE procurements SET charged_at = updated_at, charged_cents = cost_cents "
        "WHERE state = 'delivered' OR (state = 'partial' AND keys_received > 0)"
    )
    op.execute("UPDATE procurements SET settles_at = finished_at WHERE state = 'rejected'")
    # Purchases abandoned at a deadline before this release were never asked about again.
    op.execute(
        "UPDATE procurements SET late_check_at = updated_at "
        "WHERE state = 'abandoned' AND keys_received = 0"
    )
    op.create_table(
        "supplier_claims",
        sa.Column("id", _ID, nullable=False),
        sa.Column("supplier_id", _ID, nullable=False),
        sa.Column("procurement_id", _ID, nullable=False),
        sa.Column("order_id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("keys_count", sa.Integer(), nullable=False),
        sa.Column("note", sa.String(length=500), nullable=False),
        sa.Column("created_at", kameng.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", kameng.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("resolved_by", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_supplier_claims_order_id_orders")
        ),
        sa.ForeignKeyConstraint(
            ["procurement_id"],
            ["procurements.id"],
            name=op.f("fk_supplier_claims_procurement_id_procurements"),
        ),
        sa.ForeignKeyConstraint(
            ["supplier_id"], ["suppliers.id"], name=op.f("fk_supplier_claims_supplier_id_suppliers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_supplier_claims")),
        sa.UniqueConstraint("procurement_id", name="uq_supplier_claims_procurement"),
    )
    with op.batch_alter_table("supplier_claims", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_supplier_claims_supplier_id"), ["supplier_id"], unique=False
        )
    op.create_table(
        "supplier_reconciliations",
        sa.Column("id", _ID, nullable=False),
        sa.Column("supplier_id", _ID, nullable=False),
        sa.Column("ran_at", kameng.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("since", kameng.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("until", kameng.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.Column("mismatches", sa.Integer(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["supplier_id"],
            ["suppliers.id"],
            name=op.f("fk_supplier_reconciliations_supplier_id_suppliers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_supplier_reconciliations")),
    )
    with op.batch_alter_table("supplier_reconciliations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_supplier_reconciliations_supplier_ran", ["supplier_id", "ran_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("supplier_reconciliations", schema=None) as batch_op:
        batch_op.drop_index("ix_supplier_reconciliations_supplier_ran")
    op.drop_table("supplier_reconciliations")
    with op.batch_alter_table("supplier_claims", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_supplier_claims_supplier_id"))
    op.drop_table("supplier_claims")
    with op.batch_alter_table("procurements", schema=None) as batch_op:
        batch_op.drop_index("ix_procurements_late_check_at")
        batch_op.drop_column("late_check_at")
        batch_op.drop_column("charged_cents")
        batch_op.drop_column("charged_at")
        batch_op.drop_column("settles_at")
        batch_op.drop_column("last_sent_at")
    with op.batch_alter_table("suppliers", schema=None) as batch_op:
        batch_op.drop_column("dedup_window_s")
        batch_op.drop_column("request_ttl_s")
