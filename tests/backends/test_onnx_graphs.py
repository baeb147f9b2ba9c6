"""Every operator kind builds a valid ONNX graph whose output has the catalogue's shape and the right numbers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from latency_service.backends.onnx_graphs import (
    IR_VERSION,
    OPSET,
    build_identity_model,
    build_op_model,
    random_inputs,
)
from predictors.ops import (
    ACTIVATIONS,
    OPERATORS,
    Add,
    AvgPool,
    BatchNorm,
    ChannelShuffle,
    Concat,
    Conv2d,
    GlobalAvgPool,
    Linear,
    MaxPool,
    Mul,
    OpSpec,
)

EXAMPLES: list[OpSpec] = [
    Conv2d(cin=8, cout=12, hw=9, k=3),
    Conv2d(cin=8, cout=12, hw=9, k=1, bn=True, act="relu"),
    Conv2d(cin=6, cout=6, hw=9, k=5, stride=2, groups=6, bn=True, act="relu6"),
    Conv2d(cin=8, cout=8, hw=10, k=3, stride=2, groups=2, act="hardswish"),
    Conv2d(cin=3, cout=8, hw=15, k=7, stride=2, act="silu"),
    Conv2d(cin=8, cout=4, hw=1, k=1, act="sigmoid"),
    Conv2d(cin=4, cout=8, hw=1, k=1, act="hardsigmoid"),
    Linear(cin=16, cout=5),
    Linear(cin=16, cout=5, act="relu", batch=2),
    BatchNorm(c=5, hw=6),
    MaxPool(c=4, hw=9, k=3, stride=2),
    MaxPool(c=4, hw=8, k=2, stride=2),
    AvgPool(c=4, hw=9, k=3, stride=1),
    AvgPool(c=4, hw=8, k=2, stride=2),
    GlobalAvgPool(c=7, hw=5),
    Add(c=4, hw=5),
    Mul(c=4, hw=5),
    Concat(cins=(3, 5, 2), hw=4),
    ChannelShuffle(c=12, hw=3, groups=3),
    *[OPERATORS[act](c=3, hw=4) for act in ACTIVATIONS],  # type: ignore[call-arg]
]


def _run(op: OpSpec, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_DISABLE_ALL) -> tuple:
    model = build_op_model(op)
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = random_inputs(model, seed=1)
    return feeds, session.run(None, feeds)[0], model


def test_examples_cover_every_kind() -> None:
    assert {op.kind for op in EXAMPLES} == set(OPERATORS)


@pytest.mark.parametrize("op", EXAMPLES, ids=lambda op: f"{op.kind}-{op.key[:6]}")
def test_graph_is_valid_and_has_the_catalogue_output_shape(op: OpSpec) -> None:
    model = build_op_model(op)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == OPSET and model.ir_version == IR_VERSION
    feeds, out, _ = _run(op)
    assert [f.shape for f in feeds.values()] == op.input_shapes()
    assert out.shape == op.output_shape()
    # All optimisation levels must agree with the reference graph (fusions must not change the maths).
    _, fused, _ = _run(op, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_allclose(fused, out, rtol=1e-4, atol=1e-4)


def test_activations_match_their_pytorch_definitions() -> None:
    reference = {
        "relu": lambda x: np.maximum(x, 0),
        "relu6": lambda x: np.clip(x, 0, 6),
        "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
        "hardsigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
        "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
        "silu": lambda x: x / (1 + np.exp(-x)),
    }
    for act in ACTIVATIONS:
        feeds, out, _ = _run(OPERATORS[act](c=3, hw=4))  # type: ignore[call-arg]
        np.testing.assert_allclose(out, reference[act](feeds["x0"]), rtol=1e-5, atol=1e-6)


def test_structural_ops_compute_what_their_names_say() -> None:
    feeds, out, _ = _run(ChannelShuffle(c=6, hw=2, groups=2))
    x = feeds["x0"]
    np.testing.assert_array_equal(out, x.reshape(1, 2, 3, 2, 2).transpose(0, 2, 1, 3, 4).reshape(1, 6, 2, 2))
    feeds, out, _ = _run(Mul(c=3, hw=2))
    np.testing.assert_allclose(out, feeds["x0"] * feeds["x1"])
    feeds, out, _ = _run(Concat(cins=(1, 2), hw=2))
    np.testing.assert_array_equal(out, np.concatenate([feeds["x0"], feeds["x1"]], axis=1))
    feeds, out, _ = _run(GlobalAvgPool(c=3, hw=4))
    np.testing.assert_allclose(out, feeds["x0"].mean(axis=(2, 3), keepdims=True), rtol=1e-5)


def test_conv_with_and_without_bn_is_the_same_folded_kernel() -> None:
    with_bn = build_op_model(Conv2d(cin=4, cout=4, hw=5, bn=True))
    without = build_op_model(Conv2d(cin=4, cout=4, hw=5, bn=False))
    assert [n.op_type for n in with_bn.graph.node] == [n.op_type for n in without.graph.node] == ["Conv"]


def test_weights_are_deterministic_per_variant_and_differ_between_variants() -> None:
    op = Conv2d(cin=4, cout=8, hw=5)
    assert build_op_model(op).SerializeToString() == build_op_model(op).SerializeToString()
    other = build_op_model(op.replace(cout=9)).graph.initializer[0]
    assert (
        onnx.numpy_helper.to_array(other)[:8].tobytes()
        != onnx.numpy_helper.to_array(build_op_model(op).graph.initializer[0]).tobytes()
    )


def test_random_inputs_are_not_zeros_and_fill_symbolic_dimensions() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x, ids], [y])
    feeds = random_inputs(helper.make_model(graph))
    assert feeds["x"].shape == (1, 3, 4) and feeds["x"].dtype == np.float32
    assert np.count_nonzero(feeds["x"]) == feeds["x"].size
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (2,)


def test_identity_model_runs() -> None:
    model = build_identity_model()
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x0": np.ones(1, np.float32)})[0].tolist() == [1.0]


def test_device_side_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import latency_service.backends.onnxruntime, latency_service.measurement, "
        "latency_service.presets, latency_service.environment; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
