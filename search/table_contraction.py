"""Σₐ Σ_b P(C_in = a) P(C_out = b) T[a, b] for every layer and device, as one sparse matrix-vector product.

All layers' latency tables together have ~30,000 real entries on the default digits space; padded to one dense
``[devices, layers, rows, cols]`` block they are mostly zeros (a 1-row depthwise table padded to the widest
projection).  Here they are one block-sparse matrix ``A[(device, layer, a), (source, b)] = T_device,layer[a, b]``
in CSR form, so that

    u = A · vec(source pmfs)        Σ_b T[a, b] P(C_out = b) for every (device, layer, a)
    value[device, layer] = Σₐ P(C_in = a) · u[device, layer, a]

and the backward is one product with the transpose (the same CSR arrays, scattered).  Only the (layer, a) input
probabilities are gathered.  float64 numpy arrays; the loops are in :mod:`search.pmf_kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.pmf_kernels import csr_matvec, csr_rmatvec


class TableContraction:
    """The latency tables of every layer on every device, laid out for :meth:`forward`.

    ``tables[d][l]`` is layer ``l``'s dense table on device ``d`` (``[rows_l, cols_l]``); ``in_source[l]`` and
    ``out_source[l]`` index the rows of the ``[n_sources, pmf_width]`` source-pmf matrix.  A layer whose count is
    fixed on one side uses a source whose pmf is a point mass at 0, and its table has one row (or column) there.
    """

    def __init__(
        self,
        tables: Sequence[Sequence[np.ndarray]],
        in_source: np.ndarray,
        out_source: np.ndarray,
        pmf_width: int,
        n_sources: int,
    ) -> None:
        self.devices = len(tables)
        self.layers = len(in_source)
        self.rows = max((int(np.shape(t)[0]) for device in tables for t in device), default=1)
        if self.rows > pmf_width:
            raise ValueError(f"tables: {self.rows} rows exceed the pmf width {pmf_width}")
        self.n_columns = n_sources * pmf_width
        row_ids, col_ids, values = [], [], []
        for d, device_tables in enumerate(tables):
            if len(device_tables) != self.layers:
                raise ValueError(f"tables[{d}]: {len(device_tables)} tables for {self.layers} layers")
            for layer, table in enumerate(device_tables):
                dense = np.asarray(table, dtype=np.float64)
                r, c = dense.shape
                a, b = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
                row_ids.append((d * self.layers + layer) * self.rows + a.ravel())
                col_ids.append(int(out_source[layer]) * pmf_width + b.ravel())
                values.append(dense.ravel())
        n_rows = self.devices * self.layers * self.rows
        rows = np.concatenate(row_ids) if row_ids else np.zeros(0, dtype=np.int64)
        cols = np.concatenate(col_ids) if col_ids else np.zeros(0, dtype=np.int64)
        vals = np.concatenate(values) if values else np.zeros(0)
        order = np.lexsort((cols, rows))
        self.entries = int(vals.size)
        self._pointers = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))]).astype(np.int64)
        self._columns = cols[order].astype(np.int64)
        self._values = np.ascontiguousarray(vals[order])
        # Where each (layer, a) input probability sits in the flattened source pmfs.
        self.in_positions = (np.asarray(in_source)[:, None] * pmf_width + np.arange(self.rows)).ravel()

    def forward(self, flat_pmfs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(u [devices, layers, rows], in_pmf [layers, rows], values [devices, layers])`` from the flattened
        source pmfs."""
        flat_u = np.empty(self.devices * self.layers * self.rows)
        csr_matvec(self._pointers, self._columns, self._values, flat_pmfs, flat_u)
        u = flat_u.reshape(self.devices, self.layers, self.rows)
        in_pmf = flat_pmfs[self.in_positions].reshape(self.layers, self.rows)
        return u, in_pmf, (u * in_pmf).sum(-1)

    def backward(self, u: np.ndarray, in_pmf: np.ndarray, grad_values: np.ndarray) -> np.ndarray:
        """∂L/∂(flattened source pmfs) from ∂L/∂values ``[devices, layers]``."""
        grad_u = (grad_values[:, :, None] * in_pmf).ravel()
        grad = np.empty(self.n_columns)
        csr_rmatvec(self._pointers, self._columns, self._values, grad_u, grad)
        grad_in = (grad_values[:, :, None] * u).sum(0).ravel()
        return grad + np.bincount(self.in_positions, weights=grad_in, minlength=self.n_columns)


__all__ = ["TableContraction"]
