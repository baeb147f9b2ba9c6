"""Exact expectations of table-valued costs over the Poisson-binomial distribution of live-channel counts.

With independent gates, the number of live channels of a layer is Poisson-binomial.  Its pmf is the coefficient
list of ∏ᵢ (1 − pᵢ + pᵢ z); we multiply the factors pairwise in log₂ n rounds (one batched polynomial product per
round), so the whole pmf costs O(n²) arithmetic but only O(log n) tensor operations, and every intermediate is a
sum of non-negative products (no cancellation, unlike an FFT).  :func:`polynomial_product` does those rounds for
any factors.  The expected latency of a layer is then Σₐ Σ_b P(C_in = a) P(C_out = b) T[a, b].  These are the
reference implementations (autograd, any shape); the training step uses the compiled kernels of
:mod:`search.exact_costs`, which the tests hold to these.

Latency is a staircase in the channel count on real runtimes (a 1×1 conv 64→c at 28 px: 28 µs for c ≤ 16,
~35 µs for 20–32, 45–62 µs for 36–48 on this CPU), so T(E[C]) — the plug-in form FLOPs-style regularisers use —
is biased near every step; :func:`plugin_table_value` is kept to show and measure that bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_NEGLIGIBLE = 1e-100


def _multiply_pairs(polys: Tensor) -> Tensor:
    """Products of neighbouring polynomials: ``[B, m, d]`` (m even, coefficients lowest first) → ``[B, m/2, 2d − 1]``.

    A convolution as one product: the windows of the zero-padded right factor are a strided view (no copy), and
    the flipped left factor weighs each window.
    """
    d = polys.shape[-1]
    left, right = polys[:, 0::2], polys[:, 1::2]
    # windows[k, i] = right[k + i − (d − 1)], so Σᵢ left[d − 1 − i]·windows[k, i] = Σ_{i+j=k} left[i]·right[j].
    windows = torch.nn.functional.pad(right, (d - 1, d - 1)).unfold(-1, d, 1)
    # Broadcast multiply and sum rather than bmm: bmm over hundreds of 3×2 matrices loops over the batch.
    return (windows * left.flip(-1).unsqueeze(-2)).sum(-1)


def _product_tree(polys: Tensor) -> list[Tensor]:
    """The rounds of multiplying ``polys [B, K, d]`` (K a power of two) pairwise, leaves first; the last level is
    ``[B, 1, K·(d − 1) + 1]``, the product.  No autograd: :func:`_product_tree_backward` is its gradient."""
    levels = [polys]
    while levels[-1].shape[1] > 1:
        # Coefficients below 1e-100 become 0: a pmf's far tail (all 96 channels off at p = 0.9999 is 1e-384)
        # otherwise underflows into denormals, whose arithmetic is ~10x slower, and carries no weight anyway.
        levels.append(torch.nn.functional.threshold(_multiply_pairs(levels[-1]), _NEGLIGIBLE, 0.0))
    return levels


def _product_tree_backward(levels: Sequence[Tensor], grad: Tensor) -> Tensor:
    """∂L/∂leaves from ∂L/∂product ``[B, K·(d − 1) + 1]``: the downward pass of the product tree.

    For c = a·b, ∂L/∂a[i] = Σⱼ g[i + j]·b[j]: a product with the Hankel matrix of g, which is a strided view of g
    (no copy), and symmetric, so one matrix serves both factors.
    """
    grad = grad.unsqueeze(1)
    for polys in reversed(levels[:-1]):
        d = polys.shape[-1]
        hankel = grad.unfold(-1, d, 1)  # [B, m/2, d, d]: hankel[i, j] = grad[i + j]
        factors = torch.stack([polys[:, 1::2], polys[:, 0::2]], dim=2)  # the left factor's gradient uses the right
        grad = (hankel.unsqueeze(2) * factors.unsqueeze(-2)).sum(-1).flatten(1, 2)
    return grad


class _PolynomialProduct(torch.autograd.Function):
    """∏ₖ polysₖ(z) per row with the hand-written backward of :func:`_product_tree_backward`.

    Autograd through the rounds kept every strided slice and outer product of the forward and paid a zero-filled
    buffer per slice in the backward (1.1 ms of a 3 ms cost-term step on the default space).
    """

    @staticmethod
    def forward(ctx: Any, polys: Tensor) -> Tensor:
        levels = _product_tree(polys)
        ctx.save_for_backward(*levels)
        return levels[-1][:, 0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _product_tree_backward(ctx.saved_tensors, grad)


def _pad_factors(polys: Tensor) -> Tensor:
    """``polys [B, K, d]`` with constant-1 factors appended up to a power of two (they change no product)."""
    batch, factors, d = polys.shape
    width = 1 << max(factors - 1, 0).bit_length()
    if width == factors:
        return polys
    one = torch.zeros(batch, width - factors, d, dtype=polys.dtype, device=polys.device)
    one[..., 0] = 1
    return torch.cat([polys, one], dim=1)


def polynomial_product(polys: Tensor) -> Tensor:
    """Coefficients of ∏ₖ polys[b, k](z) for every row b: ``[B, K, d]`` → ``[B, K·(d − 1) + 1]``, differentiable.

    K need not be a power of two: the missing factors are the constant 1, which changes no product.
    """
    if polys.dim() != 3:
        raise ValueError(f"polys: expected [batch, factors, coefficients], got shape {tuple(polys.shape)}")
    _, factors, d = polys.shape
    product = _PolynomialProduct.apply(_pad_factors(polys).contiguous())
    return product[:, : factors * (d - 1) + 1]


def poisson_binomial_pmf(p: Tensor) -> Tensor:
    """P(Σᵢ Bernoulli(pᵢ) = k) for k = 0..n; ``p [..., n]`` → ``[..., n + 1]``, differentiable in ``p``."""
    n = p.shape[-1]
    batch = p.shape[:-1]
    flat = p.reshape(-1, n)
    return polynomial_product(torch.stack([1 - flat, flat], dim=-1)).reshape(*batch, n + 1)


def _as_counts(values: Sequence[int] | Tensor) -> Tensor:
    counts = torch.as_tensor(values, dtype=torch.float64).flatten()
    if counts.numel() == 0:
        raise ValueError("grid: needs at least one count")
    if bool((counts[1:] <= counts[:-1]).any()):
        raise ValueError("grid: counts must be strictly increasing")
    return counts


def _interpolation_weights(grid: Tensor, n: int) -> Tensor:
    """Matrix ``[n + 1, len(grid)]`` mapping grid values to counts 0..n: linear inside, nearest outside, 0 at 0."""
    counts = torch.arange(n + 1, dtype=torch.float64)
    positions = counts.clamp(float(grid[0]), float(grid[-1]))
    upper = torch.searchsorted(grid, positions).clamp(1, max(grid.numel() - 1, 1))
    weights = torch.zeros(n + 1, grid.numel(), dtype=torch.float64)
    if grid.numel() == 1:
        weights[:, 0] = 1
    else:
        lower = upper - 1
        span = grid[upper] - grid[lower]
        frac = (positions - grid[lower]) / span
        rows = torch.arange(n + 1)
        weights[rows, lower] += 1 - frac
        weights[rows, upper] += frac
    # A layer with no live channel on either side does not run at all.
    weights[0] = 0
    return weights


def interpolate_table(
    grid_cin: Sequence[int] | Tensor | None,
    grid_cout: Sequence[int] | Tensor | None,
    table: Tensor,
    n_in: int | None,
    n_out: int | None,
) -> Tensor:
    """Dense table over every count 0..n from a service table on a coarse grid (bilinear; 0 channels cost 0).

    ``table`` is ``[len(grid_cin), len(grid_cout)]``.  Pass ``grid_cin=None, n_in=None`` for a layer whose input
    count is fixed (network input) or tied to its output (depthwise): that axis collapses to size 1.  Counts between
    0 and the smallest grid value take the nearest grid value, as do counts above the largest.
    """
    values = torch.as_tensor(table, dtype=torch.float64)
    if values.dim() == 1:
        values = values.unsqueeze(0) if grid_cin is None else values.unsqueeze(1)
    expected_rows = 1 if grid_cin is None else len(grid_cin)
    expected_cols = 1 if grid_cout is None else len(grid_cout)
    if tuple(values.shape) != (expected_rows, expected_cols):
        grid_shape = (expected_rows, expected_cols)
        raise ValueError(f"table: shape {tuple(values.shape)} does not match the grid {grid_shape}")
    if (grid_cin is None) != (n_in is None) or (grid_cout is None) != (n_out is None):
        raise ValueError("grid: a grid and its full count must be given together")
    if grid_cin is not None and n_in is not None:
        values = _interpolation_weights(_as_counts(grid_cin), n_in) @ values
    if grid_cout is not None and n_out is not None:
        values = values @ _interpolation_weights(_as_counts(grid_cout), n_out).T
    return values


def _axis_pmf(p: Tensor | None, size: int, like: Tensor) -> Tensor:
    if p is None:
        if size != 1:
            pmf = torch.zeros(size, dtype=like.dtype, device=like.device)
            pmf[-1] = 1  # a fixed count sits at the full width
            return pmf
        return torch.ones(1, dtype=like.dtype, device=like.device)
    pmf = poisson_binomial_pmf(p.to(like.dtype))
    if pmf.numel() != size:
        raise ValueError(f"table: axis has {size} entries but the gate has {p.numel()} channels (needs n + 1)")
    return pmf


def _as_matrix(table: Tensor, p_in: Tensor | None, p_out: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """1-D tables are depthwise (cin tied to cout): one count axis, carried by whichever side has a gate."""
    if table.dim() == 1:
        return table.unsqueeze(0), None, p_out if p_out is not None else p_in
    return table, p_in, p_out


def expected_table_value(p_in: Tensor | None, p_out: Tensor | None, table: Tensor) -> Tensor:
    """E[T(C_in, C_out)] = Σₐ Σ_b P(C_in = a) P(C_out = b) T[a, b] with Poisson-binomial counts.

    ``table`` is dense over counts (``[n_in + 1, n_out + 1]``; an axis of size 1 or a ``None`` probability means a
    fixed count at full width).  A 1-D table is a depthwise layer indexed by its single live-channel count.
    """
    matrix, p_in, p_out = _as_matrix(table, p_in, p_out)
    pmf_in = _axis_pmf(p_in, matrix.shape[0], matrix)
    pmf_out = _axis_pmf(p_out, matrix.shape[1], matrix)
    return pmf_in @ matrix @ pmf_out


def _bilinear(table: Tensor, row: Tensor, col: Tensor) -> Tensor:
    def corners(x: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
        x = x.clamp(0, size - 1)
        lo = x.detach().floor().long().clamp(0, max(size - 2, 0))
        hi = (lo + 1).clamp(max=size - 1)
        return lo, hi, x - lo.to(x.dtype)

    r0, r1, fr = corners(row, table.shape[0])
    c0, c1, fc = corners(col, table.shape[1])
    top = table[r0, c0] * (1 - fc) + table[r0, c1] * fc
    bottom = table[r1, c0] * (1 - fc) + table[r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def plugin_table_value(p_in: Tensor | None, p_out: Tensor | None, table: Tensor) -> Tensor:
    """T(E[C_in], E[C_out]) by bilinear interpolation: the biased plug-in form, kept for comparison."""
    matrix, p_in, p_out = _as_matrix(table, p_in, p_out)
    full_in = torch.tensor(float(matrix.shape[0] - 1), dtype=matrix.dtype)
    full_out = torch.tensor(float(matrix.shape[1] - 1), dtype=matrix.dtype)
    row = full_in if p_in is None else p_in.to(matrix.dtype).sum()
    col = full_out if p_out is None else p_out.to(matrix.dtype).sum()
    return _bilinear(matrix, row, col)


def monte_carlo_table_value(
    p_in: Tensor | None, p_out: Tensor | None, table: Tensor, samples: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Mean of T over ``samples`` independent draws of the gates (a check on the exact form, not differentiable)."""
    matrix, p_in, p_out = _as_matrix(table, p_in, p_out)

    def counts(p: Tensor | None, size: int) -> Tensor:
        if p is None:
            return torch.full((samples,), size - 1, dtype=torch.long)
        draws = torch.rand(samples, p.numel(), generator=generator, dtype=torch.float64) < p.detach().double()
        return draws.sum(-1)

    a = counts(p_in, matrix.shape[0])
    b = counts(p_out, matrix.shape[1])
    return matrix.detach()[a, b].mean()


__all__ = [
    "expected_table_value",
    "interpolate_table",
    "monte_carlo_table_value",
    "plugin_table_value",
    "poisson_binomial_pmf",
    "polynomial_product",
]
