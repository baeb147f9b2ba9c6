"""The onnxruntime CPU backend with real sessions and real (tiny) timings."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from latency_service.backends import create_backend
from latency_service.backends.onnx_graphs import build_op_model
from latency_service.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunnable
from latency_service.measurement import MeasurementConfig, measure
from predictors.ops import Add, Conv2d, Linear

FAST = MeasurementConfig(warmup_runs=2, warmup_s=0.0, min_runs=20, min_time_s=0.02, max_time_s=0.5, max_attempts=2)


@pytest.fixture(scope="module")
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()


def test_status_and_environment_record_every_timing_setting() -> None:
    assert OnnxRuntimeBackend.status().available
    backend = create_backend("onnxruntime", intra_op_threads=2, optimization_level="basic")
    env = backend.environment()
    assert env["runtime"] == "onnxruntime" and env["runtime_version"] == ort.__version__
    assert env["execution_provider"] == "CPUExecutionProvider"
    assert (env["intra_op_threads"], env["inter_op_threads"]) == (2, 1)
    assert env["optimization_level"] == "basic" and env["execution_mode"] == "sequential"


@pytest.mark.parametrize(
    ("options", "field"),
    [({"intra_op_threads": 0}, "intra_op_threads"), ({"optimization_level": "max"}, "optimization_level")],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OnnxRuntimeBackend(**options)  # type: ignore[arg-type]


def test_bound_inputs_are_random_and_outputs_land_in_the_bound_buffer(backend: OnnxRuntimeBackend) -> None:
    op = Conv2d(cin=8, cout=16, hw=10, k=3, act="relu")
    runnable = backend.prepare_op(op)
    assert isinstance(runnable, OnnxRuntimeRunnable)
    x = runnable.input_arrays["x0"]
    assert np.count_nonzero(x) == x.size and x.std() > 0.5
    runnable.output_arrays[0].fill(np.nan)
    elapsed = runnable.time_once()
    assert 0 < elapsed < 1
    reference = ort.InferenceSession(build_op_model(op).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = reference.run(None, {"x0": x})[0]
    np.testing.assert_allclose(runnable.output_arrays[0], expected, rtol=1e-4, atol=1e-5)
    runnable.close()


def test_timings_follow_the_work(backend: OnnxRuntimeBackend) -> None:
    small = backend.prepare_op(Add(c=8, hw=4))
    large = backend.prepare_op(Conv2d(cin=64, cout=64, hw=28, k=3))
    small_ms = measure(small, FAST).median_ms
    large_ms = measure(large, FAST).median_ms
    # ~58 MFLOP against 128 additions: even a loaded 2-core machine keeps them 10x apart.
    assert large_ms > 10 * small_ms
    small.close()
    large.close()


def test_empty_model_is_the_cheapest(backend: OnnxRuntimeBackend) -> None:
    empty = backend.prepare_empty()
    stats = measure(empty, FAST)
    assert 0 < stats.median_ms < 0.5
    empty.close()


def test_prepare_model_takes_onnx_bytes(backend: OnnxRuntimeBackend) -> None:
    data = build_op_model(Linear(cin=32, cout=8, act="relu")).SerializeToString()
    runnable = backend.prepare_model(data)
    assert runnable.time_once() > 0
    runnable.close()


def test_prepare_model_binds_symbolic_batch_as_one(backend: OnnxRuntimeBackend) -> None:
    model = build_op_model(Linear(cin=32, cout=8))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    runnable = backend.prepare_model(model.SerializeToString())
    assert isinstance(runnable, OnnxRuntimeRunnable)
    assert runnable.input_arrays["x0"].shape == (1, 32) and np.count_nonzero(runnable.input_arrays["x0"]) == 32
    assert runnable.time_once() > 0 and runnable.output_arrays[0].shape == (1, 8)
    runnable.close()


def test_prepare_model_refuses_garbage_naming_the_model(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(ValueError, match="model"):
        backend.prepare_model(b"definitely not a protobuf")


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_every_optimization_level_runs(level: str) -> None:
    runnable = OnnxRuntimeBackend(optimization_level=level).prepare_op(Conv2d(cin=8, cout=8, hw=6, act="silu"))
    assert runnable.time_once() > 0
    runnable.close()


def test_two_intra_op_threads_measure_at_normal_priority() -> None:
    runnable = OnnxRuntimeBackend(intra_op_threads=2).prepare_op(Conv2d(cin=32, cout=32, hw=28, k=3))
    assert isinstance(runnable, OnnxRuntimeRunnable) and runnable.threads == 2
    stats = measure(runnable, FAST)
    assert stats.median_ms > 0 and stats.n >= FAST.min_runs
    runnable.close()
