"""Named operator grids a new device is profiled with.

``smoke`` is a few dozen small variants that touch every operator kind (a minute at most).  ``standard`` is a prior
over the layers real CNNs are made of — MobileNet V2/V3, MNASNet, ResNet, ShuffleNet V2, EfficientNet, RegNet,
DenseNet and VGG at input resolutions from 32 to 224 — plus dense channel sweeps where latency is a staircase in the
channel count.  Grids are drawn from a seeded generator, so a preset is the same list on every machine and run.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    OpSpecError,
)

# Layers above this cost are rarer in the target networks than they are slow to time (VGG-at-224 territory).
MAX_VARIANT_FLOPS = 1_500_000_000
# Keeps session build and weight generation of one variant under ~0.5 s.
MAX_VARIANT_PARAMS = 12_000_000


class UnknownPresetError(ValueError):
    """No preset has this name; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(f"preset: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        self.field = "preset"
        self.name = name


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[], list[OpSpec]]


def _activation_class(name: str) -> Callable[..., OpSpec]:
    # The activation classes are generated at import, so their (c, hw) fields are invisible to the type checker.
    return OPERATORS[name]


# ---- smoke ----------------------------------------------------------------------------------------------------------
def _smoke() -> list[OpSpec]:
    ops: list[OpSpec] = [
        Conv2d(cin=16, cout=32, hw=14, k=1, bn=True, act="relu"),
        Conv2d(cin=16, cout=20, hw=14, k=1, bn=True, act=None),
        Conv2d(cin=24, cout=24, hw=14, k=1, bn=True, act="relu6"),
        Conv2d(cin=16, cout=16, hw=14, k=3, bn=True, act="hardswish"),
        Conv2d(cin=16, cout=32, hw=14, k=3, stride=2, bn=True, act="silu"),
        Conv2d(cin=3, cout=16, hw=32, k=3, stride=2, bn=True, act="relu"),
        Conv2d(cin=32, cout=32, hw=14, k=3, groups=32, bn=True, act="relu6"),
        Conv2d(cin=32, cout=32, hw=14, k=5, stride=2, groups=32, bn=True, act="hardswish"),
        Conv2d(cin=32, cout=32, hw=14, k=3, groups=4, bn=True, act="relu"),
        Conv2d(cin=32, cout=8, hw=1, k=1, act="relu"),
        Conv2d(cin=8, cout=32, hw=1, k=1, act="hardsigmoid"),
        Conv2d(cin=8, cout=32, hw=1, k=1, act="sigmoid"),
        Linear(cin=64, cout=10),
        Linear(cin=256, cout=128, act="relu"),
        BatchNorm(c=32, hw=14),
        BatchNorm(c=64, hw=7),
        MaxPool(c=16, hw=16, k=3, stride=2),
        MaxPool(c=32, hw=14, k=2, stride=2),
        AvgPool(c=16, hw=16, k=2, stride=2),
        AvgPool(c=32, hw=14, k=3, stride=1),
        GlobalAvgPool(c=64, hw=7),
        GlobalAvgPool(c=32, hw=14),
        Add(c=16, hw=14),
        Add(c=64, hw=7),
        Mul(c=32, hw=14),
        Mul(c=64, hw=7),
        Concat(cins=(16, 16), hw=14),
        Concat(cins=(32, 8, 8), hw=7),
        ChannelShuffle(c=32, hw=14, groups=2),
        ChannelShuffle(c=48, hw=7, groups=4),
    ]
    ops += [_activation_class(act)(c=32, hw=14) for act in ACTIVATIONS]
    return ops


# ---- standard -------------------------------------------------------------------------------------------------------
# (downsampling level from the input, smallest and largest channel count seen there) across the target families.
_STAGES: tuple[tuple[int, int, int], ...] = (
    (1, 8, 96),
    (2, 16, 192),
    (3, 24, 384),
    (4, 40, 768),
    (5, 64, 1280),
)
_INPUT_RESOLUTIONS: tuple[int, ...] = (224, 224, 224, 192, 160, 128, 96, 64, 32, 32)
_CONV_ACTS: tuple[tuple[str | None, float], ...] = (
    ("relu", 0.32),
    (None, 0.22),
    ("relu6", 0.16),
    ("hardswish", 0.14),
    ("silu", 0.14),
    ("sigmoid", 0.01),
    ("hardsigmoid", 0.01),
)


class _Sampler:
    """Seeded draws from the layer prior; every draw is a valid spec (invalid ones are redrawn)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def stage(self) -> tuple[int, int, int]:
        level, lo, hi = self.rng.choice(_STAGES)
        resolution = self.rng.choice(_INPUT_RESOLUTIONS)
        hw = max(1, math.ceil(resolution / 2**level))
        if resolution <= 64:
            # CIFAR-style nets downsample less: the same channel counts meet larger maps than at 224.
            hw = max(1, math.ceil(resolution / 2 ** max(0, level - 1)))
        return hw, lo, hi

    def channels(self, lo: int, hi: int) -> int:
        """Log-uniform in [lo, hi]; 70 % rounded to a multiple of 8 as designed nets are, 30 % any count as pruned
        or searched nets end up with (the runtime's channel blocking makes those the expensive side of a step)."""
        value = math.exp(self.rng.uniform(math.log(lo), math.log(hi)))
        if self.rng.random() < 0.7:
            return max(8, round(value / 8) * 8)
        return max(1, round(value))

    def act(self) -> str | None:
        names = [a for a, _ in _CONV_ACTS]
        return self.rng.choices(names, weights=[w for _, w in _CONV_ACTS])[0]

    def pointwise(self) -> Conv2d:
        hw, lo, hi = self.stage()
        if self.rng.random() < 0.08:
            # Squeeze-excitation reduce/expand convs run on a 1x1 map.
            c = self.channels(lo * 2, hi)
            squeezed = max(8, c // self.rng.choice((4, 4, 16)))
            expand = self.rng.random() < 0.5
            return Conv2d(
                cin=squeezed if expand else c,
                cout=c if expand else squeezed,
                hw=1,
                k=1,
                bn=False,
                act=self.rng.choice(("hardsigmoid", "sigmoid")) if expand else self.rng.choice(("relu", "silu")),
            )
        return Conv2d(cin=self.channels(lo, hi), cout=self.channels(lo, hi), hw=hw, k=1, bn=True, act=self.act())

    def dense(self) -> Conv2d:
        if self.rng.random() < 0.15:
            # Stems: RGB in, stride 2 (3x3, or ResNet's 7x7).
            resolution = self.rng.choice(_INPUT_RESOLUTIONS)
            k = self.rng.choice((3, 3, 3, 7))
            return Conv2d(
                cin=3,
                cout=self.channels(8, 64),
                hw=resolution,
                k=k,
                stride=2 if resolution > 32 else 1,
                bn=True,
                act=self.act() or "relu",
            )
        hw, lo, hi = self.stage()
        # Maps of 1-2 pixels (32 px inputs, last stage) only take pointwise kernels.
        k = self.rng.choice((3, 3, 3, 3, 3, 5)) if hw >= 3 else 1
        k = 3 if k > hw else k
        stride = 2 if self.rng.random() < 0.25 and hw >= 4 else 1
        return Conv2d(
            cin=self.channels(lo, min(hi, 640)),
            cout=self.channels(lo, min(hi, 640)),
            hw=hw,
            k=k,
            stride=stride,
            bn=True,
            act=self.act(),
        )

    def depthwise(self) -> Conv2d:
        hw, lo, hi = self.stage()
        c = self.channels(lo * 2, min(hi * 2, 1920))
        k = self.rng.choice((3, 3, 3, 5, 5, 7))
        k = k if k <= hw else (3 if hw >= 3 else 1)
        stride = 2 if self.rng.random() < 0.25 and hw >= 4 and k > 1 else 1
        return Conv2d(cin=c, cout=c, hw=hw, k=k, stride=stride, groups=c, bn=True, act=self.act())

    def grouped(self) -> Conv2d:
        hw, lo, hi = self.stage()
        # RegNet fixes the group width (8..64 channels per group); ResNeXt uses 32 groups.
        width = self.rng.choice((8, 16, 24, 32, 48, 64))
        groups = max(2, self.channels(lo, hi) // width)
        c = groups * width
        k = 3 if hw >= 3 else 1
        return Conv2d(
            cin=c,
            cout=c,
            hw=hw,
            k=k,
            stride=self.rng.choice((1, 1, 2)) if k > 1 else 1,
            groups=groups,
            bn=True,
            act="relu",
        )

    def linear(self) -> Linear:
        cin = self.rng.choice((self.channels(64, 2048), self.channels(256, 4096), self.rng.choice((9216, 4096, 2560))))
        cout = self.rng.choice((10, 100, 1000, self.channels(64, 4096)))
        return Linear(cin=cin, cout=cout, act=self.rng.choice((None, None, "relu")))

    def spatial(self, c_scale: int = 1) -> tuple[int, int]:
        hw, lo, hi = self.stage()
        return self.channels(lo, hi * c_scale), hw

    def shaped(self, cls: Callable[..., OpSpec], c_scale: int = 1) -> OpSpec:
        """A one-tensor op (c channels, hw x hw) at a stage of the prior."""
        c, hw = self.spatial(c_scale)
        return cls(c=c, hw=hw)


def _sweeps() -> list[OpSpec]:
    """Dense steps over one channel count with the rest fixed: the staircase the predictors must learn."""
    ops: list[OpSpec] = []
    ops += [Conv2d(cin=64, cout=c, hw=28, k=1, bn=True, act="relu") for c in range(4, 101, 4)]
    ops += [Conv2d(cin=c, cout=64, hw=28, k=1, bn=True) for c in range(4, 101, 4)]
    ops += [Conv2d(cin=c, cout=c, hw=28, k=3, groups=c, bn=True, act="relu6") for c in range(8, 161, 8)]
    ops += [Conv2d(cin=96, cout=c, hw=14, k=3, bn=True, act="relu") for c in range(8, 129, 12)]
    return ops


def _heavy_anchors() -> list[OpSpec]:
    """The few layers beyond the sampling caps that classic nets do use (VGG/AlexNet heads and 224 px stacks).

    Tree regressors do not extrapolate, so without these a 38 M-parameter classifier would be predicted from the
    largest sampled one.  They cost ~19 s together here.  VGG-224's 25088x4096 layer is left out: it alone took 10 s
    (building 411 MB of weights), and at that size a linear layer is a pure weight stream, bytes over bandwidth.
    """
    return [
        Linear(cin=9216, cout=4096, act="relu"),
        Linear(cin=4096, cout=4096, act="relu"),
        Linear(cin=4096, cout=1000),
        Linear(cin=2048, cout=1000),
        Linear(cin=1280, cout=1000),
        Linear(cin=512, cout=10),
        Conv2d(cin=3, cout=64, hw=224, k=3, bn=False, act="relu"),
        Conv2d(cin=3, cout=64, hw=224, k=11, stride=4, bn=False, act="relu"),
        Conv2d(cin=64, cout=64, hw=224, k=3, bn=False, act="relu"),
        Conv2d(cin=128, cout=128, hw=112, k=3, bn=False, act="relu"),
        Conv2d(cin=256, cout=256, hw=56, k=3, bn=False, act="relu"),
        Conv2d(cin=512, cout=512, hw=28, k=3, bn=False, act="relu"),
        Conv2d(cin=512, cout=512, hw=14, k=3, bn=False, act="relu"),
    ]


def _draw(count: int, draw: Callable[[], OpSpec]) -> list[OpSpec]:
    ops: list[OpSpec] = []
    while len(ops) < count:
        try:
            op = draw()
        except OpSpecError:
            continue
        if op.flops() > MAX_VARIANT_FLOPS or op.params() > MAX_VARIANT_PARAMS:
            continue
        ops.append(op)
    return ops


def _standard() -> list[OpSpec]:
    s = _Sampler(seed=20_240_611)

    def act_op() -> OpSpec:
        return s.shaped(_activation_class(s.rng.choice(ACTIVATIONS)))

    def pool_op(cls: type[MaxPool] | type[AvgPool]) -> OpSpec:
        c, hw = s.spatial()
        k, stride = s.rng.choice(((3, 2), (3, 2), (2, 2), (3, 1)))
        return cls(c=c, hw=max(hw, k), k=k, stride=stride)

    def concat_op() -> OpSpec:
        c, hw = s.spatial()
        parts = s.rng.choice((2, 2, 2, 3, 4))
        if s.rng.random() < 0.3:
            # DenseNet: a growing stack plus one growth-rate slice.
            return Concat(cins=(c, s.rng.choice((12, 24, 32))), hw=hw)
        return Concat(
            cins=tuple(max(1, s.channels(max(4, c // parts // 2), max(8, c // parts))) for _ in range(parts)), hw=hw
        )

    def shuffle_op() -> OpSpec:
        c, hw = s.spatial()
        groups = s.rng.choice((2, 2, 2, 3, 4, 8))
        return ChannelShuffle(c=max(groups, c // groups * groups), hw=hw, groups=groups)

    ops: list[OpSpec] = []
    ops += _sweeps()
    ops += _heavy_anchors()
    ops += _draw(240, s.pointwise)
    ops += _draw(130, s.dense)
    ops += _draw(140, s.depthwise)
    ops += _draw(40, s.grouped)
    ops += _draw(40, s.linear)
    ops += _draw(25, lambda: s.shaped(BatchNorm))
    ops += _draw(60, act_op)
    ops += _draw(16, lambda: pool_op(MaxPool))
    ops += _draw(16, lambda: pool_op(AvgPool))
    # Global pooling and SE scaling sit after expansions, so they see up to twice a stage's channel count.
    ops += _draw(25, lambda: s.shaped(GlobalAvgPool, c_scale=2))
    ops += _draw(30, lambda: s.shaped(Add))
    ops += _draw(30, lambda: s.shaped(Mul, c_scale=2))
    ops += _draw(30, concat_op)
    ops += _draw(20, shuffle_op)
    return _unique(ops)


def _unique(ops: list[OpSpec]) -> list[OpSpec]:
    seen: set[str] = set()
    out = []
    for op in ops:
        if op.key not in seen:
            seen.add(op.key)
            out.append(op)
    return out


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("smoke", "a few dozen small variants touching every operator kind; under a minute", _smoke),
        Preset(
            "standard",
            "the default grid for a new device: a prior over the layers of real CNNs (32-224 px) plus channel sweeps",
            _standard,
        ),
    )
}


def preset_ops(name: str) -> list[OpSpec]:
    """The operator variants of preset ``name``, in measuring order (deterministic).

    Raises:
        UnknownPresetError: for a name that is not in ``PRESETS``.
    """
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise UnknownPresetError(str(name))
    return preset.build()


def describe_preset(name: str) -> dict[str, Any]:
    """Name, description, variant count and the count per operator kind."""
    ops = preset_ops(name)
    return {
        "name": name,
        "description": PRESETS[name].description,
        "variants": len(ops),
        "kinds": dict(sorted(Counter(op.kind for op in ops).items())),
    }


__all__ = ["PRESETS", "Preset", "UnknownPresetError", "describe_preset", "preset_ops"]
