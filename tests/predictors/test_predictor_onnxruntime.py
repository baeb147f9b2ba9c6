"""Fit on real onnxruntime timings of a small conv grid (graphs built here with onnx.helper, timed directly)."""

from __future__ import annotations

import itertools
import statistics
import time

import numpy as np
import pytest

from predictors.fitting import CANDIDATES, fit_predictors
from predictors.ops import Conv2d, OpSpec

onnx = pytest.importorskip("onnx", reason="the onnx package is needed to build test graphs")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to time real kernels")
helper = onnx.helper


def conv_model(op: Conv2d, rng: np.random.Generator) -> bytes:
    weight = rng.standard_normal((op.cout, op.cin // op.groups, op.k, op.k)).astype(np.float32)
    bias = rng.standard_normal(op.cout).astype(np.float32)
    pad = op.k // 2
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv" if op.act else "y"], kernel_shape=[op.k, op.k],
                         strides=[op.stride] * 2, pads=[pad] * 4, group=op.groups),
    ]  # fmt: skip
    if op.act:
        nodes.append(helper.make_node("Relu", ["conv"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(op.input_shapes()[0]))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(op.output_shape()))],
        initializer=[onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return bytes(model.SerializeToString())


def median_ms(op: Conv2d, rng: np.random.Generator, runs: int = 40) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(conv_model(op, rng), sess_options=options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    x = rng.standard_normal(op.input_shapes()[0]).astype(np.float32)
    binding.bind_ortvalue_input("x", ort.OrtValue.ortvalue_from_numpy(x))
    binding.bind_output("y")
    for _ in range(10):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def test_fit_on_real_onnxruntime_timings_reports_cv_error() -> None:
    rng = np.random.default_rng(0)
    grid = [
        Conv2d(cin=cin, cout=cout, hw=14, k=k, act="relu")
        for cin, cout, k in itertools.product((8, 16, 24, 40), (8, 16, 32, 48), (1, 3))
    ]
    samples: list[tuple[OpSpec, float]] = [(op, median_ms(op, rng)) for op in grid]
    predictor, reports = fit_predictors(samples, seed=0, cv_folds=4, candidates=list(CANDIDATES))

    (report,) = reports
    assert report.op == "conv2d" and report.n_samples == len(grid)
    assert set(report.candidates) == set(CANDIDATES)
    assert all(v is not None and np.isfinite(v) for v in report.candidates.values())
    assert report.mape is not None and 0 < report.mape < 0.5, report
    assert report.within_10pct is not None and 0 <= report.within_10pct <= 1

    assert predictor.predict([grid[0]]) == [(samples[0][1], "measured")]
    (ms, source), = predictor.predict([Conv2d(cin=32, cout=24, hw=14, k=3, act="relu")])  # fmt: skip
    neighbours = [t for op, t in samples if isinstance(op, Conv2d) and op.k == 3 and op.cin in (24, 40)]
    assert source == "predicted"
    assert min(neighbours) / 3 < ms < max(neighbours) * 3
