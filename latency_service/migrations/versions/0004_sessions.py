"""Per-measurement session count and spread.

Variants and whole models are timed on several independently built runtime sessions (see
``latency_service.measurement``); how many, and how far their medians lay apart, is stored with every number.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("measurements", "model_measurements"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("sessions", sa.Integer(), nullable=False, server_default="1"))
            batch.add_column(sa.Column("session_spread", sa.Float(), nullable=True))


def downgrade() -> None:
    for table in ("measurements", "model_measurements"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("session_spread")
            batch.drop_column("sessions")
