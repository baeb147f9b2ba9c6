from __future__ import annotations

import math
from typing import cast

from fastapi import APIRouter

from latency_service.api.deps import ServiceDep, SessionDep
from latency_service.api.errors import parse_ops
from latency_service.api.schemas import OpsRequest, PredictResponse, Source

router = APIRouter(tags=["predict"])


@router.post("/v1/predict")
def predict(body: OpsRequest, service: ServiceDep, session: SessionDep) -> PredictResponse:
    """Latency per operator: the measured median where this variant was profiled, the regressor's estimate else."""
    ops = parse_ops(body.ops, max_elements=service.settings.max_elements)
    predictor, version = service.predictor(session)
    predictions = predictor.predict(ops)
    latency_ms = [float(ms) for ms, _ in predictions]
    return PredictResponse(
        latency_ms=latency_ms,
        source=[cast(Source, source) for _, source in predictions],
        total_ms=math.fsum(latency_ms),
        predictor_version=version,
    )
