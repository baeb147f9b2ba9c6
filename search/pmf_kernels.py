"""Compiled loops behind the exact expected costs: Poisson-binomial pmfs and their gradients, products of count
pmfs, and the sparse table contraction (numba, float64).

Why compiled: the same computation as ~150 small tensor operations cost 2-4 ms of an 80 ms training step on the
default digits space — at or over the 5 % budget for the cost terms — almost all of it per-operation overhead (each
op 3-20 µs with the caches a training step leaves behind).  As loops the arithmetic itself (O(n²) per gated layer)
takes tens of microseconds.

Numerics: values below ``NEGLIGIBLE`` (1e-100) are set to 0.  A pmf's far tail (96 channels all off at p = 0.9999
is 1e-384) otherwise underflows into denormals, whose arithmetic is ~10x slower, and carries no weight: it changes an
expectation by less than float64 rounding does.  The leave-one-out pmfs of the gradient are deconvolutions run in
the direction that keeps every step a contraction (upwards for p ≤ ½, downwards otherwise), so they are stable.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NEGLIGIBLE = 1e-100


@njit(cache=True)
def poisson_binomial_rows(p: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[a] = pmf of Σᵢ Bernoulli(p[a, i])`` for every row; ``p [A, W]``, ``out [A, W + 1]``."""
    rows, width = p.shape
    for a in range(rows):
        f = out[a]
        f[:] = 0.0
        f[0] = 1.0
        top = 0
        for i in range(width):
            q = p[a, i]
            if q == 0.0:
                continue
            top += 1
            for k in range(top, 0, -1):
                v = f[k] * (1.0 - q) + f[k - 1] * q
                f[k] = v if v > NEGLIGIBLE else 0.0
            f[0] *= 1.0 - q
            if f[0] < NEGLIGIBLE:
                f[0] = 0.0


@njit(cache=True)
def poisson_binomial_rows_backward(
    p: np.ndarray, pmf: np.ndarray, grad_pmf: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """∂L/∂p[a, i] = Σₖ (g[k + 1] − g[k])·pmf₋ᵢ[k], with pmf₋ᵢ the pmf without channel i (a deconvolution).

    Channels are processed side by side (the inner loop runs over channels, so the recurrences do not wait on each
    other); both directions are run for every channel and the stable one is kept, which keeps the loops branch-free.
    """
    rows, width = p.shape
    for a in range(rows):
        n = 0
        for i in range(width):
            if p[a, i] != 0.0:
                n = i + 1
        for i in range(n, width):
            out[a, i] = 0.0
        if n == 0:
            continue
        q = p[a, :n]
        low = q <= 0.5
        # The other direction's factor is replaced by 1 (times a factor ≤ 1): bounded, discarded afterwards.
        inv_up = 1.0 / (1.0 - np.where(low, q, 0.0))
        inv_down = 1.0 / np.where(low, 1.0, q)
        prev = np.zeros(n)
        acc_up = np.zeros(n)
        for k in range(n):
            fk = pmf[a, k]
            hk = grad_pmf[a, k + 1] - grad_pmf[a, k]
            for i in range(n):
                cur = (fk - q[i] * prev[i]) * inv_up[i]
                cur = cur if abs(cur) > NEGLIGIBLE else 0.0
                acc_up[i] += hk * cur
                prev[i] = cur
        nxt = np.zeros(n)
        acc_down = np.zeros(n)
        for k in range(n - 1, -1, -1):
            fk = pmf[a, k + 1]
            hk = grad_pmf[a, k + 1] - grad_pmf[a, k]
            for i in range(n):
                cur = (fk - (1.0 - q[i]) * nxt[i]) * inv_down[i]
                cur = cur if abs(cur) > NEGLIGIBLE else 0.0
                acc_down[i] += hk * cur
                nxt[i] = cur
        for i in range(n):
            out[a, i] = acc_up[i] if low[i] else acc_down[i]


@njit(cache=True)
def _convolve_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out = (a * b)[:len(out)]`` (polynomial product, truncated)."""
    out[:] = 0.0
    length = out.shape[0]
    for i in range(min(a.shape[0], length)):
        ai = a[i]
        if ai == 0.0:
            continue
        for j in range(min(b.shape[0], length - i)):
            out[i + j] += ai * b[j]
    for k in range(length):
        if abs(out[k]) < NEGLIGIBLE:
            out[k] = 0.0


@njit(cache=True)
def product_rows(
    parts: np.ndarray, pointers: np.ndarray, members: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``out[s] = ∏ parts[members[pointers[s]:pointers[s + 1]]]`` as polynomials, truncated to ``out.shape[1]``."""
    length = out.shape[1]
    work = np.empty(length)
    for s in range(out.shape[0]):
        first = members[pointers[s]]
        out[s, :] = 0.0
        m = min(parts.shape[1], length)
        out[s, :m] = parts[first, :m]
        for j in range(pointers[s] + 1, pointers[s + 1]):
            _convolve_into(out[s], parts[members[j]], work)
            out[s, :] = work


@njit(cache=True)
def product_rows_backward(
    parts: np.ndarray, pointers: np.ndarray, members: np.ndarray, grad: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Adds ∂L/∂parts to ``out`` from ∂L/∂products ``grad``: for each part, the correlation of the product's
    gradient with the product of the other parts."""
    length = grad.shape[1]
    width = parts.shape[1]
    others = np.empty(length)
    work = np.empty(length)
    for s in range(grad.shape[0]):
        start, stop = pointers[s], pointers[s + 1]
        for j in range(start, stop):
            others[:] = 0.0
            others[0] = 1.0
            for m in range(start, stop):
                if m != j:
                    _convolve_into(others, parts[members[m]], work)
                    others[:] = work
            target = members[j]
            span = min(width, length)
            for k in range(length):
                weight = others[k]
                if weight == 0.0:  # a single part's "others" is the constant 1: one row, not a triangle
                    continue
                for i in range(min(span, length - k)):
                    out[target, i] += grad[s, i + k] * weight


@njit(cache=True)
def csr_matvec(
    pointers: np.ndarray, columns: np.ndarray, values: np.ndarray, x: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    for r in range(out.shape[0]):
        total = 0.0
        for e in range(pointers[r], pointers[r + 1]):
            total += values[e] * x[columns[e]]
        out[r] = total


@njit(cache=True)
def csr_rmatvec(
    pointers: np.ndarray, columns: np.ndarray, values: np.ndarray, y: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``out = Aᵀ y`` for the CSR matrix A (``out`` is overwritten)."""
    out[:] = 0.0
    for r in range(y.shape[0]):
        yr = y[r]
        if yr == 0.0:
            continue
        for e in range(pointers[r], pointers[r + 1]):
            out[columns[e]] += values[e] * yr


__all__ = [
    "NEGLIGIBLE",
    "csr_matvec",
    "csr_rmatvec",
    "poisson_binomial_rows",
    "poisson_binomial_rows_backward",
    "product_rows",
    "product_rows_backward",
]
