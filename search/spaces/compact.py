"""Architecture JSON and the standalone network it describes (no gates, no masks: real, smaller tensors).

Format ``figs-arch/1``::

    {"format": "figs-arch/1", "space": "blocks", "input": {"channels": 1, "size": 8}, "num_classes": 10,
     "nodes": [{"name": "stem", "op": "conv", "inputs": ["input"], "cin": 1, "cout": 12, "k": 3, "stride": 1,
                "groups": 1, "bn": true, "act": "relu", "bias": false}, ...],
     "output": "classifier"}

Node ops: ``conv``, ``linear``, ``add`` (optional ``act`` after the sum), ``concat`` (channels), ``act``,
``maxpool`` / ``avgpool`` (``k``, ``stride``, ``padding``, default ``k // 2`` as in the operator catalogue),
``global_avgpool`` (to ``[B, C]``) and ``flatten``.  Nodes are listed in execution order; ``inputs`` name
earlier nodes or ``input``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from predictors.ops import ACTIVATIONS, Conv2d, Linear, OpSpec

ARCH_FORMAT = "figs-arch/1"
NODE_OPS = ("conv", "linear", "add", "concat", "act", "maxpool", "avgpool", "global_avgpool", "flatten")
_ACT_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}


class ArchitectureError(ValueError):
    """The architecture JSON is invalid; ``field`` names where (``nodes[3].cin``, ``output``, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    if name not in _ACT_MODULES:
        raise ValueError(f"act: must be null or one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return _ACT_MODULES[name]()


class ConvBNAct(nn.Module):
    """Conv → BatchNorm → activation: the unit the runtime fuses into one kernel; used by supernets and compact nets."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        bn: bool = True,
        act: str | None = "relu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias or not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.act = activation(act)
        self.act_name = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)


def _module_key(name: str) -> str:
    return name.replace(".", "__")


def _positive_int(node: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArchitectureError(f"{where}.{key}", f"must be a positive integer, got {value!r}")
    return value


def _shape_walk(arch: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Validate ``arch`` and return (channels, spatial size; 0 once flattened) of every node."""
    if not isinstance(arch, dict):
        raise ArchitectureError("arch", "must be a JSON object")
    if arch.get("format") != ARCH_FORMAT:
        raise ArchitectureError("format", f"must be {ARCH_FORMAT!r}, got {arch.get('format')!r}")
    spec_in = arch.get("input")
    if not isinstance(spec_in, dict):
        raise ArchitectureError("input", "must be an object with channels and size")
    shapes = {"input": (_positive_int(spec_in, "channels", "input"), _positive_int(spec_in, "size", "input"))}
    nodes = arch.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise ArchitectureError("nodes", "must be a non-empty list")
    for i, node in enumerate(nodes):
        where = f"nodes[{i}]"
        if not isinstance(node, dict):
            raise ArchitectureError(where, "must be an object")
        name, op, inputs = node.get("name"), node.get("op"), node.get("inputs")
        if not isinstance(name, str) or not name or name in shapes:
            raise ArchitectureError(f"{where}.name", f"must be a new, non-empty name, got {name!r}")
        if op not in NODE_OPS:
            raise ArchitectureError(f"{where}.op", f"must be one of {', '.join(NODE_OPS)}, got {op!r}")
        if not isinstance(inputs, list) or not inputs or any(s not in shapes for s in inputs):
            raise ArchitectureError(f"{where}.inputs", f"must name earlier nodes, got {inputs!r}")
        if op not in ("add", "concat") and len(inputs) != 1:
            raise ArchitectureError(f"{where}.inputs", f"{op} takes one input, got {len(inputs)}")
        if node.get("act") is not None and node["act"] not in _ACT_MODULES:
            raise ArchitectureError(f"{where}.act", f"must be null or one of {', '.join(ACTIVATIONS)}")
        in_shapes = [shapes[s] for s in inputs]
        channels, size = in_shapes[0]
        if op == "conv":
            cin, cout = _positive_int(node, "cin", where), _positive_int(node, "cout", where)
            k = _positive_int(node, "k", where, 1)
            stride = _positive_int(node, "stride", where, 1)
            groups = _positive_int(node, "groups", where, 1)
            if size == 0 or cin != channels:
                raise ArchitectureError(f"{where}.cin", f"is {cin} but its input has {channels} channels")
            if cin % groups or cout % groups:
                raise ArchitectureError(f"{where}.groups", f"{groups} does not divide cin {cin} and cout {cout}")
            shapes[name] = (cout, (size + 2 * (k // 2) - k) // stride + 1)
        elif op == "linear":
            cin, cout = _positive_int(node, "cin", where), _positive_int(node, "cout", where)
            if size != 0 or cin != channels:
                raise ArchitectureError(f"{where}.cin", f"is {cin} but its flattened input has {channels} features")
            shapes[name] = (cout, 0)
        elif op == "add":
            if len(set(in_shapes)) != 1:
                raise ArchitectureError(f"{where}.inputs", f"added tensors differ in shape: {in_shapes}")
            shapes[name] = in_shapes[0]
        elif op == "concat":
            if len({s for _, s in in_shapes}) != 1:
                raise ArchitectureError(f"{where}.inputs", f"concatenated tensors differ in size: {in_shapes}")
            shapes[name] = (sum(c for c, _ in in_shapes), size)
        elif op in ("maxpool", "avgpool"):
            k, stride = _positive_int(node, "k", where, 2), _positive_int(node, "stride", where, 2)
            padding = node.get("padding", k // 2)
            if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= k // 2:
                raise ArchitectureError(f"{where}.padding", f"must be an integer in [0, {k // 2}], got {padding!r}")
            shapes[name] = (channels, (size + 2 * padding - k) // stride + 1)
        elif op in ("global_avgpool", "flatten"):
            shapes[name] = (channels if op == "global_avgpool" else channels * max(size, 1) ** 2, 0)
        else:
            shapes[name] = (channels, size)
    if arch.get("output") not in shapes:
        raise ArchitectureError("output", f"must name a node, got {arch.get('output')!r}")
    return shapes


def validate_architecture(arch: dict[str, Any]) -> None:
    """Raise :class:`ArchitectureError` naming the first invalid field."""
    _shape_walk(arch)


class CompactNet(nn.Module):
    """The standalone network of an architecture JSON: plain Conv/BN/ReLU/Linear modules run in node order."""

    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        _shape_walk(arch)
        self.arch = copy.deepcopy(arch)
        self.layers = nn.ModuleDict()
        for node in self.arch["nodes"]:
            op, key = node["op"], _module_key(node["name"])
            if op == "conv":
                self.layers[key] = ConvBNAct(
                    node["cin"],
                    node["cout"],
                    node.get("k", 1),
                    node.get("stride", 1),
                    node.get("groups", 1),
                    bn=bool(node.get("bn", True)),
                    act=node.get("act"),
                    bias=bool(node.get("bias", False)),
                )
            elif op == "linear":
                linear = nn.Linear(node["cin"], node["cout"], bias=bool(node.get("bias", True)))
                self.layers[key] = nn.Sequential(linear, activation(node.get("act")))
            elif op in ("add", "act"):
                self.layers[key] = activation(node.get("act"))
            elif op in ("maxpool", "avgpool"):
                k, stride = node.get("k", 2), node.get("stride", 2)
                pool = nn.MaxPool2d if op == "maxpool" else nn.AvgPool2d
                self.layers[key] = pool(k, stride, node.get("padding", k // 2))
            elif op == "global_avgpool":
                self.layers[key] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            elif op == "flatten":
                self.layers[key] = nn.Flatten()

    def forward(self, x: Tensor) -> Tensor:
        values: dict[str, Tensor] = {"input": x}
        for node in self.arch["nodes"]:
            inputs = [values[s] for s in node["inputs"]]
            op = node["op"]
            if op == "add":
                out = inputs[0]
                for other in inputs[1:]:
                    out = out + other
                values[node["name"]] = self.layers[_module_key(node["name"])](out)
            elif op == "concat":
                values[node["name"]] = torch.cat(inputs, dim=1)
            else:
                values[node["name"]] = self.layers[_module_key(node["name"])](inputs[0])
        return values[self.arch["output"]]


def architecture_ops(arch: dict[str, Any]) -> list[tuple[str, OpSpec]]:
    """The compact network's convolutions and linears as operator specs (batch 1), for per-layer prediction."""
    shapes = _shape_walk(arch)
    ops: list[tuple[str, OpSpec]] = []
    for node in arch["nodes"]:
        if node["op"] == "conv":
            size = shapes[node["inputs"][0]][1]
            spec: OpSpec = Conv2d(
                cin=node["cin"],
                cout=node["cout"],
                hw=size,
                k=node.get("k", 1),
                stride=node.get("stride", 1),
                groups=node.get("groups", 1),
                bn=bool(node.get("bn", True)),
                act=node.get("act"),
            )
            ops.append((node["name"], spec))
        elif node["op"] == "linear":
            ops.append((node["name"], Linear(cin=node["cin"], cout=node["cout"], act=node.get("act"))))
    return ops


def conv_node(
    name: str, inputs: list[str], unit: ConvBNAct, cin: int, cout: int, *, depthwise: bool = False
) -> dict[str, Any]:
    conv = unit.conv
    return {
        "name": name,
        "op": "conv",
        "inputs": inputs,
        "cin": cin,
        "cout": cout,
        "k": int(conv.kernel_size[0]),
        "stride": int(conv.stride[0]),
        "groups": cout if depthwise else 1,
        "bn": unit.bn is not None,
        "act": unit.act_name,
        "bias": conv.bias is not None and unit.bn is None,
    }


def sliced_conv_weights(
    name: str, unit: ConvBNAct, out_idx: Tensor, in_idx: Tensor | None, zero_out: Tensor | None = None
) -> dict[str, Tensor]:
    """State-dict entries of ``unit`` restricted to kept channels.

    ``in_idx=None`` means a depthwise conv (its input channels are its output channels).  ``zero_out`` marks kept
    output channels this unit must leave at exactly zero (a residual group keeps the channel for another member):
    zero weights, bias and BN affine make BN output 0, and the activations used here map 0 to 0.
    """
    prefix = f"layers.{_module_key(name)}"
    weight = unit.conv.weight.detach()[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    out: dict[str, Tensor] = {f"{prefix}.conv.weight": weight.clone()}
    if unit.conv.bias is not None and unit.bn is None:
        out[f"{prefix}.conv.bias"] = unit.conv.bias.detach()[out_idx].clone()
    if unit.bn is not None:
        for key in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.bn.{key}"] = getattr(unit.bn, key).detach()[out_idx].clone()
        if unit.conv.bias is not None:
            # A conv bias before BN is a shift of the running mean (compact conv-BN units carry no conv bias).
            out[f"{prefix}.bn.running_mean"] -= unit.conv.bias.detach()[out_idx]
        tracked = unit.bn.num_batches_tracked
        if tracked is not None:
            out[f"{prefix}.bn.num_batches_tracked"] = tracked.detach().clone()
    if zero_out is not None and bool(zero_out.any()):
        out[f"{prefix}.conv.weight"][zero_out] = 0
        for key in (f"{prefix}.conv.bias", f"{prefix}.bn.weight", f"{prefix}.bn.bias"):
            if key in out:
                out[key][zero_out] = 0
    return out


def sliced_linear_weights(name: str, linear: nn.Linear, out_idx: Tensor | None, in_idx: Tensor) -> dict[str, Tensor]:
    prefix = f"layers.{_module_key(name)}.0"
    weight = linear.weight.detach()[:, in_idx]
    bias = linear.bias.detach() if linear.bias is not None else None
    if out_idx is not None:
        weight = weight[out_idx]
        bias = bias[out_idx] if bias is not None else None
    out = {f"{prefix}.weight": weight.clone()}
    if bias is not None:
        out[f"{prefix}.bias"] = bias.clone()
    return out


def kept_indices(alive: Tensor) -> Tensor:
    return torch.nonzero(alive, as_tuple=False).flatten()


__all__ = [
    "ARCH_FORMAT",
    "NODE_OPS",
    "ArchitectureError",
    "CompactNet",
    "ConvBNAct",
    "activation",
    "architecture_ops",
    "conv_node",
    "kept_indices",
    "sliced_conv_weights",
    "sliced_linear_weights",
    "validate_architecture",
]
