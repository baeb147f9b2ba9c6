"""Expected costs of a gated space (parameters, FLOPs, latency per device) and the penalties that enforce targets.

All expectations are over the current gate distribution and differentiable in the gates' log-odds:

* parameters and FLOPs are bilinear in (C_in, C_out), so E[a·C_in·C_out + b·C_out] = a·E[C_in]·E[C_out] + b·E[C_out]
  is exact for independent input and output gates;
* latency is a table lookup T[C_in, C_out] per layer; ``mode="exact"`` sums Σₐ Σ_b P(a) P(b) T[a, b] with the
  Poisson-binomial count distributions, ``mode="plugin"`` evaluates T(E[C_in], E[C_out]) (biased, for comparison).

One evaluation computes every layer's count distribution once, batched by width, and all devices' expectations in
one contraction, so the cost terms stay a small fraction of a training step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from search.cost_plan import CountPlan, UnsupportedSource
from search.exact_costs import ExactCosts
from search.expected import poisson_binomial_pmf
from search.gates import AnyOf, ChannelGate, ChannelSource, GateConcat, GateGroup, OperatorGate, OperatorGated
from search.penalties import (
    CostTargets,
    LagrangianPenalty,
    hinge,
    log_hinge,
    make_lagrangians,
    total_penalty,
)
from search.spaces.base import LatencyLayer, SearchSpace
from search.table_contraction import TableContraction

Mode = Literal["exact", "plugin"]


@dataclass
class CostValues:
    """One evaluation of every expected cost (scalars, differentiable)."""

    params: Tensor
    flops: Tensor
    latency_ms: dict[str, Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        out = {"params": float(self.params.detach()), "flops": float(self.flops.detach())}
        out |= {f"latency_ms/{device}": float(v.detach()) for device, v in self.latency_ms.items()}
        return out


def _atoms(source: ChannelSource, found: dict[int, ChannelSource]) -> None:
    """Sources whose count is a plain Poisson binomial of their keep probabilities."""
    if isinstance(source, OperatorGated):
        _atoms(source.inner, found)
    elif isinstance(source, GateConcat):
        for part in source.parts:
            _atoms(part, found)
    else:
        found.setdefault(id(source), source)


def _gates_of(source: object, found: dict[int, ChannelGate | OperatorGate]) -> None:
    if isinstance(source, ChannelGate | OperatorGate):
        found.setdefault(id(source), source)
    elif isinstance(source, GateGroup):
        for member in source.members:
            _gates_of(member, found)
    elif isinstance(source, OperatorGated):
        _gates_of(source.inner, found)
        _gates_of(source.operator_gate, found)
    elif isinstance(source, GateConcat):
        for part in source.parts:
            _gates_of(part, found)
    elif isinstance(source, AnyOf):
        for gate in source.gates:
            _gates_of(gate, found)


class CostModel:
    """Expected costs of a space's latency layers (or of an explicit list of them).

    ``latency_tables[device][i]`` is the dense table of layer ``i`` over live counts, shape ``layer.table_shape``
    (build it from a service grid with :meth:`LatencyLayer.dense_table`).  :meth:`evaluate` is memoised for the
    current step (same gate values, same sampled masks), so asking for latency, FLOPs and parameters separately
    costs one evaluation.
    """

    def __init__(
        self,
        layers: SearchSpace | Sequence[LatencyLayer],
        latency_tables: Mapping[str, Sequence[Tensor]] | None = None,
        *,
        mode: Mode = "exact",
    ) -> None:
        if mode not in ("exact", "plugin"):
            raise ValueError(f"mode: must be 'exact' or 'plugin', got {mode!r}")
        if isinstance(layers, SearchSpace):
            layers = layers.latency_layers()
        if not layers:
            raise ValueError("layers: a cost model needs at least one layer")
        self.layers = list(layers)
        self.mode: Mode = mode
        self.devices = list(latency_tables or {})
        rows = max(layer.table_shape[0] for layer in self.layers)
        cols = max(layer.table_shape[1] for layer in self.layers)
        self._tables = torch.zeros(len(self.devices), len(self.layers), rows, cols)
        for d, device in enumerate(self.devices):
            tables = list((latency_tables or {})[device])
            if len(tables) != len(self.layers):
                raise ValueError(f"latency_tables[{device!r}]: {len(tables)} tables for {len(self.layers)} layers")
            for i, (layer, table) in enumerate(zip(self.layers, tables, strict=True)):
                dense = torch.as_tensor(table, dtype=torch.float32)
                if dense.dim() == 1:
                    dense = dense.unsqueeze(0)
                if tuple(dense.shape) != layer.table_shape:
                    raise ValueError(
                        f"latency_tables[{device!r}][{i}] ({layer.name}): shape {tuple(dense.shape)}, "
                        f"expected {layer.table_shape}"
                    )
                if not bool(torch.isfinite(dense).all()) or bool((dense < 0).any()):
                    raise ValueError(f"latency_tables[{device!r}][{i}] ({layer.name}): needs finite values ≥ 0")
                self._tables[d, i, : dense.shape[0], : dense.shape[1]] = dense
        # Ragged form of the tables (only each layer's real entries): the padded [D, L, R, C] block is mostly zeros
        # (a 1-row depthwise table padded to the widest projection) and cost 1.8 ms a step to contract.
        entry_layer, entry_in, entry_out = [], [], []
        for i, layer in enumerate(self.layers):
            r, c = layer.table_shape
            grid_r, grid_c = torch.meshgrid(torch.arange(r), torch.arange(c), indexing="ij")
            entry_layer.append(torch.full((r * c,), i))
            entry_in.append(i * rows + grid_r.flatten())
            entry_out.append(i * cols + grid_c.flatten())
        self._entry_layer = torch.cat(entry_layer)
        self._entry_in, self._entry_out = torch.cat(entry_in), torch.cat(entry_out)
        self._ragged = self._tables.flatten(2)[
            :, self._entry_layer, (self._entry_in % rows) * cols + self._entry_out % cols
        ]
        found: dict[int, ChannelSource] = {}
        for layer in self.layers:
            for source in (layer.cin_source if layer.input_gated else None, layer.cout_source):
                if source is not None:
                    _atoms(source, found)
        self._atoms = list(found.values())
        gates: dict[int, ChannelGate | OperatorGate] = {}
        for layer in self.layers:
            for source in (layer.cin_source, layer.cout_source, layer.operator_gate):
                _gates_of(source, gates)
        self._gates = list(gates.values())
        self._memo: tuple[tuple[object, ...], CostValues] | None = None
        coefficients = torch.tensor([layer.cost_coefficients() for layer in self.layers], dtype=torch.float32)
        self._flops_a, self._flops_b, self._params_a, self._params_b = coefficients.unbind(1)
        self._full_cin = torch.tensor([float(layer.cin) for layer in self.layers])
        self._full_cout = torch.tensor([float(layer.cout) for layer in self.layers])
        self._fixed_in = torch.tensor([not layer.input_gated for layer in self.layers])
        self._fixed_out = torch.tensor([not layer.output_gated for layer in self.layers])
        self._count_rows = torch.arange(rows, dtype=torch.float32)
        self._count_cols = torch.arange(cols, dtype=torch.float32)
        try:
            self.plan: CountPlan | None = CountPlan(self.layers, rows, cols)
        except UnsupportedSource:
            self.plan = None
        if self.plan is not None:
            self._pmf_width = max(rows, cols)
            shapes = self._shapes()
            contraction = None
            if self.devices:
                contraction = TableContraction(
                    [
                        [self._tables[d, i, :r, :c].double().numpy() for i, (r, c) in enumerate(shapes)]
                        for d in range(len(self.devices))
                    ],
                    self.plan.in_index.numpy(),
                    self.plan.out_index.numpy(),
                    self._pmf_width,
                    self.plan.n_sources + 1,
                )
            self._exact = ExactCosts(
                self.plan, contraction, coefficients, self._full_cin, self._full_cout, self._pmf_width
            )

    @classmethod
    def from_space(
        cls, space: SearchSpace, latency_tables: Mapping[str, Sequence[Tensor]] | None = None, *, mode: Mode = "exact"
    ) -> CostModel:
        return cls(space.latency_layers(), latency_tables, mode=mode)

    # ---- count distributions ------------------------------------------------------------------------------------
    def _atom_pmfs(self) -> dict[int, Tensor]:
        """Poisson-binomial pmfs of every atom, one batched call per power-of-two width."""
        buckets: dict[int, list[ChannelSource]] = {}
        for atom in self._atoms:
            buckets.setdefault(1 << max(atom.n - 1, 0).bit_length(), []).append(atom)
        cache: dict[int, Tensor] = {}
        for width, atoms in buckets.items():
            probs = torch.stack([nn.functional.pad(a.keep_probability(), (0, width - a.n)) for a in atoms])
            pmfs = poisson_binomial_pmf(probs)
            for atom, pmf in zip(atoms, pmfs, strict=True):
                cache[id(atom)] = pmf[: atom.n + 1]
        return cache

    def _axis(self, sources: list[ChannelSource | None], size: int, cache: dict[int, Tensor]) -> Tensor:
        rows = []
        for source in sources:
            if source is None:
                rows.append(nn.functional.pad(torch.ones(1), (0, size - 1)))
            else:
                pmf = source.count_pmf(cache)
                rows.append(nn.functional.pad(pmf, (0, size - pmf.numel())))
        return torch.stack(rows)

    def _operator_probabilities(self) -> Tensor:
        return torch.stack(
            [
                layer.operator_gate.probability() if layer.operator_gate is not None else torch.ones(())
                for layer in self.layers
            ]
        )

    # ---- expectations ---------------------------------------------------------------------------------------------
    def _step_key(self) -> tuple[object, ...]:
        return (
            torch.is_grad_enabled(),
            *((g.log_odds._version, g.refresh_count) for g in self._gates),
        )

    def evaluate(self) -> CostValues:
        """Every expected cost in one pass; repeated calls within a step return the same (shared-graph) values."""
        key = self._step_key()
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        values = self._evaluate()
        self._memo = (key, values)
        return values

    def _evaluate(self) -> CostValues:
        if self.plan is None:
            return self._evaluate_generic()
        plan = self.plan
        if self.mode == "exact":
            # One autograd node with a written-out backward (search/exact_costs.py): ~0.5 ms a step on digits.
            out = self._exact(plan.channel_logits(), plan.operator_logits())
            latency = {device: out[d] for d, device in enumerate(self.devices)}
            return CostValues(params=out[-1], flops=out[-2], latency_ms=latency)
        switches = plan.switches()
        atom_probs = plan.atom_probabilities(switches)
        op_prob = switches[plan.layer_switch]
        means = plan.source_means(switches, atom_probs)
        count_in = torch.where(plan.fixed_in, self._full_cin, means[plan.in_index])
        count_out = torch.where(plan.fixed_out, self._full_cout, means[plan.out_index])
        return self._combine(op_prob, count_in, count_out, None, None)

    def _combine(
        self, op_prob: Tensor, count_in: Tensor, count_out: Tensor, pmf_in: Tensor | None, pmf_out: Tensor | None
    ) -> CostValues:
        flops = (op_prob * (self._flops_a * count_in * count_out + self._flops_b * count_out)).sum()
        params = (op_prob * (self._params_a * count_in * count_out + self._params_b * count_out)).sum()
        latency: dict[str, Tensor] = {}
        if self.devices:
            if pmf_in is not None and pmf_out is not None:
                weight = pmf_in.flatten()[self._entry_in] * pmf_out.flatten()[self._entry_out]
                per_layer = torch.zeros(len(self.devices), len(self.layers)).index_add(
                    1, self._entry_layer, self._ragged * weight
                )
            else:
                per_layer = self._plugin(count_in, count_out)
            totals = (per_layer * op_prob).sum(1)
            latency = {device: totals[d] for d, device in enumerate(self.devices)}
        return CostValues(params=params, flops=flops, latency_ms=latency)

    def _evaluate_generic(self) -> CostValues:
        """Object-by-object evaluation: the reference the vectorised plan is tested against."""
        op_prob = self._operator_probabilities()
        in_sources = [layer.cin_source if layer.input_gated else None for layer in self.layers]
        out_sources = [layer.cout_source for layer in self.layers]
        pmf_in = pmf_out = None
        if self.mode == "exact":
            cache = self._atom_pmfs()
            pmf_in = self._axis(in_sources, self._tables.shape[2], cache)
            pmf_out = self._axis(out_sources, self._tables.shape[3], cache)
            fixed_in = torch.tensor([s is None for s in in_sources])
            fixed_out = torch.tensor([s is None for s in out_sources])
            count_in = torch.where(fixed_in, self._full_cin, pmf_in @ self._count_rows)
            count_out = torch.where(fixed_out, self._full_cout, pmf_out @ self._count_cols)
        else:
            count_in = self._expected_counts(in_sources, self._full_cin)
            count_out = self._expected_counts(out_sources, self._full_cout)
        return self._combine(op_prob, count_in, count_out, pmf_in, pmf_out)

    @staticmethod
    def _expected_counts(sources: list[ChannelSource | None], full: Tensor) -> Tensor:
        return torch.stack([s.expected_count() if s is not None else full[i] for i, s in enumerate(sources)])

    def _plugin(self, count_in: Tensor, count_out: Tensor) -> Tensor:
        """T(E[C_in], E[C_out]) per device and layer, bilinear between integer counts."""
        row = torch.where(self._fixed_in, torch.zeros_like(count_in), count_in)
        col = torch.where(self._fixed_out, torch.zeros_like(count_out), count_out)
        r0 = row.detach().floor().long().clamp(0, self._tables.shape[2] - 1)
        c0 = col.detach().floor().long().clamp(0, self._tables.shape[3] - 1)
        r1 = (r0 + 1).clamp(max=self._tables.shape[2] - 1)
        c1 = (c0 + 1).clamp(max=self._tables.shape[3] - 1)
        fr, fc = row - r0, col - c0
        layer_index = torch.arange(len(self.layers))
        t = self._tables[:, layer_index]

        def at(r: Tensor, c: Tensor) -> Tensor:
            return t[:, layer_index, r, c]

        top = at(r0, c0) * (1 - fc) + at(r0, c1) * fc
        bottom = at(r1, c0) * (1 - fc) + at(r1, c1) * fc
        return top * (1 - fr) + bottom * fr

    def expected_params(self) -> Tensor:
        return self.evaluate().params

    def expected_flops(self) -> Tensor:
        return self.evaluate().flops

    def expected_latency_ms(self, device: str) -> Tensor:
        if device not in self.devices:
            raise KeyError(f"device: no latency tables for {device!r}; have {', '.join(self.devices) or 'none'}")
        return self.evaluate().latency_ms[device]

    def layer_latency_ms(self, device: str) -> Tensor:
        """Per-layer expected latency (detached), for reports."""
        d = self.devices.index(device)
        cache = self._atom_pmfs()
        in_sources = [layer.cin_source if layer.input_gated else None for layer in self.layers]
        pmf_in = self._axis(in_sources, self._tables.shape[2], cache)
        pmf_out = self._axis([layer.cout_source for layer in self.layers], self._tables.shape[3], cache)
        values = torch.einsum("lr,lrc,lc->l", pmf_in, self._tables[d], pmf_out)
        return (values * self._operator_probabilities()).detach()

    def full_costs(self) -> dict[str, float]:
        """Costs with every gate on: the scale for relative targets and FiGS's strength ≈ 1 / initial cost."""
        flops = (self._flops_a * self._full_cin * self._full_cout + self._flops_b * self._full_cout).sum()
        params = (self._params_a * self._full_cin * self._full_cout + self._params_b * self._full_cout).sum()
        out = {"params": float(params), "flops": float(flops)}
        for d, device in enumerate(self.devices):
            last = [self._tables[d, i, shape[0] - 1, shape[1] - 1] for i, shape in enumerate(self._shapes())]
            out[f"latency_ms/{device}"] = float(torch.stack(last).sum())
        return out

    def _shapes(self) -> list[tuple[int, int]]:
        return [layer.table_shape for layer in self.layers]


__all__ = [
    "CostModel",
    "CostTargets",
    "CostValues",
    "LagrangianPenalty",
    "hinge",
    "log_hinge",
    "make_lagrangians",
    "total_penalty",
]
