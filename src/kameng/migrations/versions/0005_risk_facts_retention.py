"""risk facts: an index on created_at, so retention pruning is a range scan

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 01:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_risk_facts_created_at", "risk_facts", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_risk_facts_created_at", table_name="risk_facts")
