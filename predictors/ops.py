"""Operator catalogue: typed, validated operator variants with a canonical JSON form and a stable hash.

Every spec is a frozen dataclass registered under its ``kind`` (the ``"op"`` key of its JSON form).  Tensors are
NCHW with square spatial size ``hw``; convolutions and pools pad by ``k // 2`` ("same" for odd kernels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "hardswish", "hardsigmoid", "sigmoid", "silu")
DTYPES: tuple[str, ...] = ("float32",)
DTYPE_BYTES: dict[str, int] = {"float32": 4}
# Largest tensor (in elements) a spec may describe; the service may lower it through settings.
DEFAULT_MAX_ELEMENTS = 1 << 26

OPERATORS: dict[str, type[OpSpec]] = {}


class OpSpecError(ValueError):
    """An operator spec is invalid; ``field`` names the offending field (``"op"`` for the kind itself)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def register_operator(cls: type[OpSpec]) -> type[OpSpec]:
    if cls.kind in OPERATORS:
        raise ValueError(f"operator {cls.kind!r} registered twice")
    OPERATORS[cls.kind] = cls
    return cls


def _conv_out(hw: int, k: int, stride: int) -> int:
    return (hw + 2 * (k // 2) - k) // stride + 1


@dataclass(frozen=True, kw_only=True)
class OpSpec:
    """Base of all operator variants.  Subclasses add their shape fields."""

    kind: ClassVar[str] = ""
    batch: int = 1
    dtype: str = "float32"

    # ---- construction and validation -------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dtype":
                if value not in DTYPES:
                    raise OpSpecError("dtype", f"must be one of {', '.join(DTYPES)}, got {value!r}")
            elif f.name == "act":
                if value is not None and value not in ACTIVATIONS:
                    raise OpSpecError("act", f"must be null or one of {', '.join(ACTIVATIONS)}, got {value!r}")
            elif f.name == "bn":
                if not isinstance(value, bool):
                    raise OpSpecError("bn", "must be a boolean")
            elif f.name == "cins":
                if not isinstance(value, tuple) or len(value) < 2:
                    raise OpSpecError("cins", "must list at least two input channel counts")
                for c in value:
                    if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
                        raise OpSpecError("cins", f"channel counts must be positive integers, got {c!r}")
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise OpSpecError(f.name, f"must be an integer, got {value!r}")
                if value <= 0:
                    raise OpSpecError(f.name, f"must be positive, got {value}")
        self._validate()

    def _validate(self) -> None:
        """Kind-specific checks; raise OpSpecError naming the field."""

    def check_size(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        """Refuse specs whose largest tensor exceeds ``max_elements`` (a configurable cap)."""
        for shape in [*self.input_shapes(), self.output_shape(), *self.weight_shapes()]:
            if math.prod(shape) > max_elements:
                raise OpSpecError("hw" if len(shape) == 4 else "cin", f"tensor {shape} exceeds {max_elements} elements")

    # ---- canonical form -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        """Stable hash of the canonical JSON: equal specs have equal keys across processes and versions."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]

    def replace(self, **changes: Any) -> OpSpec:
        return dataclasses.replace(self, **changes)

    # ---- shapes and costs -----------------------------------------------------------------------------------
    def input_shapes(self) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def output_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def weight_shapes(self) -> list[tuple[int, ...]]:
        return []

    def flops(self) -> int:
        """Multiply-adds counted as two FLOPs; elementwise ops count one per output element."""
        return math.prod(self.output_shape())

    def params(self) -> int:
        return sum(math.prod(s) for s in self.weight_shapes())

    def bytes_moved(self) -> int:
        """Bytes read and written once: inputs, weights and output."""
        elements = sum(math.prod(s) for s in self.input_shapes()) + self.params() + math.prod(self.output_shape())
        return elements * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, kw_only=True)
class _Spatial(OpSpec):
    """An op over one NCHW tensor of ``c`` channels and size ``hw`` that keeps its shape."""

    c: int
    hw: int

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, self.c, self.hw, self.hw)]

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.c, self.hw, self.hw)


@register_operator
@dataclass(frozen=True, kw_only=True)
class Conv2d(OpSpec):
    """Convolution, optionally with folded batch-norm and a fused activation (one conv-bn-act kernel)."""

    kind: ClassVar[str] = "conv2d"
    cin: int
    cout: int
    hw: int
    k: int = 3
    stride: int = 1
    groups: int = 1
    bn: bool = False
    act: str | None = None

    def _validate(self) -> None:
        if self.k > self.hw:
            raise OpSpecError("k", f"kernel {self.k} is larger than the input ({self.hw})")
        if self.stride > self.k and self.k > 1:
            raise OpSpecError("stride", f"stride {self.stride} skips input pixels with kernel {self.k}")
        if self.cin % self.groups:
            raise OpSpecError("groups", f"cin {self.cin} is not divisible by groups {self.groups}")
        if self.cout % self.groups:
            raise OpSpecError("groups", f"cout {self.cout} is not divisible by groups {self.groups}")

    @property
    def depthwise(self) -> bool:
        return self.groups == self.cin == self.cout and self.groups > 1

    @property
    def out_hw(self) -> int:
        return _conv_out(self.hw, self.k, self.stride)

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, self.cin, self.hw, self.hw)]

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.cout, self.out_hw, self.out_hw)

    def weight_shapes(self) -> list[tuple[int, ...]]:
        # BN folds into the conv weights and bias at export, so it adds no weights of its own.
        return [(self.cout, self.cin // self.groups, self.k, self.k), (self.cout,)]

    def flops(self) -> int:
        macs = self.batch * self.cout * self.out_hw**2 * (self.cin // self.groups) * self.k**2
        return 2 * macs

    def resized(self, cin: int, cout: int) -> Conv2d:
        """The same layer with other channel counts; depthwise stays depthwise."""
        if self.depthwise:
            return dataclasses.replace(self, cin=cout, cout=cout, groups=cout)
        groups = self.groups if cin % self.groups == 0 and cout % self.groups == 0 else 1
        return dataclasses.replace(self, cin=cin, cout=cout, groups=groups)


@register_operator
@dataclass(frozen=True, kw_only=True)
class Linear(OpSpec):
    kind: ClassVar[str] = "linear"
    cin: int
    cout: int
    act: str | None = None

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, self.cin)]

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.cout)

    def weight_shapes(self) -> list[tuple[int, ...]]:
        return [(self.cout, self.cin), (self.cout,)]

    def flops(self) -> int:
        return 2 * self.batch * self.cin * self.cout

    def resized(self, cin: int, cout: int) -> Linear:
        return dataclasses.replace(self, cin=cin, cout=cout)


@register_operator
@dataclass(frozen=True, kw_only=True)
class BatchNorm(_Spatial):
    kind: ClassVar[str] = "batchnorm"

    def weight_shapes(self) -> list[tuple[int, ...]]:
        return [(self.c,)] * 4

    def flops(self) -> int:
        return 2 * math.prod(self.output_shape())


def _activation(name: str) -> type[OpSpec]:
    cls = dataclasses.make_dataclass(
        name.capitalize(), [], bases=(_Spatial,), frozen=True, kw_only=True, namespace={"kind": name}
    )
    cls.__module__ = __name__
    cls.__doc__ = f"Elementwise {name} over a c×hw×hw tensor."
    return register_operator(cls)


Relu, Relu6, Hardswish, Hardsigmoid, Sigmoid, Silu = (_activation(a) for a in ACTIVATIONS)


@dataclass(frozen=True, kw_only=True)
class _Pool(_Spatial):
    k: int = 2
    stride: int = 2

    def _validate(self) -> None:
        if self.k > self.hw:
            raise OpSpecError("k", f"kernel {self.k} is larger than the input ({self.hw})")

    @property
    def out_hw(self) -> int:
        return _conv_out(self.hw, self.k, self.stride)

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.c, self.out_hw, self.out_hw)

    def flops(self) -> int:
        return math.prod(self.output_shape()) * self.k * self.k


@register_operator
@dataclass(frozen=True, kw_only=True)
class MaxPool(_Pool):
    kind: ClassVar[str] = "maxpool"


@register_operator
@dataclass(frozen=True, kw_only=True)
class AvgPool(_Pool):
    kind: ClassVar[str] = "avgpool"


@register_operator
@dataclass(frozen=True, kw_only=True)
class GlobalAvgPool(_Spatial):
    kind: ClassVar[str] = "global_avgpool"

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, self.c, 1, 1)

    def flops(self) -> int:
        return math.prod(self.input_shapes()[0])


@register_operator
@dataclass(frozen=True, kw_only=True)
class Add(_Spatial):
    """Elementwise sum of two equal tensors (a residual connection)."""

    kind: ClassVar[str] = "add"

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, self.c, self.hw, self.hw)] * 2


@register_operator
@dataclass(frozen=True, kw_only=True)
class Mul(_Spatial):
    """Channel-wise scale: a c×hw×hw tensor times a c×1×1 one, as in squeeze-excitation."""

    kind: ClassVar[str] = "mul"

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, self.c, self.hw, self.hw), (self.batch, self.c, 1, 1)]


@register_operator
@dataclass(frozen=True, kw_only=True)
class Concat(OpSpec):
    """Concatenation along channels of tensors with ``cins`` channels each."""

    kind: ClassVar[str] = "concat"
    cins: tuple[int, ...]
    hw: int

    def input_shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch, c, self.hw, self.hw) for c in self.cins]

    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, sum(self.cins), self.hw, self.hw)


@register_operator
@dataclass(frozen=True, kw_only=True)
class ChannelShuffle(_Spatial):
    kind: ClassVar[str] = "channel_shuffle"
    groups: int = 2

    def _validate(self) -> None:
        if self.c % self.groups:
            raise OpSpecError("groups", f"c {self.c} is not divisible by groups {self.groups}")


_ALIASES: dict[str, str] = {"kind": "op"}


def op_from_dict(data: Mapping[str, Any], *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> OpSpec:
    """Parse and validate an OpSpec from its JSON form ``{"op": kind, ...fields}``.

    Raises:
        OpSpecError: naming the field that is missing, unknown or invalid.
    """
    if not isinstance(data, Mapping):
        raise OpSpecError("op", "an operator spec must be a JSON object")
    kind = data.get("op")
    if kind is None:
        raise OpSpecError("op", "missing operator kind")
    cls = OPERATORS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise OpSpecError("op", f"unknown operator kind {kind!r}; known: {', '.join(sorted(OPERATORS))}")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "op":
            continue
        if name not in known:
            raise OpSpecError(name, f"unknown field for {kind}")
        kwargs[name] = tuple(value) if name == "cins" and isinstance(value, list) else value
    for name, f in known.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise OpSpecError(name, f"required for {kind}")
    spec = cls(**kwargs)
    spec.check_size(max_elements)
    return spec


def op_from_json(text: str) -> OpSpec:
    return op_from_dict(json.loads(text))


__all__ = [
    "ACTIVATIONS",
    "OPERATORS",
    "Add",
    "AvgPool",
    "BatchNorm",
    "ChannelShuffle",
    "Concat",
    "Conv2d",
    "GlobalAvgPool",
    "Linear",
    "MaxPool",
    "Mul",
    "OpSpec",
    "OpSpecError",
    "op_from_dict",
    "op_from_json",
    "register_operator",
]
