"""ORM rows of the in-context kernel profiling (issue 3), on the shared ``Base``; migration 0002 creates them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from latency_service.models import Base, utcnow


class ProfiledNetworkRow(Base):
    """A generated network profiled in context: its un-profiled wall median and per-run constant."""

    __tablename__ = "kernel_networks"
    __table_args__ = (Index("ix_kernel_networks_device_time", "device_id", "profiled_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    network_id: Mapped[str] = mapped_column(String(100))
    description: Mapped[dict[str, Any]]
    wall_ms: Mapped[float] = mapped_column(Float)
    overhead_ms: Mapped[float] = mapped_column(Float)
    n_kernels: Mapped[int] = mapped_column(Integer)
    environment: Mapped[dict[str, Any]]
    profiled_at: Mapped[datetime] = mapped_column(default=utcnow)


class KernelSampleRow(Base):
    """One kernel of a profiled network: its class, features, profiled median and reconciled share of the wall."""

    __tablename__ = "kernel_samples"
    __table_args__ = (Index("ix_kernel_samples_device_class", "device_id", "kernel_class"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    network_row_id: Mapped[int] = mapped_column(ForeignKey("kernel_networks.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    kernel_class: Mapped[str] = mapped_column(String(50))
    op_type: Mapped[str] = mapped_column(String(100))
    features: Mapped[list[Any]]
    latency_ms: Mapped[float] = mapped_column(Float)
    profiled_ms: Mapped[float] = mapped_column(Float)


class FusionRuleRow(Base):
    """nn-Meter's fusion test for one operator pair on one device: fused when T(A)+T(B)−T(A→B) > α·min(T(A),T(B))."""

    __tablename__ = "fusion_rules"
    __table_args__ = (Index("ix_fusion_rules_device", "device_id", "measured_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    first_op: Mapped[str] = mapped_column(String(50))
    second_op: Mapped[str] = mapped_column(String(50))
    fused: Mapped[bool] = mapped_column(Boolean)
    first_ms: Mapped[float] = mapped_column(Float)
    second_ms: Mapped[float] = mapped_column(Float)
    chained_ms: Mapped[float] = mapped_column(Float)
    kernels_in_chain: Mapped[int] = mapped_column(Integer)
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class KernelPredictorRow(Base):
    """A fitted whole-model (kernel) predictor in portable JSON; the newest row of a device class is used."""

    __tablename__ = "kernel_predictors"
    __table_args__ = (Index("ix_kernel_predictors_class_time", "device_class", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"))
    device_class: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]]
    report: Mapped[dict[str, Any]]
