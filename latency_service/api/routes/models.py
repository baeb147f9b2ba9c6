"""Whole ONNX models: predicted from the kernels the backend will run, or measured end to end (and stored)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from latency_service.api.deps import ServiceDep, ServiceState
from latency_service.api.errors import ConflictError, FieldError
from latency_service.db import transaction
from latency_service.kernel_store import NoKernelPredictorError, latest_kernel_predictor
from latency_service.measurement_lock import MEASUREMENT_LOCK
from latency_service.model_latency import InvalidModelError, measure_model, predict_with, validate_model

router = APIRouter(tags=["models"])

_ONNX_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "description": "An ONNX model with static input shapes, batch 1 (either torch.onnx.export path).",
    }
}


class KernelPrediction(BaseModel):
    name: str
    ops: list[str]
    latency_ms: float
    source: str


class UnmodelledKernel(BaseModel):
    name: str
    op_type: str
    kernel_class: str | None
    latency_ms: float
    estimate: str
    reason: str


class ModelPrediction(BaseModel):
    total_ms: float
    per_run_overhead_ms: float
    kernels: list[KernelPrediction]
    unmodelled: list[UnmodelledKernel]
    predictor_version: str
    method: str


class ModelMeasurementPublic(BaseModel):
    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    mean_ms: float
    cv: float
    flagged: bool
    model_sha256: str


def _predict(service: ServiceState, model_bytes: bytes) -> dict[str, Any]:
    validate_model(model_bytes)  # a bad body is a 422 whether or not a predictor exists
    with service.session_factory() as session:
        predictor, _ = latest_kernel_predictor(session=session, device_class=service.device_class)
    return predict_with(predictor, service.measuring.backend, model_bytes)


def _measure(service: ServiceState, model_bytes: bytes, name: str | None) -> dict[str, Any]:
    measuring = service.measuring
    with MEASUREMENT_LOCK:
        overhead_ms = measuring.overhead_ms()
        with transaction(service.session_factory) as session:
            return measure_model(
                model_bytes,
                session=session,
                device_id=service.device_id,
                backend=measuring.backend,
                config=measuring.config,
                overhead_ms=overhead_ms,
                environment=measuring.environment(),
                model_name=name,
                gate=measuring.gate(),
            )


@router.post("/v1/predict/model", openapi_extra=_ONNX_BODY)
async def predict_model(request: Request, service: ServiceDep) -> ModelPrediction:
    """Decompose the model into the backend's kernels (after its fusions) and predict each; unmodelled ones listed."""
    body = await request.body()
    try:
        result = await run_in_threadpool(_predict, service, body)
    except InvalidModelError as exc:
        raise FieldError(("body",), exc.message) from exc
    except NoKernelPredictorError as exc:
        raise ConflictError(str(exc)) from exc
    return ModelPrediction(**result)


@router.post("/v1/measure/model", openapi_extra=_ONNX_BODY)
async def measure_model_route(
    request: Request, service: ServiceDep, name: str | None = Query(default=None, max_length=300)
) -> ModelMeasurementPublic:
    """Measure the model end to end with the service's protocol (one measurement at a time) and store it."""
    body = await request.body()
    try:
        result = await run_in_threadpool(_measure, service, body, name)
    except InvalidModelError as exc:
        raise FieldError(("body",), exc.message) from exc
    return ModelMeasurementPublic(**result)
