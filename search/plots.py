"""PNG plots of a search: keep-probabilities per layer and the latency / accuracy trajectory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: searches run on servers and in CI without a display

import matplotlib.pyplot as plt
import numpy as np


def plot_keep_probabilities(
    probabilities: Mapping[str, Sequence[float]], path: Path | str, *, threshold: float = 0.5
) -> None:
    """One row per gate group, one cell per channel (sorted high to low), coloured by keep probability.

    Sorting inside each row makes the kept width readable at a glance: it is where the row crosses ``threshold``.
    """
    names = list(probabilities)
    if not names:
        raise ValueError("no gate probabilities to plot")
    width = max(len(probabilities[n]) for n in names)
    grid = np.full((len(names), width), np.nan)
    for row, name in enumerate(names):
        values = np.sort(np.asarray(probabilities[name], dtype=float))[::-1]
        grid[row, : len(values)] = values
    fig, (heat, bars) = plt.subplots(
        1, 2, figsize=(12, 0.35 * len(names) + 1.8), gridspec_kw={"width_ratios": [3, 1]}, sharey=True
    )
    image = heat.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    heat.set_yticks(range(len(names)), labels=names, fontsize=7)
    heat.set_xlabel("channel (sorted by keep probability)")
    heat.set_title("keep probability per channel")
    fig.colorbar(image, ax=heat, fraction=0.03)
    kept = [int((np.asarray(probabilities[n]) >= threshold).sum()) for n in names]
    total = [len(probabilities[n]) for n in names]
    bars.barh(range(len(names)), total, color="lightgray", label="full width")
    bars.barh(range(len(names)), kept, color="tab:green", label=f"kept (p ≥ {threshold})")
    bars.set_xlabel("channels")
    bars.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectory(
    history: Sequence[Mapping[str, float]], path: Path | str, *, targets_ms: Mapping[str, float]
) -> None:
    """Expected latency per device (with its target) and accuracy against the step."""
    if not history:
        raise ValueError("empty search history")
    steps = [h["step"] for h in history]
    fig, (lat_ax, acc_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for device, target in targets_ms.items():
        key = f"latency_ms/{device}"
        values = [h.get(key, np.nan) for h in history]
        (line,) = lat_ax.plot(steps, values, label=f"E[latency] {device}")
        lat_ax.axhline(target, color=line.get_color(), linestyle="--", linewidth=1, label=f"target {device}")
    lat_ax.set_ylabel("ms")
    lat_ax.legend(fontsize=7)
    lat_ax.set_title("expected latency")
    for key, label in (("train_accuracy", "train (batch)"), ("val_accuracy", "validation")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            xs, ys = zip(*points, strict=True)
            acc_ax.plot(xs, ys, marker="." if key == "val_accuracy" else None, label=label)
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_xlabel("step")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["plot_keep_probabilities", "plot_trajectory"]
