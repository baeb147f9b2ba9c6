"""POST /v1/predict/model and /v1/measure/model through FastAPI's TestClient (real app lifespan, real timings)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from model_latency_helpers import QUICK, TINY_PRIOR

from latency_service import store
from latency_service.api.main import create_app
from latency_service.config import Settings
from latency_service.kernel_generator import NetworkBuilder
from latency_service.model_latency import fit_and_store

FAST: dict[str, Any] = {
    "warmup_runs": 2,
    "warmup_s": 0.0,
    "min_runs": 5,
    "min_time_s": 0.01,
    "max_time_s": 0.05,
    "max_attempts": 1,
}
OCTET = {"content-type": "application/octet-stream"}


def _conv_net(hw: int = 32) -> bytes:
    b = NetworkBuilder(rng=np.random.default_rng(1), hw=hw)
    x = b.conv(b.input(), 16, k=3, stride=2, act="relu")
    x = b.add(x, b.conv(b.conv(x, 32, act="relu6"), 16))
    return b.build(b.linear(b.flatten(b.global_pool(x, reduce_mean=False)), 10)).SerializeToString()


def _with_lrn() -> bytes:
    """A conv net followed by LRN: onnxruntime runs it, no kernel class models it."""
    model = onnx.load_model_from_string(_conv_net())
    out = model.graph.output[0].name
    # LRN needs a 4-D input: normalise the stem's output instead and make it a second graph output.
    stem = model.graph.node[0].output[0]
    model.graph.node.append(onnx.helper.make_node("LRN", [stem], ["lrn_out"], name="lrn_node", size=3))
    model.graph.output.append(onnx.helper.make_tensor_value_info("lrn_out", onnx.TensorProto.FLOAT, None))
    assert out
    return model.SerializeToString()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("models-api"), device_id="model-api-test", **FAST)
    with TestClient(create_app(settings)) as client:
        yield client


def test_predict_before_profiling_is_a_conflict(client: TestClient) -> None:
    response = client.post("/v1/predict/model", content=_conv_net(), headers=OCTET)
    assert response.status_code == 409
    assert "standard" in response.json()["detail"]


@pytest.mark.parametrize("body", [b"", b"not an onnx model", b"\x08\x07"], ids=["empty", "garbage", "no-graph"])
def test_invalid_onnx_names_the_body(client: TestClient, body: bytes) -> None:
    for route in ("/v1/predict/model", "/v1/measure/model"):
        response = client.post(route, content=body, headers=OCTET)
        assert response.status_code == 422, (route, response.text)
        assert response.json()["detail"][0]["loc"] == ["body"]


def test_measure_stores_the_model_measurement(client: TestClient) -> None:
    body = _conv_net()
    response = client.post("/v1/measure/model?name=tiny", content=body, headers=OCTET)
    assert response.status_code == 200, response.text
    result = response.json()
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["n"] >= FAST["min_runs"]
    service = client.app.state.service  # type: ignore[attr-defined]
    with service.session_factory() as session:
        rows, total = store.list_model_measurements(session=session, device_id=service.device_id)
    assert total == 1 and rows[0].model_sha256 == result["model_sha256"] and rows[0].model_name == "tiny"


def test_predict_lists_kernels_and_unmodelled(client: TestClient, profiled) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    with service.session_factory() as session:
        fit_and_store(
            session=session,
            device_id=service.device_id,
            device_class=service.device_class,
            networks=profiled,
            block_size=16,
            compare=False,
        )
        session.commit()
    response = client.post("/v1/predict/model", content=_conv_net(), headers=OCTET)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["unmodelled"] == []
    kernel_sum = sum(k["latency_ms"] for k in result["kernels"])
    assert result["total_ms"] == pytest.approx(result["per_run_overhead_ms"] + kernel_sum)
    assert any("Add" in k["ops"] for k in result["kernels"]), "the residual add is fused into a conv kernel"
    assert all(k["source"].startswith("regressor:") for k in result["kernels"])

    response = client.post("/v1/predict/model", content=_with_lrn(), headers=OCTET)
    assert response.status_code == 200, response.text
    result = response.json()
    (unmodelled,) = [u for u in result["unmodelled"] if u["op_type"] == "LRN"]
    assert unmodelled["latency_ms"] > 0
    assert all(u["kernel_class"] is None or u["reason"] for u in result["unmodelled"]), result["unmodelled"]
    lrn = [k for k in result["kernels"] if k["name"] == unmodelled["name"]]
    assert lrn and lrn[0]["source"] == "fallback", "the fallback estimate is counted in total_ms, not dropped"


def test_standard_hook_stores_samples_fusion_rules_and_predictor(client: TestClient) -> None:
    from sqlalchemy import func, select

    from latency_service.kernel_models import KernelSampleRow, ProfiledNetworkRow
    from latency_service.kernel_profiling import block_size
    from latency_service.kernel_store import latest_fusion_rules, latest_kernel_predictor
    from latency_service.model_latency import run_in_context_profiling

    service = client.app.state.service  # type: ignore[attr-defined]
    ticks: list[int] = []
    row = run_in_context_profiling(
        session_factory=service.session_factory,
        measuring=service.measuring,
        device_id=service.device_id,
        device_class=service.device_class,
        budget_s=3.0,
        progress=lambda elapsed, total: ticks.append(elapsed),
        prior=TINY_PRIOR,
        config=QUICK,
        compare=False,
    )
    assert ticks and row.report["networks"] >= 1
    with service.session_factory() as session:
        networks = session.scalar(select(func.count()).select_from(ProfiledNetworkRow))
        samples = session.scalar(select(func.count()).select_from(KernelSampleRow))
        stored_rules = latest_fusion_rules(session=session, device_id=service.device_id)
        predictor, stored = latest_kernel_predictor(session=session, device_class=service.device_class)
    assert networks == row.report["networks"] and samples == row.report["samples"]
    rules = {(r.first_op, r.second_op): r for r in stored_rules}
    assert rules[("conv", "relu")].kernels_in_chain == 1
    assert stored.id == row.id and predictor.block_size == block_size(service.measuring.backend)


def test_stored_samples_keep_their_network_footprint(client: TestClient, profiled) -> None:
    from latency_service.kernel_store import clear_kernel_samples, save_profiled_networks, stored_kernel_samples

    service = client.app.state.service  # type: ignore[attr-defined]
    expected = {n.network_id: n.samples()[0].network_bytes for n in profiled if n.samples()}
    with service.session_factory() as session:
        clear_kernel_samples(session=session, device_id=service.device_id)
        save_profiled_networks(session=session, device_id=service.device_id, networks=profiled, environment={})
        samples, _ = stored_kernel_samples(session=session, device_id=service.device_id)
        session.rollback()
    # Refitting from the store must see the footprint the fit saw (it is summed from the kernels, not stored).
    assert {s.network_id: s.network_bytes for s in samples} == pytest.approx(expected)
    assert min(expected.values()) > 0
