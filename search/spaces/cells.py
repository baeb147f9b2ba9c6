"""Cells of blocks (FiGS Fig. 4A): every block sums operators applied to the two previous cells and earlier blocks.

Cell k sees the outputs of cells k−2 and k−1 (the stem stands in for missing ones).  Block b of a cell sums one
3×3 conv-BN-ReLU edge from every earlier node of the cell (both cell inputs and blocks 0..b−1); the cell's output
is the concatenation of its blocks.  Reduction cells halve the resolution (their edges from the cell inputs have
stride 2) and double the block width.

Gates: a channel gate per edge on its output channels and an operator gate per edge.  A block's channels are tied
by its sum (a :class:`GateGroup` of the edges), so every live edge of a block computes the block's surviving
channels.  The first edge of block 0 (from the previous cell) has no operator gate, which keeps every cell
connected.  A block whose every edge is off, or reads only dead nodes, is dropped with all edges leaving it; the
cost model charges an edge by its own operator gate only (a small overestimate when its source block dies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from predictors.ops import Conv2d, Linear
from search.gates import ChannelGate, ChannelSource, GateConcat, GateConfig, GateGroup, MaskLayer, OperatorGate
from search.gates import OperatorGated as Gated
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
class CellsConfig:
    stem_channels: int = 16
    block_channels: int = 12
    cells: int = 3
    blocks_per_cell: int = 2
    reductions: tuple[int, ...] | None = None  # None: cell 1 for images up to 16 px, else cells 1 and 2
    width_multiplier: float = 1.0
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        for name in ("stem_channels", "block_channels", "cells", "blocks_per_cell"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")


@dataclass
class _Node:
    name: str
    channels: int
    hw: int
    source: ChannelSource


class Edge(nn.Module):
    def __init__(self, name: str, src: _Node, cout: int, stride: int, gated_op: bool, config: GateConfig) -> None:
        super().__init__()
        self.edge_name, self.src = name, src
        self.unit = ConvBNAct(src.channels, cout, 3, stride)
        self.gate = ChannelGate(cout, config, f"{name}.ch")
        self.op_gate = OperatorGate(config, f"{name}.on") if gated_op else None
        self.out_source: ChannelSource = self.gate if self.op_gate is None else Gated(self.gate, self.op_gate)
        self.mask = MaskLayer(self.out_source)

    def is_on(self) -> bool:
        """In eval mode, the deterministic decision; in training, whether this step's mask is not exactly zero."""
        if self.op_gate is None:
            return True
        return bool(self.op_gate.mask().detach().item() != 0)


class CellsNetwork(SearchSpace):
    space_name = "cells"

    def __init__(self, *, in_channels: int, num_classes: int, image_size: int, config: CellsConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        w = config.width_multiplier
        stem_stride = 1 if image_size <= 16 else 2
        stem_width = max(1, round(config.stem_channels * w))
        self.stem = ConvBNAct(in_channels, stem_width, 3, stem_stride)
        self.stem_gate = ChannelGate(stem_width, config.gate, "stem")
        self.stem_mask = MaskLayer(self.stem_gate)
        hw = conv_out_size(image_size, 3, stem_stride)
        stem = _Node("stem", stem_width, hw, self.stem_gate)
        reductions = config.reductions if config.reductions is not None else ((1,) if image_size <= 16 else (1, 2))
        width = max(1, round(config.block_channels * w))
        prev_prev, prev = stem, stem
        self.edge_list: list[Edge] = []
        self.block_edges: list[list[Edge]] = []
        self.block_nodes: list[_Node] = []
        self.cell_nodes: list[_Node] = []
        self.cell_blocks: list[list[int]] = []
        for c in range(config.cells):
            reduce = c in reductions
            width = width * 2 if reduce else width
            out_hw = conv_out_size(prev.hw, 3, 2) if reduce else prev.hw
            candidates = [prev] if prev_prev is prev else [prev, prev_prev]
            nodes = [n for n in candidates if self._stride(n.hw, out_hw) is not None]
            blocks: list[int] = []
            for b in range(config.blocks_per_cell):
                edges = []
                for i, src in enumerate(nodes):
                    stride = self._stride(src.hw, out_hw)
                    assert stride is not None
                    name = f"c{c}b{b}.from_{src.name}"
                    edges.append(Edge(name, src, width, stride, not (b == 0 and i == 0), config.gate))
                group = GateGroup([e.out_source for e in edges], f"c{c}b{b}")
                node = _Node(f"c{c}b{b}", width, out_hw, group)
                self.edge_list.extend(edges)
                self.block_edges.append(edges)
                blocks.append(len(self.block_nodes))
                self.block_nodes.append(node)
                nodes.append(node)
            concat = GateConcat([self.block_nodes[i].source for i in blocks])
            cell = _Node(f"c{c}", width * len(blocks), out_hw, concat)
            self.cell_nodes.append(cell)
            self.cell_blocks.append(blocks)
            prev_prev, prev = prev, cell
        self.edges = nn.ModuleList(self.edge_list)
        self.classifier = nn.Linear(prev.channels, num_classes)

    @staticmethod
    def _stride(hw_in: int, hw_out: int) -> int | None:
        for stride in (1, 2):
            if conv_out_size(hw_in, 3, stride) == hw_out:
                return stride
        return None

    def _live_blocks(self) -> list[bool]:
        """A block lives when one of its edges is on and reads a live node (cells and the stem always live)."""
        alive: dict[str, bool] = {"stem": True}
        live = []
        for cell, blocks in zip(self.cell_nodes, self.cell_blocks, strict=True):
            for b in blocks:
                on = any(e.is_on() and alive[e.src.name] for e in self.block_edges[b])
                alive[self.block_nodes[b].name] = on
                live.append(on)
            alive[cell.name] = True
        return live

    def forward(self, x: Tensor) -> Tensor:
        self.refresh_masks()
        values = {"stem": self.stem_mask(self.stem(x))}
        live = self._live_blocks()
        for cell, blocks in zip(self.cell_nodes, self.cell_blocks, strict=True):
            outputs = []
            for b in blocks:
                node = self.block_nodes[b]
                total: Tensor | None = None
                if live[b]:
                    for e in self.block_edges[b]:
                        if e.is_on() and values.get(e.src.name) is not None:
                            out = e.mask(e.unit(values[e.src.name]))
                            total = out if total is None else total + out
                values[node.name] = total
                outputs.append(total)
            reference = next(o for o in outputs if o is not None)
            values[cell.name] = torch.cat([o if o is not None else torch.zeros_like(reference) for o in outputs], 1)
        return self.classifier(values[self.cell_nodes[-1].name].mean(dim=(2, 3)))

    def latency_layers(self) -> list[LatencyLayer]:
        stem = Conv2d(
            cin=self.in_channels, cout=self.stem_gate.n, hw=self.image_size, k=3,
            stride=int(self.stem.conv.stride[0]), bn=True, act="relu",
        )  # fmt: skip
        layers = [LatencyLayer("stem", stem, None, self.stem_gate)]
        for b, edges in enumerate(self.block_edges):
            block = self.block_nodes[b]
            for e in edges:
                op = Conv2d(
                    cin=e.src.channels, cout=block.channels, hw=e.src.hw, k=3,
                    stride=int(e.unit.conv.stride[0]), bn=True, act="relu",
                )  # fmt: skip
                layers.append(LatencyLayer(e.edge_name, op, e.src.source, block.source, e.op_gate))
        last = self.cell_nodes[-1]
        layers.append(LatencyLayer("classifier", Linear(cin=last.channels, cout=self.num_classes), last.source, None))
        return layers

    def architecture(self, threshold: float = 0.5) -> tuple[dict[str, Any], dict[str, Tensor]]:
        was_training = self.training
        self.eval()
        self.refresh_masks()
        live = self._live_blocks()
        self.train(was_training)
        nodes: list[dict[str, Any]] = []
        weights: dict[str, Tensor] = {}
        kept: dict[str, Tensor] = {}
        # Logical node -> the compact node that computes it (a block with one live edge is that edge's conv).
        produced: dict[str, str] = {"stem": "stem"}
        kept["stem"] = kept_indices(self.stem_gate.alive(threshold))
        nodes.append(conv_node("stem", ["input"], self.stem, self.in_channels, len(kept["stem"])))
        weights |= sliced_conv_weights("stem", self.stem, kept["stem"], torch.arange(self.in_channels))
        for cell, blocks in zip(self.cell_nodes, self.cell_blocks, strict=True):
            parts: list[str] = []
            columns: list[Tensor] = []
            offset = 0
            for b in blocks:
                node = self.block_nodes[b]
                live_edges = [e for e in self.block_edges[b] if live[b] and e.is_on() and e.src.name in kept]
                if live_edges:
                    out_idx = kept_indices(torch.stack([e.gate.alive(threshold) for e in live_edges]).any(0))
                    names = []
                    for e in live_edges:
                        in_idx = kept[e.src.name]
                        nodes.append(conv_node(e.edge_name, [produced[e.src.name]], e.unit, len(in_idx), len(out_idx)))
                        zero = ~e.gate.alive(threshold)[out_idx]
                        weights |= sliced_conv_weights(e.edge_name, e.unit, out_idx, in_idx, zero)
                        names.append(e.edge_name)
                    if len(names) > 1:
                        nodes.append({"name": node.name, "op": "add", "inputs": names})
                    produced[node.name] = node.name if len(names) > 1 else names[0]
                    kept[node.name] = out_idx
                    parts.append(produced[node.name])
                    columns.append(out_idx + offset)
                offset += node.channels
            if len(parts) > 1:
                nodes.append({"name": cell.name, "op": "concat", "inputs": parts})
            produced[cell.name] = cell.name if len(parts) > 1 else parts[0]
            kept[cell.name] = torch.cat(columns)
        last = self.cell_nodes[-1].name
        nodes.append({"name": "pool", "op": "global_avgpool", "inputs": [produced[last]]})
        nodes.append(
            {"name": "classifier", "op": "linear", "inputs": ["pool"], "cin": len(kept[last]), "cout": self.num_classes}
        )
        weights |= sliced_linear_weights("classifier", self.classifier, None, kept[last])
        arch = {
            "format": ARCH_FORMAT,
            "space": self.space_name,
            "input": {"channels": self.in_channels, "size": self.image_size},
            "num_classes": self.num_classes,
            "nodes": nodes,
            "output": "classifier",
        }
        return arch, weights


@register_space("cells")
def cells_network(
    *, in_channels: int, num_classes: int, image_size: int, config: CellsConfig | None = None, **overrides: Any
) -> CellsNetwork:
    """Cells of blocks; keyword overrides set :class:`CellsConfig` fields."""
    base = with_overrides(config or CellsConfig(), overrides, space="cells")
    return CellsNetwork(in_channels=in_channels, num_classes=num_classes, image_size=image_size, config=base)


__all__ = ["CellsConfig", "CellsNetwork", "Edge", "cells_network"]
