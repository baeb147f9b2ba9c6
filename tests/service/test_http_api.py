"""API v1 through FastAPI's TestClient (the app's lifespan runs: migrations, worker, real onnxruntime timings)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from latency_helpers import FAST_MEASUREMENT_ENV

from latency_service.api.main import create_app
from latency_service.config import Settings
from latency_service.presets import preset_ops
from predictors.fitting import LatencyPredictor
from predictors.ops import Conv2d, op_from_dict

FAST = {name.removeprefix("FIGS_").lower(): value for name, value in FAST_MEASUREMENT_ENV.items()}

CONVS = [{"op": "conv2d", "cin": c, "cout": 2 * c, "hw": 8, "k": 3} for c in (2, 4, 6, 8, 12, 16)]
DEPTHWISE = [{"op": "conv2d", "cin": c, "cout": c, "hw": 8, "k": 3, "groups": c} for c in (4, 8, 12, 16, 24)]
# Fewer than five linears: that kind gets the quick roofline fit, which keeps this module's fixture fast.
LINEARS = [{"op": "linear", "cin": c, "cout": 16} for c in (8, 32, 96)]
RELUS = [{"op": "relu", "c": c, "hw": 4} for c in (4, 8)]


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    lock = str(data_dir / "measure.lock")
    return Settings(data_dir=data_dir, device_id="api-test", measure_lock_path=lock, **{**FAST, **overrides})


def wait_done(client: TestClient, job_id: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path, max_body_bytes=4096, max_elements=100_000))) as client:
        yield client


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A service that profiled a few tiny conv, depthwise, linear and relu variants and fitted predictors."""
    data_dir = tmp_path_factory.mktemp("fitted")
    with TestClient(create_app(make_settings(data_dir))) as client:
        created = client.post("/v1/jobs", json={"ops": CONVS + DEPTHWISE + LINEARS + RELUS})
        assert created.status_code == 202, created.text
        job = wait_done(client, created.json()["id"])
        assert job["status"] == "done" and job["failed"] == 0, job
        fit = client.post("/v1/predictors/fit")
        assert fit.status_code == 200, fit.text
        yield client


def test_health_device_and_backends(client: TestClient) -> None:
    assert client.get("/v1/health").json() == {"status": "ok"}
    device = client.get("/v1/device").json()
    assert device["device_id"] == "api-test" and device["backend"] == "onnxruntime"
    assert device["backend_version"] and device["host"]["cpu_model"] and device["device_class"].endswith("-t1")
    backends = {b["name"]: b for b in client.get("/v1/backends").json()}
    assert backends["onnxruntime"]["available"] is True
    assert all(b["reason"] for b in backends.values() if not b["available"])


def test_unavailable_backend_is_503_for_jobs(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, backend="tensorrt"))) as client:
        assert client.get("/v1/health").status_code == 200
        assert client.get("/v1/device").json()["backend_version"] == "unavailable"
        response = client.post("/v1/jobs", json={"preset": "smoke"})
        assert response.status_code == 503 and "tensorrt" in response.json()["detail"]
        assert client.get("/v1/jobs").json() == []


def test_presets_are_served(client: TestClient) -> None:
    listed = {p["name"]: p for p in client.get("/v1/presets").json()}
    assert {"smoke", "standard"} <= set(listed)
    smoke = client.get("/v1/presets/smoke").json()
    assert len(smoke["ops"]) == listed["smoke"]["variants"]
    assert [op_from_dict(op).key for op in smoke["ops"]] == [op.key for op in preset_ops("smoke")]
    assert client.get("/v1/presets/enormous").status_code == 404


def field_error(response: Any) -> list[Any]:
    assert response.status_code == 422, response.text
    loc: list[Any] = response.json()["detail"][0]["loc"]
    return loc


@pytest.mark.parametrize(
    ("bad_op", "field"),
    [
        ({"op": "conv2d", "cin": 0, "cout": 8, "hw": 8}, "cin"),
        ({"op": "conv2d", "cin": 8, "cout": -1, "hw": 8}, "cout"),
        ({"op": "conv2d", "cin": 8, "cout": 8, "hw": 4, "k": 5}, "k"),
        ({"op": "conv2d", "cin": 8, "cout": 6, "hw": 8, "groups": 4}, "groups"),
        ({"op": "conv2d", "cin": 8, "cout": 8, "hw": 400}, "hw"),
        ({"op": "conv3d", "cin": 8}, "op"),
        ({"op": "relu", "c": 8}, "hw"),
        ({"op": "relu", "c": 8, "hw": 8, "colour": "red"}, "colour"),
    ],
)
def test_bad_spec_is_422_naming_the_field_and_writes_nothing(
    client: TestClient, bad_op: dict[str, Any], field: str
) -> None:
    ops = [{"op": "relu", "c": 4, "hw": 4}, {"op": "relu", "c": 4, "hw": 4}, {"op": "relu", "c": 8, "hw": 4}, bad_op]
    assert field_error(client.post("/v1/jobs", json={"ops": ops})) == ["body", "ops", 3, field]
    assert client.get("/v1/jobs").json() == []
    assert field_error(client.post("/v1/predict", json={"ops": ops})) == ["body", "ops", 3, field]


def test_job_request_errors(client: TestClient) -> None:
    assert field_error(client.post("/v1/jobs", json={"preset": "enormous"})) == ["body", "preset"]
    assert field_error(client.post("/v1/jobs", json={"ops": []})) == ["body", "ops"]
    response = client.post("/v1/jobs", json={"ops": [{"op": "relu", "c": 4, "hw": 4}], "preset": "smoke"})
    assert response.status_code == 422 and "exactly one of ops and preset" in response.text
    assert client.post("/v1/jobs", json={"ops": [], "speed": "fast"}).status_code == 422
    assert client.get("/v1/jobs").json() == []
    assert client.get("/v1/jobs/424242").status_code == 404
    assert client.delete("/v1/jobs/424242").status_code == 404
    assert client.get("/v1/measurements", params={"op": "conv3d"}).status_code == 422


def test_table_cell_cap_is_422(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, max_table_entries=10))) as client:
        layer = {"op": CONVS[-1], "cin_counts": [1, 2, 3, 4], "cout_counts": [1, 2, 3]}
        assert field_error(client.post("/v1/tables", json={"layers": [layer]})) == ["body", "layers"]
        assert field_error(client.post("/v1/tables", json={"layers": []})) == ["body", "layers"]


def test_body_over_the_cap_is_413(client: TestClient) -> None:
    ops = [{"op": "relu", "c": 4, "hw": 4}] * 200
    response = client.post("/v1/jobs", json={"ops": ops})
    assert response.status_code == 413 and "4096" in response.text
    assert client.get("/v1/jobs").json() == []


def test_nothing_to_predict_or_fit_before_profiling(client: TestClient) -> None:
    response = client.post("/v1/predict", json={"ops": [{"op": "relu", "c": 4, "hw": 4}]})
    assert response.status_code == 409 and "POST /v1/predictors/fit" in response.json()["detail"]
    assert client.get("/v1/predictors").status_code == 409
    assert client.post("/v1/predictors/fit").status_code == 409
    layer = {"op": CONVS[0], "cin_counts": [1, 2], "cout_counts": [1]}
    assert client.post("/v1/tables", json={"layers": [layer]}).status_code == 409


def test_token_guards_every_route_but_health(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, token="s3cret"))) as client:
        assert client.get("/v1/health").status_code == 200
        for method, path in (
            ("GET", "/v1/device"),
            ("GET", "/v1/backends"),
            ("GET", "/v1/jobs/1"),
            ("POST", "/v1/jobs"),
        ):
            assert client.request(method, path, json={"preset": "smoke"}).status_code == 401
            wrong = client.request(method, path, json={"preset": "smoke"}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/device", headers=good).status_code == 200
        assert client.get("/v1/jobs", headers=good).json() == []


@pytest.mark.slow  # the module's fitted service takes ~10-20 s to profile and fit
def test_measurements_predict_and_cancel(fitted: TestClient) -> None:
    page = fitted.get("/v1/measurements", params={"limit": 100}).json()
    assert page["total"] == len(CONVS + DEPTHWISE + LINEARS + RELUS)
    item = page["items"][0]
    assert set(item) >= {"op", "median_ms", "p10_ms", "p90_ms", "cv", "n", "measured_at"}
    linears = fitted.get("/v1/measurements", params={"op": "linear", "limit": 2, "offset": 1}).json()
    assert linears["total"] == len(LINEARS) and len(linears["items"]) == 2
    assert all(i["op"]["op"] == "linear" for i in linears["items"])

    measured = {op_from_dict(i["op"]).key: i["median_ms"] for i in page["items"]}
    unmeasured = {"op": "conv2d", "cin": 5, "cout": 9, "hw": 8, "k": 3}
    result = fitted.post("/v1/predict", json={"ops": [CONVS[1], unmeasured]}).json()
    assert result["source"] == ["measured", "predicted"]
    assert result["latency_ms"][0] == pytest.approx(measured[op_from_dict(CONVS[1]).key])
    assert result["latency_ms"][1] > 0
    assert result["total_ms"] == pytest.approx(sum(result["latency_ms"]))

    unmodelled = fitted.post("/v1/predict", json={"ops": [{"op": "maxpool", "c": 4, "hw": 8}]})
    assert unmodelled.status_code == 409 and unmodelled.json()["kind"] == "maxpool"

    predictor = fitted.get("/v1/predictors").json()
    assert predictor["version"] == result["predictor_version"]
    assert {r["op"] for r in predictor["reports"]} == {"conv2d", "linear", "relu"}

    job = fitted.post("/v1/jobs", json={"ops": [{"op": "relu", "c": c, "hw": 16} for c in range(1, 200)]}).json()
    cancelled = fitted.delete(f"/v1/jobs/{job['id']}").json()
    assert cancelled["status"] == "cancelled"
    time.sleep(0.3)
    final = fitted.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["done"] < final["total"]


def test_tables_match_the_predictor_cell_by_cell(fitted: TestClient, tmp_path: Path) -> None:
    conv = {"op": "conv2d", "cin": 16, "cout": 32, "hw": 8, "k": 3}
    depthwise = {"op": "conv2d", "cin": 24, "cout": 24, "hw": 8, "k": 3, "groups": 24}
    linear = {"op": "linear", "cin": 96, "cout": 16}
    body = {
        "layers": [
            {"op": conv, "cin_counts": [4, 8, 16], "cout_counts": [8, 16, 24, 32]},
            {"op": depthwise, "cin_counts": [8, 16, 24], "cout_counts": [8, 16, 24]},
            {"op": linear, "cin_counts": [32, 96], "cout_counts": [16]},
        ]
    }
    response = fitted.post("/v1/tables", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["device_id"] == "api-test" and result["predictor_version"]
    conv_table = np.array(result["tables"][0]["latency_ms"])
    assert conv_table.shape == (3, 4)

    # The same numbers from the stored predictor directly.
    with fitted.app.state.service.session_factory() as session:  # type: ignore[attr-defined]
        from latency_service import store

        row = store.latest_predictor(session=session, device_class=fitted.app.state.service.device_class)  # type: ignore[attr-defined]
        assert row is not None
        predictor = LatencyPredictor.from_json(row.payload)
    full = Conv2d(cin=16, cout=32, hw=8, k=3)
    expected = predictor.predict_ms([full.resized(a, b) for a in (4, 8, 16) for b in (8, 16, 24, 32)]).reshape(3, 4)
    np.testing.assert_allclose(conv_table, expected, rtol=1e-9)
    dw_table = np.array(result["tables"][1]["latency_ms"])
    # A depthwise conv's cost follows its one width: every row is the same.
    np.testing.assert_allclose(dw_table, np.repeat(dw_table[:1], 3, axis=0))
    assert np.array(result["tables"][2]["latency_ms"]).shape == (2, 1)


@pytest.mark.parametrize(
    ("layer", "loc"),
    [
        ({"op": CONVS[0], "cin_counts": [1, 3], "cout_counts": [1]}, ["body", "layers", 0, "cin_counts", 1]),
        ({"op": CONVS[0], "cin_counts": [1], "cout_counts": [0]}, ["body", "layers", 0, "cout_counts", 0]),
        ({"op": CONVS[0], "cin_counts": [], "cout_counts": [1]}, ["body", "layers", 0, "cin_counts"]),
        ({"op": DEPTHWISE[0], "cin_counts": [1], "cout_counts": [2]}, ["body", "layers", 0, "cin_counts"]),
        ({"op": RELUS[0], "cin_counts": [1], "cout_counts": [1]}, ["body", "layers", 0, "op", "op"]),
        ({"op": {**CONVS[0], "cin": 0}, "cin_counts": [1], "cout_counts": [1]}, ["body", "layers", 0, "op", "cin"]),
    ],
)
def test_bad_table_request_is_422_naming_the_field(fitted: TestClient, layer: dict[str, Any], loc: list[Any]) -> None:
    assert field_error(fitted.post("/v1/tables", json={"layers": [layer]})) == loc
