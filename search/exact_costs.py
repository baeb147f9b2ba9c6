"""The exact expected costs of a :class:`~search.cost_plan.CountPlan` as one autograd Function with a written-out
backward: latency on every device, FLOPs and parameters from the gates' log-odds.

Why not autograd: the evaluation is ~60 small tensor operations; recording them and running ~80 backward nodes cost
4-6 ms of an 80 ms training step on the default digits space (each op 3-20 µs with the caches a training step leaves
behind), against a 5 % budget.  Here the step is a few dozen numpy operations on small float64 arrays plus the
compiled loops of :mod:`search.pmf_kernels`, and the backward reuses the forward's intermediates.

The forward, step by step (``CountPlan`` documents the layout):

1. operator gates → switch probabilities S (plus the constants 1 and 0, and any-of groups 1 − ∏(1 − Sⱼ));
2. channel gates → keep probabilities p; each atom channel: 1 − ∏ₘ (1 − Sₘ·pₘ) over its tied members;
3. atoms → Poisson-binomial pmfs;
4. parts → s·pmf + (1 − s)·δ₀; sources → the product of their parts' pmf polynomials (a concatenation's count
   is the sum of its parts' counts);
5. latency[d] = Σ_l S_l · Σₐ Σ_b P_in(a) T_d,l[a, b] P_out(b) (:class:`~search.table_contraction.TableContraction`),
   FLOPs and parameters from the expected counts (bilinear per layer).

``tests/search/test_exact_costs.py`` checks values and gradients against the object-by-object evaluation (autograd)
and finite differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from search.cost_plan import CountPlan
from search.pmf_kernels import (
    poisson_binomial_rows,
    poisson_binomial_rows_backward,
    product_rows,
    product_rows_backward,
)
from search.table_contraction import TableContraction


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|, unlike 1 / (1 + e^−x)
    return out


def _exclusive_products(x: np.ndarray) -> np.ndarray:
    """∏ of ``x`` along axis 1 leaving out each position in turn, without division (entries may be 0).

    Axis 1 holds the members of a tied group or an any-of switch: one to a handful.
    """
    members = x.shape[1]
    out = np.ones_like(x)
    for m in range(members):
        for other in range(members):
            if other != m:
                out[:, m] *= x[:, other]
    return out


def _numpy(t: Tensor, dtype: type = np.int64) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype))


class ExactCosts:
    """Index arrays and constants of one cost model; ``costs(channel_logits, operator_logits)`` → ``[devices + 2]``
    (latency per device, FLOPs, parameters), differentiable in both logit vectors."""

    def __init__(
        self,
        plan: CountPlan,
        contraction: TableContraction | None,
        coefficients: Tensor,
        full_cin: Tensor,
        full_cout: Tensor,
        pmf_width: int,
    ) -> None:
        self.contraction = contraction
        self.devices = contraction.devices if contraction is not None else 0
        self.pmf_width = pmf_width
        self.flops_a, self.flops_b, self.params_a, self.params_b = _numpy(coefficients, np.float64).T
        self.full_cin, self.full_cout = _numpy(full_cin, np.float64), _numpy(full_cout, np.float64)
        self.shift, self.op_shift = _numpy(plan.shift, np.float64), _numpy(plan.op_shift, np.float64)
        self.forced_on, self.op_fixed = _numpy(plan.forced_on, np.bool_), _numpy(plan.op_fixed, np.bool_)
        self.any_index = _numpy(plan.any_index)
        self.channel_index, self.member_switch = _numpy(plan.channel_index), _numpy(plan.member_switch)
        self.part_atom, self.part_switch = _numpy(plan.part_atom), _numpy(plan.part_switch)
        self.source_pointers, self.source_parts = _numpy(plan.source_pointers), np.arange(len(self.part_atom))
        self.in_index, self.out_index = _numpy(plan.in_index), _numpy(plan.out_index)
        self.fixed_in, self.fixed_out = _numpy(plan.fixed_in, np.bool_), _numpy(plan.fixed_out, np.bool_)
        self.layer_switch = _numpy(plan.layer_switch)
        self.n_atoms, self.atom_width = int(self.channel_index.shape[0]), int(plan.atom_width)
        self.n_sources = plan.n_sources
        self.n_base = plan.zero + 1  # operator gates, then the constants 1 and 0
        self.counts = np.arange(pmf_width, dtype=np.float64)
        # part_of_atom[a, j] = 1 where part j reads atom a: the scatter of the parts' gradient as one product.
        self.part_of_atom = np.zeros((self.n_atoms, len(self.part_atom)))
        self.part_of_atom[self.part_atom, np.arange(len(self.part_atom))] = 1.0

    def __call__(self, channel_logits: Tensor, operator_logits: Tensor) -> Tensor:
        out: Tensor = _ExactCostsFunction.apply(channel_logits, operator_logits, self)
        return out

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(self, channel_logits: np.ndarray, operator_logits: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        q = _sigmoid(operator_logits - self.op_shift)
        base = np.concatenate([np.where(self.op_fixed, 1.0, q), [1.0, 0.0]])
        any_off = 1.0 - base[self.any_index]
        switches = np.concatenate([base, 1.0 - any_off.prod(1)]) if len(self.any_index) else base
        sig = _sigmoid(channel_logits - self.shift)
        p = np.concatenate([np.where(self.forced_on, 1.0, sig), [0.0]])
        member_p = p[self.channel_index]  # [atoms, members, width]
        member_s = switches[self.member_switch][:, :, None]  # [atoms, members, 1]
        keep_off = 1.0 - member_p * member_s
        atom_p = np.ascontiguousarray(1.0 - keep_off.prod(1))
        atom_pmfs = np.empty((self.n_atoms, self.atom_width + 1))
        poisson_binomial_rows(atom_p, atom_pmfs)
        s = switches[self.part_switch][:, None]
        gathered = atom_pmfs[self.part_atom]
        parts = s * gathered
        parts[:, 0] += 1.0 - s[:, 0]
        source_pmfs = np.zeros((self.n_sources + 1, self.pmf_width))
        product_rows(parts, self.source_pointers, self.source_parts, source_pmfs[:-1])
        source_pmfs[-1, 0] = 1.0  # the fixed count: a point mass at index 0 of its one-row table
        op_prob = switches[self.layer_switch]
        tape: dict[str, Any] = {"q": q, "any_off": any_off, "switches": switches, "sig": sig, "member_p": member_p,
                                "member_s": member_s, "keep_off": keep_off, "atom_p": atom_p, "atom_pmfs": atom_pmfs,
                                "part_s": s, "gathered": gathered, "parts": parts, "op_prob": op_prob}  # fmt: skip
        latency = np.zeros(0)
        if self.contraction is not None:
            u, in_pmf, per_layer = self.contraction.forward(source_pmfs.ravel())
            tape.update(u=u, in_pmf=in_pmf, per_layer=per_layer)
            latency = per_layer @ op_prob
        means = source_pmfs @ self.counts
        count_in = np.where(self.fixed_in, self.full_cin, means[self.in_index])
        count_out = np.where(self.fixed_out, self.full_cout, means[self.out_index])
        flops_l = (self.flops_a * count_in + self.flops_b) * count_out
        params_l = (self.params_a * count_in + self.params_b) * count_out
        tape.update(count_in=count_in, count_out=count_out, flops_l=flops_l, params_l=params_l)
        return np.concatenate([latency, [flops_l @ op_prob, params_l @ op_prob]]), tape

    # ---- backward -----------------------------------------------------------------------------------------------
    def backward(self, tape: dict[str, Any], grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g_lat, g_flops, g_params = grad[: self.devices], grad[self.devices], grad[self.devices + 1]
        switches, op_prob = tape["switches"], tape["op_prob"]
        n_switches = len(switches)
        # FLOPs and parameters: bilinear in the expected counts of each layer.
        count_in, count_out = tape["count_in"], tape["count_out"]
        d_op = g_flops * tape["flops_l"] + g_params * tape["params_l"]
        weight_a = op_prob * (g_flops * self.flops_a + g_params * self.params_a)
        d_in = np.where(self.fixed_in, 0.0, weight_a * count_out)
        d_out = np.where(
            self.fixed_out, 0.0, weight_a * count_in + op_prob * (g_flops * self.flops_b + g_params * self.params_b)
        )
        d_means = np.bincount(self.in_index, d_in, self.n_sources + 1) + np.bincount(
            self.out_index, d_out, self.n_sources + 1
        )
        d_source = d_means[:, None] * self.counts
        if self.contraction is not None:
            d_op = d_op + g_lat @ tape["per_layer"]
            d_flat = self.contraction.backward(tape["u"], tape["in_pmf"], g_lat[:, None] * op_prob)
            d_source += d_flat.reshape(-1, self.pmf_width)
        d_switches = np.bincount(self.layer_switch, d_op, n_switches)
        # Sources → parts → atoms (the fixed row has no parts).
        d_parts = np.zeros_like(tape["parts"])
        product_rows_backward(
            tape["parts"], self.source_pointers, self.source_parts, np.ascontiguousarray(d_source[:-1]), d_parts
        )
        s, gathered = tape["part_s"], tape["gathered"]
        d_atom_pmfs = self.part_of_atom @ (s * d_parts)
        d_s = (d_parts * gathered).sum(1) - d_parts[:, 0]
        d_switches += np.bincount(self.part_switch, d_s, n_switches)
        d_atom_p = np.empty_like(tape["atom_p"])
        poisson_binomial_rows_backward(tape["atom_p"], tape["atom_pmfs"], d_atom_pmfs, d_atom_p)
        # Atoms → tied members → channels.
        member_p, member_s = tape["member_p"], tape["member_s"]
        d_member = d_atom_p[:, None, :] * _exclusive_products(tape["keep_off"])
        d_switches += np.bincount(self.member_switch.ravel(), (d_member * member_p).sum(-1).ravel(), n_switches)
        d_p = np.bincount(self.channel_index.ravel(), (d_member * member_s).ravel(), len(self.forced_on) + 1)
        sig = tape["sig"]
        d_channel = np.where(self.forced_on, 0.0, d_p[:-1] * sig * (1.0 - sig))
        # Switches → operator gates, through the any-of groups.
        d_base = d_switches[: self.n_base].copy()
        if len(self.any_index):
            d_any = d_switches[self.n_base :, None] * _exclusive_products(tape["any_off"])
            d_base += np.bincount(self.any_index.ravel(), d_any.ravel(), self.n_base)
        q = tape["q"]
        d_operator = np.where(self.op_fixed, 0.0, d_base[: len(q)] * q * (1.0 - q))
        return d_channel, d_operator


class _ExactCostsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, channel_logits: Tensor, operator_logits: Tensor, costs: ExactCosts) -> Tensor:
        as_numpy = [t.detach().cpu().numpy().astype(np.float64) for t in (channel_logits, operator_logits)]
        out, tape = costs.forward(*as_numpy)
        ctx.costs, ctx.tape = costs, tape
        ctx.dtypes = (channel_logits.dtype, operator_logits.dtype)
        return torch.from_numpy(out).to(channel_logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        d_channel, d_operator = ctx.costs.backward(ctx.tape, grad.detach().cpu().numpy().astype(np.float64))
        return torch.from_numpy(d_channel).to(ctx.dtypes[0]), torch.from_numpy(d_operator).to(ctx.dtypes[1]), None


__all__ = ["ExactCosts"]
