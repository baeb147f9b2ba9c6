"""The .tflite builder: every catalogue kind loads in the real LiteRT interpreter with the catalogue's shapes, the
float conv computes what a reference convolution computes, and int8 models are full-integer and track the float."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from predictors.ops import OpSpec, op_from_dict

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert is not installed")
tflite = pytest.importorskip("tflite", reason="the tflite schema package is not installed")

from latency_service.backends.tflite_builder import (  # noqa: E402
    UnsupportedForTFLite,
    build_identity_tflite,
    build_op_tflite,
)

CATALOGUE = [
    {"op": "conv2d", "cin": 16, "cout": 24, "hw": 14, "k": 3, "act": "relu"},
    {"op": "conv2d", "cin": 16, "cout": 24, "hw": 14, "k": 3, "stride": 2, "bn": True, "act": "hardswish"},
    {"op": "conv2d", "cin": 16, "cout": 16, "hw": 14, "k": 5, "stride": 2, "groups": 16, "act": "relu6"},
    {"op": "conv2d", "cin": 8, "cout": 16, "hw": 14, "k": 1, "act": "silu"},
    {"op": "conv2d", "cin": 8, "cout": 16, "hw": 14, "k": 2, "act": "hardsigmoid"},
    {"op": "conv2d", "cin": 16, "cout": 32, "hw": 8, "k": 3, "groups": 4},
    {"op": "linear", "cin": 64, "cout": 10, "act": "relu"},
    {"op": "linear", "cin": 64, "cout": 10, "batch": 2, "act": "sigmoid"},
    {"op": "batchnorm", "c": 8, "hw": 10},
    *({"op": act, "c": 8, "hw": 10} for act in ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu")),
    {"op": "maxpool", "c": 8, "hw": 10, "k": 2, "stride": 2},
    {"op": "maxpool", "c": 8, "hw": 10, "k": 3, "stride": 2},
    {"op": "avgpool", "c": 8, "hw": 10, "k": 3, "stride": 1},
    {"op": "global_avgpool", "c": 8, "hw": 10},
    {"op": "add", "c": 8, "hw": 10},
    {"op": "mul", "c": 8, "hw": 10},
    {"op": "concat", "cins": [8, 16, 4], "hw": 10},
    {"op": "channel_shuffle", "c": 12, "hw": 10, "groups": 3},
]


def _nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else shape


def _interpreter(model: bytes) -> Any:
    resolver = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = litert.Interpreter(model_content=model, experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


def _run(model: bytes, inputs: list[np.ndarray], *, int8: bool = False) -> np.ndarray:
    interpreter = _interpreter(model)
    for details, x in zip(interpreter.get_input_details(), inputs, strict=True):
        if int8:
            scale, zero_point = details["quantization"]
            x = np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)
        interpreter.set_tensor(details["index"], x)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    y = interpreter.get_tensor(out["index"])
    if int8:
        scale, zero_point = out["quantization"]
        y = (y.astype(np.float32) - zero_point) * scale
    return np.asarray(y)


def _inputs(op: OpSpec, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, _nhwc(s)).astype(np.float32) for s in op.input_shapes()]


@pytest.mark.parametrize("spec", CATALOGUE, ids=lambda d: f"{d['op']}-{d.get('act') or d.get('k') or ''}")
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_every_kind_loads_and_matches_catalogue_shapes(spec: dict[str, Any], int8: bool) -> None:
    op = op_from_dict(spec)
    model = build_op_tflite(op, int8=int8)
    assert model[4:8] == b"TFL3"
    interpreter = _interpreter(model)
    inputs = interpreter.get_input_details()
    assert [tuple(d["shape"]) for d in inputs] == [_nhwc(s) for s in op.input_shapes()]
    assert tuple(interpreter.get_output_details()[0]["shape"]) == _nhwc(op.output_shape())
    assert {d["dtype"] for d in inputs} == {np.int8 if int8 else np.float32}
    y = _run(model, _inputs(op), int8=int8)
    assert np.isfinite(y).all() and np.abs(y).max() > 0


def _conv_reference(x: np.ndarray, w_ohwi: np.ndarray, bias: np.ndarray, stride: int, groups: int) -> np.ndarray:
    """Direct NHWC convolution with the catalogue's padding (k // 2 each side)."""
    k = w_ohwi.shape[1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    hw = (x.shape[1] + 2 * pad - k) // stride + 1
    cout, cin_g = w_ohwi.shape[0], w_ohwi.shape[3]
    out = np.zeros((1, hw, hw, cout), np.float64)
    for o in range(cout):
        g = o // (cout // groups)
        for i in range(hw):
            for j in range(hw):
                patch = xp[0, i * stride : i * stride + k, j * stride : j * stride + k, g * cin_g : (g + 1) * cin_g]
                out[0, i, j, o] = (patch * w_ohwi[o]).sum() + bias[o]
    return out


def _constants(model: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias of the model's convolution, read back through the interpreter."""
    graph = tflite.Model.GetRootAsModel(model, 0).Subgraphs(0)
    conv = next(graph.Operators(i) for i in range(graph.OperatorsLength()) if graph.Operators(i).InputsLength() == 3)
    weight_index, bias_index = (int(i) for i in conv.InputsAsNumpy()[1:3])
    interpreter = _interpreter(model)
    return interpreter.get_tensor(weight_index), interpreter.get_tensor(bias_index)


@pytest.mark.parametrize(
    "spec",
    [
        {"op": "conv2d", "cin": 3, "cout": 4, "hw": 7, "k": 3, "stride": 1},
        {"op": "conv2d", "cin": 3, "cout": 4, "hw": 8, "k": 3, "stride": 2},
        {"op": "conv2d", "cin": 3, "cout": 4, "hw": 6, "k": 2, "stride": 1},
        {"op": "conv2d", "cin": 4, "cout": 6, "hw": 6, "k": 3, "groups": 2},
        {"op": "conv2d", "cin": 5, "cout": 5, "hw": 6, "k": 3, "stride": 2, "groups": 5},
    ],
)
def test_float_conv_matches_reference_convolution(spec: dict[str, Any]) -> None:
    op = op_from_dict(spec)
    model = build_op_tflite(op)
    weight, bias = _constants(model)
    if op.depthwise:  # TFLite stores depthwise filters as [1, k, k, cout]
        weight = np.transpose(weight, (3, 1, 2, 0))
    x = _inputs(op)[0]
    expected = _conv_reference(x, weight, bias, op.stride, op.groups)
    np.testing.assert_allclose(_run(model, [x]), expected, rtol=1e-4, atol=1e-4)


def _tensor_types(model: bytes) -> dict[str, set[int]]:
    graph = tflite.Model.GetRootAsModel(model, 0).Subgraphs(0)
    types: dict[str, set[int]] = {"activations": set(), "constants": set()}
    buffers = tflite.Model.GetRootAsModel(model, 0)
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        has_data = buffers.Buffers(tensor.Buffer()).DataLength() > 0
        types["constants" if has_data else "activations"].add(tensor.Type())
    return types


def test_int8_model_is_full_integer_with_per_channel_weights() -> None:
    op = op_from_dict({"op": "conv2d", "cin": 8, "cout": 16, "hw": 10, "k": 3, "act": "relu6"})
    model = build_op_tflite(op, int8=True)
    types = _tensor_types(model)
    assert types["activations"] == {tflite.TensorType.INT8}
    assert types["constants"] == {tflite.TensorType.INT8, tflite.TensorType.INT32}
    interpreter = _interpreter(model)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    graph = tflite.Model.GetRootAsModel(model, 0).Subgraphs(0)
    x_index, w_index, b_index = (int(i) for i in graph.Operators(0).InputsAsNumpy())
    weight_q, bias_q = details[w_index]["quantization_parameters"], details[b_index]["quantization_parameters"]
    assert weight_q["scales"].shape == (16,) and not weight_q["zero_points"].any()
    input_scale = details[x_index]["quantization_parameters"]["scales"][0]
    np.testing.assert_allclose(bias_q["scales"], input_scale * weight_q["scales"], rtol=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        {"op": "conv2d", "cin": 16, "cout": 24, "hw": 12, "k": 3, "act": "relu"},
        {"op": "conv2d", "cin": 16, "cout": 16, "hw": 12, "k": 3, "groups": 16, "act": "hardswish"},
        {"op": "silu", "c": 8, "hw": 8},
        {"op": "concat", "cins": [8, 16], "hw": 6},
        {"op": "global_avgpool", "c": 16, "hw": 8},
    ],
)
def test_int8_tracks_the_float_model(spec: dict[str, Any]) -> None:
    op = op_from_dict(spec)
    x = _inputs(op)
    reference, quantised = _run(build_op_tflite(op), x), _run(build_op_tflite(op, int8=True), x, int8=True)
    # Calibration saw other random draws, so a few outputs clip; the bulk must sit within a few quantisation steps.
    assert np.corrcoef(reference.ravel(), quantised.ravel())[0, 1] > 0.99
    assert np.median(np.abs(reference - quantised)) < 0.02 * np.abs(reference).max()


def test_grouped_conv_refused_where_the_target_cannot_run_it() -> None:
    op = op_from_dict({"op": "conv2d", "cin": 16, "cout": 32, "hw": 8, "k": 3, "groups": 4})
    with pytest.raises(UnsupportedForTFLite) as info:
        build_op_tflite(op, int8=True, allow_grouped_conv=False)
    assert info.value.field == "groups"


def test_identity_model_runs_in_both_precisions() -> None:
    for int8 in (False, True):
        interpreter = _interpreter(build_identity_tflite(int8=int8))
        interpreter.invoke()
        assert tuple(interpreter.get_output_details()[0]["shape"]) == (4,)


def test_same_seed_gives_identical_bytes() -> None:
    op = op_from_dict({"op": "conv2d", "cin": 8, "cout": 8, "hw": 8, "k": 3})
    assert build_op_tflite(op, seed=1) == build_op_tflite(op, seed=1) != build_op_tflite(op, seed=2)
