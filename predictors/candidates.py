"""The regressors compared per operator kind, and the cross-validation that compares them.

A fitted model is a list of *components* whose contributions add up in log-milliseconds: a roofline contributes the
log of its prediction, a tree ensemble on the log ratio to that roofline contributes its output directly.  Every
component is a portable model (:mod:`predictors.portable`), so a fitted kind is plain JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from predictors.features import class_column, compute_columns, feature_names
from predictors.portable import ByClass, PortableModel, Roofline, RooflineTerm, export_model

# A kernel class (depthwise, pointwise, ... within conv2d) gets its own roofline term from this many variants on.
MIN_SAMPLES_PER_CLASS = 6
# Machine balance assumed by the few-sample fallback (FLOPs per byte at which compute and memory time are equal);
# roughly a one-core AVX-512 CPU against its DRAM.  Only the scale is fitted there, so this just picks the axis.
FALLBACK_BALANCE = 8.0
# A component either predicts milliseconds (its log is added) or adds straight to log-milliseconds.
MS, LOG_MS = "ms", "log_ms"

Components = list[tuple[str, PortableModel]]


def evaluate_components(components: Components, x: np.ndarray) -> np.ndarray:
    """Predicted milliseconds for feature rows ``x``."""
    log_ms = np.zeros(len(x))
    for space, component in components:
        raw = component.predict(x)
        log_ms += np.log(np.maximum(raw, 1e-9)) if space == MS else raw
    result: np.ndarray = np.exp(log_ms)
    return result


def _fit_term(
    x: np.ndarray, y_ms: np.ndarray, *, memory: int, compute_options: list[int], launch_ms: float | None = None
) -> tuple[float, RooflineTerm]:
    """Least squares on log latency; ``launch_ms`` fixes ``c`` instead of fitting it."""
    from scipy.optimize import least_squares

    log_y = np.log(y_ms)
    nbytes = x[:, memory]
    best: tuple[float, RooflineTerm] | None = None
    for compute in compute_options:
        flops = np.maximum(x[:, compute], 1.0)

        def coefficients(theta: np.ndarray) -> tuple[float, float, float]:
            a, b = np.exp(theta[:2])
            c = np.exp(theta[2]) if launch_ms is None else launch_ms
            return float(a), float(b), float(c)

        def residuals(theta: np.ndarray, flops: np.ndarray = flops) -> np.ndarray:
            a, b, c = coefficients(theta)
            result: np.ndarray = np.log(np.maximum(a * flops, b * nbytes) + c) - log_y
            return result

        for share in (0.5, 0.9):
            theta0 = np.log([np.median(y_ms / flops) * share, np.median(y_ms / nbytes) * share,
                             y_ms.min() * (1 - share) + 1e-6])  # fmt: skip
            if launch_ms is not None:
                theta0 = theta0[:2]
            # soft_l1: one variant timed during a burst of contention should not drag the whole curve.
            fit = least_squares(residuals, theta0, loss="soft_l1", f_scale=0.1)
            if best is None or fit.cost < best[0]:
                best = (float(fit.cost), RooflineTerm(*coefficients(fit.x), compute))
    assert best is not None
    return best


def fit_roofline(x: np.ndarray, y_ms: np.ndarray, *, kind: str) -> Roofline:
    """Fit ``max(a*FLOPs, b*bytes) + c`` on log latency, pooled and per kernel class with enough variants.

    The compute axis is raw or channel-padded FLOPs, whichever fits a term better.
    """
    names = feature_names(kind)
    memory = names.index("bytes")
    options = [names.index(c) for c in compute_columns(kind)]
    _, pooled = _fit_term(x, y_ms, memory=memory, compute_options=options)
    class_name = class_column(kind)
    classes: dict[int, RooflineTerm] = {}
    if class_name is not None:
        column = names.index(class_name)
        for value in np.unique(x[:, column]):
            rows = x[:, column] == value
            if rows.sum() >= MIN_SAMPLES_PER_CLASS:
                # Class terms share the pooled launch cost: a class fitted without tiny variants otherwise invents
                # one (11.6 us for dense k x k against 3.3 us pooled), and held-out 3-14 us smoke-preset convs
                # then came out at 27.8 % MAPE instead of 15.7 % (CV on the standard grid: 15.2 % vs 14.9 %).
                classes[int(value)] = _fit_term(
                    x[rows], y_ms[rows], memory=memory, compute_options=options, launch_ms=pooled.c
                )[1]
    return Roofline(
        pooled=pooled,
        memory_column=memory,
        n_features=x.shape[1],
        class_column=None if class_name is None else names.index(class_name),
        classes=classes,
    )


def roofline_ratio(x: np.ndarray, y_ms: np.ndarray, *, kind: str) -> Components:
    """For 1-4 variants: one fitted scale over ``max(FLOPs, FALLBACK_BALANCE * bytes)``, nothing else to overfit."""
    names = feature_names(kind)
    flops, nbytes = x[:, names.index("flops")], x[:, names.index("bytes")]
    work = np.maximum(flops, FALLBACK_BALANCE * nbytes)
    scale = float(np.exp(np.mean(np.log(y_ms / work))))
    term = RooflineTerm(scale, scale * FALLBACK_BALANCE, 0.0, names.index("flops"))
    return [(MS, Roofline(pooled=term, memory_column=names.index("bytes"), n_features=x.shape[1]))]


def _trees(name: str, seed: int, n_samples: int) -> Any:
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor

    # Settings from 5-fold CV on 684 conv2d variants measured here (bench/bench_predictors.py): pooled residual
    # trees over the roofline reach 19-21 % MAPE across depth 3-5, 150-300 stages, 40 forest trees with 64 leaves
    # or unlimited; Huber loss and larger leaves give boosting 18.8 % against 19.9 % by keeping single variants
    # timed under contention from steering a leaf.  At most 64 leaves per tree keeps both on the bitvector
    # evaluator.  Small kinds (8-40 variants) need leaves of one or two variants to fit at all.
    min_leaf = max(1, min(10, n_samples // 40))
    if name == "random_forest":
        return RandomForestRegressor(
            n_estimators=40, max_features=0.5, max_leaf_nodes=64, min_samples_leaf=max(1, min(3, n_samples // 100)),
            random_state=seed,
        )  # fmt: skip
    return GradientBoostingRegressor(
        n_estimators=150, max_depth=3, learning_rate=0.1, subsample=0.8, loss="huber", min_samples_leaf=min_leaf,
        random_state=seed,
    )  # fmt: skip


# A candidate fits on (features, ms, kind, seed, the roofline already fitted to the same rows).
Candidate = Callable[[np.ndarray, np.ndarray, str, int, Roofline], Components]


def _residual_trees(tree_name: str, x: np.ndarray, residual: np.ndarray, kind: str, seed: int) -> PortableModel:
    names = feature_names(kind)
    class_name = class_column(kind)
    if class_name is None:
        return export_model(_trees(tree_name, seed, len(residual)).fit(x, residual))
    # Per kernel class, as nn-Meter does per kernel type: 15.0 % CV MAPE against 18.8 % for one pooled booster on
    # the 684 conv2d variants of the benchmark.  A class too rare to fit keeps the roofline alone (residual 0).
    column = names.index(class_name)
    models: dict[int, PortableModel] = {}
    for value in np.unique(x[:, column]):
        rows = x[:, column] == value
        if rows.sum() >= MIN_SAMPLES_PER_CLASS:
            models[int(value)] = export_model(_trees(tree_name, seed, int(rows.sum())).fit(x[rows], residual[rows]))
    return ByClass(models, class_column=column, n_features=x.shape[1], default=0.0)


def _tree_candidate(tree_name: str, *, on_roofline: bool) -> Candidate:
    def fit(x: np.ndarray, y_ms: np.ndarray, kind: str, seed: int, roofline: Roofline) -> Components:
        if not on_roofline:
            return [(LOG_MS, export_model(_trees(tree_name, seed, len(y_ms)).fit(x, np.log(y_ms))))]
        residual = np.log(y_ms) - np.log(roofline.predict(x))
        return [(MS, roofline), (LOG_MS, _residual_trees(tree_name, x, residual, kind, seed))]

    return fit


def _roofline_candidate(x: np.ndarray, y_ms: np.ndarray, kind: str, seed: int, roofline: Roofline) -> Components:
    return [(MS, roofline)]


CANDIDATES: dict[str, Candidate] = {
    "roofline": _roofline_candidate,
    "random_forest": _tree_candidate("random_forest", on_roofline=False),
    "gradient_boosting": _tree_candidate("gradient_boosting", on_roofline=False),
    "random_forest+roofline": _tree_candidate("random_forest", on_roofline=True),
    "gradient_boosting+roofline": _tree_candidate("gradient_boosting", on_roofline=True),
}


def relative_errors(predicted: np.ndarray, y_ms: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.abs(predicted - y_ms) / y_ms
    return result


# Fitted unless the caller asks for others: the plain tree candidates lost to their roofline-residual versions on
# every one of the 16 kinds of the benchmark grid, and dropping them halves the fitting time.
DEFAULT_CANDIDATES: tuple[str, ...] = ("roofline", "random_forest+roofline", "gradient_boosting+roofline")


def cross_validated_errors(
    x: np.ndarray,
    y_ms: np.ndarray,
    *,
    kind: str,
    folds: list[tuple[np.ndarray, np.ndarray]],
    seed: int,
    names: Sequence[str] = DEFAULT_CANDIDATES,
) -> dict[str, np.ndarray]:
    """Out-of-fold relative errors per candidate; the roofline is fitted once per fold and shared."""
    predicted = {name: np.empty(len(y_ms)) for name in names}
    for train, test in folds:
        roofline = fit_roofline(x[train], y_ms[train], kind=kind)
        for name in names:
            components = CANDIDATES[name](x[train], y_ms[train], kind, seed, roofline)
            predicted[name][test] = evaluate_components(components, x[test])
    return {name: relative_errors(p, y_ms) for name, p in predicted.items()}


__all__ = [
    "CANDIDATES",
    "DEFAULT_CANDIDATES",
    "FALLBACK_BALANCE",
    "LOG_MS",
    "MIN_SAMPLES_PER_CLASS",
    "MS",
    "Candidate",
    "Components",
    "cross_validated_errors",
    "evaluate_components",
    "fit_roofline",
    "relative_errors",
    "roofline_ratio",
]
