"""Kernel latency regressors: one per kernel class, fitted on in-context samples, stored as portable JSON.

Three regressor families are compared on held-out kernels *and* held-out networks (grouped cross-validation, so a
network's kernels never train the model that predicts it): a random forest and gradient boosting on the log of the
latency (kernel times span four decades; a log target weighs a 5 µs reorder like a 5 ms convolution), and a
roofline ``max(a·FLOPs, b·bytes) + c`` per class.  The winner on held-out networks is the one the service keeps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from predictors.kernels import CONV, CONV_NCHW, DWCONV, FEATURE_NAMES, GEMM, Kernel, network_kernel_bytes
from predictors.portable import export_model, load_model

if TYPE_CHECKING:
    from latency_service.kernel_profiling import KernelSample, ProfiledNetwork

METHODS: tuple[str, ...] = ("random_forest", "gradient_boosting", "roofline")
DEFAULT_METHOD = "random_forest"
MIN_CLASS_SAMPLES = 8
# Format 2 adds the network-context column; a format-1 predictor (fitted without it) still loads and predicts as before.
PREDICTOR_FORMAT = 2
READABLE_FORMATS = (1, 2)
MAX_COMPARE_NETWORKS = 300
# Classes whose time depends on where their weights and activations live: a 6 MB Gemm streams at ~145 GB/s in a
# small network (all of it in L3 between runs) and ~45 GB/s in a large one.  They get the network's footprint.
CONTEXT_CLASSES = frozenset({CONV, DWCONV, CONV_NCHW, GEMM})
# Used when the host does not say (no sysfs cache description): the L3 of the machine this was developed on.
DEFAULT_L3_BYTES = 32 * 2**20
_CACHE_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


def host_l3_bytes() -> float:
    """The last-level (L3) cache size of this host from sysfs, or DEFAULT_L3_BYTES where it cannot be read."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        for index in sorted(_CACHE_SYSFS.glob("index*")):
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                return float(int(size.rstrip("KMG")) * units.get(size[-1:], 1))
    except (OSError, ValueError):
        pass
    return float(DEFAULT_L3_BYTES)


def network_context(network_bytes: float, cache_bytes: float) -> float:
    """The context column: log2(1 + footprint), capped at the L3 size.

    The cap matters: beyond L3 everything streams from DRAM alike, and the uncapped footprint let the trees split on
    network sizes no generated network reached (ResNets at 64 px were predicted badly off).
    """
    return float(np.log2(1.0 + min(max(network_bytes, 0.0), cache_bytes)))


def with_context(x: np.ndarray, context: float | Sequence[float]) -> np.ndarray:
    """``x`` with the context column appended: one value for every row, or one per row."""
    return np.column_stack([x, np.broadcast_to(np.asarray(context, dtype=np.float64), (len(x),))])


def work_column(kernel_class: str) -> int | None:
    """The feature a kernel's time is proportional to, to first order: FLOPs for convolutions and GEMMs, else bytes."""
    names = FEATURE_NAMES[kernel_class]
    for name in ("flops", "bytes", "numel"):
        if name in names:
            return names.index(name)
    return None


@dataclass
class ClassModel:
    """One kernel class's regressor.

    ``log_target``: the model predicts log(ms); with ``work_column`` set it predicts log(ms / (1 + work)) — the
    time per unit of work, which varies over one decade where the time varies over four, and which extrapolates
    proportionally to the work beyond the sampled range instead of flattening out as a tree's raw output does.
    """

    model: Any
    log_target: bool
    work_column: int | None = None

    baseline: KernelRoofline | None = None

    def _work(self, x: np.ndarray) -> np.ndarray:
        if self.baseline is not None:
            return np.maximum(self.baseline.predict(x), 1e-6)
        return 1.0 + x[:, self.work_column] if self.work_column is not None else np.ones(len(x))

    def predict_ms(self, x: np.ndarray) -> np.ndarray:
        raw = np.asarray(self.model.predict(x), dtype=np.float64)
        if not self.log_target:
            return np.maximum(raw, 0.0)
        return np.exp(raw) * self._work(np.asarray(x, dtype=np.float64))

    def to_json(self) -> dict[str, Any]:
        baseline = self.baseline.to_json() if self.baseline is not None else None
        return {"model": self.model.to_json(), "log_target": self.log_target, "work_column": self.work_column,
                "baseline": baseline}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassModel:
        column = data.get("work_column")
        raw = data["model"]
        model = KernelRoofline.from_json(raw) if raw.get("type") == KernelRoofline.kind else load_model(raw)
        baseline = KernelRoofline.from_json(data["baseline"]) if data.get("baseline") else None
        return cls(model, bool(data["log_target"]), None if column is None else int(column), baseline)


@dataclass
class KernelPredictor:
    """Whole-model latency = per-run constant + Σ kernel predictions (kernels of the runtime's optimised graph)."""

    models: dict[str, ClassModel]
    overhead_ms: float
    block_size: int
    method: str
    fallback_ms_per_byte: float
    fallback_const_ms: float
    n_samples: dict[str, int] = field(default_factory=dict)
    # The L3 size the context column was capped at when fitted (kept so that another host predicts the same); None:
    # no context column (a format-1 predictor).
    cache_bytes: float | None = None

    @property
    def version(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def fallback_ms(self, kernel: Kernel) -> float:
        """The estimate used for a kernel no regressor models: a memory-bound line over the bytes it touches."""
        elements = sum(int(np.prod(s)) for s in (*kernel.input_shapes, *kernel.output_shapes))
        return self.fallback_const_ms + self.fallback_ms_per_byte * 4.0 * elements

    def predict(self, kernels: Sequence[Kernel]) -> list[tuple[float, str]]:
        """(ms, source) per kernel; source is ``"regressor:<class>"`` or ``"fallback"`` (then it is unmodelled)."""
        results: list[tuple[float, str]] = [(0.0, "fallback")] * len(kernels)
        by_class: dict[str, list[int]] = {}
        for i, kernel in enumerate(kernels):
            if kernel.kernel_class in self.models:
                by_class.setdefault(kernel.kernel_class, []).append(i)
            else:
                results[i] = (self.fallback_ms(kernel), "fallback")
        context = None if self.cache_bytes is None else network_context(network_kernel_bytes(kernels), self.cache_bytes)
        for kernel_class, indices in by_class.items():
            x = np.array([kernels[i].features for i in indices], dtype=np.float64)
            if context is not None and kernel_class in CONTEXT_CLASSES:
                x = with_context(x, context)
            for i, ms in zip(indices, self.models[kernel_class].predict_ms(x), strict=True):
                results[i] = (float(ms), f"regressor:{kernel_class}")
        return results

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PREDICTOR_FORMAT,
            "method": self.method,
            "overhead_ms": self.overhead_ms,
            "block_size": self.block_size,
            "fallback_ms_per_byte": self.fallback_ms_per_byte,
            "fallback_const_ms": self.fallback_const_ms,
            "n_samples": self.n_samples,
            "network_context": None if self.cache_bytes is None else {"cache_bytes": self.cache_bytes},
            "models": {name: model.to_json() for name, model in sorted(self.models.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelPredictor:
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format: this code reads kernel predictors of formats {READABLE_FORMATS}")
        context = data.get("network_context")
        return cls(
            models={name: ClassModel.from_json(m) for name, m in data["models"].items()},
            overhead_ms=float(data["overhead_ms"]),
            block_size=int(data["block_size"]),
            method=str(data["method"]),
            fallback_ms_per_byte=float(data["fallback_ms_per_byte"]),
            fallback_const_ms=float(data["fallback_const_ms"]),
            n_samples={k: int(v) for k, v in data.get("n_samples", {}).items()},
            cache_bytes=float(context["cache_bytes"]) if context else None,
        )


@dataclass(frozen=True)
class KernelRoofline:
    """``max(a·x[compute], b·x[memory]) + c``: seconds per FLOP, per byte and per kernel launch (MorphNet's cost)."""

    a: float
    b: float
    c: float
    compute_column: int
    memory_column: int

    kind = "kernel_roofline"

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        result: np.ndarray = np.maximum(self.a * x[:, self.compute_column], self.b * x[:, self.memory_column]) + self.c
        return result

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, "a": self.a, "b": self.b, "c": self.c, "compute_column": self.compute_column,
                "memory_column": self.memory_column}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelRoofline:
        return cls(float(data["a"]), float(data["b"]), float(data["c"]), int(data["compute_column"]),
                   int(data["memory_column"]))  # fmt: skip


def _fit_roofline(x: np.ndarray, y: np.ndarray, compute: int, memory: int) -> KernelRoofline:
    """Least squares on log time (relative error) with a soft-L1 loss; a, b, c kept positive through exp."""
    from scipy.optimize import least_squares

    flops, bytes_ = x[:, compute], x[:, memory]

    def residual(p: np.ndarray) -> np.ndarray:
        a, b, c = np.exp(p)
        return np.asarray(np.log(np.maximum(a * flops, b * bytes_) + c) - np.log(y))

    start = np.log([max(np.median(y / np.maximum(flops, 1)), 1e-12), max(np.median(y / bytes_), 1e-12), 1e-3])
    fitted = least_squares(residual, start, loss="soft_l1").x
    a, b, c = (float(v) for v in np.exp(fitted))
    return KernelRoofline(a, b, c, compute, memory)


def fit_class_model(x: np.ndarray, y: np.ndarray, kernel_class: str, method: str, seed: int = 0) -> ClassModel:
    if method == "roofline":
        names = FEATURE_NAMES[kernel_class]
        memory = names.index("bytes") if "bytes" in names else 0
        compute = names.index("flops") if "flops" in names else memory
        return ClassModel(_fit_roofline(x, y, compute, memory), log_target=False)
    if method == "random_forest":
        from sklearn.ensemble import RandomForestRegressor

        estimator: Any = RandomForestRegressor(n_estimators=60, min_samples_leaf=2, random_state=seed, n_jobs=1)
    elif method == "gradient_boosting":
        from sklearn.ensemble import GradientBoostingRegressor

        estimator = GradientBoostingRegressor(n_estimators=300, max_depth=4, learning_rate=0.08, random_state=seed)
    else:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    # The trees learn the ratio to a per-class roofline (launch cost + max(compute, memory)): a fixed-cost
    # kernel and a compute-bound one then both extrapolate the physical way, where a ratio to FLOPs alone made a
    # 192-channel 1x1 conv at 1x1 pixels 20x too slow (its leaf held squeeze-excitation convs with tiny FLOPs).
    names = FEATURE_NAMES[kernel_class]
    memory = names.index("bytes") if "bytes" in names else 0
    compute = names.index("flops") if "flops" in names else memory
    model = ClassModel(None, log_target=True, baseline=_fit_roofline(x, y, compute, memory))
    estimator.fit(x, np.log(y / model._work(x)))
    model.model = export_model(estimator)
    return model


def fit_kernel_predictor(
    samples: Sequence[KernelSample],
    *,
    overhead_ms: float,
    block_size: int,
    method: str = DEFAULT_METHOD,
    seed: int = 0,
    use_context: bool = True,
    cache_bytes: float | None = None,
) -> KernelPredictor:
    """One regressor per kernel class with at least MIN_CLASS_SAMPLES samples.

    ``use_context`` adds the network-footprint column to CONTEXT_CLASSES, capped at ``cache_bytes`` (default: this
    host's L3, :func:`host_l3_bytes`).
    """
    cap = (cache_bytes if cache_bytes is not None else host_l3_bytes()) if use_context else None
    by_class: dict[str, list[KernelSample]] = {}
    for sample in samples:
        by_class.setdefault(sample.kernel_class, []).append(sample)
    models: dict[str, ClassModel] = {}
    counts: dict[str, int] = {}
    for kernel_class, rows in sorted(by_class.items()):
        if len(rows) < MIN_CLASS_SAMPLES:
            continue
        x = np.array([r.features for r in rows], dtype=np.float64)
        if cap is not None and kernel_class in CONTEXT_CLASSES:
            x = with_context(x, [network_context(r.network_bytes, cap) for r in rows])
        y = np.maximum(np.array([r.latency_ms for r in rows], dtype=np.float64), 1e-5)
        models[kernel_class] = fit_class_model(x, y, kernel_class, method, seed)
        counts[kernel_class] = len(rows)
    per_byte, const = _fit_fallback(samples)
    return KernelPredictor(models, overhead_ms, block_size, method, per_byte, const, counts, cap)


def _fit_fallback(samples: Sequence[KernelSample]) -> tuple[float, float]:
    """A memory-bound line ms = c + bytes/bandwidth from the data-movement-like kernels (reorders, elementwise)."""
    rows = [s for s in samples if s.kernel_class in ("reorder", "elementwise", "data_movement", "concat")]
    if len(rows) < 4:
        return 1e-9, 0.003
    bytes_ = np.array([s.features[-1] for s in rows])
    y = np.array([s.latency_ms for s in rows])
    slope, intercept = np.polyfit(bytes_, y, 1)
    return float(max(slope, 1e-12)), float(max(intercept, 0.0))


def network_predictions(
    networks: Sequence[ProfiledNetwork],
    *,
    method: str = DEFAULT_METHOD,
    folds: int = 3,
    seed: int = 0,
    use_context: bool = True,
) -> np.ndarray:
    """Cross-validated whole-network predictions: each network predicted by a model that never saw it."""
    networks = list(networks)
    order = np.random.default_rng(seed).permutation(len(networks))
    fold_of = np.empty(len(networks), dtype=int)
    fold_of[order] = np.arange(len(networks)) % folds
    predicted = np.zeros(len(networks))
    for fold in range(folds):
        train = [n for n, f in zip(networks, fold_of, strict=True) if f != fold]
        samples = [s for n in train for s in n.samples()]
        predictor = fit_kernel_predictor(
            samples, overhead_ms=train[0].overhead_ms, block_size=16, method=method, use_context=use_context
        )
        for i in np.flatnonzero(fold_of == fold):
            network = networks[i]
            kernel_ms = sum(ms for ms, _ in predictor.predict(network.kernels))
            predicted[i] = network.overhead_ms + kernel_ms
    return predicted


def network_errors(
    networks: Sequence[ProfiledNetwork], *, method: str = DEFAULT_METHOD, seed: int = 0, use_context: bool = True
) -> list[float]:
    """Relative error (predicted / measured − 1) of every network under grouped cross-validation."""
    predicted = network_predictions(networks, method=method, seed=seed, use_context=use_context)
    return [float(p / n.truth_ms - 1.0) for p, n in zip(predicted, networks, strict=True)]


def compare_methods(networks: Sequence[ProfiledNetwork], *, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out kernels (MAPE) and held-out networks (share within ±10 %, RMSPE) for every method.

    Only networks whose profile and wall agree enter: a disturbed timing is neither a lesson nor a test.
    """
    networks = [n for n in networks if n.wall_trusted]
    if len(networks) > MAX_COMPARE_NETWORKS:
        # Twelve fits per comparison: a random subset bounds the time; the kept method is refitted on everything.
        keep = np.random.default_rng(seed).choice(len(networks), MAX_COMPARE_NETWORKS, replace=False)
        networks = [networks[i] for i in sorted(keep)]
    report = []
    for method in METHODS:
        errors = np.array(network_errors(networks, method=method, seed=seed))
        kernel_errors = _heldout_kernel_errors(networks, method, seed)
        report.append(
            {
                "method": method,
                "kernel_mape": float(np.mean(np.abs(kernel_errors))),
                "kernel_within_10pct": float(np.mean(np.abs(kernel_errors) <= 0.10)),
                "network_within_10pct": float(np.mean(np.abs(errors) <= 0.10)),
                "network_within_5pct": float(np.mean(np.abs(errors) <= 0.05)),
                "network_rmspe": float(np.sqrt(np.mean(errors**2))),
            }
        )
    return report


def _heldout_kernel_errors(networks: Sequence[ProfiledNetwork], method: str, seed: int) -> np.ndarray:
    half = len(networks) // 2
    order = np.random.default_rng(seed + 1).permutation(len(networks))
    train = [networks[i] for i in order[:half]]
    test = [networks[i] for i in order[half:]]
    predictor = fit_kernel_predictor(
        [s for n in train for s in n.samples()], overhead_ms=train[0].overhead_ms, block_size=16, method=method
    )
    errors: list[float] = []
    for network in test:
        modelled = [(k, r) for k, r in zip(network.kernels, network.reconciled_ms, strict=True) if k.kernel_class]
        predicted = predictor.predict([k for k, _ in modelled])
        errors.extend((ms / max(r, 1e-6)) - 1.0 for (ms, _), (_, r) in zip(predicted, modelled, strict=True))
    return np.asarray(errors)
