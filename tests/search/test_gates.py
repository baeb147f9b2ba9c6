"""Gate estimators: keep probabilities agree with the sampled masks, groups tie channels, REINFORCE is unbiased."""

from __future__ import annotations

import math

import pytest
import torch

from search.gates import (
    AnyOf,
    ChannelGate,
    GateConcat,
    GateConfig,
    GateGroup,
    MaskLayer,
    OperatorGate,
    OperatorGated,
    ReinforceBaseline,
    reinforce_surrogate,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    # Tiny tensors: a second intra-op thread only adds contention on the shared 2-core machine.
    torch.set_num_threads(1)


def gate_with(log_odds: list[float], **config: object) -> ChannelGate:
    gate = ChannelGate(len(log_odds), GateConfig(**config), "g")  # type: ignore[arg-type]
    with torch.no_grad():
        gate.log_odds.copy_(torch.tensor(log_odds))
    return gate


@pytest.mark.parametrize("estimator", ["concrete", "hard_concrete", "reinforce"])
def test_keep_probability_matches_sampled_liveness(estimator: str) -> None:
    torch.manual_seed(0)
    gate = gate_with([-2.0, -0.5, 0.0, 1.0, 3.0], estimator=estimator, keep_first_alive=False)
    draws = 4000
    alive = torch.stack([gate.sample().detach() for _ in range(draws)])
    # Concrete: alive means the relaxed mask is above 1/2; hard-concrete and REINFORCE: mask is nonzero.
    live = alive > 0.5 if estimator == "concrete" else alive > 0
    observed = live.double().mean(0)
    expected = gate.keep_probability().detach().double()
    bound = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-9
    assert bool(((observed - expected).abs() <= bound).all()), (observed, expected)


def test_first_channel_kept_alive_and_eval_mask_thresholds_probability() -> None:
    gate = gate_with([-5.0, -1.0, 0.5, 2.0])
    assert float(gate.keep_probability().detach()[0]) == 1.0
    gate.eval()
    gate.refresh()
    torch.testing.assert_close(gate.mask(), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    gate.train()
    assert all(float(gate.sample().detach()[0]) == 1.0 for _ in range(20))


def test_straight_through_is_binary_forward_with_gradient() -> None:
    torch.manual_seed(0)
    # At τ = 1 the relaxed mask's slope stays representable for any plausible noise draw (at τ = 0.1 it rounds to 0
    # whenever |ℓ + L| > 1.7, which is the point of a low temperature, not a failure).
    gate = gate_with([0.3, -0.2, 1.0], straight_through=True, keep_first_alive=False, temperature=1.0)
    mask = gate.sample()
    assert set(mask.detach().tolist()) <= {0.0, 1.0}
    (mask * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert gate.log_odds.grad is not None and bool((gate.log_odds.grad != 0).all())


def test_temperature_annealing_schedule() -> None:
    config = GateConfig(temperature=1.0, decay=0.1, decay_steps=100, min_temperature=0.01)
    assert config.temperature_at(0) == 1.0
    assert config.temperature_at(100) == pytest.approx(0.1)
    assert config.temperature_at(1000) == 0.01
    gate = ChannelGate(3, config)
    gate.set_step(200)
    assert gate.temperature == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("estimator", {"estimator": "gumbel"}), ("temperature", {"temperature": 0.0}), ("decay", {"decay": 1.5})],
)
def test_config_errors_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        GateConfig(**kwargs)  # type: ignore[arg-type]


def test_group_probability_and_mask_are_or_of_members() -> None:
    a = gate_with([0.0, -1.0, 2.0], keep_first_alive=False)
    b = gate_with([1.0, -3.0, -2.0], keep_first_alive=False)
    group = GateGroup([a, b])
    pa, pb = a.keep_probability(), b.keep_probability()
    torch.testing.assert_close(group.keep_probability(), 1 - (1 - pa) * (1 - pb))
    a.refresh()
    b.refresh()
    torch.testing.assert_close(group.mask(), torch.maximum(a.mask(), b.mask()))
    with pytest.raises(ValueError, match="members"):
        GateGroup([a, gate_with([0.0, 0.0])])


def test_operator_gated_and_concat_sources() -> None:
    inner = gate_with([1.0, 2.0], keep_first_alive=False)
    op = OperatorGate(GateConfig(init_log_odds=0.0))
    gated = OperatorGated(inner, op)
    torch.testing.assert_close(gated.keep_probability(), 0.5 * inner.keep_probability())
    pmf = gated.count_pmf()
    assert float(pmf.sum().detach()) == pytest.approx(1.0)
    assert float(pmf[0].detach()) > 0.5  # off half the time, plus both channels dead
    concat = GateConcat([inner, gated])
    assert concat.n == 4 and concat.count_pmf().shape == (5,)
    either = AnyOf([op, OperatorGate(GateConfig(init_log_odds=0.0))])
    assert float(either.probability().detach()) == pytest.approx(0.75)


def test_mask_layer_broadcasts_over_batch_and_space() -> None:
    gate = gate_with([5.0, -5.0, 5.0])
    gate.eval()
    layer = MaskLayer(gate)
    out = layer(torch.ones(2, 3, 4, 4))
    assert out[:, 1].abs().sum() == 0 and out[:, 2].sum() == 32
    assert layer(torch.ones(5, 3)).sum() == 10
    assert list(layer.parameters()) == []  # the gate's parameters are registered once, by the space


def test_fixed_on_gate_is_always_on_and_not_trained() -> None:
    gate = ChannelGate(4, GateConfig(fixed_on=True, init_log_odds=-3.0))
    assert not gate.log_odds.requires_grad
    assert bool((gate.sample() == 1).all()) and bool((gate.keep_probability() == 1).all())


def test_reinforce_estimates_the_gradient_of_an_expectation() -> None:
    torch.manual_seed(1)
    log_odds = [0.5, -1.0, 2.0]
    gate = gate_with(log_odds, estimator="reinforce", keep_first_alive=False)
    weights = torch.tensor([1.0, -2.0, 3.0])
    baseline = ReinforceBaseline(decay=0.9)
    grads: list[torch.Tensor] = []
    for _ in range(1000):
        gate.log_odds.grad = None
        mask = gate.sample()
        loss = (mask * weights).sum()
        reinforce_surrogate([gate], loss, baseline).backward()
        assert gate.log_odds.grad is not None
        grads.append(gate.log_odds.grad.clone())
    per_round = torch.stack(grads)
    estimate, stderr = per_round.mean(0), per_round.std(0) / math.sqrt(len(grads))
    # d/dℓ E[Σ wᵢ mᵢ] = wᵢ σ(ℓᵢ)(1 − σ(ℓᵢ)); the baseline changes the variance, not the mean.
    p = torch.sigmoid(torch.tensor(log_odds))
    truth = weights * p * (1 - p)
    assert bool(((estimate - truth).abs() < 5 * stderr).all()), (estimate, truth, stderr)


def test_log_prob_is_bernoulli_log_likelihood() -> None:
    gate = gate_with([0.0, math.log(3.0)], estimator="reinforce", keep_first_alive=False)
    value = float(gate.log_prob(torch.tensor([1.0, 0.0])).detach())
    assert value == pytest.approx(math.log(0.5) + math.log(0.25))
