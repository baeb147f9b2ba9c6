"""Optimised ONNX graph → the kernels the runtime executes, each with a feature vector for its latency regressor.

Input is the graph *after* the runtime's optimisations (onnxruntime writes it when
``SessionOptions.optimized_model_filepath`` is set): BN is already folded, activations and residual adds are fused into
convolutions, and NCHWc layout changes are explicit ``ReorderInput``/``ReorderOutput`` nodes.  Every node of that
graph is one kernel.  The optimised model carries no ``value_info``, so shapes are propagated here; inside the NCHWc
region tensors carry their *padded* channel count (a multiple of the runtime's block size), which is what the kernel
actually computes on.

Nothing here imports onnxruntime or torch: the service hands the optimised model in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

NCHWC_DOMAIN = "com.microsoft.nchwc"

# Kernel classes: one latency regressor each.  Ops in one class share a cost shape (same features make sense).
CONV = "conv"
DWCONV = "dwconv"
CONV_NCHW = "conv_nchw"
GEMM = "gemm"
POOL = "pool"
GLOBAL_POOL = "global_pool"
REORDER = "reorder"
ELEMENTWISE = "elementwise"
CONCAT = "concat"
DATA_MOVEMENT = "data_movement"
SHAPE_ONLY = "shape_only"
KERNEL_CLASSES: tuple[str, ...] = (
    CONV,
    DWCONV,
    CONV_NCHW,
    GEMM,
    POOL,
    GLOBAL_POOL,
    REORDER,
    ELEMENTWISE,
    CONCAT,
    DATA_MOVEMENT,
    SHAPE_ONLY,
)

_ELEMENTWISE_CODES: dict[str, int] = {
    "Add": 1,
    "Sum": 1,
    "Sub": 1,
    "Mul": 2,
    "Div": 2,
    "Relu": 3,
    "LeakyRelu": 3,
    "Clip": 3,
    "Max": 3,
    "Min": 3,
    "Sigmoid": 4,
    "HardSigmoid": 5,
    "HardSwish": 6,
    "QuickGelu": 7,
    "Tanh": 8,
    "Erf": 8,
    "Gelu": 8,
    "BiasGelu": 8,
    "FastGelu": 8,
    "BatchNormalization": 9,
}
_ACTIVATION_CODES: dict[str, int] = {
    "": 0,
    "Relu": 1,
    "Clip": 2,
    "LeakyRelu": 2,
    "HardSigmoid": 3,
    "HardSwish": 4,
    "Sigmoid": 5,
    "Tanh": 5,
}
_DATA_MOVEMENT = {"Transpose", "Split", "Slice", "Pad", "Gather", "Expand", "Tile", "Resize", "Upsample"}
# Ops the runtime executes by aliasing or tiny copies; their cost is the per-node dispatch, not the bytes.
_SHAPE_ONLY = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Constant", "Cast"}
_POOLS = {"MaxPool", "AveragePool"}
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum"}
_GEMMS = {"Gemm", "MatMul", "FusedGemm", "FusedMatMul"}

# Feature order per class; the regressors are fitted on exactly these columns.
FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    CONV: ("cin", "cout", "hw_in", "hw_out", "k", "stride", "groups", "act", "has_sum", "nchw_in", "flops", "bytes"),
    DWCONV: ("c", "hw_in", "hw_out", "k", "stride", "act", "has_sum", "flops", "bytes"),
    CONV_NCHW: ("cin", "cout", "hw_in", "hw_out", "k", "stride", "groups", "act", "has_sum", "flops", "bytes"),
    GEMM: ("m", "k", "n", "flops", "bytes"),
    POOL: ("c", "hw_in", "hw_out", "k", "stride", "is_max", "nchwc", "bytes"),
    GLOBAL_POOL: ("c", "hw_in", "is_reduce", "nchwc", "bytes"),
    REORDER: ("c", "hw", "to_nchwc", "c_padded", "bytes"),
    ELEMENTWISE: ("op", "numel", "n_inputs", "broadcast", "nchwc", "bytes"),
    CONCAT: ("numel", "n_inputs", "axis_is_channel", "bytes"),
    DATA_MOVEMENT: ("op", "numel", "n_outputs", "bytes"),
    SHAPE_ONLY: ("numel",),
}


class KernelDecompositionError(ValueError):
    """The graph cannot be decomposed (a shape could not be inferred); ``node`` names the node."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


@dataclass(frozen=True)
class Kernel:
    """One node of the optimised graph: what the runtime runs as one unit."""

    name: str
    op_type: str
    domain: str
    kernel_class: str | None  # None: not modelled by any regressor
    features: tuple[float, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    fused: tuple[str, ...] = field(default=())  # what the runtime folded into it (activation, residual sum)

    @property
    def ops(self) -> list[str]:
        base = f"{self.op_type}" if not self.domain else f"{self.domain.split('.')[-1]}:{self.op_type}"
        return [base, *self.fused]

    def feature_dict(self) -> dict[str, float]:
        names = FEATURE_NAMES.get(self.kernel_class or "", ())
        return dict(zip(names, self.features, strict=True))


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
    if op in _POOLS:
        kernel = _ints(node, "kernel_shape", [1, 1])
        strides = _ints(node, "strides", [1] * len(kernel))
        dilations = _ints(node, "dilations", [1] * len(kernel))
        pads = _ints(node, "pads", [0] * 2 * len(kernel))
        ceil_mode = bool(_attr(node, "ceil_mode", 0))
        spatial = [
            _pooled(first[2 + i], kernel[i], strides[i], pads[i] + pads[i + len(kernel)], dilations[i], ceil_mode)
            for i in range(len(kernel))
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
    if op in _ELEMENTWISE_CODES or op in ("Not", "Abs", "Neg", "Exp", "Log", "Sqrt", "Pow", "Where"):
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
        return [tuple(first[:axis]) + (s,) + tuple(first[axis + 1 :]) for s in sizes]
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
            axes = [int(v) for v in table.values[node.input[1]].reshape(-1)]
        else:
            axes = _ints(node, "axes", [i for i, d in enumerate(first) if d == 1])
        if op == "Squeeze":
            drop = {a % len(first) for a in axes}
            return [tuple(d for i, d in enumerate(first) if i not in drop)]
        out = list(first)
        rank = len(first) + len(axes)
        for a in sorted(a % rank for a in axes):
            out.insert(a, 1)
        return [tuple(out)]
    if op in ("Identity", "Dropout", "Cast"):
        return [first] * len(node.output)
    if op in _GEMMS:
        a, b = inputs[0], inputs[1]
        if op in ("Gemm", "FusedGemm"):
            m = a[1] if _attr(node, "transA", 0) else a[0]
            n = b[0] if _attr(node, "transB", 0) else b[1]
            return [(m, n)]
        return [(*a[:-1], b[-1])]
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


def _classify(node: onnx.NodeProto, ins: list[tuple[int, ...]], outs: list[tuple[int, ...]]) -> str | None:
    op = node.op_type
    if op in ("Conv", "FusedConv"):
        groups = int(_attr(node, "group", 1))  # type: ignore[call-overload]
        if node.domain != NCHWC_DOMAIN:
            return CONV_NCHW
        cin = ins[0][1]
        if groups > 1 and groups == outs[0][1] and ins[1][1] == 1 and groups >= cin:
            return DWCONV
        return CONV
    if op in _GEMMS:
        return GEMM
    if op in _POOLS:
        return POOL
    if op in _GLOBAL_POOLS:
        return GLOBAL_POOL
    if op in ("ReorderInput", "ReorderOutput"):
        return REORDER
    if op in _ELEMENTWISE_CODES:
        return ELEMENTWISE
    if op == "Concat":
        return CONCAT
    if op in _DATA_MOVEMENT:
        return DATA_MOVEMENT
    if op in _SHAPE_ONLY:
        return SHAPE_ONLY
    return None


def _features(kernel_class: str | None, node: onnx.NodeProto, ins: list, outs: list, weight_bytes: int) -> list[float]:
    op = node.op_type
    act_bytes = 4 * (sum(_numel(s) for s in ins) + sum(_numel(s) for s in outs))
    total_bytes = float(act_bytes + weight_bytes)
    if kernel_class in (CONV, DWCONV, CONV_NCHW):
        x, w, y = ins[0], ins[1], outs[0]
        groups = int(_attr(node, "group", 1))  # type: ignore[call-overload]
        k = w[2] if len(w) > 2 else 1
        stride = _ints(node, "strides", [1, 1])[0]
        act = _ACTIVATION_CODES.get(_text(node, "activation"), 6)
        has_sum = float(len([i for i in node.input if i]) > 3)
        flops = 2.0 * _numel(y) * w[1] * k * k
        if kernel_class == DWCONV:
            return [y[1], x[2], y[2], k, stride, act, has_sum, flops, total_bytes]
        nchw_in = float(node.domain == NCHWC_DOMAIN and x[1] % 4 != 0 and w[1] == x[1] and groups == 1 and x[1] < 8)
        row = [x[1], y[1], x[2], y[2], k, stride, groups, act, has_sum]
        return [*row, nchw_in, flops, total_bytes] if kernel_class == CONV else [*row, flops, total_bytes]
    if kernel_class == GEMM:
        a, y = ins[0], outs[0]
        m = _numel(y[:-1])
        kdim = a[0] if (op in ("Gemm", "FusedGemm") and _attr(node, "transA", 0)) else a[-1]
        return [m, kdim, y[-1], 2.0 * m * kdim * y[-1], total_bytes]
    if kernel_class == POOL:
        k = _ints(node, "kernel_shape", [1, 1])[0]
        stride = _ints(node, "strides", [1, 1])[0]
        is_max = float(op == "MaxPool")
        return [ins[0][1], ins[0][2], outs[0][2], k, stride, is_max, float(node.domain == NCHWC_DOMAIN), total_bytes]
    if kernel_class == GLOBAL_POOL:
        hw = ins[0][2] if len(ins[0]) > 2 else 1
        is_reduce = float(op.startswith("Reduce"))
        return [ins[0][1], hw, is_reduce, float(node.domain == NCHWC_DOMAIN), total_bytes]
    if kernel_class == REORDER:
        to_nchwc = float(op == "ReorderInput")
        logical, padded = (ins[0], outs[0]) if to_nchwc else (outs[0], ins[0])
        hw = logical[2] if len(logical) > 2 else 1
        return [logical[1], hw, to_nchwc, padded[1], total_bytes]
    if kernel_class == ELEMENTWISE:
        numel = _numel(outs[0])
        broadcast = float(any(_numel(s) != numel for s in ins))
        return [_ELEMENTWISE_CODES[op], numel, len(ins), broadcast, float(node.domain == NCHWC_DOMAIN), total_bytes]
    if kernel_class == CONCAT:
        axis = int(_attr(node, "axis", 1)) % len(outs[0])  # type: ignore[call-overload]
        return [_numel(outs[0]), len(ins), float(axis == 1), total_bytes]
    if kernel_class == DATA_MOVEMENT:
        codes = {"Transpose": 1, "Split": 2, "Slice": 3, "Pad": 4, "Gather": 5}
        return [codes.get(op, 6), _numel(ins[0]), len(outs), total_bytes]
    if kernel_class == SHAPE_ONLY:
        return [_numel(ins[0]) if ins else 0]
    return []


def decompose(
    model: onnx.ModelProto, *, block_size: int = 16, known_shapes: Mapping[str, tuple[int, ...]] | None = None
) -> list[Kernel]:
    """The kernels of an optimised graph in execution order, with shapes and features.

    Args:
        model: the optimised model the runtime wrote (``optimized_model_filepath``), static shapes.
        block_size: the runtime's NCHWc channel block (16 with AVX-512, 8 with AVX2); ReorderInput pads to it.
        known_shapes: tensor shapes from elsewhere (shape inference on the original model); used for the outputs of
            ops that have no shape rule here, whose names the optimiser kept.

    Raises:
        KernelDecompositionError: naming the first node whose shapes cannot be inferred.
    """
    table = _ShapeTable(model, block_size)
    kernels: list[Kernel] = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            for out in node.output:
                tensor = onnx.helper.get_attribute_value(node.attribute[0])
                if isinstance(tensor, onnx.TensorProto):
                    table.shapes[out] = tuple(int(d) for d in tensor.dims)
                    if tensor.data_type == onnx.TensorProto.INT64:
                        table.values[out] = numpy_helper.to_array(tensor)
            continue
        try:
            outs = _infer_outputs(node, table)
        except KernelDecompositionError:
            if not known_shapes or not all(o in known_shapes for o in node.output if o):
                raise
            outs = [known_shapes[o] for o in node.output if o]
        for name, shape in zip(node.output, outs, strict=False):
            if name:
                table.shapes[name] = shape
        ins = [table.get(node, i) for i in node.input if i]
        weight_bytes = 4 * sum(_numel(table.shapes[i]) for i in node.input if i in table.initializers)
        activations = [s for i, s in zip([i for i in node.input if i], ins, strict=True) if i not in table.initializers]
        if node.op_type in ("Conv", "FusedConv", *_GEMMS):
            activations = ins  # the weight shape is a feature of these kernels
        kernel_class = _classify(node, ins, outs)
        fused: list[str] = []
        activation = _text(node, "activation")
        if activation:
            fused.append(activation)
        if node.op_type in ("Conv", "FusedConv") and len([i for i in node.input if i]) > 3:
            fused.append("Add")
        kernels.append(
            Kernel(
                name=node.name or f"{node.op_type}_{len(kernels)}",
                op_type=node.op_type,
                domain=node.domain,
                kernel_class=kernel_class,
                features=tuple(float(v) for v in _features(kernel_class, node, activations, outs, weight_bytes)),
                input_shapes=tuple(ins),
                output_shapes=tuple(outs),
                fused=tuple(fused),
            )
        )
    return kernels
