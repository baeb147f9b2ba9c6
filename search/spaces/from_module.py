"""A search space from an existing network: trace it with torch.fx, gate its convs and linears, tie added channels.

Supported graph: Conv2d (fused with a following BatchNorm2d and activation when they are its only users), depthwise
Conv2d (channels follow its input), Linear, activations (modules, ``F.*`` and ``torch.*`` forms), Max/AvgPool2d,
global average pooling (``AdaptiveAvgPool2d(1)`` or ``mean((2, 3))``), flatten, ``+`` / ``torch.add``
(residuals: the added tensors' channels form one :class:`GateGroup`), ``torch.cat(dim=1)``, Dropout and Identity.
Anything else raises :class:`UnsupportedModuleError` naming the node.  Every conv and linear gets a channel gate,
except those whose channels reach the output (the classes) and grouped convs that are not depthwise.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from predictors.ops import Conv2d as ConvSpec
from predictors.ops import Linear as LinearSpec
from search.gates import ChannelGate, ChannelSource, GateConcat, GateConfig, GateGroup, MaskLayer
from search.spaces.base import LatencyLayer, SearchSpace, register_space
from search.spaces.compact import ARCH_FORMAT, ConvBNAct, activation, kept_indices

_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {
    torch.relu: "relu", nn.functional.relu: "relu", nn.functional.relu6: "relu6",
    nn.functional.hardswish: "hardswish", nn.functional.silu: "silu",
}  # fmt: skip
_PASS_MODULES = (nn.Dropout, nn.Identity)


class UnsupportedModuleError(ValueError):
    """The network uses an operation the gated space cannot express; ``node`` names it."""

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"{node}: {message}")
        self.node = node


@dataclass
class _Op:
    name: str
    kind: str  # input | conv | linear | act | pool | gap | flatten | add | cat | identity
    inputs: list[str]
    module: str | None = None
    bn: str | None = None
    act: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _trace(module: nn.Module) -> list[_Op]:
    graph = torch.fx.symbolic_trace(module).graph
    modules = dict(module.named_modules())
    users = {n.name: list(n.users) for n in graph.nodes}
    ops: list[_Op] = []
    alias: dict[str, str] = {}
    fused: set[str] = set()

    def src(arg: Any) -> str:
        if not isinstance(arg, torch.fx.Node):
            raise UnsupportedModuleError(str(arg), "expected a tensor input")
        return alias.get(arg.name, arg.name)

    for node in graph.nodes:
        if node.name in fused:
            continue
        target = modules.get(str(node.target)) if node.op == "call_module" else None
        if node.op == "placeholder":
            ops.append(_Op(node.name, "input", []))
        elif node.op == "output":
            ops.append(_Op("output", "identity", [src(node.args[0])]))
        elif node.op == "get_attr" or (node.op == "call_method" and node.target == "size"):
            continue
        elif isinstance(target, nn.Conv2d | nn.Linear):
            if isinstance(target, nn.Conv2d):
                k = _square(target.kernel_size, node.name)
                if _square(target.padding, node.name) != k // 2 or _square(target.dilation, node.name) != 1:
                    raise UnsupportedModuleError(node.name, f"conv padding must be k // 2 = {k // 2}, dilation 1")
            op = _Op(node.name, "conv" if isinstance(target, nn.Conv2d) else "linear", [src(node.args[0])])
            op.module, tail = str(node.target), node
            nxt = users[tail.name]
            if (
                isinstance(target, nn.Conv2d)
                and len(nxt) == 1
                and isinstance(modules.get(str(nxt[0].target)), nn.BatchNorm2d)
            ):
                op.bn, tail = str(nxt[0].target), nxt[0]
                fused.add(tail.name)
                nxt = users[tail.name]
            if len(nxt) == 1 and (act := _activation_of(nxt[0], modules)) is not None:
                op.act, tail = act, nxt[0]
                fused.add(tail.name)
            alias[tail.name] = node.name
            ops.append(op)
        elif (act := _activation_of(node, modules)) is not None:
            ops.append(_Op(node.name, "act", [src(node.args[0])], act=act))
        elif isinstance(target, nn.MaxPool2d | nn.AvgPool2d):
            extra: dict[str, Any] = {
                k: _square(getattr(target, k), node.name) for k in ("kernel_size", "stride", "padding")
            }
            extra["op"] = "maxpool" if isinstance(target, nn.MaxPool2d) else "avgpool"
            ops.append(_Op(node.name, "pool", [src(node.args[0])], module=str(node.target), extra=extra))
        elif isinstance(target, nn.AdaptiveAvgPool2d) and _square(target.output_size, node.name) == 1:
            ops.append(_Op(node.name, "gap", [src(node.args[0])], extra={"keepdim": True}))
        elif node.op == "call_method" and node.target == "mean" and tuple(node.args[1:2]) in ((2, 3), ((2, 3),)):
            ops.append(_Op(node.name, "gap", [src(node.args[0])], extra={"keepdim": False}))
        elif isinstance(target, nn.Flatten) or node.target in (torch.flatten, "flatten", "view", "reshape"):
            ops.append(_Op(node.name, "flatten", [src(node.args[0])]))
        elif node.target in (operator.add, operator.iadd, torch.add, "add"):
            ops.append(_Op(node.name, "add", [src(a) for a in node.args[:2]]))
        elif node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim != 1:
                raise UnsupportedModuleError(node.name, f"concatenation along dim {dim}; only channels (1)")
            ops.append(_Op(node.name, "cat", [src(a) for a in node.args[0]]))
        elif isinstance(target, _PASS_MODULES):
            alias[node.name] = src(node.args[0])
        else:
            raise UnsupportedModuleError(node.name, f"unsupported operation {node.op} {node.target}")
    return ops


def _activation_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(modules.get(str(node.target))))  # type: ignore[arg-type]
    if node.op == "call_function":
        return next((name for fn, name in _ACT_FUNCTIONS.items() if fn is node.target), None)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _square(value: Any, where: str) -> int:
    if isinstance(value, tuple | list):
        if len(set(value)) != 1:
            raise UnsupportedModuleError(where, f"non-square {value}")
        value = value[0]
    return int(value)


class TracedSpace(SearchSpace):
    """The gated version of a traced network (a deep copy: the original stays untouched)."""

    space_name = "from_module"

    def __init__(
        self, network: nn.Module, *, in_channels: int, image_size: int, gate: GateConfig | None = None
    ) -> None:
        super().__init__()
        self.net = copy.deepcopy(network)
        self.in_channels, self.image_size = in_channels, image_size
        self.ops = _trace(self.net)
        self._modules_by_name = dict(self.net.named_modules())
        self.acts = nn.ModuleDict({op.name: activation(op.act) for op in self.ops if op.kind == "act"})
        self._shapes = self._propagate_shapes()
        self._layout, self._group_of_unit, finder = self._channel_groups()
        output_groups = {finder.find(g) for g, _ in self._layout["output"]}
        config = gate or GateConfig()
        self.gate_of: dict[str, ChannelGate] = {}
        for op in self.ops:
            if op.kind in ("conv", "linear") and not self._depthwise(op):
                group = finder.find(self._group_of_unit[op.name])
                if group not in output_groups and group != finder.find(self._input_group):
                    self.gate_of[op.name] = ChannelGate(self._shapes[op.name][1], config, op.name)
        self.gates_by_name = nn.ModuleDict(self.gate_of)
        members: dict[int, list[ChannelSource]] = {}
        for name, g in self.gate_of.items():
            members.setdefault(finder.find(self._group_of_unit[name]), []).append(g)
        self.group_source: dict[int, ChannelSource] = {
            k: v[0] if len(v) == 1 else GateGroup(v, f"group{k}") for k, v in members.items()
        }
        self.finder = finder
        self.masks = nn.ModuleDict({name: MaskLayer(g) for name, g in self.gate_of.items()})
        self.num_classes = int(self._shapes["output"][1])
        self.depthwise_masks = nn.ModuleDict(
            {op.name: MaskLayer(s) for op in self.ops if self._depthwise(op) and (s := self.source_of(op.inputs[0]))}
        )

    # ---- structure ------------------------------------------------------------------------------------------------
    def _module(self, name: str | None) -> nn.Module:
        assert name is not None
        return self._modules_by_name[name]

    def _depthwise(self, op: _Op) -> bool:
        conv = self._module(op.module) if op.kind == "conv" else None
        if not isinstance(conv, nn.Conv2d) or conv.groups == 1:
            return False
        if conv.groups == conv.in_channels == conv.out_channels:
            return True
        raise UnsupportedModuleError(op.name, f"grouped conv (groups={conv.groups}) that is not depthwise")

    def _propagate_shapes(self) -> dict[str, tuple[int, ...]]:
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            values = self._run(torch.zeros(1, self.in_channels, self.image_size, self.image_size), masked=False)
        self.net.train(was_training)
        return {name: tuple(v.shape) for name, v in values.items()}

    def _channel_groups(self) -> tuple[dict[str, list[tuple[int, int]]], dict[str, int], _UnionFind]:
        """Per tensor, its channel layout: (group, width) pieces; adds unify groups piecewise."""
        finder = _UnionFind()
        layout: dict[str, list[tuple[int, int]]] = {}
        unit_group: dict[str, int] = {}
        for op in self.ops:
            if op.kind == "input":
                self._input_group = finder.new()
                layout[op.name] = [(self._input_group, self.in_channels)]
            elif op.kind in ("conv", "linear"):
                if self._depthwise(op):
                    layout[op.name] = layout[op.inputs[0]]
                    continue
                unit_group[op.name] = finder.new()
                layout[op.name] = [(unit_group[op.name], self._shapes[op.name][1])]
            elif op.kind == "add":
                first, second = (layout[i] for i in op.inputs)
                if [w for _, w in first] != [w for _, w in second]:
                    raise UnsupportedModuleError(op.name, "added tensors with different channel pieces")
                for (a, _), (b, _) in zip(first, second, strict=True):
                    finder.union(a, b)
                layout[op.name] = first
            elif op.kind == "cat":
                layout[op.name] = [piece for i in op.inputs for piece in layout[i]]
            elif op.kind == "flatten" and len(self._shapes[op.inputs[0]]) == 4 and self._shapes[op.inputs[0]][2] > 1:
                raise UnsupportedModuleError(op.name, "flattening a spatial map (only after global pooling)")
            else:
                layout[op.name] = layout[op.inputs[0]]
        return layout, unit_group, finder

    def source_of(self, tensor: str) -> ChannelSource | None:
        """The live-channel source of a tensor; None when every channel is fixed (network input, classes)."""
        pieces = []
        for group, width in self._layout[tensor]:
            source = self.group_source.get(self.finder.find(group))
            pieces.append(source if source is not None else ChannelGate(width, GateConfig(fixed_on=True)))
        if all(isinstance(p, ChannelGate) and p.config.fixed_on for p in pieces):
            return None
        return pieces[0] if len(pieces) == 1 else GateConcat(pieces)

    # ---- execution ------------------------------------------------------------------------------------------------
    def _run(self, x: Tensor, *, masked: bool) -> dict[str, Tensor]:
        values: dict[str, Tensor] = {}
        for op in self.ops:
            args = [values[i] for i in op.inputs]
            if op.kind == "input":
                out = x
            elif op.kind in ("conv", "linear"):
                out = self._module(op.module)(args[0])
                if op.bn is not None:
                    out = self._module(op.bn)(out)
                if op.act is not None:
                    out = activation(op.act)(out)
                if masked and op.name in self.gate_of:
                    out = self.masks[op.name](out)
                elif masked and op.name in self.depthwise_masks:
                    out = self.depthwise_masks[op.name](out)
            elif op.kind == "act":
                out = self.acts[op.name](args[0])
            elif op.kind == "pool":
                out = self._module(op.module)(args[0])
            elif op.kind == "gap":
                out = args[0].mean(dim=(2, 3), keepdim=bool(op.extra["keepdim"]))
            elif op.kind == "flatten":
                out = args[0].flatten(1)
            elif op.kind == "add":
                out = args[0] + args[1]
            elif op.kind == "cat":
                out = torch.cat(args, dim=1)
            else:
                out = args[0]
            values[op.name] = out
        return values

    def forward(self, x: Tensor) -> Tensor:
        self.refresh_masks()
        return self._run(x, masked=True)["output"]

    # ---- costs and compaction ---------------------------------------------------------------------------------------
    def latency_layers(self) -> list[LatencyLayer]:
        layers = []
        for op in self.ops:
            if op.kind not in ("conv", "linear"):
                continue
            module = self._module(op.module)
            cin_source = self.source_of(op.inputs[0])
            cout_source = cin_source if self._depthwise(op) else self.source_of(op.name)
            if isinstance(module, nn.Conv2d):
                k, stride = _square(module.kernel_size, op.name), _square(module.stride, op.name)
                spec: ConvSpec | LinearSpec = ConvSpec(
                    cin=module.in_channels, cout=module.out_channels, hw=self._shapes[op.inputs[0]][2], k=k,
                    stride=stride, groups=module.groups, bn=op.bn is not None, act=op.act,
                )  # fmt: skip
            else:
                assert isinstance(module, nn.Linear)
                spec = LinearSpec(cin=module.in_features, cout=module.out_features, act=op.act)
            layers.append(LatencyLayer(op.name, spec, cin_source, cout_source))
        return layers

    def _kept(self, tensor: str, threshold: float) -> Tensor:
        parts, offset = [], 0
        for group, width in self._layout[tensor]:
            source = self.group_source.get(self.finder.find(group))
            alive = source.alive(threshold) if source is not None else torch.ones(width, dtype=torch.bool)
            parts.append(kept_indices(alive) + offset)
            offset += width
        return torch.cat(parts)

    def architecture(self, threshold: float = 0.5) -> tuple[dict[str, Any], dict[str, Tensor]]:
        from search.spaces.compact import conv_node, sliced_conv_weights, sliced_linear_weights

        rename = {self.ops[0].name: "input"}
        nodes: list[dict[str, Any]] = []
        weights: dict[str, Tensor] = {}
        for op in self.ops[1:]:
            inputs = [rename.get(i, i) for i in op.inputs]
            if op.kind == "identity":
                rename[op.name] = inputs[0]
                continue
            if op.kind in ("conv", "linear"):
                in_idx, out_idx = self._kept(op.inputs[0], threshold), self._kept(op.name, threshold)
                gate = self.gate_of.get(op.name)
                zero = ~gate.alive(threshold)[out_idx] if gate is not None else None
                module = self._module(op.module)
                if isinstance(module, nn.Conv2d):
                    unit = ConvBNAct.__new__(ConvBNAct)
                    nn.Module.__init__(unit)
                    bn = self._module(op.bn) if op.bn else None
                    assert bn is None or isinstance(bn, nn.BatchNorm2d)
                    unit.conv, unit.bn, unit.act_name = module, bn, op.act
                    depthwise = self._depthwise(op)
                    nodes.append(conv_node(op.name, inputs, unit, len(in_idx), len(out_idx), depthwise=depthwise))
                    weights |= sliced_conv_weights(op.name, unit, out_idx, None if depthwise else in_idx, zero)
                else:
                    assert isinstance(module, nn.Linear)
                    node = {"name": op.name, "op": "linear", "inputs": inputs, "cin": len(in_idx)}
                    nodes.append(node | {"cout": len(out_idx), "act": op.act, "bias": module.bias is not None})
                    weights |= sliced_linear_weights(op.name, module, out_idx, in_idx)
                    if zero is not None and bool(zero.any()):
                        weights[f"layers.{op.name}.0.weight"][zero] = 0
                        if module.bias is not None:
                            weights[f"layers.{op.name}.0.bias"][zero] = 0
            elif op.kind == "pool":
                e = op.extra
                nodes.append({"name": op.name, "op": e["op"], "inputs": inputs, "k": e["kernel_size"],
                              "stride": e["stride"], "padding": e["padding"]})  # fmt: skip
            elif op.kind == "gap":
                nodes.append({"name": op.name, "op": "global_avgpool", "inputs": inputs})
            else:
                kind = {"act": "act", "flatten": "flatten", "add": "add", "cat": "concat"}[op.kind]
                nodes.append({"name": op.name, "op": kind, "inputs": inputs, "act": op.act})
        output = rename.get("output", "output")
        arch = {
            "format": ARCH_FORMAT, "space": self.space_name,
            "input": {"channels": self.in_channels, "size": self.image_size},
            "num_classes": int(self._shapes["output"][1]), "nodes": nodes, "output": output,
        }  # fmt: skip
        return arch, weights


def space_from_module(
    network: nn.Module, *, in_channels: int, image_size: int, gate: GateConfig | None = None
) -> TracedSpace:
    """Gate an existing network (see the module docstring for what it may contain)."""
    return TracedSpace(network, in_channels=in_channels, image_size=image_size, gate=gate)


@register_space("from_module")
def _registered(
    *, in_channels: int, num_classes: int, image_size: int, module: nn.Module, gate: GateConfig | None = None
) -> TracedSpace:
    space = TracedSpace(module, in_channels=in_channels, image_size=image_size, gate=gate)
    if space.num_classes != num_classes:
        raise ValueError(f"num_classes: the module outputs {space.num_classes}, not {num_classes}")
    return space


__all__ = ["TracedSpace", "UnsupportedModuleError", "space_from_module"]
