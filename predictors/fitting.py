"""Latency predictors: a lookup table of measured variants plus, per operator kind, a regressor chosen by evidence.

For every kind, :func:`fit_predictors` compares candidates by K-fold cross-validated MAPE and keeps the winner:

* ``roofline`` — ``max(a * FLOPs, b * bytes) + c`` (MorphNet's latency cost with a launch constant), one term per
  kernel class (conv2d: dense, pointwise, depthwise, grouped), fitted on log latency so that 20 us and 20 ms
  variants weigh alike;
* ``random_forest`` / ``gradient_boosting`` — trees on log latency over :mod:`predictors.features`;
* ``random_forest+roofline`` / ``gradient_boosting+roofline`` — trees on the log ratio of latency to the roofline:
  the roofline carries the trend (and extrapolates it beyond the grid), the trees the staircase of NCHWc blocking.

A kind with fewer than :data:`MIN_SAMPLES_FOR_REGRESSORS` measured variants gets ``roofline_ratio``, one scale over
``max(FLOPs, 8 * bytes)``, with leave-one-out error when there are at least two variants and ``None`` below.

The candidates and their cross-validation live in :mod:`predictors.candidates`.  The fitted predictor is plain JSON
(:mod:`predictors.portable`); loading and predicting need numpy only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from predictors.candidates import (
    CANDIDATES,
    DEFAULT_CANDIDATES,
    LOG_MS,
    MS,
    Components,
    cross_validated_errors,
    evaluate_components,
    fit_roofline,
    relative_errors,
    roofline_ratio,
)
from predictors.features import feature_matrix, feature_names
from predictors.ops import OpSpec
from predictors.portable import load_model

FORMAT = "figs-latency-predictor"
FORMAT_VERSION = 1
MIN_SAMPLES_FOR_REGRESSORS = 5


class UnmodelledOpError(KeyError, ValueError):
    """No predictor exists for an operator kind (nothing of that kind was measured before fitting)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind

    def __str__(self) -> str:
        return f"no latency predictor for operator kind {self.kind!r}; profile variants of it and refit"


@dataclass(frozen=True)
class FitReport:
    """Cross-validated quality of one kind's predictor.

    ``mape`` is a fraction (0.05 = 5 %) and ``within_10pct`` the fraction of held-out variants predicted within
    ±10 %; both are None when too few variants exist to hold any out.  ``n_samples`` counts distinct variants.
    ``candidates`` maps every compared regressor to its cross-validated MAPE (``candidates_within_10pct`` likewise).
    """

    op: str
    n_samples: int
    mape: float | None
    within_10pct: float | None
    model: str
    candidates: dict[str, float | None] = field(default_factory=dict)
    candidates_within_10pct: dict[str, float | None] = field(default_factory=dict)


class KindPredictor:
    """Measured medians of one kind's variants plus the chosen regressor over that kind's features."""

    def __init__(self, kind: str, *, table: dict[str, float], components: Components, model: str) -> None:
        self.kind = kind
        self.table = table
        self.components = components
        self.model = model

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        return evaluate_components(self.components, x)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "feature_names": feature_names(self.kind),
            "table": self.table,
            "components": [{"space": space, "model": c.to_json()} for space, c in self.components],
        }

    @classmethod
    def from_json(cls, kind: str, data: dict[str, Any]) -> KindPredictor:
        expected = feature_names(kind)
        if data.get("feature_names") != expected:
            raise ValueError(
                f"kinds.{kind}.feature_names: fitted with other features than this version computes; refit"
            )
        components: Components = []
        for i, entry in enumerate(data["components"]):
            if entry.get("space") not in (MS, LOG_MS):
                raise ValueError(f"kinds.{kind}.components[{i}].space: must be {MS!r} or {LOG_MS!r}")
            components.append((entry["space"], load_model(entry["model"])))
        table = {str(k): float(v) for k, v in data["table"].items()}
        return cls(kind, table=table, components=components, model=str(data["model"]))


class LatencyPredictor:
    """Latency of operator variants on one device: measured where available, predicted otherwise."""

    def __init__(self, kinds: dict[str, KindPredictor]) -> None:
        self._kinds = dict(sorted(kinds.items()))

    @property
    def kinds(self) -> list[str]:
        return list(self._kinds)

    def kind_predictor(self, kind: str) -> KindPredictor:
        if kind not in self._kinds:
            raise UnmodelledOpError(kind)
        return self._kinds[kind]

    def predict(self, ops: Sequence[OpSpec]) -> list[tuple[float, str]]:
        """Per op ``(ms, "measured")`` when that exact variant was measured, else ``(ms, "predicted")``.

        Raises:
            UnmodelledOpError: an op's kind has no predictor.
        """
        for op in ops:
            self.kind_predictor(op.kind)
        results: list[tuple[float, str] | None] = [None] * len(ops)
        unmeasured = []
        for i, op in enumerate(ops):
            measured = self._kinds[op.kind].table.get(op.key)
            if measured is None:
                unmeasured.append(i)
            else:
                results[i] = (measured, "measured")
        if unmeasured:
            predicted = self.predict_ms([ops[i] for i in unmeasured])
            for i, ms in zip(unmeasured, predicted, strict=True):
                results[i] = (float(ms), "predicted")
        return [r for r in results if r is not None]

    def predict_ms(self, ops: Sequence[OpSpec]) -> np.ndarray:
        """Regressor predictions in ms for every op (the table is not consulted), vectorised per kind.

        Raises:
            UnmodelledOpError: an op's kind has no predictor.
        """
        by_kind: dict[str, list[int]] = defaultdict(list)
        for i, op in enumerate(ops):
            by_kind[op.kind].append(i)
        out = np.empty(len(ops), dtype=np.float64)
        for kind, indices in by_kind.items():
            predictor = self.kind_predictor(kind)
            out[indices] = predictor.predict_features(feature_matrix([ops[i] for i in indices]))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kinds": {kind: p.to_json() for kind, p in self._kinds.items()},
        }

    @cached_property
    def version(self) -> str:
        """Content hash of the JSON form: equal predictors have equal versions in every process."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatencyPredictor:
        """Rebuild from :meth:`to_json` output; needs numpy only.

        Raises:
            ValueError: naming the field that is missing, of another format, or from a newer format version.
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format: not a {FORMAT} document")
        version = data.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise ValueError(f"format_version: this code reads 1..{FORMAT_VERSION}, got {version!r}")
        kinds = data.get("kinds")
        if not isinstance(kinds, dict):
            raise ValueError("kinds: missing or not an object")
        try:
            return cls({kind: KindPredictor.from_json(kind, entry) for kind, entry in kinds.items()})
        except KeyError as exc:
            raise ValueError(f"kinds: missing field {exc.args[0]!r}") from exc


def _fit_kind(
    kind: str, ops: list[OpSpec], y_ms: np.ndarray, *, seed: int, cv_folds: int, candidates: Sequence[str]
) -> tuple[Components, FitReport]:
    x = feature_matrix(ops)
    n = len(y_ms)
    if n < MIN_SAMPLES_FOR_REGRESSORS:
        errors = None
        if n >= 2:
            loo = np.array([
                evaluate_components(roofline_ratio(np.delete(x, i, 0), np.delete(y_ms, i), kind=kind), x[i : i + 1])[0]
                for i in range(n)
            ])  # fmt: skip
            errors = relative_errors(loo, y_ms)
        report = FitReport(
            op=kind, n_samples=n, model="roofline_ratio",
            mape=None if errors is None else float(errors.mean()),
            within_10pct=None if errors is None else float((errors <= 0.1).mean()),
            candidates={"roofline_ratio": None if errors is None else float(errors.mean())},
            candidates_within_10pct={"roofline_ratio": None if errors is None else float((errors <= 0.1).mean())},
        )  # fmt: skip
        return roofline_ratio(x, y_ms, kind=kind), report

    from sklearn.model_selection import KFold

    splitter = KFold(n_splits=min(cv_folds, n), shuffle=True, random_state=seed)
    folds = list(splitter.split(x))
    errors_by_name = cross_validated_errors(x, y_ms, kind=kind, folds=folds, seed=seed, names=candidates)
    # Ties go to the earlier (simpler) candidate: min() keeps the first of equal values.
    winner = min(errors_by_name, key=lambda name: float(errors_by_name[name].mean()))
    errors = errors_by_name[winner]
    report = FitReport(
        op=kind, n_samples=n, model=winner, mape=float(errors.mean()),
        within_10pct=float((errors <= 0.1).mean()),
        candidates={name: float(e.mean()) for name, e in errors_by_name.items()},
        candidates_within_10pct={name: float((e <= 0.1).mean()) for name, e in errors_by_name.items()},
    )  # fmt: skip
    return CANDIDATES[winner](x, y_ms, kind, seed, fit_roofline(x, y_ms, kind=kind)), report


def fit_predictors(
    samples: Sequence[tuple[OpSpec, float]],
    *,
    seed: int = 0,
    cv_folds: int = 5,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
) -> tuple[LatencyPredictor, list[FitReport]]:
    """Fit one predictor per operator kind from ``(op, median_ms)`` samples.

    Repeated measurements of one variant are merged to their median first, so folds hold out whole variants.
    ``candidates`` names the regressors compared (keys of ``predictors.candidates.CANDIDATES``); the benchmark
    passes all of them.

    Raises:
        ValueError: a sample is not ``(OpSpec, positive finite ms)`` (the message names ``samples[i]``),
            ``cv_folds`` is below 2, or ``candidates`` is empty or names an unknown regressor.
    """
    if cv_folds < 2:
        raise ValueError(f"cv_folds: must be at least 2, got {cv_folds}")
    unknown = [name for name in candidates if name not in CANDIDATES]
    if unknown or not candidates:
        raise ValueError(f"candidates: choose from {', '.join(CANDIDATES)}; got {list(candidates)!r}")
    by_kind: dict[str, dict[str, tuple[OpSpec, list[float]]]] = defaultdict(dict)
    for i, sample in enumerate(samples):
        if not isinstance(sample, tuple | list) or len(sample) != 2 or not isinstance(sample[0], OpSpec):
            raise ValueError(f"samples[{i}]: expected (OpSpec, latency_ms), got {sample!r}")
        op, ms = sample
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) or ms <= 0:
            raise ValueError(f"samples[{i}].latency_ms: must be a positive finite number, got {ms!r}")
        by_kind[op.kind].setdefault(op.key, (op, []))[1].append(float(ms))

    predictors: dict[str, KindPredictor] = {}
    reports: list[FitReport] = []
    for kind in sorted(by_kind):
        variants = list(by_kind[kind].values())
        ops = [op for op, _ in variants]
        y_ms = np.array([float(np.median(values)) for _, values in variants])
        components, report = _fit_kind(kind, ops, y_ms, seed=seed, cv_folds=cv_folds, candidates=candidates)
        table = {op.key: float(ms) for op, ms in zip(ops, y_ms, strict=True)}
        predictors[kind] = KindPredictor(kind, table=table, components=components, model=report.model)
        reports.append(report)
    return LatencyPredictor(predictors), reports


__all__ = [
    "CANDIDATES",
    "DEFAULT_CANDIDATES",
    "FitReport",
    "KindPredictor",
    "LatencyPredictor",
    "UnmodelledOpError",
    "fit_predictors",
    "fit_roofline",
]
