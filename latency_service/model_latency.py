"""Whole-model latency: predict an ONNX model from its kernels, measure it end to end, and keep both in the store.

Prediction = per-run constant + Σ kernel predictions, where the kernels are the nodes of the graph the backend's own
optimiser produces for this model (fusions, folded BN, NCHWc reorders included), and each kernel's regressor was
fitted on in-context samples (:mod:`latency_service.kernel_profiling`).  A kernel of a class no regressor covers is
never dropped: it is predicted with a memory-bound fallback and listed in ``unmodelled`` with that estimate.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import onnx
from sqlalchemy.orm import Session, sessionmaker

from latency_service import store
from latency_service.backends.base import Backend, Runnable
from latency_service.clock_gate import ClockGate
from latency_service.db import transaction
from latency_service.fusion_rules import detect_fusions
from latency_service.kernel_fit import DEFAULT_METHOD, KernelPredictor, compare_methods, fit_kernel_predictor
from latency_service.kernel_generator import SamplingPrior
from latency_service.kernel_models import KernelPredictorRow
from latency_service.kernel_profiling import (
    STANDARD_BUDGET_S,
    ProfiledNetwork,
    ProgressCallback,
    block_size,
    optimise,
    profile_kernels_in_context,
)
from latency_service.kernel_store import (
    clear_kernel_samples,
    latest_kernel_predictor,
    save_fusion_rules,
    save_kernel_predictor,
    save_profiled_networks,
)
from latency_service.measurement import MeasurementConfig, measure_sessions
from predictors.kernel_shapes import KernelDecompositionError, static_shapes
from predictors.kernels import decompose


class InvalidModelError(ValueError):
    """The uploaded model cannot be used; ``field`` is the request part at fault (the body)."""

    def __init__(self, message: str, field: str = "body") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def model_sha256(model_bytes: bytes) -> str:
    return hashlib.sha256(model_bytes).hexdigest()


def validate_model(model_bytes: bytes) -> onnx.ModelProto:
    """Parse and check an uploaded model: a valid ONNX protobuf with a graph and static input shapes.

    Raises:
        InvalidModelError: naming what is wrong with the body.
    """
    if not model_bytes:
        raise InvalidModelError("empty body: send the ONNX model as application/octet-stream")
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as exc:  # protobuf's DecodeError and friends share no useful base class
        raise InvalidModelError(f"not a valid ONNX protobuf: {exc}") from exc
    if not model.graph.node:
        raise InvalidModelError("the ONNX graph has no nodes")
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            raise InvalidModelError(f"input {value.name!r} has no static shape; export with fixed input sizes")
    return model


def _optimised(backend: Backend, model_bytes: bytes) -> onnx.ModelProto:
    try:
        return optimise(backend, model_bytes)
    except Exception as exc:  # onnxruntime's errors (invalid graph, unsupported op) all mean the body is unusable
        raise InvalidModelError(f"the runtime cannot load this model: {exc}") from exc


def predict_with(predictor: KernelPredictor, backend: Backend, model_bytes: bytes) -> dict[str, Any]:
    """Predict one model with a given kernel predictor (the service and the benchmark share this)."""
    original = validate_model(model_bytes)
    optimised = _optimised(backend, model_bytes)
    try:
        kernels = decompose(optimised, block_size=predictor.block_size, known_shapes=static_shapes(original))
    except KernelDecompositionError as exc:
        raise InvalidModelError(f"cannot infer kernel shapes: {exc}") from exc
    predictions = predictor.predict(kernels)
    rows = []
    unmodelled = []
    for kernel, (ms, source) in zip(kernels, predictions, strict=True):
        rows.append({"name": kernel.name, "ops": kernel.ops, "latency_ms": ms, "source": source})
        if source == "fallback":
            reason = "no regressor for this kernel class" if kernel.kernel_class else "operator type not modelled"
            unmodelled.append(
                {
                    "name": kernel.name,
                    "op_type": kernel.op_type,
                    "kernel_class": kernel.kernel_class,
                    "latency_ms": ms,
                    "estimate": "memory-bound fallback",
                    "reason": reason,
                }
            )
    kernel_total = math.fsum(ms for ms, _ in predictions)
    return {
        "total_ms": predictor.overhead_ms + kernel_total,
        "per_run_overhead_ms": predictor.overhead_ms,
        "kernels": rows,
        "unmodelled": unmodelled,
        "predictor_version": predictor.version,
        "method": predictor.method,
    }


def predict_model(
    model_bytes: bytes, *, session: Session, device: Any, settings: Any, backend: Backend | None = None
) -> dict[str, Any]:
    """Predicted whole-model latency on ``device`` (anything with a ``device_class``: the service state, a Device row).

    ``backend`` defaults to the one ``settings`` configure; its optimiser decides the kernels.
    """
    from latency_service.jobs import configured_backend

    validate_model(model_bytes)
    predictor, _ = latest_kernel_predictor(session=session, device_class=device.device_class)
    return predict_with(predictor, backend or configured_backend(settings), model_bytes)


def measure_model(
    model_bytes: bytes,
    *,
    session: Session,
    device_id: str,
    backend: Backend,
    config: MeasurementConfig,
    overhead_ms: float | None,
    environment: dict[str, Any],
    model_name: str | None = None,
    gate: ClockGate | None = None,
) -> dict[str, Any]:
    """Measure a model end to end with the service's protocol and store the measurement (caller commits).

    The caller holds the process-wide measurement lock: two timings on one CPU corrupt each other.
    """
    validate_model(model_bytes)

    def prepare() -> Runnable:
        try:
            return backend.prepare_model(model_bytes)
        except Exception as exc:  # the runtime refusing the graph is a property of the body
            raise InvalidModelError(f"the runtime cannot load this model: {exc}") from exc

    stats = measure_sessions(prepare, config, overhead_ms=overhead_ms, gate=gate).stats
    digest = model_sha256(model_bytes)
    store.add_model_measurement(
        session=session,
        device_id=device_id,
        model_sha256=digest,
        stats=stats,
        environment=environment,
        model_name=model_name,
    )
    return {
        "median_ms": stats.median_ms,
        "p10_ms": stats.p10_ms,
        "p90_ms": stats.p90_ms,
        "n": stats.n,
        "mean_ms": stats.mean_ms,
        "cv": stats.cv,
        "flagged": stats.flagged,
        "model_sha256": digest,
    }


def fit_and_store(
    *,
    session: Session,
    device_id: str,
    device_class: str,
    networks: Sequence[ProfiledNetwork],
    block_size: int,
    compare: bool = True,
) -> KernelPredictorRow:
    """Compare regressors on held-out networks, fit the winner on everything, store it (caller commits)."""
    samples = [s for n in networks for s in n.samples()]
    overhead = sorted(n.overhead_ms for n in networks)[len(networks) // 2]
    comparison = compare_methods(networks) if compare and len(networks) >= 12 else []
    method = (
        max(comparison, key=lambda r: (r["network_within_10pct"], -r["network_rmspe"]))["method"]
        if comparison
        else DEFAULT_METHOD
    )
    predictor = fit_kernel_predictor(samples, overhead_ms=overhead, block_size=block_size, method=method)
    report = {
        "method": method,
        "comparison": comparison,
        "networks": len(networks),
        "samples": len(samples),
        "per_class": predictor.n_samples,
    }
    return save_kernel_predictor(
        session=session, device_id=device_id, device_class=device_class, predictor=predictor, report=report
    )


def run_in_context_profiling(
    *,
    session_factory: sessionmaker[Session],
    measuring: Any,
    device_id: str,
    device_class: str,
    budget_s: float = STANDARD_BUDGET_S,
    progress: ProgressCallback | None = None,
    lock: AbstractContextManager[Any] | None = None,
    prior: SamplingPrior | None = None,
    config: MeasurementConfig | None = None,
    compare: bool = True,
) -> KernelPredictorRow:
    """The ``standard`` preset's whole-model part: profile in context, store samples, fit and store the predictor.

    ``measuring`` is the service's MeasuringSession (backend + protocol).  A rerun replaces the device's samples.
    """
    backend = measuring.backend
    networks: list[ProfiledNetwork] = []
    with lock if lock is not None else nullcontext():
        rules = detect_fusions(backend, config)
        gate = measuring.gate()
    profile_kernels_in_context(
        backend,
        config,
        budget_s=budget_s,
        progress=progress,
        networks_out=networks,
        lock=lock,
        prior=prior,
        gate=gate,
    )
    if not networks:
        raise RuntimeError(f"in-context profiling produced no network in {budget_s:.0f} s")
    with transaction(session_factory) as session:
        clear_kernel_samples(session=session, device_id=device_id)
        save_fusion_rules(session=session, device_id=device_id, rules=rules)
        save_profiled_networks(
            session=session, device_id=device_id, networks=networks, environment=measuring.environment()
        )
        return fit_and_store(
            session=session,
            device_id=device_id,
            device_class=device_class,
            networks=networks,
            block_size=block_size(backend),
            compare=compare,
        )


def predictor_summary(row: KernelPredictorRow) -> dict[str, Any]:
    return {"version": row.version, "method": row.method, "created_at": row.created_at.isoformat(), **row.report}


__all__ = [
    "InvalidModelError",
    "fit_and_store",
    "measure_model",
    "model_sha256",
    "predict_model",
    "predict_with",
    "run_in_context_profiling",
    "validate_model",
]
