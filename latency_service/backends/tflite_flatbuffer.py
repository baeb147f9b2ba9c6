"""The TFLite flatbuffer writer behind ``tflite_builder``: a small graph IR, int8 quantisation, serialisation.

Written with the ``tflite`` package's generated schema functions (the official schema.fbs compiled by flatc) and
``flatbuffers``; no TensorFlow.  Quantisation follows the TFLite int8 spec: activations asymmetric per tensor,
conv weights symmetric per output channel, biases int32 with scale = input scale x weight scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator as Code
from tflite.BuiltinOptions import BuiltinOptions as OptionsType
from tflite.TensorType import TensorType

# Ops whose int8 kernels require the output to carry the input's scale and zero point (TFLite Prepare() checks).
SAME_QUANT_CODES = {Code.MAX_POOL_2D, Code.AVERAGE_POOL_2D, Code.RESHAPE, Code.TRANSPOSE, Code.PAD, Code.CONCATENATION}
# Operator versions the converter assigns to int8 variants (per-channel conv needs v3); float graphs use v1.
_INT8_VERSIONS = {Code.CONV_2D: 3, Code.DEPTHWISE_CONV_2D: 3, Code.FULLY_CONNECTED: 4}
_INT8_VERSIONS.update(
    dict.fromkeys(SAME_QUANT_CODES | {Code.ADD, Code.MUL, Code.MEAN, Code.LOGISTIC, Code.RELU, Code.RELU6}, 2)
)
_INT8_VERSIONS[Code.RESHAPE] = 1
OptionsBuilder = Callable[[flatbuffers.Builder], int]


@dataclass
class GraphTensor:
    name: str
    shape: tuple[int, ...]
    role: str  # "act" | "weight" | "bias" | "const" | "int32"
    data: np.ndarray | None = None
    quant_dim: int = 0
    per_channel: bool = False
    bias_of: tuple[int, int] = (-1, -1)  # (activation input, weight) whose scales multiply into a bias scale


@dataclass
class GraphOp:
    code: int
    inputs: list[int]
    outputs: list[int]
    options_type: int = OptionsType.NONE
    options: OptionsBuilder | None = None


@dataclass
class TFLiteGraph:
    rng: np.random.Generator
    tensors: list[GraphTensor] = field(default_factory=list)
    ops: list[GraphOp] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(self, shape: Sequence[int], role: str = "act", data: np.ndarray | None = None, **kw: Any) -> int:
        self.tensors.append(GraphTensor(f"t{len(self.tensors)}", tuple(int(s) for s in shape), role, data, **kw))
        return len(self.tensors) - 1

    def input(self, shape: Sequence[int]) -> int:
        index = self.tensor(shape)
        self.inputs.append(index)
        return index

    def op(
        self, code: int, inputs: list[int], out_shape: Sequence[int], options: tuple[int, OptionsBuilder] | None = None
    ) -> int:
        out = self.tensor(out_shape)
        options_type, build = options if options else (OptionsType.NONE, None)
        self.ops.append(GraphOp(code, inputs, [out], options_type, build))
        return out

    def const(self, values: np.ndarray, role: str = "const") -> int:
        return self.tensor(values.shape, role, values)

    def shape_of(self, index: int) -> tuple[int, ...]:
        return self.tensors[index].shape


def _affine(lo: float, hi: float) -> tuple[float, int]:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


def _activation_quant(g: TFLiteGraph, ranges: dict[int, tuple[float, float]]) -> dict[int, tuple[float, int]]:
    quant: dict[int, tuple[float, int]] = {}
    for index in g.inputs:  # all inputs share one scale so CONCATENATION needs no rescaling
        quant[index] = _affine(-1.0, 1.0)
    for op in g.ops:
        out = op.outputs[0]
        if op.code in SAME_QUANT_CODES:
            quant[out] = quant[op.inputs[0]]
        elif op.code == Code.LOGISTIC:
            quant[out] = (1.0 / 256.0, -128)  # the int8 LOGISTIC kernel accepts only this output quantisation
        else:
            quant[out] = _affine(*ranges[out])
    return quant


def _quantized(
    tensor: GraphTensor, quant: dict[int, tuple[float, int]], g: TFLiteGraph
) -> tuple[np.ndarray, np.ndarray, int]:
    """(data, scales, quantized_dimension) for a constant of an int8 graph."""
    assert tensor.data is not None
    values = tensor.data
    if tensor.role == "weight":
        axis = tensor.quant_dim
        if tensor.per_channel:
            reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
            scales = np.maximum(np.abs(values).max(axis=reduce_axes), 1e-8) / 127.0
            shape = [1] * values.ndim
            shape[axis] = -1
            data = np.clip(np.round(values / scales.reshape(shape)), -127, 127).astype(np.int8)
            return data, scales.astype(np.float32), axis
        scale = max(float(np.abs(values).max()), 1e-8) / 127.0
        return np.clip(np.round(values / scale), -127, 127).astype(np.int8), np.array([scale], np.float32), 0
    if tensor.role == "bias":
        source, weight = tensor.bias_of
        _, weight_scales, _ = _quantized(g.tensors[weight], quant, g)
        scales = (quant[source][0] * weight_scales).astype(np.float32)
        return np.round(values / scales).astype(np.int32), scales, 0
    scale = max(float(np.abs(values).max()), 1e-8) / 127.0
    return np.clip(np.round(values / scale), -127, 127).astype(np.int8), np.array([scale], np.float32), 0


def _vector(b: flatbuffers.Builder, values: np.ndarray, alignment: int = 4) -> int:
    raw = np.ascontiguousarray(values).tobytes()
    b.StartVector(values.dtype.itemsize, values.size, alignment)
    b.head = b.head - len(raw)
    b.Bytes[b.head : b.head + len(raw)] = raw
    return int(b.EndVector())


def _offsets(b: flatbuffers.Builder, offsets: Sequence[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return int(b.EndVector())


def serialize_graph(g: TFLiteGraph, *, int8: bool, ranges: dict[int, tuple[float, float]] | None = None) -> bytes:
    b = flatbuffers.Builder(1024)
    quant = _activation_quant(g, ranges or {}) if int8 else {}
    buffers: list[int] = []
    tflite.BufferStart(b)
    buffers.append(tflite.BufferEnd(b))  # buffer 0 is the empty sentinel by convention
    tensors = []
    for index, tensor in enumerate(g.tensors):
        scales: np.ndarray | None = None
        zero_points = np.zeros(1, np.int64)
        quant_dim = 0
        if tensor.data is None:
            dtype = TensorType.INT8 if int8 else TensorType.FLOAT32
            buffer_index = 0
            if int8:
                scale, zero_point = quant[index]
                scales, zero_points = np.array([scale], np.float32), np.array([zero_point], np.int64)
        else:
            data = tensor.data
            if tensor.role == "int32":
                dtype = TensorType.INT32
            elif int8:
                data, scales, quant_dim = _quantized(tensor, quant, g)
                zero_points = np.zeros(scales.size, np.int64)
                dtype = TensorType.INT32 if tensor.role == "bias" else TensorType.INT8
            else:
                dtype = TensorType.FLOAT32
            data_offset = _vector(b, np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8), alignment=16)
            tflite.BufferStart(b)
            tflite.BufferAddData(b, data_offset)
            buffers.append(tflite.BufferEnd(b))
            buffer_index = len(buffers) - 1
        quant_offset = None
        if scales is not None:
            scale_vec, zero_vec = _vector(b, scales.astype(np.float32)), _vector(b, zero_points, alignment=8)
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale_vec)
            tflite.QuantizationParametersAddZeroPoint(b, zero_vec)
            tflite.QuantizationParametersAddQuantizedDimension(b, quant_dim)
            quant_offset = tflite.QuantizationParametersEnd(b)
        name = b.CreateString(tensor.name)
        shape = _vector(b, np.array(tensor.shape, np.int32))
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, dtype)
        tflite.TensorAddBuffer(b, buffer_index)
        tflite.TensorAddName(b, name)
        if quant_offset is not None:
            tflite.TensorAddQuantization(b, quant_offset)
        tensors.append(tflite.TensorEnd(b))

    codes = sorted({op.code for op in g.ops})
    operators = []
    for op in g.ops:
        options = op.options(b) if op.options else None
        inputs, outputs = _vector(b, np.array(op.inputs, np.int32)), _vector(b, np.array(op.outputs, np.int32))
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, codes.index(op.code))
        tflite.OperatorAddInputs(b, inputs)
        tflite.OperatorAddOutputs(b, outputs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(b, op.options_type)
            tflite.OperatorAddBuiltinOptions(b, options)
        operators.append(tflite.OperatorEnd(b))

    subgraph_vectors = [_offsets(b, tensors), _vector(b, np.array(g.inputs, np.int32))]
    subgraph_vectors += [_vector(b, np.array(g.outputs, np.int32)), _offsets(b, operators), b.CreateString("main")]
    tflite.SubGraphStart(b)
    for add, offset in zip(
        (tflite.SubGraphAddTensors, tflite.SubGraphAddInputs, tflite.SubGraphAddOutputs, tflite.SubGraphAddOperators),
        subgraph_vectors,
        strict=False,
    ):
        add(b, offset)
    tflite.SubGraphAddName(b, subgraph_vectors[4])
    subgraph = tflite.SubGraphEnd(b)

    code_offsets = []
    for code in codes:
        tflite.OperatorCodeStart(b)
        # Codes above 127 live only in builtin_code; the int8 field keeps the placeholder for old readers.
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, Code.PLACEHOLDER_FOR_GREATER_OP_CODES))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, _INT8_VERSIONS.get(code, 1) if int8 else 1)
        code_offsets.append(tflite.OperatorCodeEnd(b))
    codes_vec, subgraphs_vec, buffers_vec = _offsets(b, code_offsets), _offsets(b, [subgraph]), _offsets(b, buffers)
    description = b.CreateString("figs-nas tflite_builder")
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


__all__ = ["SAME_QUANT_CODES", "GraphOp", "GraphTensor", "OptionsBuilder", "TFLiteGraph", "serialize_graph"]
