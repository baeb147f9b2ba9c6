"""TensorRT backend: skips here (no tensorrt, no CUDA device) with the reason; on a GPU host with TensorRT it builds
engines from the variants' ONNX and times them with CUDA events, plain and with CUDA-graph replay."""

from __future__ import annotations

import pytest

from latency_service.backends import BackendUnavailable, backend_statuses, create_backend
from latency_service.backends.tensorrt import PRECISIONS, TensorRTBackend
from predictors.ops import op_from_dict

status = TensorRTBackend.status()


@pytest.mark.skipif(status.available, reason="TensorRT and a GPU are present: the unavailable path cannot be observed")
def test_unavailable_names_what_is_missing_everywhere_it_is_reported() -> None:
    assert status.reason is not None
    assert "tensorrt" in status.reason or "CUDA device" in status.reason
    listed = next(s for s in backend_statuses() if s.name == "tensorrt")
    assert listed == status
    with pytest.raises(BackendUnavailable, match=r"^tensorrt: "):
        create_backend("tensorrt", precision="fp16")


def test_precisions_offered_are_those_trtexec_offers() -> None:
    assert set(PRECISIONS) == {"fp32", "fp16", "int8"}


@pytest.mark.skipif(not status.available, reason=f"tensorrt unavailable: {status.reason}")
@pytest.mark.parametrize(("precision", "cuda_graph", "spin_wait"), [("fp32", False, False), ("fp16", True, True)])
def test_engine_build_is_recorded_apart_from_the_timed_runs(precision: str, cuda_graph: bool, spin_wait: bool) -> None:
    from latency_service.measurement import MeasurementConfig, measure

    backend = TensorRTBackend(precision=precision, cuda_graph=cuda_graph, spin_wait=spin_wait)
    op = op_from_dict({"op": "conv2d", "cin": 64, "cout": 128, "hw": 56, "k": 3, "bn": True, "act": "relu"})
    runnable = backend.prepare_op(op)
    stats = measure(runnable, MeasurementConfig(min_runs=100, min_time_s=0.5))
    build_s = runnable.engine_build_s  # type: ignore[attr-defined]
    assert build_s > 0 and backend.environment()["last_engine_build_s"] == build_s
    # Building takes at least tens of milliseconds; a conv of this size runs in well under one.
    assert 0 < stats.median_ms < build_s * 1e3
    runnable.close()
