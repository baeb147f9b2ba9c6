"""Physically meaningful feature vectors per operator kind, computed column-wise in numpy.

Beyond nn-Meter's conv features (HW, Cin, Cout, K, S, FLOPs, params) these carry what makes latency a staircase on
ONNX Runtime's CPU kernels: NCHWc blocks channels by 8 (AVX2) or 16 (AVX-512), so a 1x1 conv 64->c at 28 px takes
28 us for c <= 16, ~35 us for 20-32 and 45-62 us for 36-48 here, and a cin off a multiple of 16 costs up to 40 %
more.  Channel counts modulo 4/8/16, channels rounded up to 8/16 and the FLOPs of that padded work let a tree put its
splits on the steps; FLOPs, bytes moved and arithmetic intensity give the roofline its two axes.

The search client asks for ~100k conv variants at a time (tables over channel grids), so convolutions and linear
layers are featurised with vectorised formulas; a test checks them against ``OpSpec.flops()`` and ``bytes_moved()``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from predictors.ops import ACTIVATIONS, DTYPE_BYTES, OPERATORS, Concat, Conv2d, Linear, OpSpec

Columns = dict[str, np.ndarray]

_ACT_INDEX: dict[str | None, int] = {None: -1, **{a: i for i, a in enumerate(ACTIVATIONS)}}
_ACT_NAMES = ["has_act", *(f"act_{a}" for a in ACTIVATIONS)]
_BLOCKS = (4, 8, 16)


def _channel_names(prefix: str) -> list[str]:
    return [*(f"{prefix}_mod{b}" for b in _BLOCKS), f"{prefix}_ceil8", f"{prefix}_ceil16"]


def _ceil_to(c: np.ndarray, block: int) -> np.ndarray:
    result: np.ndarray = np.ceil(c / block) * block
    return result


def _channel_columns(prefix: str, c: np.ndarray) -> Columns:
    cols = {f"{prefix}_mod{b}": c % b for b in _BLOCKS}
    cols[f"{prefix}_ceil8"] = _ceil_to(c, 8)
    cols[f"{prefix}_ceil16"] = _ceil_to(c, 16)
    return cols


def _act_columns(act_index: np.ndarray) -> Columns:
    cols = {"has_act": (act_index >= 0).astype(np.float64)}
    for i, a in enumerate(ACTIVATIONS):
        cols[f"act_{a}"] = (act_index == i).astype(np.float64)
    return cols


def _intensity(flops: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    result: np.ndarray = flops / np.maximum(nbytes, 1.0)
    return result


# ---- conv2d ---------------------------------------------------------------------------------------------------
# Kernel classes inside conv2d: onnxruntime runs each through a different code path (depthwise NCHWc kernel,
# 1x1 as a GEMM, k x k NCHWc direct convolution, grouped convolution), each with its own attainable FLOP rate.
CONV_DENSE, CONV_POINTWISE, CONV_DEPTHWISE, CONV_GROUPED = 0, 1, 2, 3

CONV_FEATURES: list[str] = [
    "batch", "cin", "cout", "hw", "out_hw", "k", "stride", "groups", "cin_per_group", "cout_per_group",
    "depthwise", "conv_class", "bn", *_ACT_NAMES, "flops", "params", "bytes", "arithmetic_intensity", "in_elements",
    "out_elements", *_channel_names("cin"), *_channel_names("cout"), "flops_pad8", "flops_pad16",
]  # fmt: skip


def _conv_columns(ops: Sequence[OpSpec]) -> Columns:
    raw = np.array(
        [
            (o.batch, o.cin, o.cout, o.hw, o.k, o.stride, o.groups, o.bn, _ACT_INDEX[o.act], DTYPE_BYTES[o.dtype])
            for o in ops
            if isinstance(o, Conv2d)
        ],
        dtype=np.float64,
    ).reshape(-1, 10)
    batch, cin, cout, hw, k, stride, groups, bn, act, dtype_bytes = raw.T
    out_hw = np.floor((hw + 2 * np.floor(k / 2) - k) / stride) + 1
    cin_pg, cout_pg = cin / groups, cout / groups
    depthwise = ((groups == cin) & (groups == cout) & (groups > 1)).astype(np.float64)
    conv_class = np.select(
        [depthwise > 0, groups > 1, k == 1], [CONV_DEPTHWISE, CONV_GROUPED, CONV_POINTWISE], default=CONV_DENSE
    )
    pixels = batch * out_hw**2 * k**2
    params = cout * cin_pg * k**2 + cout
    in_el, out_el = batch * cin * hw**2, batch * cout * out_hw**2
    flops = 2 * pixels * cout * cin_pg
    nbytes = (in_el + params + out_el) * dtype_bytes

    def padded(block: int) -> np.ndarray:
        # A depthwise kernel works per channel block; a dense one pads both channel axes of the weight.
        dense: np.ndarray = 2 * pixels * _ceil_to(cout, block) * _ceil_to(cin, block) / groups
        return np.where(depthwise > 0, 2 * pixels * _ceil_to(cout, block), dense)

    return {
        "batch": batch, "cin": cin, "cout": cout, "hw": hw, "out_hw": out_hw, "k": k, "stride": stride,
        "groups": groups, "cin_per_group": cin_pg, "cout_per_group": cout_pg, "depthwise": depthwise,
        "conv_class": conv_class, "bn": bn,
        **_act_columns(act), "flops": flops, "params": params, "bytes": nbytes,
        "arithmetic_intensity": _intensity(flops, nbytes), "in_elements": in_el, "out_elements": out_el,
        **_channel_columns("cin", cin), **_channel_columns("cout", cout),
        "flops_pad8": padded(8), "flops_pad16": padded(16),
    }  # fmt: skip


# ---- linear ---------------------------------------------------------------------------------------------------
LINEAR_FEATURES: list[str] = [
    "batch", "cin", "cout", *_ACT_NAMES, "flops", "params", "bytes", "arithmetic_intensity",
    *_channel_names("cin"), *_channel_names("cout"), "flops_pad8", "flops_pad16",
]  # fmt: skip


def _linear_columns(ops: Sequence[OpSpec]) -> Columns:
    raw = np.array(
        [(o.batch, o.cin, o.cout, _ACT_INDEX[o.act], DTYPE_BYTES[o.dtype]) for o in ops if isinstance(o, Linear)],
        dtype=np.float64,
    ).reshape(-1, 5)
    batch, cin, cout, act, dtype_bytes = raw.T
    params = cin * cout + cout
    flops = 2 * batch * cin * cout
    nbytes = (batch * cin + params + batch * cout) * dtype_bytes
    return {
        "batch": batch, "cin": cin, "cout": cout, **_act_columns(act), "flops": flops, "params": params,
        "bytes": nbytes, "arithmetic_intensity": _intensity(flops, nbytes),
        **_channel_columns("cin", cin), **_channel_columns("cout", cout),
        "flops_pad8": 2 * batch * _ceil_to(cin, 8) * _ceil_to(cout, 8),
        "flops_pad16": 2 * batch * _ceil_to(cin, 16) * _ceil_to(cout, 16),
    }  # fmt: skip


# ---- concat ---------------------------------------------------------------------------------------------------
CONCAT_FEATURES: list[str] = [
    "batch", "n_inputs", "c_total", "c_min", "c_max", "hw", "inputs_off8", "inputs_off16", "flops", "bytes",
    "arithmetic_intensity", "out_elements", *_channel_names("c_total"),
]  # fmt: skip


def _concat_columns(ops: Sequence[OpSpec]) -> Columns:
    rows = []
    for o in ops:
        assert isinstance(o, Concat)
        cins = np.asarray(o.cins)
        rows.append((o.batch, len(cins), cins.sum(), cins.min(), cins.max(), o.hw, (cins % 8 != 0).sum(),
                     (cins % 16 != 0).sum(), o.flops(), o.bytes_moved()))  # fmt: skip
    raw = np.array(rows, dtype=np.float64).reshape(-1, 10)
    batch, n_inputs, c_total, c_min, c_max, hw, off8, off16, flops, nbytes = raw.T
    return {
        "batch": batch, "n_inputs": n_inputs, "c_total": c_total, "c_min": c_min, "c_max": c_max, "hw": hw,
        "inputs_off8": off8, "inputs_off16": off16, "flops": flops, "bytes": nbytes,
        "arithmetic_intensity": _intensity(flops, nbytes), "out_elements": batch * c_total * hw**2,
        **_channel_columns("c_total", c_total),
    }  # fmt: skip


# ---- single-tensor ops (batchnorm, activations, pools, add, mul, shuffle) and kinds registered later -------------
_COST_FEATURES = ["flops", "params", "bytes", "arithmetic_intensity", "in_elements", "out_elements"]


def _shape_fields(kind: str) -> list[str]:
    # Integer and boolean fields are shapes and flags; others (dtype, act, lists) are encoded separately or not.
    return [f.name for f in dataclasses.fields(OPERATORS[kind]) if f.type in ("int", "bool", int, bool)]


def _generic_names(kind: str) -> list[str]:
    names = _shape_fields(kind)
    if "act" in {f.name for f in dataclasses.fields(OPERATORS[kind])}:
        names += _ACT_NAMES
    names += _COST_FEATURES
    if "c" in names and "hw" in names:
        names += [*_channel_names("c"), "elements_pad16"]
    return names


def _generic_columns(ops: Sequence[OpSpec]) -> Columns:
    kind = ops[0].kind
    names = _generic_names(kind)
    cols: Columns = {n: np.array([float(getattr(o, n)) for o in ops]) for n in _shape_fields(kind)}
    if "has_act" in names:
        cols.update(_act_columns(np.array([_ACT_INDEX[getattr(o, "act", None)] for o in ops], dtype=np.float64)))
    flops = np.array([float(o.flops()) for o in ops])
    nbytes = np.array([float(o.bytes_moved()) for o in ops])
    cols.update({
        "flops": flops, "params": np.array([float(o.params()) for o in ops]), "bytes": nbytes,
        "arithmetic_intensity": _intensity(flops, nbytes),
        "in_elements": np.array([float(sum(np.prod(s) for s in o.input_shapes())) for o in ops]),
        "out_elements": np.array([float(np.prod(o.output_shape())) for o in ops]),
    })  # fmt: skip
    if "c_mod16" in names:
        cols.update(_channel_columns("c", cols["c"]))
        cols["elements_pad16"] = cols["batch"] * _ceil_to(cols["c"], 16) * cols["hw"] ** 2
    return cols


_SPECIFIC: dict[str, tuple[list[str], Callable[[Sequence[OpSpec]], Columns]]] = {
    Conv2d.kind: (CONV_FEATURES, _conv_columns),
    Linear.kind: (LINEAR_FEATURES, _linear_columns),
    Concat.kind: (CONCAT_FEATURES, _concat_columns),
}


def feature_names(kind: str) -> list[str]:
    """Column names of :func:`feature_matrix` for one operator kind.

    Raises:
        KeyError: ``kind`` is not a registered operator kind.
    """
    if kind in _SPECIFIC:
        return list(_SPECIFIC[kind][0])
    if kind not in OPERATORS:
        raise KeyError(f"unknown operator kind {kind!r}")
    return _generic_names(kind)


def compute_columns(kind: str) -> list[str]:
    """Feature columns a roofline may use as its compute axis: raw FLOPs and, where channels block, padded work."""
    names = feature_names(kind)
    return [n for n in ("flops", "flops_pad16") if n in names]


def class_column(kind: str) -> str | None:
    """The feature that splits a kind into kernel classes fitted with separate roofline terms, if it has one."""
    return "conv_class" if kind == Conv2d.kind else None


def feature_matrix(ops: Sequence[OpSpec]) -> np.ndarray:
    """Rows of features for ops that all share one kind; shape (len(ops), len(feature_names(kind))).

    Raises:
        ValueError: ``ops`` is empty or mixes kinds.
    """
    if not ops:
        raise ValueError("ops: need at least one operator to featurise")
    kind = ops[0].kind
    if any(o.kind != kind for o in ops):
        raise ValueError(f"ops: feature_matrix takes one kind at a time, got {sorted({o.kind for o in ops})}")
    names = feature_names(kind)
    columns = _SPECIFIC[kind][1](ops) if kind in _SPECIFIC else _generic_columns(ops)
    return np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in names])


def feature_vector(op: OpSpec) -> np.ndarray:
    result: np.ndarray = feature_matrix([op])[0]
    return result


__all__ = [
    "CONV_DENSE",
    "CONV_DEPTHWISE",
    "CONV_GROUPED",
    "CONV_POINTWISE",
    "class_column",
    "compute_columns",
    "feature_matrix",
    "feature_names",
    "feature_vector",
]
