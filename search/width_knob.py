"""The family of compact networks the device chooses from: one chain, ordered by size, built from a searched supernet.

The search ranks every channel and operator by its keep probability; the device decides how much to keep.  Most of
the chain is channel widths at the searched operator set (scale 1 is the network the search chose).  When the
search switched whole operators off and even the widest channels run under target, the chain goes on upward by
switching the likeliest dead operators back on, one more per *operator level*; symmetrically it goes downward by
switching off the least likely live ones.
(Before the operator levels, every issue-4 benchmark run that missed its target by more than 10 % had measured
even its widest channel plan under target: the search had switched operators off, and channels could not make up.)
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search.export import LatencyCalibration, WidthUnit, aligned_count, force_alive, width_units
from search.gates import ChannelGate, GateConcat, GateGroup, OperatorGate, OperatorGated
from search.spaces.base import LatencyLayer, SearchSpace


@dataclass(frozen=True)
class WidthPlan:
    """One member of the knob's chain: live channels per width unit of its operator level, and a scale that
    reproduces them.  ``operators``: 0 is the searched operator set, +k the k likeliest switched-off operators
    revived, -k the k least likely live ones switched off.  ``index`` is the position in the chain (-1: off it)."""

    index: int
    scale: float
    counts: tuple[int, ...]
    operators: int = 0


@dataclass
class _Level:
    units: list[WidthUnit]
    nominal: list[int]  # the unit's channels at scale 1
    plans: list[WidthPlan]  # every distinct width at this level, narrowest first, not yet placed in the chain


class WidthKnob:
    """A chain of compact networks from a searched supernet, narrowest first.

    At an operator level, unit ``u`` keeps ``aligned_count(scale · nominal_u)`` channels: at level 0 ``nominal_u``
    is what is alive at ``threshold``, so scale 1 is the aligned network the search chose, smaller scales drop the
    least likely channels and larger ones add back the likeliest dead ones.  A revived operator's own channels
    start from their expected count.  Level 0 enters the chain whole; a level above it only with the plans larger
    (in FLOPs) than everything below, a level under it only with the smaller ones, so the chain grows with its
    index.  The probabilities are read once, at construction; :meth:`apply` rewrites log-odds and :meth:`restore`
    puts the searched ones back.
    """

    def __init__(
        self, space: SearchSpace, *, multiple: int = 8, threshold: float = 0.5, operator_levels: bool = True
    ) -> None:
        if multiple < 1:
            raise ValueError(f"multiple: must be at least 1, got {multiple}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold: must be in (0, 1), got {threshold}")
        self.space = space
        self.multiple = multiple
        self.threshold = threshold
        self._gates = space.gates()
        self._saved = {id(g): g.log_odds.detach().clone() for g in self._gates}
        switches = [g for g in self._gates if isinstance(g, OperatorGate) and not g.config.fixed_on]
        chance = {id(g): float(g.probability().detach()) for g in switches}
        self.revivable = sorted((g for g in switches if not g.is_on(threshold)), key=lambda g: -chance[id(g)])
        self.removable = sorted((g for g in switches if g.is_on(threshold)), key=lambda g: chance[id(g)])
        if not operator_levels:
            self.revivable, self.removable = [], []
        self._levels: dict[int, _Level] = {0: self._level(0, base=None)}
        self.plans = self._chain()

    @property
    def units(self) -> list[WidthUnit]:
        """The width units of the searched operator set (level 0)."""
        return self._levels[0].units

    def _set_operators(self, level: int) -> None:
        on, off = torch.tensor([True]), torch.tensor([False])
        with torch.no_grad():
            for gate in self.revivable[: max(level, 0)]:
                force_alive(gate, on, self.threshold)
            for gate in self.removable[: max(-level, 0)]:
                force_alive(gate, off, self.threshold)

    def _level(self, level: int, base: _Level | None) -> _Level:
        self.restore()
        self._set_operators(level)
        # Units that only feed switched-off operators would add plans that compact to the same network.
        used = {id(g) for layer in self.space.latency_layers() for g in _live_gates(layer, self.threshold)}
        units = [u for u in width_units(self.space, self.threshold) if any(id(g) in used for g in u.gates)]
        self.restore()
        if base is None:
            nominal = [u.live for u in units]
        else:
            known = {frozenset(map(id, u.gates)): n for u, n in zip(base.units, base.nominal, strict=True)}
            nominal = [
                known.get(frozenset(map(id, u.gates)), max(u.live, round(float(u.probability.sum())), 1)) for u in units
            ]
        units, nominal = [u for u, n in zip(units, nominal, strict=True) if n > 0], [n for n in nominal if n > 0]
        return _Level(units, nominal, _enumerate(units, nominal, self.multiple, level))

    def counts_at(self, scale: float, operators: int = 0) -> tuple[int, ...]:
        level = self._levels[operators]
        return _counts(level.units, level.nominal, scale, self.multiple)

    def _chain(self) -> list[WidthPlan]:
        # Counts grow along a level, so do FLOPs: each level's cut into the chain is found by bisection.
        middle = self._levels[0].plans
        top = self.flops(middle[-1]) if middle else 0.0
        bottom = self.flops(middle[0]) if middle else 0.0
        above: list[WidthPlan] = []
        for level in range(1, len(self.revivable) + 1):
            plans = self._add_level(level)
            above += plans[bisect.bisect_right(plans, top, key=self.flops) :]
            top = max(top, self.flops(plans[-1]))
        below: list[WidthPlan] = []
        for level in range(-1, -len(self.removable) - 1, -1):
            plans = self._add_level(level)
            below = plans[: bisect.bisect_left(plans, bottom, key=self.flops)] + below
            bottom = min(bottom, self.flops(plans[0]))
        return [WidthPlan(i, p.scale, p.counts, p.operators) for i, p in enumerate(below + middle + above)]

    def _add_level(self, level: int) -> list[WidthPlan]:
        self._levels[level] = self._level(level, self._levels[0])
        return self._levels[level].plans

    def plan_at(self, scale: float, operators: int = 0) -> WidthPlan:
        """The chain's plan at ``scale`` and operator level ``operators`` (index -1 when the chain left it out)."""
        if operators not in self._levels:
            raise ValueError(f"operators: this supernet has levels {min(self._levels)}..{max(self._levels)}")
        counts = self.counts_at(scale, operators)  # the extreme scales clamp to the level's ends
        found = [p for p in self.plans if p.operators == operators and p.counts == counts]
        return found[0] if found else WidthPlan(-1, scale, counts, operators)

    @property
    def searched(self) -> WidthPlan:
        """The plan at scale 1 and level 0: the aligned network the search itself chose."""
        return self.plan_at(1.0)

    def restore(self) -> None:
        with torch.no_grad():
            for gate in self._gates:
                gate.log_odds.copy_(self._saved[id(gate)])

    def apply(self, plan: WidthPlan) -> None:
        """Rewrite the log-odds so that compaction at ``threshold`` keeps exactly ``plan``'s operators and channels."""
        self.restore()
        self._set_operators(plan.operators)
        with torch.no_grad():
            for unit, count in zip(self._levels[plan.operators].units, plan.counts, strict=True):
                unit.force(unit.keep(count), self.threshold)

    def compact(self, plan: WidthPlan) -> tuple[nn.Module, dict[str, Any]]:
        """The standalone network of ``plan`` (the plan stays applied to the supernet until :meth:`restore`)."""
        self.apply(plan)
        return self.space.compact(threshold=self.threshold)

    def layer_counts(self, plan: WidthPlan) -> list[tuple[int, LatencyLayer, int, int]]:
        """(index, layer, live inputs, live outputs) of every latency layer that runs under ``plan``."""
        self.apply(plan)
        rows = []
        for i, layer in enumerate(self.space.latency_layers()):
            if layer.operator_gate is None or layer.operator_gate.is_on(self.threshold):
                cin, cout = (
                    full if source is None else int(source.alive(self.threshold).sum())
                    for full, source in ((layer.cin, layer.cin_source), (layer.cout, layer.cout_source))
                )
                rows.append((i, layer, cin, cout))
        self.restore()
        return rows

    def table_ms(self, plan: WidthPlan, tables: Sequence[torch.Tensor]) -> float:
        """The plan's latency as the per-layer tables predict it (the deterministic network, no expectation)."""
        rows = self.layer_counts(plan)
        return sum(float(tables[i][cin * lay.input_gated, cout * lay.output_gated]) for i, lay, cin, cout in rows)

    def flops(self, plan: WidthPlan) -> float:
        coefficients = [(lay.cost_coefficients(), cin, cout) for _, lay, cin, cout in self.layer_counts(plan)]
        return sum(c[0] * cin * cout + c[1] * cout for c, cin, cout in coefficients)

    def predictor(
        self, tables: Mapping[str, Sequence[torch.Tensor]], calibrations: Mapping[str, LatencyCalibration] | None = None
    ) -> Callable[[WidthPlan], dict[str, float]]:
        """Per device, a plan's table latency mapped to measured ms by that device's calibration (if any)."""
        maps = {d: (calibrations or {}).get(d, LatencyCalibration.identity()) for d in tables}
        return lambda plan: {d: maps[d].to_measured(self.table_ms(plan, t)) for d, t in tables.items()}


def _counts(units: list[WidthUnit], nominal: list[int], scale: float, multiple: int) -> tuple[int, ...]:
    return tuple(aligned_count(scale * n, u.alive.numel(), multiple) for u, n in zip(units, nominal, strict=True))


def _enumerate(units: list[WidthUnit], nominal: list[int], multiple: int, level: int) -> list[WidthPlan]:
    # A unit's count steps up where scale · nominal crosses a half-multiple; between two such points every count
    # is constant, so the midpoints label every distinct network (and are safe from float ties).
    points: set[float] = set()
    for unit, base in zip(units, nominal, strict=True):
        width = unit.alive.numel()
        step = 1 if width <= multiple else multiple
        top = aligned_count(width, width, multiple)
        points.update((k - 0.5) * step / base for k in range(2, top // step + 1))
    edges = sorted(points)
    labels = [edges[0] / 2] if edges else [1.0]
    labels += [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    labels += [edges[-1] * 1.01] if edges else []
    plans: list[WidthPlan] = []
    for scale in labels:
        counts = _counts(units, nominal, scale, multiple)
        if not plans or counts != plans[-1].counts:
            plans.append(WidthPlan(-1, scale, counts, level))
    return plans


def compact_searched(space: SearchSpace, *, multiple: int = 8, threshold: float = 0.5) -> nn.Module:
    """The aligned network the search chose, leaving the supernet's log-odds as they are."""
    knob = WidthKnob(space, multiple=multiple, threshold=threshold, operator_levels=False)
    network, _ = knob.compact(knob.searched)
    knob.restore()
    return network


def _live_gates(layer: LatencyLayer, threshold: float) -> list[ChannelGate]:
    if layer.operator_gate is not None and not layer.operator_gate.is_on(threshold):
        return []
    found: list[ChannelGate] = []
    pending: list[object] = [layer.cin_source, layer.cout_source]
    while pending:
        source = pending.pop()
        if isinstance(source, ChannelGate):
            found.append(source)
        elif isinstance(source, OperatorGated) and source.operator_gate.is_on(threshold):
            pending.append(source.inner)
        elif isinstance(source, GateGroup | GateConcat):
            pending.extend(source.members if isinstance(source, GateGroup) else source.parts)
    return found


__all__ = ["WidthKnob", "WidthPlan", "compact_searched"]
