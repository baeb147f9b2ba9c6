"""Penalties that enforce cost targets; every term is relative to its target, so devices and metrics add up.

Re-exported by :mod:`search.costs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from search.costs import CostValues


# ---- penalties --------------------------------------------------------------------------------------------------
def hinge(value: Tensor, target: float) -> Tensor:
    """relu(value / target − 1): zero inside the budget, relative overshoot outside (unit-free, so terms add)."""
    if not target > 0:
        raise ValueError(f"target: must be positive, got {target}")
    return torch.relu(value / target - 1)


def log_hinge(value: Tensor, target: float) -> Tensor:
    """relu(log(value / target)): symmetric in ratio, so 2× over weighs like 2× under would."""
    if not target > 0:
        raise ValueError(f"target: must be positive, got {target}")
    return torch.relu(torch.log(value.clamp_min(1e-12) / target))


class LagrangianPenalty(nn.Module):
    """λ·(value / target − 1) with λ ≥ 0 raised by gradient ascent while the constraint is violated.

    The target is fixed at construction or passed with each call (the call's wins).
    """

    multiplier: Tensor

    def __init__(self, target: float | None = None, *, lr: float = 0.05, initial: float = 0.0) -> None:
        super().__init__()
        if target is not None and not target > 0:
            raise ValueError(f"target: must be positive, got {target}")
        if lr <= 0:
            raise ValueError(f"lr: must be positive, got {lr}")
        self.target = None if target is None else float(target)
        self.lr = float(lr)
        self.register_buffer("multiplier", torch.tensor(max(0.0, float(initial))))

    def violation(self, value: Tensor, target: float | None = None) -> Tensor:
        goal = target if target is not None else self.target
        if goal is None or not goal > 0:
            raise ValueError(f"target: must be a positive number, got {goal}")
        return value / goal - 1

    def forward(self, value: Tensor, target: float | None = None) -> Tensor:
        return self.multiplier.detach() * self.violation(value, target)

    @torch.no_grad()
    def update(self, value: Tensor, target: float | None = None) -> float:
        """One dual ascent step; returns the new λ."""
        self.multiplier.add_(self.lr * self.violation(value.detach(), target)).clamp_(min=0.0)
        return float(self.multiplier)


@dataclass
class CostTargets:
    latency_ms: dict[str, float] = field(default_factory=dict)
    flops: float | None = None
    params: float | None = None

    def items(self, values: CostValues) -> list[tuple[str, Tensor, float]]:
        out = [(f"latency_ms/{d}", values.latency_ms[d], t) for d, t in self.latency_ms.items()]
        if self.flops is not None:
            out.append(("flops", values.flops, self.flops))
        if self.params is not None:
            out.append(("params", values.params, self.params))
        for name, _, target in out:
            if not (target > 0 and math.isfinite(target)):
                raise ValueError(f"{name}: target must be a positive number, got {target}")
        return out


def total_penalty(
    values: CostValues,
    targets: CostTargets,
    *,
    strength: float = 1.0,
    kind: Literal["hinge", "log_hinge", "lagrangian"] = "hinge",
    lagrangians: dict[str, LagrangianPenalty] | None = None,
) -> dict[str, Tensor]:
    """Named penalty terms plus their sum under ``"total"``; every term is relative to its target.

    For ``kind="lagrangian"`` pass the multipliers (one per term name, e.g. from :func:`make_lagrangians`) and call
    their ``update`` after each step.
    """
    terms: dict[str, Tensor] = {}
    for name, value, target in targets.items(values):
        if kind == "hinge":
            terms[name] = strength * hinge(value, target)
        elif kind == "log_hinge":
            terms[name] = strength * log_hinge(value, target)
        elif kind == "lagrangian":
            if lagrangians is None or name not in lagrangians:
                raise ValueError(f"lagrangians: missing a multiplier for {name!r}")
            terms[name] = lagrangians[name](value)
        else:
            raise ValueError(f"kind: must be hinge, log_hinge or lagrangian, got {kind!r}")
    terms["total"] = torch.stack(list(terms.values())).sum() if terms else values.flops.new_zeros(())
    return terms


def make_lagrangians(targets: CostTargets, *, lr: float = 0.05) -> dict[str, LagrangianPenalty]:
    out = {f"latency_ms/{d}": LagrangianPenalty(t, lr=lr) for d, t in targets.latency_ms.items()}
    if targets.flops is not None:
        out["flops"] = LagrangianPenalty(targets.flops, lr=lr)
    if targets.params is not None:
        out["params"] = LagrangianPenalty(targets.params, lr=lr)
    return out


__all__ = ["CostTargets", "LagrangianPenalty", "hinge", "log_hinge", "make_lagrangians", "total_penalty"]
