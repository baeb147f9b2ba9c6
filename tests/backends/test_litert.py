"""LiteRT CPU backend: real interpreter, real timings through the service's measurement protocol."""

from __future__ import annotations

import pytest

from latency_service.backends import backend_class, create_backend
from latency_service.measurement import MeasurementConfig, measure, measure_overhead
from predictors.ops import op_from_dict

pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed (pip install ai-edge-litert)")

from latency_service.backends.litert import LiteRTBackend
from latency_service.backends.onnx_graphs import build_op_model
from latency_service.backends.tflite_builder import build_op_tflite

QUICK = MeasurementConfig(warmup_runs=3, warmup_s=0.01, min_runs=15, min_time_s=0.05, max_time_s=0.5, max_attempts=2)


def test_registry_reports_litert_available_and_creates_it() -> None:
    status = backend_class("litert").status()
    assert status.available, status.reason
    backend = create_backend("litert", num_threads=1)
    environment = backend.environment()
    assert environment["runtime"] == "litert"
    assert environment["num_threads"] == 1 and environment["xnnpack"] is True
    assert environment["runtime_version"] not in ("", "unknown")


def test_measures_variants_and_more_work_takes_longer() -> None:
    backend = LiteRTBackend()
    small = op_from_dict({"op": "conv2d", "cin": 16, "cout": 16, "hw": 14, "k": 1})
    large = op_from_dict({"op": "conv2d", "cin": 64, "cout": 128, "hw": 28, "k": 3, "act": "relu"})
    medians = {}
    for op in (small, large):
        runnable = backend.prepare_op(op)
        try:
            stats = measure(runnable, QUICK)
        finally:
            runnable.close()
        assert stats.n >= QUICK.min_samples and stats.p10_ms <= stats.median_ms <= stats.p90_ms
        medians[op.key] = stats.median_ms
    # 460x the multiply-adds: no amount of noise on a shared CPU makes the large conv the faster one.
    assert medians[large.key] > 5 * medians[small.key]


@pytest.mark.parametrize(
    "spec",
    [
        {"op": "conv2d", "cin": 8, "cout": 8, "hw": 8, "k": 3, "groups": 8, "act": "hardswish"},
        {"op": "linear", "cin": 32, "cout": 16},
        {"op": "concat", "cins": [4, 4], "hw": 8},
        {"op": "channel_shuffle", "c": 8, "hw": 8},
    ],
)
def test_reference_kernels_without_xnnpack(spec: dict[str, object]) -> None:
    backend = LiteRTBackend(xnnpack=False, num_threads=2)
    assert backend.environment()["xnnpack"] is False
    runnable = backend.prepare_op(op_from_dict(spec))
    assert runnable.time_once() > 0
    runnable.close()


def test_overhead_is_small_and_positive() -> None:
    overhead_ms = measure_overhead(LiteRTBackend(), QUICK)
    assert 0 < overhead_ms < 1.0


def test_prepare_model_takes_tflite_and_refuses_onnx_with_the_fix() -> None:
    backend = LiteRTBackend()
    op = op_from_dict({"op": "conv2d", "cin": 8, "cout": 8, "hw": 8, "k": 3})
    runnable = backend.prepare_model(build_op_tflite(op))
    assert runnable.time_once() > 0
    with pytest.raises(ValueError, match=r"ONNX model; LiteRT runs \.tflite"):
        backend.prepare_model(build_op_model(op).SerializeToString())
    with pytest.raises(ValueError, match=r"^model: not a \.tflite"):
        backend.prepare_model(b"garbage!" * 4)


@pytest.mark.parametrize("options", [{"num_threads": 0}, {"num_threads": True}, {"xnnpack": "yes"}])
def test_bad_options_name_the_field(options: dict[str, object]) -> None:
    field = next(iter(options))
    with pytest.raises(ValueError, match=f"^{field}:"):
        LiteRTBackend(**options)  # type: ignore[arg-type]


def test_profile_fit_and_predict_through_the_http_api(tmp_path: object) -> None:
    import time
    from pathlib import Path

    from fastapi.testclient import TestClient

    from latency_service.api.main import create_app
    from latency_service.config import Settings

    settings = Settings(
        data_dir=Path(str(tmp_path)),
        backend="litert",
        device_id="litert-api",
        warmup_runs=2,
        warmup_s=0.005,
        min_runs=10,
        min_time_s=0.02,
        max_time_s=0.2,
        max_attempts=1,
    )
    grid = [{"op": "conv2d", "cin": c, "cout": c, "hw": 14, "k": k} for c in (8, 16, 32, 64) for k in (1, 3)]
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/device").json()["backend"] == "litert"
        job_id = client.post("/v1/jobs", json={"ops": grid}).json()["id"]
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert (job["status"], job["done"], job["failed"]) == ("done", len(grid), 0), job
        assert client.post("/v1/predictors/fit").status_code == 200
        unseen = {"op": "conv2d", "cin": 40, "cout": 40, "hw": 14, "k": 3}
        prediction = client.post("/v1/predict", json={"ops": [grid[0], unseen]}).json()
        assert prediction["source"] == ["measured", "predicted"]
        measured = client.get("/v1/measurements?limit=100").json()
        assert measured["total"] == len(grid) and all(m["median_ms"] > 0 for m in measured["items"])
        assert prediction["latency_ms"][1] > 0
