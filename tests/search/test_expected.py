"""Exact expectations over Poisson-binomial counts: against a reference recursion, Monte Carlo, finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from search.expected import (
    expected_table_value,
    interpolate_table,
    monte_carlo_table_value,
    plugin_table_value,
    poisson_binomial_pmf,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> None:
    # Tiny tensors: a second intra-op thread only adds contention on the shared 2-core machine.
    torch.set_num_threads(1)


def reference_pmf(p: torch.Tensor) -> torch.Tensor:
    """The textbook O(n²) recursion, one channel at a time."""
    pmf = torch.zeros(p.numel() + 1, dtype=torch.float64)
    pmf[0] = 1
    for pi in p.double():
        shifted = torch.cat([torch.zeros(1, dtype=torch.float64), pmf[:-1]])
        pmf = pmf * (1 - pi) + shifted * pi
    return pmf


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 50, 130])
def test_pmf_matches_reference_recursion(n: int) -> None:
    p = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    pmf = poisson_binomial_pmf(p)
    assert pmf.shape == (n + 1,)
    torch.testing.assert_close(pmf, reference_pmf(p), atol=1e-13, rtol=0)
    assert float(pmf.sum()) == pytest.approx(1.0, abs=1e-12)


def test_pmf_batched_and_degenerate_probabilities() -> None:
    p = torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    pmf = poisson_binomial_pmf(p)
    torch.testing.assert_close(pmf[0], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(pmf[1], torch.tensor([0.25, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert bool((pmf >= 0).all())


def test_pmf_gradient_matches_finite_differences() -> None:
    p = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.autograd.gradcheck(poisson_binomial_pmf, (p,))


def test_expected_table_value_gradients_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(2)
    p_in = torch.rand(5, dtype=torch.float64, generator=gen).requires_grad_()
    p_out = torch.rand(6, dtype=torch.float64, generator=gen).requires_grad_()
    table = torch.rand(6, 7, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda a, b: expected_table_value(a, b, table), (p_in, p_out))
    depthwise = torch.rand(7, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda b: expected_table_value(None, b, depthwise), (p_out,))


def staircase(n_in: int, n_out: int) -> torch.Tensor:
    """A latency-like table: steps every 16 output channels, as onnxruntime's NCHWc blocking gives on this CPU."""
    cin = torch.arange(n_in + 1, dtype=torch.float64).unsqueeze(1)
    cout = torch.arange(n_out + 1, dtype=torch.float64).unsqueeze(0)
    table = 0.01 + 0.002 * cin * torch.ceil(cout / 16) * 16 / n_out
    table[0, :] = 0
    table[:, 0] = 0
    return table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_monte_carlo_within_confidence_bound(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    p_in = torch.rand(12, dtype=torch.float64, generator=gen)
    p_out = torch.rand(40, dtype=torch.float64, generator=gen)
    table = staircase(12, 40)
    exact = float(expected_table_value(p_in, p_out, table))
    second_moment = float(expected_table_value(p_in, p_out, table**2))
    std = math.sqrt(max(second_moment - exact**2, 0.0))
    samples = 20_000
    mc = float(monte_carlo_table_value(p_in, p_out, table, samples, generator=gen))
    # Five standard errors: a false failure has probability < 1e-6.
    assert abs(mc - exact) < 5 * std / math.sqrt(samples)


def test_plugin_is_biased_on_a_staircase_and_exact_is_not() -> None:
    # 40 gates at 0.4: E[C] = 16 sits on a step; the count spreads across it, so T(E[C]) misses the average.
    p_in = torch.full((12,), 1.0, dtype=torch.float64)
    p_out = torch.full((40,), 0.4, dtype=torch.float64)
    table = staircase(12, 40)
    exact = float(expected_table_value(p_in, p_out, table))
    plugin = float(plugin_table_value(p_in, p_out, table))
    mc = float(monte_carlo_table_value(p_in, p_out, table, 40_000, generator=torch.Generator().manual_seed(3)))
    assert abs(mc - exact) / exact < 0.01
    assert (exact - plugin) / exact > 0.10  # the plug-in under-predicts by more than 10 % here
    # On a linear table the two agree: the bias comes from the steps alone.
    linear = 0.001 * torch.arange(13.0, dtype=torch.float64).unsqueeze(1) * torch.arange(41.0, dtype=torch.float64)
    assert float(plugin_table_value(p_in, p_out, linear)) == pytest.approx(
        float(expected_table_value(p_in, p_out, linear)), rel=1e-9
    )


def test_fixed_count_axis_uses_full_width() -> None:
    table = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 3)
    p_out = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert float(expected_table_value(None, p_out, table)) == float(table[3, 2])
    assert float(expected_table_value(None, p_out, table[3:4])) == float(table[3, 2])


def test_interpolate_table_bilinear_zero_and_nearest() -> None:
    grid_in, grid_out = [4, 8], [2, 4, 8]
    values = torch.tensor([[1.0, 2.0, 4.0], [3.0, 4.0, 6.0]], dtype=torch.float64)
    dense = interpolate_table(grid_in, grid_out, values, 8, 8)
    assert dense.shape == (9, 9)
    for i, a in enumerate(grid_in):
        for j, b in enumerate(grid_out):
            assert float(dense[a, b]) == float(values[i, j])
    assert float(dense[0].abs().sum()) == 0 and float(dense[:, 0].abs().sum()) == 0
    assert float(dense[6, 4]) == pytest.approx(3.0)  # halfway between rows 4 and 8
    assert float(dense[8, 6]) == pytest.approx(5.0)  # halfway between columns 4 and 8
    assert float(dense[1, 1]) == float(values[0, 0])  # below the grid: the nearest grid value
    one_axis = interpolate_table(None, grid_out, values[1], None, 8)
    assert one_axis.shape == (1, 9)


def test_interpolate_table_refuses_mismatched_grid() -> None:
    with pytest.raises(ValueError, match="table"):
        interpolate_table([1, 2], [1, 2], torch.zeros(3, 2), 2, 2)
    with pytest.raises(ValueError, match="grid"):
        interpolate_table([2, 1], [1, 2], torch.zeros(2, 2), 2, 2)
