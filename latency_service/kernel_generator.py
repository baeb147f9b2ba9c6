"""Random multi-kernel ONNX networks for in-context kernel profiling, built with the onnx helper (no torch).

Each generated network looks like a member of a CNN family a user will ask about (inverted residuals with
squeeze-excitation, residual basic/bottleneck blocks with grouped convolutions, channel split/shuffle units, fire and
inception-style concat modules, dense blocks, plain stacks with large linear heads), written the way the PyTorch
exporters write them (Conv + BatchNormalization, Clip for ReLU6, Sigmoid·x for SiLU, Reshape-Transpose-Reshape for a
channel shuffle), so that the runtime's optimiser produces the same kernels it produces for real exported models.

Widths, resolutions and kernel sizes are drawn from a prior over what real networks use (:class:`SamplingPrior`);
adaptive rounds pass a narrower prior centred on configurations whose prediction error was high.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

T = TypeVar("T")
OPSET = 17
# Widest layer a generated network gets (real CNN families stay at or below ~2048 channels).
MAX_WIDTH = 1536
FAMILIES: tuple[str, ...] = ("inverted", "resnet", "bottleneck", "shuffle", "fire", "inception", "dense", "plain")


@dataclass(frozen=True)
class SamplingPrior:
    """Where real networks put their layers: resolutions, widths (mostly multiples of 8) and kernel sizes."""

    resolutions: tuple[int, ...] = (32, 48, 64, 96, 112, 128, 160, 192, 224)
    resolution_weights: tuple[float, ...] = (0.2, 0.06, 0.14, 0.1, 0.1, 0.1, 0.1, 0.08, 0.12)
    width_scale: float = 1.0  # multiplies every width; adaptive rounds move it around a bad configuration
    families: tuple[str, ...] = FAMILIES
    family_weights: tuple[float, ...] | None = None
    # Real CNNs keep one activation throughout (EfficientNet SiLU, MobileNetV2 ReLU6, V3 hard-swish): a network draws
    # one, and only with ``activation_mix`` probability draws again per block.  A SiLU that the runtime cannot fuse
    # puts NCHWc reorders around every conv of such a network; per-block draws never produced those long runs.
    activations: tuple[str, ...] = ("relu", "relu6", "hardswish", "silu")
    activation_mix: float = 0.2
    max_macs: float = 6e8  # per generated network: keeps one profiling run under ~60 ms on one core


@dataclass
class _Tensor:
    name: str
    c: int
    hw: int


@dataclass
class NetworkBuilder:
    """Appends exporter-shaped ONNX nodes; tracks channels and spatial size of every tensor."""

    rng: np.random.Generator
    hw: int
    in_channels: int = 3
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    macs: float = 0.0
    _count: int = 0

    def input(self) -> _Tensor:
        return _Tensor("input", self.in_channels, self.hw)

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def _const(self, array: np.ndarray, stem: str) -> str:
        name = self._name(stem)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def _node(self, op: str, inputs: list[str], n_outputs: int = 1, **attrs: Any) -> list[str]:
        outputs = [self._name(op.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], **attrs))
        return outputs

    def conv(
        self, x: _Tensor, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: str | None = None
    ) -> _Tensor:
        scale = 1.0 / np.sqrt(max(1, x.c // groups * k * k))
        weight = self._const((self.rng.standard_normal((cout, x.c // groups, k, k)) * scale).astype(np.float32), "w")
        out_hw = (x.hw + 2 * (k // 2) - k) // stride + 1
        self.macs += cout * out_hw * out_hw * (x.c // groups) * k * k
        with_bn = self.rng.random() < 0.7  # exporters write Conv(bias=False) + BatchNormalization, or a biased Conv
        inputs = [x.name, weight] if with_bn else [x.name, weight, self._const(np.zeros(cout, np.float32), "b")]
        (y,) = self._node(
            "Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups
        )
        if with_bn:
            stats = [np.ones(cout, np.float32), np.zeros(cout, np.float32), np.zeros(cout, np.float32)]
            var = (self.rng.random(cout) + 0.5).astype(np.float32)
            names = [self._const(a, "bn") for a in (*stats, var)]
            (y,) = self._node("BatchNormalization", [y, *names], epsilon=1e-5)
        return self.act(_Tensor(y, cout, out_hw), act)

    def act(self, x: _Tensor, kind: str | None) -> _Tensor:
        if kind is None:
            return x
        if kind == "relu":
            (y,) = self._node("Relu", [x.name])
        elif kind == "relu6":
            lo, hi = self._const(np.array(0, np.float32), "lo"), self._const(np.array(6, np.float32), "hi")
            (y,) = self._node("Clip", [x.name, lo, hi])
        elif kind == "hardswish":
            (y,) = self._node("HardSwish", [x.name])
        elif kind == "hardsigmoid":
            (y,) = self._node("HardSigmoid", [x.name], alpha=1.0 / 6)
        elif kind == "sigmoid":
            (y,) = self._node("Sigmoid", [x.name])
        elif kind == "silu":
            (s,) = self._node("Sigmoid", [x.name])
            (y,) = self._node("Mul", [x.name, s])
        else:
            raise ValueError(f"act: unknown activation {kind!r}")
        return _Tensor(y, x.c, x.hw)

    def batchnorm(self, x: _Tensor) -> _Tensor:
        arrays = (np.ones(x.c), np.zeros(x.c), np.zeros(x.c), np.ones(x.c))
        names = [self._const(a.astype(np.float32), "bn") for a in arrays]
        (y,) = self._node("BatchNormalization", [x.name, *names], epsilon=1e-5)
        return _Tensor(y, x.c, x.hw)

    def add(self, a: _Tensor, b: _Tensor) -> _Tensor:
        (y,) = self._node("Add", [a.name, b.name])
        return _Tensor(y, a.c, a.hw)

    def global_pool(self, x: _Tensor, *, reduce_mean: bool) -> _Tensor:
        if reduce_mean:
            (y,) = self._node("ReduceMean", [x.name], axes=[2, 3], keepdims=1)
        else:
            (y,) = self._node("GlobalAveragePool", [x.name])
        return _Tensor(y, x.c, 1)

    def squeeze_excite(self, x: _Tensor, squeeze: int, act: str, gate: str) -> _Tensor:
        pooled = self.global_pool(x, reduce_mean=self.rng.random() < 0.5)
        hidden = self.conv(pooled, max(1, squeeze), act=act)
        scale = self.conv(hidden, x.c, act=gate)
        (y,) = self._node("Mul", [x.name, scale.name])
        return _Tensor(y, x.c, x.hw)

    def pool(self, x: _Tensor, k: int, stride: int, *, max_pool: bool = True, pad: bool = True) -> _Tensor:
        op = "MaxPool" if max_pool else "AveragePool"
        padding = k // 2 if pad else 0
        (y,) = self._node(op, [x.name], kernel_shape=[k, k], strides=[stride, stride], pads=[padding] * 4)
        return _Tensor(y, x.c, (x.hw + 2 * padding - k) // stride + 1)

    def concat(self, xs: list[_Tensor]) -> _Tensor:
        (y,) = self._node("Concat", [t.name for t in xs], axis=1)
        return _Tensor(y, sum(t.c for t in xs), xs[0].hw)

    def split(self, x: _Tensor, sizes: list[int]) -> list[_Tensor]:
        split = self._const(np.array(sizes, np.int64), "split")
        outs = self._node("Split", [x.name, split], n_outputs=len(sizes), axis=1)
        return [_Tensor(o, c, x.hw) for o, c in zip(outs, sizes, strict=True)]

    def channel_shuffle(self, x: _Tensor, groups: int) -> _Tensor:
        grouped = self._const(np.array([1, groups, x.c // groups, x.hw, x.hw], np.int64), "shape")
        (r,) = self._node("Reshape", [x.name, grouped])
        (t,) = self._node("Transpose", [r], perm=[0, 2, 1, 3, 4])
        (y,) = self._node("Reshape", [t, self._const(np.array([1, x.c, x.hw, x.hw], np.int64), "shape")])
        return _Tensor(y, x.c, x.hw)

    def flatten(self, x: _Tensor) -> _Tensor:
        (y,) = self._node("Flatten", [x.name], axis=1)
        return _Tensor(y, x.c * x.hw * x.hw, 1)

    def linear(self, x: _Tensor, cout: int, act: str | None = None) -> _Tensor:
        weight = self._const((self.rng.standard_normal((cout, x.c)) / np.sqrt(x.c)).astype(np.float32), "fc")
        self.macs += x.c * cout
        (y,) = self._node("Gemm", [x.name, weight, self._const(np.zeros(cout, np.float32), "fcb")], transB=1)
        return self.act(_Tensor(y, cout, 1), act)

    def build(self, output: _Tensor) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "in_context_profile",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, self.in_channels, self.hw, self.hw])],
            [helper.make_tensor_value_info(output.name, TensorProto.FLOAT, None)],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def _width(rng: np.random.Generator, base: float, scale: float) -> int:
    """A channel count near ``base``: mostly multiples of 8 (make_divisible), some of 4, a few arbitrary."""
    value = min(MAX_WIDTH, max(4.0, base * scale * float(rng.uniform(0.5, 1.6))))
    draw = rng.random()
    divisor = 8 if draw < 0.7 else (4 if draw < 0.9 else 1)
    return max(divisor, round(value / divisor) * divisor)


def _choice(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _stage(b: NetworkBuilder, family: str, x: _Tensor, cout: int, stride: int, depth: int, act: str) -> _Tensor:
    rng = b.rng
    for i in range(depth):
        s = stride if i == 0 else 1
        if family == "inverted":
            expand = int(_choice(rng, (1, 3, 4, 6)))
            k = int(_choice(rng, (3, 3, 5, 7)))
            hidden = max(8, round(x.c * expand / 8) * 8) if expand > 1 else x.c
            h = b.conv(x, hidden, act=act) if expand > 1 else x
            h = b.conv(h, hidden, k=k, stride=s, groups=hidden, act=act)
            if rng.random() < 0.5:
                gate = str(_choice(rng, ("hardsigmoid", "sigmoid")))
                h = b.squeeze_excite(h, _width(rng, hidden / 4, 1.0), "relu" if act != "silu" else "silu", gate)
            y = b.conv(h, cout)
            x = b.add(x, y) if (s == 1 and x.c == cout) else y
        elif family in ("resnet", "bottleneck"):
            shortcut = x if (s == 1 and x.c == cout) else b.conv(x, cout, stride=s)
            if family == "resnet":
                h = b.conv(b.conv(x, cout, k=3, stride=s, act="relu"), cout, k=3)
            else:
                if rng.random() < 1 / 3:  # RegNet-style: bottleneck ratio 1, a fixed group width, many groups
                    group_width = int(_choice(rng, (8, 16, 24, 32)))
                    groups = max(1, round(cout / group_width))
                    width = groups * group_width
                else:  # ResNeXt/ResNet-style: a quarter of the width, a few groups
                    width = _width(rng, cout / 4, 1.0)
                    groups = int(_choice(rng, (1, 1, 2, 4, 8)))
                    width = max(groups, width // groups * groups)
                h = b.conv(b.conv(x, width, act="relu"), width, k=3, stride=s, groups=groups, act="relu")
                h = b.conv(h, cout)
            x = b.act(b.add(h, shortcut), "relu")
        elif family == "shuffle":
            half = max(4, cout // 2)
            if s == 1 and x.c % 2 == 0:
                left, right = b.split(x, [x.c // 2, x.c - x.c // 2])
                r = b.conv(b.conv(right, right.c, act="relu"), right.c, k=3, groups=right.c)
                x = b.channel_shuffle(b.concat([left, b.conv(r, right.c, act="relu")]), 2)
            else:
                left = b.conv(b.conv(x, x.c, k=3, stride=s, groups=x.c), half, act="relu")
                r = b.conv(b.conv(x, half, act="relu"), half, k=3, stride=s, groups=half)
                x = b.channel_shuffle(b.concat([left, b.conv(r, half, act="relu")]), 2)
        elif family == "fire":
            if s > 1:
                x = b.pool(x, 3, 2)
            squeeze = b.conv(x, _width(rng, cout / 8, 1.0), act="relu")
            x = b.concat([b.conv(squeeze, cout // 2, act="relu"), b.conv(squeeze, cout - cout // 2, k=3, act="relu")])
        elif family == "inception":
            if s > 1:
                x = b.pool(x, 3, 2)
            quarter = max(4, cout // 4)
            branches = [
                b.conv(x, quarter, act="relu"),
                b.conv(b.conv(x, quarter, act="relu"), quarter, k=3, act="relu"),
                b.conv(b.conv(x, quarter // 2 or 4, act="relu"), quarter, k=5, act="relu"),
                b.conv(b.pool(x, 3, 1), quarter, act="relu"),
            ]
            x = b.concat(branches)
        elif family == "dense":
            if s > 1:
                x = b.pool(b.conv(b.act(b.batchnorm(x), "relu"), x.c // 2), 2, 2, max_pool=False)
            growth = int(_choice(rng, (12, 16, 24, 32)))
            h = b.conv(b.act(b.batchnorm(x), "relu"), 4 * growth, act="relu")
            x = b.concat([x, b.conv(h, growth, k=3)])
        else:  # plain VGG/AlexNet-style stack
            x = b.conv(x, cout, k=int(_choice(rng, (3, 3, 5))), act="relu")
            if s > 1:
                x = b.pool(x, 2, 2)
    return x


def random_network(rng: np.random.Generator, prior: SamplingPrior) -> tuple[onnx.ModelProto, dict[str, object]]:
    """One random network from the prior and a description of what was drawn (family, resolution, widths)."""
    weights = np.array(prior.family_weights or [1.0] * len(prior.families), dtype=float)
    family = str(prior.families[int(rng.choice(len(prior.families), p=weights / weights.sum()))])
    hw = int(rng.choice(prior.resolutions, p=np.array(prior.resolution_weights) / sum(prior.resolution_weights)))
    b = NetworkBuilder(rng=rng, hw=hw)
    # ImageNet-style stems (stride 2, often a pool after) are common on small inputs too, and they take a 32 px
    # network down to 1-4 px maps: the benchmark's first run over-predicted such tiny-map networks by 50-150 %
    # when the generator kept small inputs at stride 1.
    stem_stride = 1 if hw <= 48 and rng.random() < 0.4 else 2
    width = _width(rng, 24, prior.width_scale)
    stem_k = int(_choice(rng, (3, 3, 5, 7)))
    if family == "plain" and hw >= 128 and rng.random() < 0.3:
        stem_k, stem_stride = 11, 4  # AlexNet's stem
    act = str(_choice(rng, prior.activations))
    # ResNets, Inception, DenseNet and the plain stacks are ReLU networks; the inverted-residual families are not.
    stem_act = act if family == "inverted" else "relu"
    x = b.conv(b.input(), width, k=stem_k, stride=stem_stride, act=stem_act)
    if family in ("resnet", "bottleneck", "plain", "fire", "inception", "dense", "shuffle") and rng.random() < 0.6:
        x = b.pool(x, 3, 2)
    n_stages = int(rng.integers(2, 5))
    for _ in range(n_stages):
        if b.macs > prior.max_macs:
            break
        width = _width(rng, x.c * float(rng.uniform(1.2, 2.2)), prior.width_scale)
        if family == "dense":
            width = x.c
        stride = 2 if x.hw >= 2 and rng.random() < 0.75 else 1
        depth = int(rng.integers(1, 4))
        for _ in range(depth):
            if b.macs > prior.max_macs:
                break
            block_act = str(_choice(rng, prior.activations)) if rng.random() < prior.activation_mix else act
            x = _stage(b, family, x, width, stride, 1, block_act)
            stride = 1
    if family == "plain" and rng.random() < 0.6:
        if x.hw % 2 == 0 and x.hw > 2 and rng.random() < 0.5:
            x = b.pool(x, x.hw // 2, x.hw // 2, max_pool=False, pad=False)  # adaptive average pool to 2x2
        flat = b.flatten(x if x.hw <= 7 else b.pool(x, 2, 2) if x.hw <= 14 else b.global_pool(x, reduce_mean=False))
        h = b.linear(flat, _width(rng, 1024, prior.width_scale), act="relu")
        out = b.linear(h, int(rng.integers(10, 1001)))
    else:
        if rng.random() < 0.5:
            head_act = act if family == "inverted" else str(_choice(rng, ("relu", "hardswish")))
            x = b.conv(x, _width(rng, x.c * 2, prior.width_scale), act=head_act)
        pooled = b.flatten(b.global_pool(x, reduce_mean=rng.random() < 0.3))
        out = b.linear(pooled, int(rng.integers(10, 1001)))
    return b.build(out), {"family": family, "hw": hw, "macs": b.macs, "nodes": len(b.nodes), "act": act}
