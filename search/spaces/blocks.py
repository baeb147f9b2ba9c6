"""Blocks tower (FiGS Fig. 4B): stem, a sequence of multi-operator blocks, global pooling and a classifier.

Each block: per operator a 1×1 expansion and a k×k depthwise conv (both conv-BN-ReLU), combined by an add or by
concatenation, then a 1×1 linear projection (conv-BN), with a skip where the shapes allow.  The 1×1 conv "over the
concatenation" and the projection are one layer here: two consecutive linear 1×1 convs would collapse into one.

Gates: one channel gate per operator on its expansion channels, one on the projection's output channels, and one
operator gate per operator.  A block without a skip always keeps its first operator (as a gate keeps its first
channel), since removing it would cut the network.  Channels tied by skips form one :class:`GateGroup` per
stage; a block with a skip contributes its projection channels only while one of its operators is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from predictors.ops import Conv2d, Linear
from search.gates import (
    AnyOf,
    ChannelGate,
    ChannelSource,
    GateConcat,
    GateConfig,
    GateGroup,
    MaskLayer,
    OnOff,
    OperatorGate,
    OperatorGated,
)
from search.spaces.base import LatencyLayer, SearchSpace, conv_out_size, register_space, with_overrides
from search.spaces.compact import (
    ARCH_FORMAT,
    ConvBNAct,
    conv_node,
    kept_indices,
    sliced_conv_weights,
    sliced_linear_weights,
)


@dataclass
class BlocksConfig:
    """Sizes of the tower.  ``stages`` lists (output channels, blocks, stride of the first block).

    The default is sized for 8×8 digits and 28×28 MNIST on a 2-core CPU; ``width_multiplier`` scales every width
    (the uniform baseline is ``width_multiplier=w`` with ``GateConfig(fixed_on=True)``).
    """

    stem_channels: int = 16
    stem_stride: int | None = None  # None: 1 for images up to 16 px, else 2
    stages: tuple[tuple[int, int, int], ...] | None = None  # None: SMALL_IMAGE_STAGES up to 16 px, else IMAGE_STAGES
    expansion: float = 3.0
    kernels: tuple[int, ...] = (3, 5)
    aggregator: Literal["add", "concat"] = "concat"
    width_multiplier: float = 1.0
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.aggregator not in ("add", "concat"):
            raise ValueError(f"aggregator: must be 'add' or 'concat', got {self.aggregator!r}")
        if not self.kernels or any(k <= 0 or k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels: must be odd positive sizes, got {self.kernels}")
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier: must be positive, got {self.width_multiplier}")
        if self.stages is not None and not self.stages:
            raise ValueError("stages: needs at least one stage")

    def width(self, channels: float) -> int:
        return max(1, round(channels * self.width_multiplier))


# 8×8 digits keep 8×8 for two stages so that 5×5 operators stay meaningful; 28×28 MNIST goes 14 → 7 → 4.
SMALL_IMAGE_STAGES: tuple[tuple[int, int, int], ...] = ((16, 1, 1), (24, 2, 1), (32, 2, 2))
IMAGE_STAGES: tuple[tuple[int, int, int], ...] = ((16, 1, 1), (24, 2, 2), (32, 2, 2))


def block_kernels(kernels: tuple[int, ...], hw: int) -> tuple[int, ...]:
    """Kernels that fit the block's input: runtimes and the operator catalogue refuse a kernel larger than it."""
    fitting = tuple(k for k in kernels if k <= hw)
    return fitting or (max(1, hw - 1 + hw % 2),)


class Block(nn.Module):
    def __init__(self, name: str, cin: int, cout: int, hw: int, stride: int, config: BlocksConfig) -> None:
        super().__init__()
        self.block_name = name
        self.cin, self.cout, self.hw, self.stride = cin, cout, hw, stride
        self.residual = stride == 1 and cin == cout
        self.aggregator = config.aggregator
        width = max(1, round(cin * config.expansion))
        kernels = block_kernels(config.kernels, hw)
        self.kernels = kernels
        self.expanded = width
        # Typed lists for the code, ModuleLists for registration (parameters, train/eval, state dict).
        self.expand_units = [ConvBNAct(cin, width, 1) for _ in kernels]
        self.depthwise_units = [ConvBNAct(width, width, k, stride, width) for k in kernels]
        self.branch_gate_list = [ChannelGate(width, config.gate, f"{name}.op{j}.k{k}") for j, k in enumerate(kernels)]
        self.expand = nn.ModuleList(self.expand_units)
        self.depthwise = nn.ModuleList(self.depthwise_units)
        self.branch_gates = nn.ModuleList(self.branch_gate_list)
        # A block that cannot be skipped keeps its first operator unconditionally.
        first_gated = 0 if self.residual else 1
        self.operator_gates = nn.ModuleDict(
            {str(j): OperatorGate(config.gate, f"{name}.op{j}.on") for j in range(first_gated, len(kernels))}
        )
        branch_width = width if config.aggregator == "add" else width * len(kernels)
        self.project = ConvBNAct(branch_width, cout, 1, act=None)
        self.project_gate = ChannelGate(cout, config.gate, f"{name}.proj")
        self.branch_sources: list[ChannelSource] = []
        for j, gate in enumerate(self.branch_gate_list):
            op_gate = self.operator_gate(j)
            self.branch_sources.append(gate if op_gate is None else OperatorGated(gate, op_gate))
        self.aggregate_source: ChannelSource = (
            GateGroup(self.branch_sources, f"{name}.sum")
            if config.aggregator == "add"
            else GateConcat(self.branch_sources)
        )
        # What operator j computes with the add aggregator, given that j is on (its layers' cost is P(on) times
        # this): its own channels ungated, the other operators' behind their switches.  Using the unconditional
        # sum here would multiply two correlated factors; a Monte Carlo check measured FLOPs 11 % low that way.
        self.conditional_sum_sources: list[ChannelSource] = [
            GateGroup([g if k == j else self.branch_sources[k] for k, g in enumerate(self.branch_gate_list)])
            for j in range(len(kernels))
        ]
        self.alive_switch: OnOff | None = (
            AnyOf([g for g in self.operator_gates.values() if isinstance(g, OperatorGate)]) if self.residual else None
        )
        self.masks = nn.ModuleList(MaskLayer(s) for s in self.branch_sources)
        self.expand_masks = nn.ModuleList(MaskLayer(g) for g in self.branch_gate_list)
        self.project_mask = MaskLayer(self.project_gate)

    def operator_gate(self, j: int) -> OperatorGate | None:
        if str(j) not in self.operator_gates:
            return None
        gate = self.operator_gates[str(j)]
        return gate if isinstance(gate, OperatorGate) else None

    def stream_member(self) -> ChannelSource:
        """This block's contribution to its stage's tied channels."""
        if self.alive_switch is None:
            return self.project_gate
        return OperatorGated(self.project_gate, self.alive_switch)

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor | None] = []
        for j in range(len(self.expand_units)):
            op_gate = self.operator_gate(j)
            if not self.training and op_gate is not None and not op_gate.is_on():
                outputs.append(None)
                continue
            hidden = self.expand_masks[j](self.expand_units[j](x))
            outputs.append(self.masks[j](self.depthwise_units[j](hidden)))
        if all(o is None for o in outputs):
            return x
        live = [o if o is not None else torch.zeros_like(next(p for p in outputs if p is not None)) for o in outputs]
        combined = torch.stack(live).sum(0) if self.aggregator == "add" else torch.cat(live, dim=1)
        projected = self.project_mask(self.project(combined))
        if self.alive_switch is None:
            return projected
        return x + self.alive_switch.mask() * projected

    def latency_layers(self, stream_in: ChannelSource, stream_out: ChannelSource) -> list[LatencyLayer]:
        layers = []
        out_hw = conv_out_size(self.hw, 3, self.stride)
        for j, depthwise in enumerate(self.depthwise_units):
            own = self.conditional_sum_sources[j] if self.aggregator == "add" else self.branch_gate_list[j]
            op_gate = self.operator_gate(j)
            k = int(depthwise.conv.kernel_size[0])
            w = self.expanded
            layers.append(
                LatencyLayer(
                    f"{self.block_name}.op{j}.expand",
                    Conv2d(cin=self.cin, cout=w, hw=self.hw, k=1, bn=True, act="relu"),
                    stream_in,
                    own,
                    op_gate,
                )
            )
            dw = Conv2d(cin=w, cout=w, hw=self.hw, k=k, stride=self.stride, groups=w, bn=True, act="relu")
            layers.append(LatencyLayer(f"{self.block_name}.op{j}.dw{k}", dw, own, own, op_gate))
        project = Conv2d(cin=self.project.conv.in_channels, cout=self.cout, hw=out_hw, k=1, bn=True, act=None)
        layers.append(LatencyLayer(f"{self.block_name}.project", project, self.aggregate_source, stream_out))
        return layers


class BlocksTower(SearchSpace):
    space_name = "blocks"

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, config: BlocksConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        stride = config.stem_stride or (1 if image_size <= 16 else 2)
        stem_width = config.width(config.stem_channels)
        self.stem = ConvBNAct(in_channels, stem_width, 3, stride)
        self.stem_gate = ChannelGate(stem_width, config.gate, "stem")
        hw = conv_out_size(image_size, 3, stride)
        self.stem_hw = image_size
        blocks: list[Block] = []
        cin = stem_width
        stages = config.stages or (SMALL_IMAGE_STAGES if image_size <= 16 else IMAGE_STAGES)
        for s, (channels, repeats, first_stride) in enumerate(stages):
            cout = config.width(channels)
            for r in range(repeats):
                block_stride = first_stride if r == 0 else 1
                blocks.append(Block(f"s{s}b{r}", cin, cout, hw, block_stride, config))
                hw = conv_out_size(hw, 3, block_stride)
                cin = cout
        self.block_list = blocks
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, num_classes)
        # Stage streams: a block without a skip starts a new group of tied channels; blocks with one join it.
        stream_members: list[list[ChannelSource]] = [[self.stem_gate]]
        stream_of_block: list[tuple[int, int]] = []
        for block in blocks:
            if not block.residual:
                stream_members.append([])
            stream_members[-1].append(block.stream_member())
            stream_of_block.append(
                (len(stream_members) - 1 if block.residual else len(stream_members) - 2, len(stream_members) - 1)
            )
        self.streams = [GateGroup(m, f"stream{i}") for i, m in enumerate(stream_members)]
        self.block_streams = [(self.streams[i], self.streams[o]) for i, o in stream_of_block]
        self.stem_mask = MaskLayer(self.stem_gate)

    def forward(self, x: Tensor) -> Tensor:
        self.refresh_masks()
        x = self.stem_mask(self.stem(x))
        for block in self.block_list:
            x = block(x)
        return self.classifier(x.mean(dim=(2, 3)))

    def latency_layers(self) -> list[LatencyLayer]:
        stem = self.stem.conv
        layers = [
            LatencyLayer(
                "stem",
                Conv2d(
                    cin=self.in_channels,
                    cout=stem.out_channels,
                    hw=self.stem_hw,
                    k=3,
                    stride=int(stem.stride[0]),
                    bn=True,
                    act="relu",
                ),
                None,
                self.streams[0],
            )
        ]
        for block, (stream_in, stream_out) in zip(self.block_list, self.block_streams, strict=True):
            layers.extend(block.latency_layers(stream_in, stream_out))
        classifier = Linear(cin=self.classifier.in_features, cout=self.num_classes)
        layers.append(LatencyLayer("classifier", classifier, self.streams[-1], None))
        return layers

    def architecture(self, threshold: float = 0.5) -> tuple[dict[str, Any], dict[str, Tensor]]:
        nodes: list[dict[str, Any]] = []
        weights: dict[str, Tensor] = {}
        stream_alive = self.streams[0].alive(threshold)
        stream_idx = kept_indices(stream_alive)
        nodes.append(conv_node("stem", ["input"], self.stem, self.in_channels, len(stream_idx)))
        weights |= sliced_conv_weights(
            "stem", self.stem, stream_idx, torch.arange(self.in_channels), ~self.stem_gate.alive(threshold)[stream_idx]
        )
        current = "stem"
        for block, (_, stream_out) in zip(self.block_list, self.block_streams, strict=True):
            out_alive = stream_out.alive(threshold)
            out_idx = kept_indices(out_alive)
            result = _compact_block(block, current, stream_idx, out_idx, threshold, nodes, weights)
            if result is not None:
                current = result
            stream_idx = out_idx
        nodes.append({"name": "pool", "op": "global_avgpool", "inputs": [current]})
        nodes.append(
            {"name": "classifier", "op": "linear", "inputs": ["pool"], "cin": len(stream_idx), "cout": self.num_classes}
        )
        weights |= sliced_linear_weights("classifier", self.classifier, None, stream_idx)
        arch = {
            "format": ARCH_FORMAT,
            "space": self.space_name,
            "input": {"channels": self.in_channels, "size": self.image_size},
            "num_classes": self.num_classes,
            "nodes": nodes,
            "output": "classifier",
        }
        return arch, weights


def _compact_block(
    block: Block,
    current: str,
    in_idx: Tensor,
    out_idx: Tensor,
    threshold: float,
    nodes: list[dict[str, Any]],
    weights: dict[str, Tensor],
) -> str | None:
    """Append a block's surviving nodes; ``None`` when the whole block is gone (its skip carries the input)."""
    name = block.block_name
    gates = [block.operator_gate(j) for j in range(len(block.expand_units))]
    live_ops = [j for j, gate in enumerate(gates) if gate is None or gate.is_on(threshold)]
    if not live_ops:
        return None
    branch_alive = [g.alive(threshold) for g in block.branch_gate_list]
    union = torch.stack([branch_alive[j] for j in live_ops]).any(0)
    branch_names: list[str] = []
    project_columns: list[Tensor] = []
    for j in live_ops:
        if block.aggregator == "add":
            keep, zero = kept_indices(union), ~branch_alive[j][union]
        else:
            keep, zero = kept_indices(branch_alive[j]), None
            project_columns.append(keep + j * block.expanded)
        k = int(block.depthwise_units[j].conv.kernel_size[0])
        expand_name, dw_name = f"{name}.op{j}.expand", f"{name}.op{j}.dw{k}"
        nodes.append(conv_node(expand_name, [current], block.expand_units[j], len(in_idx), len(keep)))
        weights |= sliced_conv_weights(expand_name, block.expand_units[j], keep, in_idx, zero)
        nodes.append(conv_node(dw_name, [expand_name], block.depthwise_units[j], len(keep), len(keep), depthwise=True))
        weights |= sliced_conv_weights(dw_name, block.depthwise_units[j], keep, None, zero)
        branch_names.append(dw_name)
    if len(branch_names) == 1:
        combined = branch_names[0]
    else:
        combined = f"{name}.{block.aggregator}"
        nodes.append({"name": combined, "op": block.aggregator, "inputs": branch_names})
    columns = kept_indices(union) if block.aggregator == "add" else torch.cat(project_columns)
    project_name = f"{name}.project"
    nodes.append(conv_node(project_name, [combined], block.project, len(columns), len(out_idx)))
    weights |= sliced_conv_weights(
        project_name, block.project, out_idx, columns, ~block.project_gate.alive(threshold)[out_idx]
    )
    if not block.residual:
        return project_name
    nodes.append({"name": f"{name}.skip", "op": "add", "inputs": [current, project_name]})
    return f"{name}.skip"


@register_space("blocks")
def blocks_tower(
    *, in_channels: int, num_classes: int, image_size: int, config: BlocksConfig | None = None, **overrides: Any
) -> BlocksTower:
    """The blocks tower; keyword overrides set :class:`BlocksConfig` fields (``width_multiplier=0.5``, ...)."""
    base = with_overrides(config or BlocksConfig(), overrides, space="blocks")
    return BlocksTower(in_channels=in_channels, num_classes=num_classes, image_size=image_size, config=base)


__all__ = ["Block", "BlocksConfig", "BlocksTower", "blocks_tower"]
