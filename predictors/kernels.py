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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from predictors.kernel_shapes import (
    GEMM_OPS as _GEMMS,
)
from predictors.kernel_shapes import (
    POOL_OPS as _POOLS,
)
from predictors.kernel_shapes import (
    KernelDecompositionError,
    _attr,
    _infer_outputs,
    _ints,
    _numel,
    _ShapeTable,
    _text,
    conv_pads_begin,
    conv_taps,
)

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

_ELEMENTWISE_CODES: dict[str, int] = {  # the same ops as kernel_shapes.ELEMENTWISE_OPS, coded for the regressor
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
_GLOBAL_POOLS = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum"}

# Feature order per class; the regressors are fitted on exactly these columns.
FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    CONV: (
        "cin",
        "cout",
        "hw_in",
        "hw_out",
        "k",
        "stride",
        "groups",
        "act",
        "has_sum",
        "nchw_in",
        "reduction",
        "out_elems",
        "flops",
        "bytes",
    ),
    DWCONV: ("c", "hw_in", "hw_out", "k", "stride", "act", "has_sum", "out_elems", "flops", "bytes"),
    CONV_NCHW: (
        "cin",
        "cout",
        "hw_in",
        "hw_out",
        "k",
        "stride",
        "groups",
        "act",
        "has_sum",
        "reduction",
        "out_elems",
        "flops",
        "bytes",
    ),
    GEMM: ("m", "k", "n", "flops", "bytes"),
    POOL: ("c", "hw_in", "hw_out", "k", "stride", "is_max", "nchwc", "bytes"),
    GLOBAL_POOL: ("c", "hw_in", "is_reduce", "nchwc", "bytes"),
    REORDER: ("c", "hw", "to_nchwc", "c_padded", "bytes"),
    ELEMENTWISE: ("op", "numel", "n_inputs", "broadcast", "nchwc", "bytes"),
    CONCAT: ("numel", "n_inputs", "axis_is_channel", "bytes"),
    DATA_MOVEMENT: ("op", "numel", "n_outputs", "bytes"),
    SHAPE_ONLY: ("numel",),
}


def kernel_bytes(kernel_class: str | None, features: Sequence[float]) -> float:
    """A kernel's ``bytes`` feature; 0 for a class without one (shape-only kernels alias, unmodelled are unknown)."""
    names = FEATURE_NAMES.get(kernel_class or "", ())
    return float(features[names.index("bytes")]) if "bytes" in names else 0.0


def network_kernel_bytes(kernels: Sequence[Kernel]) -> float:
    """Σ of the kernels' ``bytes`` features: the memory one run of the network streams through the caches."""
    return sum(kernel_bytes(k.kernel_class, k.features) for k in kernels)


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


def rederive_conv_work(kernel: Kernel, in_map_only: bool) -> Kernel:
    """A conv kernel's flops and bytes from its shapes, counting all k×k taps or only those inside the map.

    For kernels saved without their padding (profiled networks stored before in-map taps were counted): padding
    k//2, as the generator and the common CNN families use, when it reproduces the output size, else none.
    """
    if kernel.kernel_class not in (CONV, DWCONV, CONV_NCHW):
        return kernel
    x, w, *rest = kernel.input_shapes
    y = kernel.output_shapes[0]
    names = FEATURE_NAMES[kernel.kernel_class]
    stride = int(kernel.features[names.index("stride")])
    kernel_size, ins, outs = list(w[2:]), x[2:], y[2:]
    if in_map_only:
        fits = zip(kernel_size, ins, outs, strict=True)
        pads = [k // 2 if (i + 2 * (k // 2) - k) // stride + 1 == o else 0 for k, i, o in fits]
        ones = [1] * len(kernel_size)
        taps, share = conv_taps(ins, outs, kernel_size, [stride] * len(kernel_size), pads, ones)
    else:
        taps, share = float(math.prod(kernel_size)), 1.0
    weights = 4.0 * math.prod(w)
    bias = 4.0 * math.prod(rest[0]) if rest and len(rest[0]) == 1 else 0.0
    activations = 4.0 * sum(math.prod(s) for s in (*kernel.input_shapes, *kernel.output_shapes))
    features = list(kernel.features)
    features[names.index("flops")] = 2.0 * math.prod(y) * w[1] * taps
    features[names.index("bytes")] = activations + weights + bias - 2.0 * weights * (1.0 - share)
    return dataclasses.replace(kernel, features=tuple(features))


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


def in_map_taps(
    node: onnx.NodeProto, x: tuple[int, ...], y: tuple[int, ...], w: tuple[int, ...]
) -> tuple[float, float]:
    """A conv's kernel taps that land inside its input: (mean per output position, share of the weights ever used).

    Both are products over the spatial axes (the in-map count is separable), so a 3x3 conv with padding 1 does 1 tap
    per output on a 1x1 map, 4 on 2x2 (using all 9 weight taps), and close to 9 on a large map.
    """
    kernel = list(w[2:])
    pads = conv_pads_begin(node, x[2:], y[2:], kernel)
    strides = _ints(node, "strides", [1] * len(kernel))
    dilations = _ints(node, "dilations", [1] * len(kernel))
    return conv_taps(x[2:], y[2:], kernel, strides, pads, dilations)


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
        taps, weight_share = in_map_taps(node, x, y, w)
        flops = 2.0 * _numel(y) * w[1] * taps
        # The weight tensor is in total_bytes twice (a kernel input, and an initializer); neither copy of the taps
        # that only ever meet padding is read.
        copies = 2 if weight_bytes >= 4 * _numel(w) else 1
        total_bytes -= copies * 4.0 * _numel(w) * (1.0 - weight_share)
        out_elems = float(_numel(y))
        if kernel_class == DWCONV:
            return [y[1], x[2], y[2], k, stride, act, has_sum, out_elems, flops, total_bytes]
        nchw_in = float(node.domain == NCHWC_DOMAIN and x[1] % 4 != 0 and w[1] == x[1] and groups == 1 and x[1] < 8)
        row = [x[1], y[1], x[2], y[2], k, stride, groups, act, has_sum]
        costs = [float(w[1] * k * k), out_elems, flops, total_bytes]
        return [*row, nchw_in, *costs] if kernel_class == CONV else [*row, *costs]
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
                name=node.name or f"unnamed:{node.op_type}_{len(kernels)}",
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
