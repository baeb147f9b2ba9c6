"""Exact expectations of table-valued costs over the Poisson-binomial distribution of live-channel counts.

With independent gates, the number of live channels of a layer is Poisson-binomial.  Its pmf is the coefficient
list of ∏ᵢ (1 − pᵢ + pᵢ z); we multiply the factors pairwise in log₂ n rounds (one batched polynomial product per
round), so the whole pmf costs O(n²) arithmetic but only O(log n) tensor operations, and every intermediate is a
sum of non-negative products (no cancellation, unlike an FFT).  The expected latency of a layer is then
Σₐ Σ_b P(C_in = a) P(C_out = b) T[a, b].

Latency is a staircase in the channel count on real runtimes (a 1×1 conv 64→c at 28 px: 28 µs for c ≤ 16,
~35 µs for 20–32, 45–62 µs for 36–48 on this CPU), so T(E[C]) — the plug-in form FLOPs-style regularisers use —
is biased near every step; :func:`plugin_table_value` is kept to show and measure that bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Above this size the dense degree map's matmul costs more than the pad-and-skew copies (measured, 1 thread).
_DENSE_MAP_MAX_DEGREE = 17
_DEGREE_MAPS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _degree_map(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0/1 matrix ``[d², 2d − 1]`` that sums the entries (i, j) of an outer product into degree i + j (cached)."""
    key = (d, dtype, device)
    if key not in _DEGREE_MAPS:
        i, j = torch.meshgrid(torch.arange(d), torch.arange(d), indexing="ij")
        degree_map = torch.zeros(d * d, 2 * d - 1, dtype=dtype, device=device)
        degree_map[torch.arange(d * d), (i + j).flatten()] = 1
        _DEGREE_MAPS[key] = degree_map
    return _DEGREE_MAPS[key]


def _polymul_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Products of polynomial pairs: ``a, b [..., d]`` (coefficients, lowest first) → ``[..., 2d − 1]``."""
    d = a.shape[-1]
    outer = a.unsqueeze(-1) * b.unsqueeze(-2)  # entry (i, j) contributes to degree i + j
    if d <= _DENSE_MAP_MAX_DEGREE:
        return outer.flatten(-2) @ _degree_map(d, a.dtype, a.device)
    # Reading right-padded rows with a stride of 2d − 1 shifts row i right by i, aligning equal degrees in columns.
    flat = torch.nn.functional.pad(outer, (0, d)).flatten(-2)[..., : d * (2 * d - 1)]
    return flat.unflatten(-1, (d, 2 * d - 1)).sum(-2)


def poisson_binomial_pmf(p: Tensor) -> Tensor:
    """P(Σᵢ Bernoulli(pᵢ) = k) for k = 0..n; ``p [..., n]`` → ``[..., n + 1]``, differentiable in ``p``."""
    n = p.shape[-1]
    batch = p.shape[:-1]
    # Channels with p = 0 leave the pmf unchanged, so padding to a power of two keeps every round a clean pairing.
    width = 1 << max(n - 1, 0).bit_length()
    padded = torch.nn.functional.pad(p.reshape(-1, n), (0, width - n))
    polys = torch.stack([1 - padded, padded], dim=-1)
    while polys.shape[1] > 1:
        polys = _polymul_pairs(polys[:, 0::2], polys[:, 1::2])
    return polys[:, 0, : n + 1].reshape(*batch, n + 1)


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
]
