"""SQLAlchemy 2 ORM rows of the store.  Migrations (``latency_service/migrations``) create exactly these tables."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED_JOB_STATUSES = ("queued", "running")
ITEM_STATUSES = ("pending", "done", "failed", "skipped")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend: SQLite drops the offset, so it is put back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(200), index=True)
    backend: Mapped[str] = mapped_column(String(50))
    backend_version: Mapped[str] = mapped_column(String(100))
    host: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class Variant(Base):
    """One operator variant, keyed by ``OpSpec.key``; ``spec`` is its canonical JSON form."""

    __tablename__ = "variants"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(50), index=True)
    spec: Mapped[dict[str, Any]]


class Measurement(Base):
    """History is kept: a variant measured twice has two rows; readers use the latest valid one."""

    __tablename__ = "measurements"
    __table_args__ = (Index("ix_measurements_device_variant_time", "device_id", "variant_key", "measured_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    variant_key: Mapped[str] = mapped_column(ForeignKey("variants.key"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    median_ms: Mapped[float] = mapped_column(Float)
    p10_ms: Mapped[float] = mapped_column(Float)
    p90_ms: Mapped[float] = mapped_column(Float)
    mean_ms: Mapped[float] = mapped_column(Float)
    cv: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    spread: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    flag_reason: Mapped[str | None] = mapped_column(Text)
    overhead_ms: Mapped[float | None] = mapped_column(Float)
    # Independently built runtime sessions the median was taken over, and how far their medians lay apart.
    sessions: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    session_spread: Mapped[float | None] = mapped_column(Float)
    environment: Mapped[dict[str, Any]]
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    valid: Mapped[bool] = mapped_column(Boolean, default=True)
    # Start and end of the timed work: lets anyone check that measurements never overlapped in time.
    started_at: Mapped[datetime | None]
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)

    variant: Mapped[Variant] = relationship(lazy="joined")


class ModelMeasurement(Base):
    """A whole ONNX model measured end to end on a device."""

    __tablename__ = "model_measurements"
    __table_args__ = (Index("ix_model_measurements_device_model", "device_id", "model_sha256", "measured_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    model_sha256: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(300))
    median_ms: Mapped[float] = mapped_column(Float)
    p10_ms: Mapped[float] = mapped_column(Float)
    p90_ms: Mapped[float] = mapped_column(Float)
    mean_ms: Mapped[float] = mapped_column(Float)
    cv: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    sessions: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    session_spread: Mapped[float | None] = mapped_column(Float)
    environment: Mapped[dict[str, Any]]
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_device_status", "device_id", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    preset: Mapped[str | None] = mapped_column(String(50))
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The lease (migration 0003): "host:pid:token" of the process running the job, refreshed after every item.
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]


class JobItem(Base):
    """One variant of a job, in order; its status is what makes a resumed job skip work already done."""

    __tablename__ = "job_items"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_key: Mapped[str] = mapped_column(ForeignKey("variants.key"))
    status: Mapped[str] = mapped_column(String(20), default="pending")
    error: Mapped[str | None] = mapped_column(Text)


class Predictor(Base):
    """A fitted LatencyPredictor in its portable JSON form (never pickle); the newest row is the one used."""

    __tablename__ = "predictors"
    __table_args__ = (Index("ix_predictors_class_time", "device_class", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    device_class: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]]
    reports: Mapped[list[Any]]
