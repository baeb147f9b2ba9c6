"""In-context kernel profiling: profiled networks, kernel samples, fusion rules, kernel predictors.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "kernel_networks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("network_id", sa.String(100), nullable=False),
        sa.Column("description", sa.JSON(), nullable=False),
        sa.Column("wall_ms", sa.Float(), nullable=False),
        sa.Column("overhead_ms", sa.Float(), nullable=False),
        sa.Column("n_kernels", sa.Integer(), nullable=False),
        sa.Column("environment", sa.JSON(), nullable=False),
        sa.Column("profiled_at", _utc(), nullable=False),
    )
    op.create_index("ix_kernel_networks_device_time", "kernel_networks", ["device_id", "profiled_at"])
    op.create_table(
        "kernel_samples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "network_row_id", sa.Integer(), sa.ForeignKey("kernel_networks.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("kernel_class", sa.String(50), nullable=False),
        sa.Column("op_type", sa.String(100), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("profiled_ms", sa.Float(), nullable=False),
    )
    op.create_index("ix_kernel_samples_device_class", "kernel_samples", ["device_id", "kernel_class"])
    op.create_table(
        "fusion_rules",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("first_op", sa.String(50), nullable=False),
        sa.Column("second_op", sa.String(50), nullable=False),
        sa.Column("fused", sa.Boolean(), nullable=False),
        sa.Column("first_ms", sa.Float(), nullable=False),
        sa.Column("second_ms", sa.Float(), nullable=False),
        sa.Column("chained_ms", sa.Float(), nullable=False),
        sa.Column("kernels_in_chain", sa.Integer(), nullable=False),
        sa.Column("measured_at", _utc(), nullable=False),
    )
    op.create_index("ix_fusion_rules_device", "fusion_rules", ["device_id", "measured_at"])
    op.create_table(
        "kernel_predictors",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("device_class", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("method", sa.String(50), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
    )
    op.create_index("ix_kernel_predictors_class_time", "kernel_predictors", ["device_class", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_kernel_predictors_class_time", table_name="kernel_predictors")
    op.drop_table("kernel_predictors")
    op.drop_index("ix_fusion_rules_device", table_name="fusion_rules")
    op.drop_table("fusion_rules")
    op.drop_index("ix_kernel_samples_device_class", table_name="kernel_samples")
    op.drop_table("kernel_samples")
    op.drop_index("ix_kernel_networks_device_time", table_name="kernel_networks")
    op.drop_table("kernel_networks")
