"""Initial schema: devices, variants, measurements, model measurements, jobs, job items, predictors.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("device_class", sa.String(200), nullable=False),
        sa.Column("backend", sa.String(50), nullable=False),
        sa.Column("backend_version", sa.String(100), nullable=False),
        sa.Column("host", sa.JSON(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("last_seen", _utc(), nullable=False),
    )
    op.create_index("ix_devices_device_class", "devices", ["device_class"])
    op.create_table(
        "variants",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
    )
    op.create_index("ix_variants_kind", "variants", ["kind"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("force", sa.Boolean(), nullable=False),
        sa.Column("preset", sa.String(50), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
    )
    op.create_index("ix_jobs_device_status", "jobs", ["device_id", "status"])
    op.create_table(
        "job_items",
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("variant_key", sa.String(64), sa.ForeignKey("variants.key"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_table(
        "measurements",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("variant_key", sa.String(64), sa.ForeignKey("variants.key"), nullable=False),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("median_ms", sa.Float(), nullable=False),
        sa.Column("p10_ms", sa.Float(), nullable=False),
        sa.Column("p90_ms", sa.Float(), nullable=False),
        sa.Column("mean_ms", sa.Float(), nullable=False),
        sa.Column("cv", sa.Float(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("spread", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("flag_reason", sa.Text(), nullable=True),
        sa.Column("overhead_ms", sa.Float(), nullable=True),
        sa.Column("environment", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("valid", sa.Boolean(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("measured_at", _utc(), nullable=False),
    )
    op.create_index("ix_measurements_device_variant_time", "measurements", ["device_id", "variant_key", "measured_at"])
    op.create_table(
        "model_measurements",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(300), nullable=True),
        sa.Column("median_ms", sa.Float(), nullable=False),
        sa.Column("p10_ms", sa.Float(), nullable=False),
        sa.Column("p90_ms", sa.Float(), nullable=False),
        sa.Column("mean_ms", sa.Float(), nullable=False),
        sa.Column("cv", sa.Float(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("environment", sa.JSON(), nullable=False),
        sa.Column("measured_at", _utc(), nullable=False),
    )
    op.create_index(
        "ix_model_measurements_device_model", "model_measurements", ["device_id", "model_sha256", "measured_at"]
    )
    op.create_table(
        "predictors",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(200), sa.ForeignKey("devices.id"), nullable=False),
        sa.Column("device_class", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("reports", sa.JSON(), nullable=False),
    )
    op.create_index("ix_predictors_class_time", "predictors", ["device_class", "created_at"])


def downgrade() -> None:
    op.drop_table("predictors")
    op.drop_table("model_measurements")
    op.drop_table("measurements")
    op.drop_table("job_items")
    op.drop_table("jobs")
    op.drop_table("variants")
    op.drop_table("devices")
