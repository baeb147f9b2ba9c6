"""A flat evaluation plan for the count distributions of every latency layer of a space.

Walking the gate objects layer by layer costs thousands of small tensor operations per step (measured: ~5,900
aten calls for the default blocks tower against ~2,900 for its whole training step), which broke the 5 % budget.
The plan flattens the gate graph once, at construction, into index tensors:

1. all channel-gate log-odds in one vector, all operator gates in another ("switches", plus the constants 1 and 0
   and the any-of groups);
2. every *atom* (a gate, or a group of tied gates, each member possibly behind a switch) as a
   ``[members, width]`` block of channel indices: its channel probabilities are 1 − ∏ₘ(1 − sₘ·pₘ);
3. every *source* (an atom, an atom behind a switch, or a concatenation of those) as a run of *parts* (atom,
   switch): its count pmf is the product of the parts' mixtures s·pmf + (1 − s)·δ₀.

:mod:`search.exact_costs` evaluates the exact expectations over this layout; the plug-in form uses
:meth:`CountPlan.source_means`.  Source graphs the plan cannot express raise :class:`UnsupportedSource`;
:class:`search.costs.CostModel` then falls back to the object-by-object evaluation, which gives the same values
more slowly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from search.gates import (
    HARD_CONCRETE_BETA,
    HARD_CONCRETE_GAMMA,
    HARD_CONCRETE_ZETA,
    AnyOf,
    ChannelGate,
    ChannelSource,
    GateConcat,
    GateGroup,
    OperatorGate,
    OperatorGated,
)
from search.spaces.base import LatencyLayer

_HARD_CONCRETE_SHIFT = HARD_CONCRETE_BETA * float(torch.log(torch.tensor(-HARD_CONCRETE_GAMMA / HARD_CONCRETE_ZETA)))


class UnsupportedSource(TypeError):
    """A channel source whose count distribution the vectorised plan cannot express."""


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class CountPlan:
    """Index tensors that turn the gates' log-odds into every layer's input and output count pmfs."""

    def __init__(self, layers: Sequence[LatencyLayer], rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.channel_gates: list[ChannelGate] = []
        self._gate_offset: dict[int, int] = {}
        self.operator_gates: list[OperatorGate] = []
        self._switch_index: dict[int, int] = {}
        self._any_members: list[list[int]] = []
        self._atoms: list[list[tuple[ChannelGate, object | None]]] = []
        self._atom_index: dict[int, int] = {}
        self._sources: list[list[tuple[int, object | None]]] = []
        self._source_index: dict[int, int] = {}
        in_index, out_index, layer_switches = [], [], []
        for layer in layers:
            in_index.append(self._source(layer.cin_source) if layer.input_gated else -1)
            out_index.append(self._source(layer.cout_source) if layer.cout_source is not None else -1)
            layer_switches.append(layer.operator_gate)
        # Operator gates get indices only once every switch is known, so the index tensors are built last.
        self._n_channels = sum(g.n for g in self.channel_gates)
        self._n_ops = len(self.operator_gates)
        self.one, self.zero = self._n_ops, self._n_ops + 1
        self._build(in_index, out_index, layer_switches)

    # ---- flattening the gate graph ----------------------------------------------------------------------------
    def _channel_gate(self, gate: ChannelGate) -> None:
        if id(gate) not in self._gate_offset:
            self._gate_offset[id(gate)] = sum(g.n for g in self.channel_gates)
            self.channel_gates.append(gate)

    def _switch(self, switch: object | None) -> object | None:
        if switch is None:
            return None
        gates = switch.gates if isinstance(switch, AnyOf) else [switch]
        for gate in gates:
            if not isinstance(gate, OperatorGate):
                raise UnsupportedSource(f"switch of type {type(gate).__name__}")
            if id(gate) not in self._switch_index:
                self._switch_index[id(gate)] = len(self.operator_gates)
                self.operator_gates.append(gate)
        return switch

    def _members(self, source: object) -> list[tuple[ChannelGate, object | None]]:
        if isinstance(source, ChannelGate):
            self._channel_gate(source)
            return [(source, None)]
        if isinstance(source, GateGroup):
            return [m for member in source.members for m in self._members(member)]
        if isinstance(source, OperatorGated) and isinstance(source.inner, ChannelGate):
            self._channel_gate(source.inner)
            return [(source.inner, self._switch(source.operator_gate))]
        raise UnsupportedSource(f"group member of type {type(source).__name__}")

    def _atom(self, source: ChannelSource) -> int:
        if id(source) not in self._atom_index:
            self._atom_index[id(source)] = len(self._atoms)
            self._atoms.append(self._members(source))
        return self._atom_index[id(source)]

    def _parts(self, source: ChannelSource) -> list[tuple[int, object | None]]:
        if isinstance(source, GateConcat):
            return [p for part in source.parts for p in self._parts(part)]
        if isinstance(source, OperatorGated):
            if isinstance(source.inner, GateConcat):
                raise UnsupportedSource("an operator gate over a concatenation")
            return [(self._atom(source.inner), self._switch(source.operator_gate))]
        if isinstance(source, ChannelGate | GateGroup):
            return [(self._atom(source), None)]
        raise UnsupportedSource(f"source of type {type(source).__name__}")

    def _source(self, source: ChannelSource | None) -> int:
        assert source is not None
        if id(source) not in self._source_index:
            self._source_index[id(source)] = len(self._sources)
            self._sources.append(self._parts(source))
        return self._source_index[id(source)]

    def _switch_id(self, switch: object | None) -> int:
        if switch is None:
            return self.one
        if isinstance(switch, OperatorGate):
            return self._switch_index[id(switch)]
        assert isinstance(switch, AnyOf)
        members = [self._switch_index[id(g)] for g in switch.gates]
        if members not in self._any_members:
            self._any_members.append(members)
        return self._n_ops + 2 + self._any_members.index(members)

    def _build(self, in_index: list[int], out_index: list[int], layer_switches: Sequence[object | None]) -> None:
        gates = self.channel_gates
        self.shift = torch.cat(
            [torch.full((g.n,), _HARD_CONCRETE_SHIFT if g.config.estimator == "hard_concrete" else 0.0) for g in gates]
        )
        forced = [torch.full((g.n,), g.config.fixed_on) | (g.pinned & g.config.keep_first_alive) for g in gates]
        self.forced_on = torch.cat(forced) if forced else torch.zeros(0, dtype=torch.bool)
        ops = self.operator_gates
        self.op_shift = torch.tensor(
            [_HARD_CONCRETE_SHIFT if g.config.estimator == "hard_concrete" else 0.0 for g in ops]
        )
        self.op_fixed = torch.tensor([g.config.fixed_on for g in ops], dtype=torch.bool)
        layer_switch_ids = [self._switch_id(s) for s in layer_switches]
        atom_width = _next_power_of_two(max((max(g.n for g, _ in a) for a in self._atoms), default=1))
        members = max((len(a) for a in self._atoms), default=1)
        channel_index = torch.full((len(self._atoms), members, atom_width), self._n_channels, dtype=torch.long)
        member_switch = torch.full((len(self._atoms), members), self.zero, dtype=torch.long)
        for a, atom in enumerate(self._atoms):
            for m, (gate, switch) in enumerate(atom):
                offset = self._gate_offset[id(gate)]
                channel_index[a, m, : gate.n] = torch.arange(offset, offset + gate.n)
                member_switch[a, m] = self._switch_id(switch)
        self.channel_index, self.member_switch = channel_index, member_switch
        self.atom_width = atom_width
        width = max(len(m) for m in self._any_members) if self._any_members else 1
        any_index = torch.full((len(self._any_members), width), self.zero, dtype=torch.long)
        for k, ids in enumerate(self._any_members):
            any_index[k, : len(ids)] = torch.tensor(ids)
        self.any_index = any_index
        parts = [(s, atom, self._switch_id(sw)) for s, src in enumerate(self._sources) for atom, sw in src]
        self.part_atom = torch.tensor([a for _, a, _ in parts], dtype=torch.long)
        self.part_switch = torch.tensor([w for _, _, w in parts], dtype=torch.long)
        self.part_source = torch.tensor([s for s, _, _ in parts], dtype=torch.long)
        fixed = len(self._sources)
        self.in_index = torch.tensor([fixed if i < 0 else i for i in in_index], dtype=torch.long)
        self.out_index = torch.tensor([fixed if i < 0 else i for i in out_index], dtype=torch.long)
        self.fixed_in = torch.tensor([i < 0 for i in in_index])
        self.fixed_out = torch.tensor([i < 0 for i in out_index])
        self.layer_switch = torch.tensor(layer_switch_ids, dtype=torch.long)

    @property
    def source_pointers(self) -> Tensor:
        """Source s's parts are ``part_atom[pointers[s]:pointers[s + 1]]`` (parts are numbered source by source)."""
        sizes = torch.tensor([len(src) for src in self._sources], dtype=torch.long)
        return torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])

    @property
    def n_sources(self) -> int:
        """Distinct count sources (the cost kernels add one more pmf row: the fixed count)."""
        return len(self._sources)

    # ---- per step ---------------------------------------------------------------------------------------------
    def channel_logits(self) -> Tensor:
        """Every channel gate's log-odds, concatenated in the plan's channel order."""
        return torch.cat([g.log_odds for g in self.channel_gates])

    def operator_logits(self) -> Tensor:
        """Every operator gate's log-odds, in the plan's switch order (empty when there are none)."""
        ops = self.operator_gates
        return torch.cat([g.log_odds for g in ops]) if ops else torch.zeros(0)

    def switches(self) -> Tensor:
        """[operator gates..., 1, 0, any-of groups...] probabilities."""
        ops = self.operator_gates
        if ops:
            q = torch.sigmoid(torch.cat([g.log_odds for g in ops]) - self.op_shift)
            q = torch.where(self.op_fixed, torch.ones_like(q), q)
        else:
            q = torch.zeros(0)
        base = torch.cat([q, torch.ones(1), torch.zeros(1)])
        if not self._any_members:
            return base
        return torch.cat([base, 1 - (1 - base[self.any_index]).prod(dim=1)])

    def atom_probabilities(self, switches: Tensor) -> Tensor:
        z = torch.cat([g.log_odds for g in self.channel_gates])
        p = torch.sigmoid(z - self.shift)
        p = torch.cat([torch.where(self.forced_on, torch.ones_like(p), p), torch.zeros(1)])
        member = p[self.channel_index] * switches[self.member_switch].unsqueeze(-1)
        return 1 - (1 - member).prod(dim=1)

    def source_means(self, switches: Tensor, atom_probs: Tensor) -> Tensor:
        """[sources + 1]: expected counts (the last entry, for fixed counts, is unused)."""
        part_means = switches[self.part_switch] * atom_probs.sum(1)[self.part_atom]
        return torch.zeros(len(self._sources) + 1).index_add(0, self.part_source, part_means)


__all__ = ["CountPlan", "UnsupportedSource"]
