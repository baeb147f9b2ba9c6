"""The protocol every search space implements, the latency-layer contract, and the space registry.

A space is an ``nn.Module`` supernet whose gated operators are followed by :class:`~search.gates.MaskLayer`s.  It
reports its gates (for the separate gate optimiser), its :class:`LatencyLayer`s (full-width operator specs plus the
channel sources of their input and output counts, for the device services' tables), and compacts itself into a
standalone network described by an architecture JSON (see :mod:`search.spaces.compact`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from predictors.ops import Conv2d, Linear, OpSpec
from search.expected import interpolate_table
from search.gates import ChannelGate, ChannelSource, OperatorGate


@dataclass(eq=False)
class LatencyLayer:
    """One operator whose cost depends on gated channel counts.

    ``op`` is the operator at full widths as the runtime executes it (a Conv2d with folded BN and fused activation,
    or a Linear).  ``cin_source`` / ``cout_source`` give the live-channel counts (``None``: fixed at full width, as
    for the network input or the classifier's classes).  A depthwise conv has one count axis, carried by
    ``cout_source``.  ``operator_gate`` multiplies the expectation by P(operator on); when it is set, the sources
    must not include that same gate (costs would count it twice).
    """

    name: str
    op: OpSpec
    cin_source: ChannelSource | None
    cout_source: ChannelSource | None
    operator_gate: OperatorGate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.op, Conv2d | Linear):
            raise TypeError(f"op: latency layers are Conv2d or Linear, got {type(self.op).__name__}")
        for field_name, width, source in (
            ("cin_source", self.op.cin, self.cin_source),
            ("cout_source", self.op.cout, self.cout_source),
        ):
            if source is not None and source.n != width:
                raise ValueError(f"{self.name}: {field_name} has {source.n} channels, the op {width}")

    @property
    def depthwise(self) -> bool:
        return isinstance(self.op, Conv2d) and self.op.depthwise

    @property
    def cin(self) -> int:
        return int(self.op.cin)  # type: ignore[attr-defined]

    @property
    def cout(self) -> int:
        return int(self.op.cout)  # type: ignore[attr-defined]

    @property
    def input_gated(self) -> bool:
        """Whether the table has a live-input-count axis (depthwise layers carry theirs on the output axis)."""
        return self.cin_source is not None and not self.depthwise

    @property
    def output_gated(self) -> bool:
        return self.cout_source is not None

    @property
    def table_shape(self) -> tuple[int, int]:
        return (self.cin + 1 if self.input_gated else 1, self.cout + 1 if self.output_gated else 1)

    def count_grid(self, step: int = 1) -> tuple[list[int], list[int]]:
        """Channel counts to ask a service for: every ``step``-th count up to full width on gated axes."""
        if step <= 0:
            raise ValueError(f"step: must be positive, got {step}")

        def axis(full: int, gated: bool) -> list[int]:
            if not gated:
                return [full]
            counts = sorted({1, *range(step, full + 1, step), full})
            return counts

        return axis(self.cin, self.input_gated), axis(self.cout, self.output_gated)

    def op_at(self, cin: int, cout: int) -> OpSpec:
        """The operator with ``cin`` / ``cout`` live channels (depthwise: ``cout`` both)."""
        return self.op.resized(cin, cout)  # type: ignore[attr-defined]

    def dense_table(
        self, cin_counts: list[int], cout_counts: list[int], latency_ms: Tensor | list[list[float]]
    ) -> Tensor:
        """A service table on ``count_grid`` counts → dense ``table_shape`` table (0 ms at 0 live channels)."""
        values = torch.as_tensor(latency_ms, dtype=torch.float64)
        return interpolate_table(
            cin_counts if self.input_gated else None,
            cout_counts if self.output_gated else None,
            values,
            self.cin if self.input_gated else None,
            self.cout if self.output_gated else None,
        )

    def cost_coefficients(self) -> tuple[float, float, float, float]:
        """FLOPs and params as ``a·cin·cout + b·cout`` (depthwise: ``a·c``): (flops_a, flops_b, params_a, params_b).

        Both are bilinear in the counts, so their expectation under independent gates is exact from expected counts.
        """
        op = self.op
        if isinstance(op, Linear):
            return 2.0 * op.batch, 0.0, 1.0, 1.0
        assert isinstance(op, Conv2d)
        spatial = op.batch * op.out_hw**2 * op.k**2
        if op.depthwise:
            return 0.0, 2.0 * spatial, 0.0, float(op.k**2 + 1)
        return 2.0 * spatial / op.groups, 0.0, float(op.k**2) / op.groups, 1.0


class SearchSpace(nn.Module):
    """Base of every supernet.  Subclasses call :meth:`refresh_masks` at the start of ``forward``."""

    space_name: ClassVar[str] = ""

    def gates(self) -> list[ChannelGate | OperatorGate]:
        seen: dict[int, ChannelGate | OperatorGate] = {}
        for module in self.modules():
            if isinstance(module, ChannelGate | OperatorGate):
                seen.setdefault(id(module), module)
        return list(seen.values())

    def gate_parameters(self) -> list[nn.Parameter]:
        return [g.log_odds for g in self.gates() if g.log_odds.requires_grad]

    def weight_parameters(self) -> list[nn.Parameter]:
        gate_ids = {id(g.log_odds) for g in self.gates()}
        return [p for p in self.parameters() if id(p) not in gate_ids]

    def refresh_masks(self) -> None:
        """Draw one mask per gate for this step (training) or fix the deterministic ones (eval)."""
        for gate in self.gates():
            gate.refresh()

    def set_gate_step(self, step: int) -> None:
        for gate in self.gates():
            gate.set_step(step)

    def latency_layers(self) -> list[LatencyLayer]:
        raise NotImplementedError

    def cost_layers(self) -> list[LatencyLayer]:
        return self.latency_layers()

    def architecture(self, threshold: float = 0.5) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The compact architecture JSON and the surviving weights, keyed by the compact network's state-dict names."""
        raise NotImplementedError

    def compact(self, threshold: float = 0.5) -> tuple[nn.Module, dict[str, Any]]:
        """A standalone plain-torch network keeping the channels whose keep probability exceeds ``threshold``.

        The network starts from the searched weights; in eval mode with ``threshold=0.5`` its output equals the
        supernet's eval output (the gates' deterministic masks).
        """
        from search.spaces.compact import CompactNet

        arch, weights = self.architecture(threshold)
        network = CompactNet(arch)
        missing, unexpected = network.load_state_dict(weights, strict=False)
        unset = [k for k in missing if not k.endswith("num_batches_tracked")]
        if unset or unexpected:
            raise RuntimeError(f"compaction produced mismatched weights: missing {unset}, unexpected {unexpected}")
        return network, arch

    def keep_probabilities(self) -> dict[str, Tensor]:
        """Per gate name, the detached keep probabilities (for plots and logs)."""
        return {g.gate_name: g.keep_probability().detach() for g in self.gates()}


def from_architecture(arch: dict[str, Any]) -> nn.Module:
    """Rebuild the compact network described by ``arch`` (fresh weights) for export, evaluation or retraining."""
    from search.spaces.compact import CompactNet

    return CompactNet(arch)


SpaceFactory = Callable[..., SearchSpace]
SPACES: dict[str, SpaceFactory] = {}


ConfigT = TypeVar("ConfigT")


def with_overrides(config: ConfigT, overrides: dict[str, Any], *, space: str) -> ConfigT:
    """``config`` with keyword overrides applied; an unknown keyword raises ValueError naming it."""
    known = {f.name for f in fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option for the {space} space; known: {', '.join(sorted(known))}")
    return replace(config, **overrides) if overrides else config  # type: ignore[type-var]


def register_space(name: str) -> Callable[[SpaceFactory], SpaceFactory]:
    def decorate(factory: SpaceFactory) -> SpaceFactory:
        if name in SPACES:
            raise ValueError(f"space {name!r} registered twice")
        SPACES[name] = factory
        return factory

    return decorate


def list_spaces() -> list[str]:
    _import_builtin_spaces()
    return sorted(SPACES)


def create_space(name: str, *, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> SearchSpace:
    """Build a registered space by name (``blocks``, ``cells``)."""
    _import_builtin_spaces()
    if name not in SPACES:
        raise ValueError(f"space: unknown {name!r}; known: {', '.join(sorted(SPACES))}")
    for field_name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field_name}: must be a positive integer, got {value!r}")
    return SPACES[name](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)


def _import_builtin_spaces() -> None:
    import search.spaces.blocks
    import search.spaces.cells
    import search.spaces.from_module  # noqa: F401


def iter_named_gates(space: SearchSpace) -> Iterator[tuple[str, ChannelGate | OperatorGate]]:
    for gate in space.gates():
        yield gate.gate_name, gate


def conv_out_size(hw: int, k: int, stride: int) -> int:
    return (hw + 2 * (k // 2) - k) // stride + 1


def full_macs(space: SearchSpace) -> float:
    """Multiply-adds of the supernet at full widths (for sizing penalties: FiGS suggests strength ≈ 1 / cost)."""
    return math.fsum(layer.op.flops() / 2 for layer in space.cost_layers())


__all__ = [
    "SPACES",
    "LatencyLayer",
    "SearchSpace",
    "conv_out_size",
    "create_space",
    "from_architecture",
    "full_macs",
    "iter_named_gates",
    "list_spaces",
    "register_space",
]
