"""ONNX graphs for operator variants, built with ``onnx.helper`` only (the device image carries no torch).

Each graph is the kernel the runtime executes for one :class:`~predictors.ops.OpSpec`, with static shapes, random
weights as initializers and inputs named ``x0, x1, ...``; the output is ``y``.

Decision on ``Conv2d.bn``: ``torch.onnx.export`` (both exporters) and tf2onnx fold an inference-mode batch-norm into
the preceding convolution's weights and bias, so a conv-bn-act layer reaches the runtime as ``Conv(+bias) -> act``.
Emitting a ``BatchNormalization`` node would only measure how well the runtime re-folds it, so ``bn=True`` and
``bn=False`` build the same graph (both with a bias: PyTorch convolutions without BN carry one by default).  A
standalone ``batchnorm`` variant (DenseNet-style pre-activation after a concat) does emit the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
)

OPSET = 17
# IR 8 is what opset 17 shipped with; older runtimes on devices (onnxruntime 1.14, TensorRT 8.5) refuse newer IRs.
IR_VERSION = 8
OUTPUT_NAME = "y"
_RANDOM_BLOCK = 1 << 20

_ONNX_TO_NUMPY: dict[int, type[np.generic]] = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.BOOL: np.bool_,
}


class UnsupportedOpError(ValueError):
    """No graph builder exists for an operator kind."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"op: no ONNX graph builder for kind {kind!r}")
        self.field = "op"
        self.kind = kind


class _GraphBuilder:
    """Collects nodes and initializers; seeds its weights from the op's key so a variant is bit-identical anywhere."""

    def __init__(self, op: OpSpec) -> None:
        self.op = op
        self.rng = np.random.default_rng(int(op.key[:12], 16))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def fresh(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}_{self._counter}"

    def node(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def weight(self, shape: tuple[int, ...], *, fan_in: int | None = None, low: float | None = None) -> str:
        name = self.fresh("w")
        if low is not None:
            # Strictly positive values (variances): a zero variance would feed rsqrt an infinity.
            data = self.rng.uniform(low, 1.0, size=shape).astype(np.float32)
        else:
            # He-scaled so activations stay O(1): denormals or overflow would time a different code path.
            scale = np.float32(np.sqrt(2.0 / fan_in) if fan_in else 1.0)
            size = int(np.prod(shape))
            # Dense kernels' time does not depend on the values (no sparsity, no denormals here), so large tensors
            # repeat one random block: drawing 100 M normals took 4.4 s of a 12 s VGG-fc6 variant build.
            block = self.rng.standard_normal(size=min(size, _RANDOM_BLOCK), dtype=np.float32)
            data = np.resize(block, shape) if size > _RANDOM_BLOCK else block.reshape(shape)
            data *= scale
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def int64_constant(self, values: list[int]) -> str:
        name = self.fresh("shape")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def activation(self, x: str, act: str | None, output: str | None = None) -> str:
        if act is None:
            return x if output is None else self.node("Identity", [x], output)
        if act == "relu":
            return self.node("Relu", [x], output)
        if act == "relu6":
            # Clip's bounds are inputs since opset 11; PyTorch exports ReLU6 exactly this way.
            lo = self._scalar(0.0)
            hi = self._scalar(6.0)
            return self.node("Clip", [x, lo, hi], output)
        if act == "hardswish":
            return self.node("HardSwish", [x], output)
        if act == "hardsigmoid":
            # PyTorch's hardsigmoid is relu6(x + 3) / 6, i.e. alpha 1/6; ONNX's default alpha is 0.2.
            return self.node("HardSigmoid", [x], output, alpha=1.0 / 6.0, beta=0.5)
        if act == "sigmoid":
            return self.node("Sigmoid", [x], output)
        if act == "silu":
            # Opset 17 has no SiLU; both PyTorch exporters emit x * Sigmoid(x).
            gate = self.node("Sigmoid", [x])
            return self.node("Mul", [x, gate], output)
        raise UnsupportedOpError(f"activation {act}")

    def _scalar(self, value: float) -> str:
        name = self.fresh("scalar")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name


def _conv(g: _GraphBuilder, op: Conv2d, x: str) -> str:
    fan_in = (op.cin // op.groups) * op.k * op.k
    w = g.weight((op.cout, op.cin // op.groups, op.k, op.k), fan_in=fan_in)
    b = g.weight((op.cout,), fan_in=fan_in)
    pad = op.k // 2
    conv_out = None if op.act else OUTPUT_NAME
    y = g.node(
        "Conv",
        [x, w, b],
        conv_out,
        kernel_shape=[op.k, op.k],
        strides=[op.stride, op.stride],
        pads=[pad, pad, pad, pad],
        group=op.groups,
    )
    return g.activation(y, op.act, OUTPUT_NAME) if op.act else y


def _linear(g: _GraphBuilder, op: Linear, x: str) -> str:
    w = g.weight((op.cout, op.cin), fan_in=op.cin)
    b = g.weight((op.cout,), fan_in=op.cin)
    # Gemm with transB is what nn.Linear exports to; MatMul+Add would fuse into the same kernel.
    y = g.node("Gemm", [x, w, b], None if op.act else OUTPUT_NAME, transB=1)
    return g.activation(y, op.act, OUTPUT_NAME) if op.act else y


def _batchnorm(g: _GraphBuilder, op: BatchNorm, x: str) -> str:
    scale = g.weight((op.c,), fan_in=1)
    bias = g.weight((op.c,), fan_in=1)
    mean = g.weight((op.c,), fan_in=1)
    var = g.weight((op.c,), low=0.5)
    return g.node("BatchNormalization", [x, scale, bias, mean, var], OUTPUT_NAME, epsilon=1e-5)


def _pool(g: _GraphBuilder, op: MaxPool | AvgPool, x: str) -> str:
    pad = op.k // 2
    attrs: dict[str, Any] = {"kernel_shape": [op.k, op.k], "strides": [op.stride, op.stride]}
    attrs["pads"] = [pad, pad, pad, pad]
    if isinstance(op, AvgPool):
        # PyTorch's AvgPool2d default (count_include_pad=True) exports as this attribute.
        return g.node("AveragePool", [x], OUTPUT_NAME, count_include_pad=1, **attrs)
    return g.node("MaxPool", [x], OUTPUT_NAME, **attrs)


def _channel_shuffle(g: _GraphBuilder, op: ChannelShuffle, x: str) -> str:
    n, c, hw = op.batch, op.c, op.hw
    split = g.int64_constant([n, op.groups, c // op.groups, hw, hw])
    merged = g.int64_constant([n, c, hw, hw])
    y = g.node("Reshape", [x, split])
    y = g.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
    return g.node("Reshape", [y, merged], OUTPUT_NAME)


def _single_input(op: OpSpec) -> Callable[[_GraphBuilder, str], str] | None:
    if isinstance(op, Conv2d):
        return lambda g, x: _conv(g, op, x)
    if isinstance(op, Linear):
        return lambda g, x: _linear(g, op, x)
    if isinstance(op, BatchNorm):
        return lambda g, x: _batchnorm(g, op, x)
    if isinstance(op, MaxPool | AvgPool):
        return lambda g, x: _pool(g, op, x)
    if isinstance(op, GlobalAvgPool):
        return lambda g, x: g.node("GlobalAveragePool", [x], OUTPUT_NAME)
    if isinstance(op, ChannelShuffle):
        return lambda g, x: _channel_shuffle(g, op, x)
    if op.kind in ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu"):
        return lambda g, x: g.activation(x, op.kind, OUTPUT_NAME)
    return None


def build_op_model(op: OpSpec) -> onnx.ModelProto:
    """The ONNX model (opset 17, static shapes, random weights) that runs ``op`` as the runtime would see it.

    Raises:
        UnsupportedOpError: for a kind without a builder (every kind in ``predictors.ops`` has one).
    """
    g = _GraphBuilder(op)
    input_names = [f"x{i}" for i in range(len(op.input_shapes()))]
    single = _single_input(op)
    if single is not None:
        single(g, input_names[0])
    elif isinstance(op, Add):
        g.node("Add", input_names, OUTPUT_NAME)
    elif isinstance(op, Mul):
        g.node("Mul", input_names, OUTPUT_NAME)
    elif isinstance(op, Concat):
        g.node("Concat", input_names, OUTPUT_NAME, axis=1)
    else:
        raise UnsupportedOpError(op.kind)
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
        for name, shape in zip(input_names, op.input_shapes(), strict=True)
    ]
    output = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, list(op.output_shape()))
    graph = helper.make_graph(g.nodes, f"{op.kind}_{op.key}", inputs, [output], initializer=g.initializers)
    return _finish(graph)


def build_identity_model() -> onnx.ModelProto:
    """The cheapest runnable graph (one Identity over one float): its latency is the runtime's per-call overhead."""
    x = helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x0"], [OUTPUT_NAME])], "identity", [x], [y])
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="figs-nas", ir_version=IR_VERSION
    )
    return model


def random_inputs(model: onnx.ModelProto, *, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Random (never all-zero) arrays for every graph input that is not an initializer.

    Symbolic or unknown dimensions become ``batch`` (whole models are profiled at batch 1).  Floats are standard
    normal; integers are drawn from [0, 8) so that index-like inputs stay in range for small tables.
    """
    rng = np.random.default_rng(seed)
    initialized = {init.name for init in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initialized:
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in tensor_type.shape.dim
        )
        dtype = _ONNX_TO_NUMPY.get(tensor_type.elem_type)
        if dtype is None:
            raise ValueError(f"input {value.name!r}: unsupported element type {tensor_type.elem_type}")
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(size=shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 8, size=shape).astype(dtype)
    return feeds


__all__ = ["IR_VERSION", "OPSET", "UnsupportedOpError", "build_identity_model", "build_op_model", "random_inputs"]
