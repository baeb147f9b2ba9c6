"""Shape propagation through an optimised onnxruntime graph (which carries no ``value_info``).

Shapes are logical NCHW outside the NCHWc region and channel-padded (to the runtime's block size) inside it, which is
what the kernels actually compute on.  Ops without a rule here can take shapes from onnx's own inference on the
original model (:func:`static_shapes`) when the optimiser kept their tensor names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

POOL_OPS = frozenset({"MaxPool", "AveragePool"})
GEMM_OPS = frozenset({"Gemm", "MatMul", "FusedGemm", "FusedMatMul"})
ELEMENTWISE_OPS = frozenset(
    {"Add", "Sum", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Clip", "Max", "Min", "Sigmoid", "HardSigmoid",
     "HardSwish", "QuickGelu", "Tanh", "Erf", "Gelu", "BiasGelu", "FastGelu", "BatchNormalization", "Not", "Abs",
     "Neg", "Exp", "Log", "Sqrt", "Pow", "Where"}
)  # fmt: skip


class KernelDecompositionError(ValueError):
    """The graph cannot be decomposed (a shape could not be inferred); ``node`` names the node."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> list[int]:
    value = _attr(node, name, default)
    assert isinstance(value, list | tuple)
    return [int(v) for v in value]


def _text(node: onnx.NodeProto, name: str) -> str:
    value = _attr(node, name, b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _pooled(hw: int, k: int, stride: int, pad_total: int, dilation: int = 1, ceil_mode: bool = False) -> int:
    span = hw + pad_total - dilation * (k - 1) - 1
    return (math.ceil(span / stride) if ceil_mode else span // stride) + 1


def conv_tap_coverage(
    size_in: int, size_out: int, k: int, stride: int, pad_begin: int, dilation: int = 1
) -> tuple[float, int]:
    """Along one spatial axis: (mean taps inside the input per output position, taps any output position uses).

    Padding taps multiply zeros the runtime never loads: a 3x3 conv on a 1x1 map does one tap of work per output,
    not nine, and reads only the centre tap of its weights (a 192->192 one is profiled at 5-6 us where nine taps'
    FLOPs predicted 15.6 us).  The product over both axes of the first value is the conv's real taps per output.
    """
    if size_out <= 0 or k <= 0:
        return 0.0, 0
    origins = np.arange(size_out)[:, None] * stride - pad_begin
    inside = (origins + np.arange(k)[None, :] * dilation >= 0) & (origins + np.arange(k)[None, :] * dilation < size_in)
    return float(inside.sum(axis=1).mean()), int(inside.any(axis=0).sum())


def conv_taps(
    ins: Sequence[int],
    outs: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    pads_begin: Sequence[int],
    dilations: Sequence[int],
) -> tuple[float, float]:
    """Over all spatial axes (the in-map count is separable): (mean taps inside the input per output position, share
    of the weight taps any output position uses)."""
    taps, share = 1.0, 1.0
    for axis, k in enumerate(kernel):
        mean_taps, touched = conv_tap_coverage(
            ins[axis], outs[axis], k, strides[axis], pads_begin[axis], dilations[axis]
        )
        taps *= mean_taps
        share *= touched / k
    return taps, share


def conv_pads_begin(node: onnx.NodeProto, ins: Sequence[int], outs: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """Leading padding per spatial axis, also under ``auto_pad`` (where the runtime derives it from the shapes)."""
    rank = len(kernel)
    strides = _ints(node, "strides", [1] * rank)
    dilations = _ints(node, "dilations", [1] * rank)
    auto_pad = _text(node, "auto_pad")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [max((outs[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - ins[i], 0) for i in range(rank)]
        return [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    if auto_pad == "VALID":
        return [0] * rank
    return _ints(node, "pads", [0] * 2 * rank)[:rank]


def _broadcast(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return tuple(max(dims) for dims in zip(*padded, strict=True))


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


class _ShapeTable:
    """Tensor name → shape, plus the values of small constant integer tensors (Reshape/Split/Slice arguments)."""

    def __init__(self, model: onnx.ModelProto, block_size: int) -> None:
        self.block = max(1, block_size)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.values: dict[str, np.ndarray] = {}
        self.initializers: set[str] = set()
        for init in model.graph.initializer:
            self.shapes[init.name] = tuple(int(d) for d in init.dims)
            self.initializers.add(init.name)
            if init.data_type == onnx.TensorProto.INT64 and _numel(init.dims) <= 16:
                self.values[init.name] = numpy_helper.to_array(init)
        for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
            dims = value.type.tensor_type.shape.dim
            if value.name not in self.shapes and dims and all(d.HasField("dim_value") for d in dims):
                self.shapes[value.name] = tuple(int(d.dim_value) for d in dims)

    def get(self, node: onnx.NodeProto, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise KernelDecompositionError(node.name or node.op_type, f"shape of input {name!r} is unknown")
        return self.shapes[name]

    def padded(self, channels: int) -> int:
        return -(-channels // self.block) * self.block


def _infer_outputs(node: onnx.NodeProto, table: _ShapeTable) -> list[tuple[int, ...]]:
    """Output shapes of one node from its input shapes and attributes (logical, or padded inside NCHWc)."""
    op = node.op_type
    inputs = [table.get(node, i) for i in node.input if i]
    first = inputs[0] if inputs else ()
    if op in ("Conv", "FusedConv"):
        weight = inputs[1]
        kernel = weight[2:]
        strides = _ints(node, "strides", [1] * len(kernel))
        dilations = _ints(node, "dilations", [1] * len(kernel))
        pads = _ints(node, "pads", [0] * 2 * len(kernel))
        if _text(node, "auto_pad") in ("SAME_UPPER", "SAME_LOWER"):
            spatial = [-(-first[2 + i] // strides[i]) for i in range(len(kernel))]
        else:
            spatial = [
                _pooled(first[2 + i], kernel[i], strides[i], pads[i] + pads[i + len(kernel)], dilations[i])
                for i in range(len(kernel))
            ]
        return [(first[0], weight[0], *spatial)]
    if op in POOL_OPS:
        window = _ints(node, "kernel_shape", [1, 1])
        strides = _ints(node, "strides", [1] * len(window))
        dilations = _ints(node, "dilations", [1] * len(window))
        pads = _ints(node, "pads", [0] * 2 * len(window))
        ceil_mode = bool(_attr(node, "ceil_mode", 0))
        spatial = [
            _pooled(first[2 + i], window[i], strides[i], pads[i] + pads[i + len(window)], dilations[i], ceil_mode)
            for i in range(len(window))
        ]
        return [(first[0], first[1], *spatial)]
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        return [(*first[:2], *([1] * (len(first) - 2)))]
    if op in ("ReduceMean", "ReduceMax", "ReduceSum"):
        axes_value: list[int] | None = None
        if len(node.input) > 1 and node.input[1] in table.values:
            axes_value = [int(a) for a in table.values[node.input[1]].reshape(-1)]
        else:
            raw = _attr(node, "axes", None)
            axes_value = [int(a) for a in raw] if isinstance(raw, list) else None
        axes = {a % len(first) for a in (axes_value if axes_value is not None else range(len(first)))}
        keep = bool(_attr(node, "keepdims", 1))
        return [tuple((1 if i in axes else d) for i, d in enumerate(first) if keep or i not in axes)]
    if op == "ReorderInput":
        if _attr(node, "channels_last", 0):
            n, h, w, c = first
            return [(n, table.padded(c), h, w)]
        return [(first[0], table.padded(first[1]), *first[2:])]
    if op == "ReorderOutput":
        channels = int(_attr(node, "channels", first[1]))  # type: ignore[call-overload]
        if _attr(node, "channels_last", 0):
            return [(first[0], *first[2:], channels)]
        return [(first[0], channels, *first[2:])]
    if op in ELEMENTWISE_OPS:
        if op == "BatchNormalization":
            return [first]
        return [_broadcast(inputs)]
    if op == "Concat":
        axis = int(_attr(node, "axis", 1)) % len(first)  # type: ignore[call-overload]
        out = list(first)
        out[axis] = sum(s[axis] for s in inputs)
        return [tuple(out)]
    if op == "Split":
        axis = int(_attr(node, "axis", 0)) % len(first)  # type: ignore[call-overload]
        if len(node.input) > 1 and node.input[1] in table.values:
            sizes = [int(v) for v in table.values[node.input[1]].reshape(-1)]
        elif _attr(node, "split", None) is not None:
            sizes = _ints(node, "split", [])
        else:
            parts = len(node.output)
            sizes = [first[axis] // parts] * parts
        return [(*tuple(first[:axis]), s, *tuple(first[axis + 1 :])) for s in sizes]
    if op == "Transpose":
        perm = _ints(node, "perm", list(reversed(range(len(first)))))
        return [tuple(first[p] for p in perm)]
    if op == "Reshape":
        if node.input[1] not in table.values:
            raise KernelDecompositionError(node.name or op, "Reshape target shape is not a constant")
        target = [int(v) for v in table.values[node.input[1]].reshape(-1)]
        target = [first[i] if (v == 0 and not _attr(node, "allowzero", 0)) else v for i, v in enumerate(target)]
        if -1 in target:
            known = _numel([v for v in target if v != -1])
            target[target.index(-1)] = _numel(first) // max(known, 1)
        return [tuple(target)]
    if op == "Flatten":
        axis = int(_attr(node, "axis", 1)) % (len(first) + 1)  # type: ignore[call-overload]
        return [(_numel(first[:axis]), _numel(first[axis:]))]
    if op in ("Squeeze", "Unsqueeze"):
        if len(node.input) > 1 and node.input[1] in table.values:
            squeezed = [int(v) for v in table.values[node.input[1]].reshape(-1)]
        else:
            squeezed = _ints(node, "axes", [i for i, d in enumerate(first) if d == 1])
        if op == "Squeeze":
            drop = {a % len(first) for a in squeezed}
            return [tuple(d for i, d in enumerate(first) if i not in drop)]
        out = list(first)
        rank = len(first) + len(squeezed)
        for a in sorted(a % rank for a in squeezed):
            out.insert(a, 1)
        return [tuple(out)]
    if op in ("Identity", "Dropout", "Cast"):
        return [first] * len(node.output)
    if op in GEMM_OPS:
        left, right = inputs[0], inputs[1]
        if op in ("Gemm", "FusedGemm"):
            m = left[1] if _attr(node, "transA", 0) else left[0]
            n = right[0] if _attr(node, "transB", 0) else right[1]
            return [(m, n)]
        return [(*left[:-1], right[-1])]
    raise KernelDecompositionError(node.name or op, f"no shape rule for {op}")


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every fully static tensor shape onnx's shape inference finds in a (standard-domain) model."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a best effort for the unusual ops; the rules above cover the usual ones
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes
