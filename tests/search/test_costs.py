"""Expected costs against brute-force enumeration of every gate state, and the penalties built on them."""

from __future__ import annotations

import itertools

import pytest
import torch

from predictors.ops import Conv2d, Linear
from search.costs import (
    CostModel,
    CostTargets,
    LagrangianPenalty,
    hinge,
    log_hinge,
    make_lagrangians,
    total_penalty,
)
from search.gates import ChannelGate, GateConcat, GateConfig, GateGroup, OperatorGate, OperatorGated
from search.spaces.base import LatencyLayer, create_space

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    torch.set_num_threads(1)


def _gate(n: int, seed: int) -> ChannelGate:
    gate = ChannelGate(n, GateConfig(keep_first_alive=False), f"g{seed}")
    with torch.no_grad():
        gate.log_odds.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1.5)
    return gate


def _operator(seed: int) -> OperatorGate:
    gate = OperatorGate(GateConfig(), f"op{seed}")
    with torch.no_grad():
        gate.log_odds.fill_(float(torch.randn(1, generator=torch.Generator().manual_seed(seed))))
    return gate


class SmallNet:
    """A stem into a residual stream (tied group), two switchable branches concatenated, a projection, a linear."""

    def __init__(self) -> None:
        self.stem, self.res = _gate(3, 1), _gate(3, 2)
        self.b1, self.b2 = _gate(2, 3), _gate(2, 4)
        self.op1, self.op2 = _operator(5), _operator(6)
        self.stream = GateGroup([self.stem, self.res])
        self.concat = GateConcat([OperatorGated(self.b1, self.op1), OperatorGated(self.b2, self.op2)])
        hw = 4
        self.layers = [
            LatencyLayer("stem", Conv2d(cin=1, cout=3, hw=hw, k=3, bn=True, act="relu"), None, self.stream),
            LatencyLayer("e1", Conv2d(cin=3, cout=2, hw=hw, k=1), self.stream, self.b1, self.op1),
            LatencyLayer("dw1", Conv2d(cin=2, cout=2, hw=hw, k=3, groups=2), self.b1, self.b1, self.op1),
            LatencyLayer("e2", Conv2d(cin=3, cout=2, hw=hw, k=1), self.stream, self.b2, self.op2),
            LatencyLayer("proj", Conv2d(cin=4, cout=3, hw=hw, k=1), self.concat, self.stream),
            LatencyLayer("fc", Linear(cin=3, cout=5), self.stream, None),
        ]
        gen = torch.Generator().manual_seed(7)
        self.tables = {
            dev: [torch.rand(*layer.table_shape, generator=gen, dtype=torch.float64) for layer in self.layers]
            for dev in ("cpu", "edge")
        }

    def brute_force(self) -> dict[str, float]:
        """Σ over all 2¹² joint gate states of P(state) · cost(state)."""
        probs = torch.cat(
            [
                g.keep_probability().detach().double()
                for g in (self.stem, self.res, self.b1, self.b2, self.op1, self.op2)
            ]
        )
        totals = {"params": 0.0, "flops": 0.0, "latency_ms/cpu": 0.0, "latency_ms/edge": 0.0}
        for state in itertools.product((0, 1), repeat=len(probs)):
            s = torch.tensor(state, dtype=torch.float64)
            weight = float(torch.prod(torch.where(s > 0, probs, 1 - probs)))
            stem, res, b1, b2 = s[0:3], s[3:6], s[6:8], s[8:10]
            op1, op2 = int(state[10]), int(state[11])
            stream = int(torch.maximum(stem, res).sum())
            c1, c2 = int(b1.sum()) * op1, int(b2.sum()) * op2
            counts: list[tuple[int | None, int | None, int]] = [(1, stream, 1), (stream, int(b1.sum()), op1)]
            counts.append((None, int(b1.sum()), op1))
            counts += [(stream, int(b2.sum()), op2), (c1 + c2, stream, 1), (stream, None, 1)]
            for i, (layer, (cin, cout, on)) in enumerate(zip(self.layers, counts, strict=True)):
                if not on:
                    continue
                row = cin if layer.input_gated else 0
                col = cout if layer.output_gated else 0
                for dev in ("cpu", "edge"):
                    totals[f"latency_ms/{dev}"] += weight * float(self.tables[dev][i][row, col])
                full_in = layer.cin if cin is None else cin
                full_out = layer.cout if cout is None else cout
                if full_out == 0:
                    continue
                if full_in == 0:  # no live input: no multiply-adds, the bias stays (the bilinear convention)
                    totals["params"] += weight * full_out
                    continue
                op = layer.op_at(full_in, full_out)
                totals["flops"] += weight * op.flops()
                totals["params"] += weight * op.params()
        return totals


@pytest.mark.parametrize("vectorised", [True, False])
def test_exact_costs_match_brute_force_enumeration(vectorised: bool) -> None:
    net = SmallNet()
    model = CostModel(net.layers, net.tables)
    assert model.plan is not None
    if not vectorised:
        model.plan = None
    values = model.evaluate().as_floats()
    truth = net.brute_force()
    for key, expected in truth.items():
        assert values[key] == pytest.approx(expected, rel=2e-5), key


def test_plugin_differs_from_exact_and_agrees_on_flops() -> None:
    net = SmallNet()
    exact = CostModel(net.layers, net.tables).evaluate().as_floats()
    plugin = CostModel(net.layers, net.tables, mode="plugin").evaluate().as_floats()
    assert plugin["flops"] == pytest.approx(exact["flops"], rel=1e-5)  # bilinear: exact either way
    assert abs(plugin["latency_ms/cpu"] - exact["latency_ms/cpu"]) > 1e-3


def test_latency_gradient_matches_finite_differences() -> None:
    net = SmallNet()
    model = CostModel(net.layers, net.tables)
    gate = net.b1
    value = model.evaluate().latency_ms["cpu"]
    (grad,) = torch.autograd.grad(value, gate.log_odds)
    eps = 1e-2
    with torch.no_grad():
        for i in range(gate.n):
            gate.log_odds[i] += eps
            up = float(model.evaluate().latency_ms["cpu"])
            gate.log_odds[i] -= 2 * eps
            down = float(model.evaluate().latency_ms["cpu"])
            gate.log_odds[i] += eps
            assert float(grad[i]) == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("aggregator", ["concat", "add"])
@pytest.mark.parametrize("mode", ["exact", "plugin"])
def test_vectorised_plan_equals_object_walk_on_blocks_space(aggregator: str, mode: str) -> None:
    torch.manual_seed(0)
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8, aggregator=aggregator)
    with torch.no_grad():
        for gate in space.gates():
            gate.log_odds.normal_(0.5, 2.0)
    layers = space.latency_layers()
    tables = {"cpu": [torch.rand(*layer.table_shape, dtype=torch.float64) for layer in layers]}
    model = CostModel(space, tables, mode=mode)  # type: ignore[arg-type]
    assert model.plan is not None
    fast = model._evaluate()
    slow = model._evaluate_generic()
    for key, value in fast.as_floats().items():
        assert value == pytest.approx(slow.as_floats()[key], rel=1e-5), key
    params = [g.log_odds for g in space.gates()]
    grads_fast = torch.autograd.grad(fast.latency_ms["cpu"] + 1e-4 * fast.flops, params, allow_unused=True)
    grads_slow = torch.autograd.grad(slow.latency_ms["cpu"] + 1e-4 * slow.flops, params, allow_unused=True)
    for a, b in zip(grads_fast, grads_slow, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_all_gates_on_gives_full_costs() -> None:
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8, gate=GateConfig(fixed_on=True))
    assert space.gate_parameters() == []
    layers = space.latency_layers()
    tables = {"cpu": [torch.rand(*layer.table_shape, dtype=torch.float64) for layer in layers]}
    model = CostModel(space, tables)
    values, full = model.evaluate().as_floats(), model.full_costs()
    for key in full:
        assert values[key] == pytest.approx(full[key], rel=1e-5), key
    assert full["params"] == pytest.approx(sum(layer.op.params() for layer in layers), rel=1e-6)
    assert full["flops"] == pytest.approx(sum(layer.op.flops() for layer in layers), rel=1e-6)


def test_evaluation_is_shared_within_a_step_and_renewed_after_it() -> None:
    net = SmallNet()
    model = CostModel(net.layers, net.tables)
    first = model.evaluate()
    assert model.evaluate() is first
    net.b1.refresh()  # a new forward pass samples new masks: a new step
    second = model.evaluate()
    assert second is not first
    with torch.no_grad():
        net.b1.log_odds.add_(1.0)
    assert model.evaluate() is not second


def test_table_shape_errors_name_the_layer() -> None:
    net = SmallNet()
    tables = {"cpu": list(net.tables["cpu"])}
    tables["cpu"][4] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="proj"):
        CostModel(net.layers, tables)
    with pytest.raises(ValueError, match="layers"):
        CostModel(net.layers, {"cpu": tables["cpu"][:3]})
    with pytest.raises(KeyError, match="device"):
        CostModel(net.layers, net.tables).expected_latency_ms("gpu")


def test_hinge_and_log_hinge_are_relative() -> None:
    assert float(hinge(torch.tensor(15.0), 10.0)) == pytest.approx(0.5)
    assert float(hinge(torch.tensor(5.0), 10.0)) == 0.0
    assert float(log_hinge(torch.tensor(20.0), 10.0)) == pytest.approx(0.6931, abs=1e-4)
    with pytest.raises(ValueError, match="target"):
        hinge(torch.tensor(1.0), 0.0)


def test_lagrangian_multiplier_rises_while_violated_and_stays_non_negative() -> None:
    penalty = LagrangianPenalty(10.0, lr=0.5)
    assert penalty.update(torch.tensor(20.0)) == pytest.approx(0.5)
    assert penalty.update(torch.tensor(20.0)) == pytest.approx(1.0)
    value = torch.tensor(20.0, requires_grad=True)
    penalty(value).backward()
    assert value.grad is not None and float(value.grad) == pytest.approx(0.1)
    for _ in range(10):
        penalty.update(torch.tensor(1.0))
    assert float(penalty.multiplier) == 0.0
    assert float(LagrangianPenalty(lr=0.1)(torch.tensor(3.0), 2.0)) == 0.0


def test_total_penalty_names_every_term() -> None:
    net = SmallNet()
    values = CostModel(net.layers, net.tables).evaluate()
    targets = CostTargets(latency_ms={"cpu": 0.1, "edge": 100.0}, flops=10.0, params=1e9)
    terms = total_penalty(values, targets, strength=2.0)
    assert set(terms) == {"latency_ms/cpu", "latency_ms/edge", "flops", "params", "total"}
    assert float(terms["latency_ms/edge"].detach()) == 0.0 and float(terms["latency_ms/cpu"].detach()) > 0
    lagrangian = total_penalty(values, targets, kind="lagrangian", lagrangians=make_lagrangians(targets))
    assert float(lagrangian["total"].detach()) == 0.0  # multipliers start at zero


@pytest.mark.parametrize("aggregator", ["concat", "add"])
def test_blocks_space_costs_agree_with_sampled_architectures(aggregator: str) -> None:
    """Sample whole architectures (every gate a Bernoulli draw) and cost each exactly: the mean must match.

    The model treats the channels of a residual block that an operator gate can switch off as independent (see
    ``GateGroup``), so beyond the sampling error a 2 % allowance stands for that approximation.
    """
    torch.manual_seed(0)
    space = create_space("blocks", in_channels=1, num_classes=10, image_size=8, aggregator=aggregator)
    with torch.no_grad():
        for gate in space.gates():
            gate.log_odds.normal_(0.0, 1.5)
    gen = torch.Generator().manual_seed(1)
    tables = {"cpu": [torch.rand(*layer.table_shape, generator=gen) for layer in space.latency_layers()]}
    model = CostModel(space, tables)
    expected = model.evaluate().as_floats()
    gates = space.gates()
    probabilities = [g.keep_probability().detach().clone() for g in gates]
    samples = []
    with torch.no_grad():
        for _ in range(300):
            for gate, p in zip(gates, probabilities, strict=True):
                gate.log_odds.copy_(torch.where(torch.rand(p.shape, generator=gen) < p, 30.0, -30.0))
            samples.append(model._evaluate().as_floats())
    for key, value in expected.items():
        drawn = torch.tensor([s[key] for s in samples], dtype=torch.float64)
        stderr = float(drawn.std()) / len(samples) ** 0.5
        assert abs(value - float(drawn.mean())) < 4 * stderr + 0.02 * float(drawn.mean()), key
