"""Real .tflite flatbuffers for operator variants, written with the TFLite schema and no TensorFlow.

The graphs use the builtin kernels the TFLite converter would emit for the same PyTorch layer, in NHWC: CONV_2D and
DEPTHWISE_CONV_2D with RELU/RELU6 fused (of the catalogue's activations, the converter fuses only those two),
HARD_SWISH, LOGISTIC, silu as x * LOGISTIC(x), hardsigmoid as RELU6(x + 3) / 6, batch-norm as MUL + ADD, MEAN for
the global pool, channel shuffle as RESHAPE / TRANSPOSE / RESHAPE.  ``int8=True`` gives a full-integer model (int8
activations, per-channel symmetric conv weights, int32 biases) whose activation ranges come from calibrating the
float model on random inputs -- the form the Edge TPU compiler requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flatbuffers
import numpy as np
import tflite
from tflite.ActivationFunctionType import ActivationFunctionType as Act
from tflite.BuiltinOperator import BuiltinOperator as Code
from tflite.BuiltinOptions import BuiltinOptions as OptionsType
from tflite.Padding import Padding

from latency_service.backends.tflite_flatbuffer import TFLiteGraph, serialize_graph
from predictors.ops import (
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
    OpSpecError,
)

_CALIBRATION_RUNS = 8
_FUSABLE = {"relu": Act.RELU, "relu6": Act.RELU6}


class UnsupportedForTFLite(OpSpecError):
    """The variant has no builtin TFLite form (or none the target accepts); ``field`` names why."""


def _nhwc(shape: Sequence[int]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


def _padding(hw: int, k: int, stride: int, out_hw: int) -> int | None:
    """SAME or VALID when TFLite's rule pads exactly k//2 on each side, as the catalogue (and PyTorch) do, else None.

    TFLite's SAME puts the odd pixel of padding at the bottom/right (stride 2 on an even input pads 0 before, 1
    after); PyTorch pads symmetrically, so its converted models carry an explicit PAD there, and so do these.
    """
    pad = k // 2
    if pad == 0 and (hw - k) // stride + 1 == out_hw:
        return Padding.VALID
    total = max((out_hw - 1) * stride + k - hw, 0)
    if -(-hw // stride) == out_hw and total == 2 * pad and total // 2 == pad:
        return Padding.SAME
    return None


def _explicit_pad(g: TFLiteGraph, x: int, pad: int) -> int:
    b, h, w, c = g.shape_of(x)
    paddings = np.array([[0, 0], [pad, pad], [pad, pad], [0, 0]], dtype=np.int32)
    # Zero padding also before a max pool: the values differ from -inf padding, the work per pixel does not.
    return g.op(Code.PAD, [x, g.const(paddings, "int32")], (b, h + 2 * pad, w + 2 * pad, c))


def _conv(g: TFLiteGraph, x: int, op: Conv2d) -> int:
    fused = _FUSABLE.get(op.act or "", Act.NONE)
    padding = _padding(op.hw, op.k, op.stride, op.out_hw)
    if padding is None:
        x, padding = _explicit_pad(g, x, op.k // 2), Padding.VALID
    out_shape = (op.batch, op.out_hw, op.out_hw, op.cout)
    fan_in = op.cin // op.groups * op.k * op.k
    bias = g.const(g.rng.normal(0.0, 0.1, op.cout).astype(np.float32), "bias")
    if op.depthwise:
        weight_values = g.rng.normal(0.0, (2.0 / fan_in) ** 0.5, (1, op.k, op.k, op.cout)).astype(np.float32)
        weight = g.const(weight_values, "weight")
        g.tensors[weight].quant_dim, g.tensors[weight].per_channel = 3, True
        g.tensors[bias].bias_of = (x, weight)

        def depthwise_options(b: flatbuffers.Builder) -> int:
            tflite.DepthwiseConv2DOptionsStart(b)
            tflite.DepthwiseConv2DOptionsAddPadding(b, padding)
            tflite.DepthwiseConv2DOptionsAddStrideH(b, op.stride)
            tflite.DepthwiseConv2DOptionsAddStrideW(b, op.stride)
            tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
            tflite.DepthwiseConv2DOptionsAddFusedActivationFunction(b, fused)
            return int(tflite.DepthwiseConv2DOptionsEnd(b))

        options = (OptionsType.DepthwiseConv2DOptions, depthwise_options)
        y = g.op(Code.DEPTHWISE_CONV_2D, [x, weight, bias], out_shape, options)
    else:
        shape = (op.cout, op.k, op.k, op.cin // op.groups)
        weight = g.const(g.rng.normal(0.0, (2.0 / fan_in) ** 0.5, shape).astype(np.float32), "weight")
        g.tensors[weight].per_channel = True
        g.tensors[bias].bias_of = (x, weight)

        def conv_options(b: flatbuffers.Builder) -> int:
            tflite.Conv2DOptionsStart(b)
            tflite.Conv2DOptionsAddPadding(b, padding)
            tflite.Conv2DOptionsAddStrideH(b, op.stride)
            tflite.Conv2DOptionsAddStrideW(b, op.stride)
            tflite.Conv2DOptionsAddFusedActivationFunction(b, fused)
            return int(tflite.Conv2DOptionsEnd(b))

        y = g.op(Code.CONV_2D, [x, weight, bias], out_shape, (OptionsType.Conv2DOptions, conv_options))
    return y if fused != Act.NONE else _activation(g, y, op.act)


def _linear(g: TFLiteGraph, x: int, op: Linear) -> int:
    fused = _FUSABLE.get(op.act or "", Act.NONE)
    weight_values = g.rng.normal(0.0, (2.0 / op.cin) ** 0.5, (op.cout, op.cin)).astype(np.float32)
    # Per-tensor like the converter's default for dense layers (per-channel FC is opt-in there).
    weight = g.const(weight_values, "weight")
    bias = g.const(g.rng.normal(0.0, 0.1, op.cout).astype(np.float32), "bias")
    g.tensors[bias].bias_of = (x, weight)

    def fc_options(b: flatbuffers.Builder) -> int:
        tflite.FullyConnectedOptionsStart(b)
        tflite.FullyConnectedOptionsAddFusedActivationFunction(b, fused)
        return int(tflite.FullyConnectedOptionsEnd(b))

    options = (OptionsType.FullyConnectedOptions, fc_options)
    y = g.op(Code.FULLY_CONNECTED, [x, weight, bias], (op.batch, op.cout), options)
    return y if fused != Act.NONE else _activation(g, y, op.act)


def _binary(g: TFLiteGraph, code: int, a: int, b_index: int, act: int = Act.NONE) -> int:
    options_type = OptionsType.AddOptions if code == Code.ADD else OptionsType.MulOptions

    def options(b: flatbuffers.Builder) -> int:
        if code == Code.ADD:
            tflite.AddOptionsStart(b)
            tflite.AddOptionsAddFusedActivationFunction(b, act)
            return int(tflite.AddOptionsEnd(b))
        tflite.MulOptionsStart(b)
        tflite.MulOptionsAddFusedActivationFunction(b, act)
        return int(tflite.MulOptionsEnd(b))

    shape = tuple(np.broadcast_shapes(g.shape_of(a), g.shape_of(b_index)))
    return g.op(code, [a, b_index], shape, (options_type, options))


def _activation(g: TFLiteGraph, x: int, act: str | None) -> int:
    shape = g.shape_of(x)
    if act is None:
        return x
    if act in ("relu", "relu6"):
        return g.op(Code.RELU if act == "relu" else Code.RELU6, [x], shape)
    if act == "hardswish":
        return g.op(Code.HARD_SWISH, [x], shape)
    if act == "sigmoid":
        return g.op(Code.LOGISTIC, [x], shape)
    if act == "silu":
        return _binary(g, Code.MUL, x, g.op(Code.LOGISTIC, [x], shape))
    if act == "hardsigmoid":
        shifted = _binary(g, Code.ADD, x, g.const(np.array([3.0], np.float32)), Act.RELU6)
        return _binary(g, Code.MUL, shifted, g.const(np.array([1.0 / 6.0], np.float32)))
    raise UnsupportedForTFLite("act", f"no TFLite form for activation {act!r}")


def _pool(g: TFLiteGraph, x: int, op: MaxPool | AvgPool) -> int:
    padding = _padding(op.hw, op.k, op.stride, op.out_hw)
    if padding is None:
        x, padding = _explicit_pad(g, x, op.k // 2), Padding.VALID

    def pool_options(b: flatbuffers.Builder) -> int:
        tflite.Pool2DOptionsStart(b)
        tflite.Pool2DOptionsAddPadding(b, padding)
        tflite.Pool2DOptionsAddStrideH(b, op.stride)
        tflite.Pool2DOptionsAddStrideW(b, op.stride)
        tflite.Pool2DOptionsAddFilterHeight(b, op.k)
        tflite.Pool2DOptionsAddFilterWidth(b, op.k)
        return int(tflite.Pool2DOptionsEnd(b))

    code = Code.MAX_POOL_2D if isinstance(op, MaxPool) else Code.AVERAGE_POOL_2D
    out_shape = (op.batch, op.out_hw, op.out_hw, op.c)
    return g.op(code, [x], out_shape, (OptionsType.Pool2DOptions, pool_options))


def _emit(g: TFLiteGraph, op: OpSpec, allow_grouped_conv: bool) -> list[int]:
    """Add the variant's inputs and ops to ``g``; returns the output tensor indices."""
    inputs = [g.input(_nhwc(shape)) for shape in op.input_shapes()]
    x = inputs[0]
    if isinstance(op, Conv2d):
        if op.groups > 1 and not op.depthwise and not allow_grouped_conv:
            raise UnsupportedForTFLite(
                "groups", f"grouped conv (groups={op.groups}, not depthwise) is not supported by this target"
            )
        return [_conv(g, x, op)]
    if isinstance(op, Linear):
        return [_linear(g, x, op)]
    if isinstance(op, BatchNorm):
        scale = g.const(g.rng.uniform(0.5, 1.5, op.c).astype(np.float32))
        shift = g.const(g.rng.normal(0.0, 0.1, op.c).astype(np.float32))
        return [_binary(g, Code.ADD, _binary(g, Code.MUL, x, scale), shift)]
    if isinstance(op, MaxPool | AvgPool):
        return [_pool(g, x, op)]
    if isinstance(op, GlobalAvgPool):

        def mean_options(b: flatbuffers.Builder) -> int:
            tflite.ReducerOptionsStart(b)
            tflite.ReducerOptionsAddKeepDims(b, True)
            return int(tflite.ReducerOptionsEnd(b))

        axes = g.const(np.array([1, 2], np.int32), "int32")
        return [g.op(Code.MEAN, [x, axes], (op.batch, 1, 1, op.c), (OptionsType.ReducerOptions, mean_options))]
    if isinstance(op, Add | Mul):
        return [_binary(g, Code.ADD if isinstance(op, Add) else Code.MUL, x, inputs[1])]
    if isinstance(op, Concat):

        def concat_options(b: flatbuffers.Builder) -> int:
            tflite.ConcatenationOptionsStart(b)
            tflite.ConcatenationOptionsAddAxis(b, 3)
            return int(tflite.ConcatenationOptionsEnd(b))

        out_shape = (op.batch, op.hw, op.hw, sum(op.cins))
        return [g.op(Code.CONCATENATION, inputs, out_shape, (OptionsType.ConcatenationOptions, concat_options))]
    if isinstance(op, ChannelShuffle):
        b, h, w, c = g.shape_of(x)
        split = (b, h, w, op.groups, c // op.groups)
        grouped = g.op(Code.RESHAPE, [x, g.const(np.array(split, np.int32), "int32")], split)
        perm = g.const(np.array([0, 1, 2, 4, 3], np.int32), "int32")
        swapped = g.op(Code.TRANSPOSE, [grouped, perm], (b, h, w, c // op.groups, op.groups))
        return [g.op(Code.RESHAPE, [swapped, g.const(np.array([b, h, w, c], np.int32), "int32")], (b, h, w, c))]
    if op.kind in ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu"):
        return [_activation(g, x, op.kind)]
    raise UnsupportedForTFLite("op", f"no TFLite form for operator kind {op.kind!r}")


def build_op_tflite(op: OpSpec, *, int8: bool = False, seed: int = 0, allow_grouped_conv: bool = True) -> bytes:
    """A .tflite model of one operator variant (float32, or full-integer int8 calibrated on random inputs).

    Grouped (non-depthwise) convs are a CONV_2D whose filter has cin/groups input channels: LiteRT's builtin and
    XNNPACK kernels run them (checked with ai-edge-litert 2.3, float and int8).  TFLite gained them in 2.9, after
    the Edge TPU compiler's converter (TF 2.5 era) was frozen, so the Edge TPU path refuses them
    (``allow_grouped_conv=False``) rather than report a variant the TPU cannot map.

    Raises:
        UnsupportedForTFLite: naming the field that has no TFLite form (e.g. ``groups`` for grouped convs).
    """
    g = TFLiteGraph(np.random.default_rng(seed))
    g.outputs = _emit(g, op, allow_grouped_conv)
    float_model = serialize_graph(g, int8=False)
    if not int8:
        return float_model
    return serialize_graph(g, int8=True, ranges=_calibrate(float_model, g, seed))


def build_identity_tflite(*, int8: bool = False) -> bytes:
    """The cheapest model: one RESHAPE of a four-element tensor, for the per-invoke overhead."""
    g = TFLiteGraph(np.random.default_rng(0))
    x = g.input((1, 4))
    g.outputs = [g.op(Code.RESHAPE, [x, g.const(np.array([4], np.int32), "int32")], (4,))]
    return serialize_graph(g, int8=int8, ranges={i: (-1.0, 1.0) for i in range(len(g.tensors))} if int8 else None)


def interpreter_class() -> Any:
    """The LiteRT ``Interpreter`` (ai-edge-litert), or tflite-runtime's on devices that ship only that."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    return Interpreter


def _calibrate(float_model: bytes, g: TFLiteGraph, seed: int) -> dict[int, tuple[float, float]]:
    """Min/max of every activation tensor over a few random inputs, read from the reference kernels."""
    interpreter_cls = interpreter_class()
    try:
        from ai_edge_litert.interpreter import OpResolverType
    except ImportError:
        from tflite_runtime.interpreter import OpResolverType
    interpreter = interpreter_cls(
        model_content=float_model,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    rng = np.random.default_rng(seed + 1)
    ranges: dict[int, tuple[float, float]] = {}
    for _ in range(_CALIBRATION_RUNS):
        for index in g.inputs:
            interpreter.set_tensor(index, rng.uniform(-1.0, 1.0, g.shape_of(index)).astype(np.float32))
        interpreter.invoke()
        for index, tensor in enumerate(g.tensors):
            if tensor.role == "act":
                values = interpreter.get_tensor(index)
                lo, hi = ranges.get(index, (0.0, 0.0))
                ranges[index] = (min(lo, float(values.min())), max(hi, float(values.max())))
    return ranges


__all__ = ["UnsupportedForTFLite", "build_identity_tflite", "build_op_tflite", "interpreter_class"]
