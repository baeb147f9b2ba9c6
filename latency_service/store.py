"""Store functions: the only code that reads and writes the ORM rows.

All functions are keyword-only and take the caller's session; none commits, so that a caller can make several of them
one transaction (``latency_service.db.transaction``).  The job queue's functions live in ``latency_service.job_store``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from latency_service.measurement import MeasurementStats
from latency_service.models import (
    Device,
    Measurement,
    ModelMeasurement,
    Predictor,
    Variant,
    utcnow,
)
from predictors.ops import OpSpec, op_from_dict


@dataclass(frozen=True)
class StoredMeasurement:
    op: OpSpec
    measurement: Measurement


# ---- devices and variants ---------------------------------------------------------------------------------------
def upsert_device(
    *,
    session: Session,
    device_id: str,
    device_class: str,
    backend: str,
    backend_version: str,
    host: dict[str, Any],
) -> Device:
    device = session.get(Device, device_id)
    now = utcnow()
    if device is None:
        device = Device(id=device_id, created_at=now)
        session.add(device)
    device.device_class = device_class
    device.backend = backend
    device.backend_version = backend_version
    device.host = host
    device.last_seen = now
    session.flush()
    return device


def get_device(*, session: Session, device_id: str) -> Device | None:
    return session.get(Device, device_id)


def get_or_create_variants(*, session: Session, ops: Iterable[OpSpec]) -> list[str]:
    """Insert the variants that are new and return every key, in order.  Safe against a concurrent inserter."""
    rows = {op.key: {"key": op.key, "kind": op.kind, "spec": op.to_dict()} for op in ops}
    keys = list(rows)
    if not rows:
        return keys
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        # ON CONFLICT DO NOTHING: two services of a farm may insert the same variant at once.
        insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        session.execute(insert(Variant).on_conflict_do_nothing(index_elements=["key"]), list(rows.values()))
    else:
        existing = set(session.scalars(select(Variant.key).where(Variant.key.in_(keys))))
        session.add_all(Variant(**row) for key, row in rows.items() if key not in existing)
        session.flush()
    return keys


def get_or_create_variant(*, session: Session, op: OpSpec) -> str:
    return get_or_create_variants(session=session, ops=[op])[0]


def variant_spec(*, session: Session, variant_key: str) -> dict[str, Any]:
    variant = session.get(Variant, variant_key)
    if variant is None:
        raise LookupError(f"no variant with key {variant_key}")
    return dict(variant.spec)


def variant_op(variant: Variant) -> OpSpec:
    return op_from_dict(variant.spec)


# ---- operator measurements --------------------------------------------------------------------------------------
def add_measurement(
    *,
    session: Session,
    device_id: str,
    variant_key: str,
    stats: MeasurementStats,
    environment: dict[str, Any],
    job_id: int | None = None,
    started_at: datetime | None = None,
    measured_at: datetime | None = None,
) -> Measurement:
    row = Measurement(
        variant_key=variant_key,
        device_id=device_id,
        median_ms=stats.median_ms,
        p10_ms=stats.p10_ms,
        p90_ms=stats.p90_ms,
        mean_ms=stats.mean_ms,
        cv=stats.cv,
        n=stats.n,
        spread=stats.spread,
        attempts=stats.attempts,
        flagged=stats.flagged,
        flag_reason=stats.flag_reason,
        overhead_ms=stats.overhead_ms,
        sessions=stats.sessions,
        session_spread=stats.session_spread,
        environment=environment,
        job_id=job_id,
        valid=True,
        started_at=started_at,
        measured_at=measured_at or utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def _latest_ids(device_id: str, kind: str | None) -> Any:
    # Ids grow with insertion order, so the largest id per variant is its latest measurement.
    query = (
        select(func.max(Measurement.id).label("id"))
        .where(Measurement.device_id == device_id, Measurement.valid.is_(True))
        .group_by(Measurement.variant_key)
    )
    if kind is not None:
        query = query.join(Variant, Variant.key == Measurement.variant_key).where(Variant.kind == kind)
    return query.subquery()


def latest_measurements(
    *, session: Session, device_id: str, kind: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[StoredMeasurement], int]:
    """The latest valid measurement per variant on a device, newest first, and how many there are in all."""
    latest = _latest_ids(device_id, kind)
    total = session.scalar(select(func.count()).select_from(latest)) or 0
    rows = session.scalars(
        select(Measurement)
        .join(latest, latest.c.id == Measurement.id)
        .order_by(Measurement.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return [StoredMeasurement(op=variant_op(row.variant), measurement=row) for row in rows], total


def measured_keys(*, session: Session, device_id: str) -> set[str]:
    query = select(Measurement.variant_key).where(Measurement.device_id == device_id, Measurement.valid.is_(True))
    return set(session.scalars(query.distinct()))


def has_measurement(*, session: Session, device_id: str, variant_key: str) -> bool:
    query = select(Measurement.id).where(
        Measurement.device_id == device_id, Measurement.variant_key == variant_key, Measurement.valid.is_(True)
    )
    return session.scalars(query.limit(1)).first() is not None


def training_samples(
    *, session: Session, device_id: str | None = None, device_class: str | None = None
) -> list[tuple[OpSpec, float]]:
    """(op, median ms) for fitting: one device's latest medians, or, for a device class, per variant the median of
    the latest medians of every device in that class (the farm-wide predictor)."""
    if (device_id is None) == (device_class is None):
        raise ValueError("give exactly one of device_id and device_class")
    latest = select(func.max(Measurement.id).label("id")).where(Measurement.valid.is_(True))
    if device_id is not None:
        latest = latest.where(Measurement.device_id == device_id)
    else:
        latest = latest.join(Device, Device.id == Measurement.device_id).where(Device.device_class == device_class)
    latest_ids = latest.group_by(Measurement.device_id, Measurement.variant_key).subquery()
    rows = session.execute(
        select(Variant, Measurement.median_ms)
        .join(Measurement, Measurement.variant_key == Variant.key)
        .join(latest_ids, latest_ids.c.id == Measurement.id)
        .order_by(Variant.key)
    ).all()
    medians: dict[str, list[float]] = {}
    specs: dict[str, Variant] = {}
    for variant, median_ms in rows:
        medians.setdefault(variant.key, []).append(median_ms)
        specs[variant.key] = variant
    return [(variant_op(specs[key]), statistics.median(values)) for key, values in medians.items()]


def invalidate_measurements(*, session: Session, device_id: str, variant_keys: Sequence[str] | None = None) -> int:
    """Mark measurements invalid (kept as history, no longer used); returns how many rows changed."""
    statement = update(Measurement).where(Measurement.device_id == device_id, Measurement.valid.is_(True))
    if variant_keys is not None:
        statement = statement.where(Measurement.variant_key.in_(variant_keys))
    result = session.execute(statement.values(valid=False))
    return int(getattr(result, "rowcount", 0) or 0)


# ---- predictors -------------------------------------------------------------------------------------------------
def save_predictor(
    *,
    session: Session,
    device_id: str,
    device_class: str,
    version: str,
    payload: dict[str, Any],
    reports: list[dict[str, Any]],
) -> Predictor:
    row = Predictor(
        device_id=device_id,
        device_class=device_class,
        version=version,
        payload=payload,
        reports=reports,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def latest_predictor(
    *, session: Session, device_id: str | None = None, device_class: str | None = None
) -> Predictor | None:
    query = select(Predictor)
    if device_id is not None:
        query = query.where(Predictor.device_id == device_id)
    if device_class is not None:
        query = query.where(Predictor.device_class == device_class)
    return session.scalars(query.order_by(Predictor.id.desc()).limit(1)).first()


# ---- whole-model measurements -----------------------------------------------------------------------------------
def add_model_measurement(
    *,
    session: Session,
    device_id: str,
    model_sha256: str,
    stats: MeasurementStats,
    environment: dict[str, Any],
    model_name: str | None = None,
) -> ModelMeasurement:
    row = ModelMeasurement(
        device_id=device_id,
        model_sha256=model_sha256,
        model_name=model_name,
        median_ms=stats.median_ms,
        p10_ms=stats.p10_ms,
        p90_ms=stats.p90_ms,
        mean_ms=stats.mean_ms,
        cv=stats.cv,
        n=stats.n,
        flagged=stats.flagged,
        sessions=stats.sessions,
        session_spread=stats.session_spread,
        environment=environment,
        measured_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


def latest_model_measurement(*, session: Session, device_id: str, model_sha256: str) -> ModelMeasurement | None:
    query = (
        select(ModelMeasurement)
        .where(ModelMeasurement.device_id == device_id, ModelMeasurement.model_sha256 == model_sha256)
        .order_by(ModelMeasurement.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def list_model_measurements(
    *, session: Session, device_id: str, limit: int = 100, offset: int = 0
) -> tuple[list[ModelMeasurement], int]:
    where = ModelMeasurement.device_id == device_id
    total = session.scalar(select(func.count()).where(where)) or 0
    query = select(ModelMeasurement).where(where).order_by(ModelMeasurement.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(query)), total
