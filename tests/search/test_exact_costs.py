"""The compiled exact-cost path (search/exact_costs.py, search/pmf_kernels.py) against autograd and finite
differences: values and gradients on every built-in kind of space, several devices, both relaxations."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from search.costs import CostModel
from search.expected import poisson_binomial_pmf
from search.gates import GateConfig
from search.pmf_kernels import poisson_binomial_rows, poisson_binomial_rows_backward
from search.spaces.base import SearchSpace, create_space
from search.spaces.from_module import space_from_module


class Inception(nn.Module):
    """Two branches concatenated, a depthwise conv over them and a residual add: tied groups and a concat source."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.res = nn.Conv2d(12, 12, 1)
        self.b, self.c = nn.Conv2d(12, 5, 1), nn.Conv2d(12, 7, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + torch.relu(self.res(x))
        y = torch.cat([torch.relu(self.b(x)), torch.relu(self.c(x))], dim=1)
        return self.fc((self.dw(y) + y).mean((2, 3)))


SPACES: dict[str, Callable[[GateConfig], SearchSpace]] = {
    "blocks-concat": lambda g: create_space("blocks", in_channels=1, num_classes=10, image_size=8, gate=g),
    "blocks-add": lambda g: create_space(
        "blocks", in_channels=1, num_classes=10, image_size=8, aggregator="add", gate=g
    ),
    "cells": lambda g: create_space("cells", in_channels=1, num_classes=10, image_size=8, gate=g),
    "from-module": lambda g: space_from_module(Inception(), in_channels=1, image_size=8, gate=g),
}


def _model(name: str, estimator: str, seed: int) -> tuple[SearchSpace, CostModel]:
    torch.manual_seed(seed)
    space = SPACES[name](GateConfig(estimator=estimator))  # type: ignore[arg-type]
    with torch.no_grad():
        for gate in space.gates():
            gate.log_odds.normal_(0.5, 2.5)  # spread over undecided and nearly decided gates
    layers = space.latency_layers()
    tables = {d: [torch.rand(*layer.table_shape, dtype=torch.float64) for layer in layers] for d in ("cpu", "gpu")}
    model = CostModel(space, tables)
    assert model.plan is not None, name
    return space, model


def _objective(values: object) -> torch.Tensor:
    lat = values.latency_ms  # type: ignore[attr-defined]
    return lat["cpu"] + 2.0 * lat["gpu"] + 1e-6 * values.flops + 1e-4 * values.params  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("estimator", ["concrete", "hard_concrete"])
def test_compiled_costs_equal_the_autograd_object_walk(name: str, estimator: str) -> None:
    space, model = _model(name, estimator, seed=3)
    fast, slow = model._evaluate(), model._evaluate_generic()
    for key, value in fast.as_floats().items():
        assert value == pytest.approx(slow.as_floats()[key], rel=1e-5), key
    params = [g.log_odds for g in space.gates() if g.log_odds.requires_grad]
    grads_fast = torch.autograd.grad(_objective(fast), params, allow_unused=True)
    grads_slow = torch.autograd.grad(_objective(slow), params, allow_unused=True)
    # The reference runs in float32: its rounding sits around 1e-6 of the largest gradient.
    scale = max(float(b.abs().max()) for b in grads_slow if b is not None)
    compared = 0
    for a, b in zip(grads_fast, grads_slow, strict=True):
        if b is None:  # a gate the object walk never reaches must get no gradient here either
            assert a is None or float(a.abs().max()) == 0.0
            continue
        assert a is not None
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
        compared += int(b.abs().gt(0).sum())
    assert compared > 20  # the comparison saw real gradients, not zeros


@pytest.mark.parametrize("name", ["blocks-concat", "from-module"])
def test_compiled_gradient_matches_finite_differences_in_float64(name: str) -> None:
    _, model = _model(name, "concrete", seed=5)
    assert model.plan is not None
    costs = model._exact
    z = model.plan.channel_logits().detach().double().numpy().copy()
    o = model.plan.operator_logits().detach().double().numpy().copy()
    weights = np.array([1.0, 2.0, 1e-6, 1e-4])
    _, tape = costs.forward(z, o)
    d_z, d_o = costs.backward(tape, weights)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for vector, grad in ((z, d_z), (o, d_o)):
        for i in rng.choice(len(vector), size=min(12, len(vector)), replace=False):
            vector[i] += eps
            up = costs.forward(z, o)[0] @ weights
            vector[i] -= 2 * eps
            down = costs.forward(z, o)[0] @ weights
            vector[i] += eps
            assert grad[i] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("probability", [1e-6, 0.3, 0.5, 0.7, 0.999999])
def test_poisson_binomial_kernel_and_its_gradient_against_autograd(probability: float) -> None:
    rng = np.random.default_rng(1)
    p = np.zeros((3, 64))
    p[0, :40] = rng.random(40)
    p[1, :64] = probability
    p[2, :7] = rng.choice([1e-9, 1.0 - 1e-9, 0.5], size=7)
    pmf = np.empty((3, 65))
    poisson_binomial_rows(p, pmf)
    grad_pmf = rng.standard_normal((3, 65))
    grad = np.empty_like(p)
    poisson_binomial_rows_backward(p, pmf, grad_pmf, grad)
    p_t = torch.tensor(p, requires_grad=True)
    reference = poisson_binomial_pmf(p_t)
    (reference * torch.from_numpy(grad_pmf)).sum().backward()
    np.testing.assert_allclose(pmf, reference.detach().numpy(), atol=1e-12)
    assert p_t.grad is not None
    real = p > 0
    np.testing.assert_allclose(grad[real], p_t.grad.numpy()[real], rtol=1e-9, atol=1e-9)
    assert np.all(grad[~real] == 0.0)
