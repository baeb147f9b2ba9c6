from __future__ import annotations

from fastapi import APIRouter, Query

from latency_service import store
from latency_service.api.deps import ServiceDep, SessionDep
from latency_service.api.errors import FieldError
from latency_service.api.schemas import MeasurementPage, MeasurementPublic
from predictors.ops import OPERATORS

router = APIRouter(tags=["measurements"])


@router.get("/v1/measurements")
def list_measurements(
    service: ServiceDep,
    session: SessionDep,
    op: str | None = Query(default=None, description="Only this operator kind, e.g. conv2d"),
    limit: int = Query(default=100, ge=1, le=10_000),
    offset: int = Query(default=0, ge=0),
) -> MeasurementPage:
    """The latest valid measurement of every variant measured on this device, newest first."""
    if op is not None and op not in OPERATORS:
        raise FieldError(("query", "op"), f"unknown operator kind {op!r}; known: {', '.join(sorted(OPERATORS))}")
    rows, total = store.latest_measurements(
        session=session, device_id=service.device_id, kind=op, limit=limit, offset=offset
    )
    items = [
        MeasurementPublic(
            op=row.op.to_dict(),
            key=row.measurement.variant_key,
            median_ms=row.measurement.median_ms,
            p10_ms=row.measurement.p10_ms,
            p90_ms=row.measurement.p90_ms,
            mean_ms=row.measurement.mean_ms,
            cv=row.measurement.cv,
            n=row.measurement.n,
            flagged=row.measurement.flagged,
            flag_reason=row.measurement.flag_reason,
            measured_at=row.measurement.measured_at,
        )
        for row in rows
    ]
    return MeasurementPage(items=items, total=total)
