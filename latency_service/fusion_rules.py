"""Fusion rules of a backend, detected by measurement (nn-Meter's test) rather than hard-coded.

Two operators A and B fuse when T(A) + T(B) − T(A→B) > α·min(T(A), T(B)), α = 0.5: running them chained costs
less than running them apart by more than half the cheaper one.  Each model is timed end to end with the service's
protocol and the per-run constant is subtracted first.  The kernel decomposition of onnxruntime does not need these
rules (its optimiser's output already shows the fusions); they are recorded per device so that a backend without an
inspectable optimised graph can group operators into kernels, and so that a user sees what fuses where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from latency_service.backends.base import Backend
from latency_service.kernel_generator import NetworkBuilder
from latency_service.kernel_profiling import IN_CONTEXT_CONFIG, optimise
from latency_service.measurement import MeasurementConfig, measure

FUSION_ALPHA = 0.5
FUSION_ROUNDS = 3
# Operator pairs whose fusion decides whether a per-layer sum can work; each as (first, second).
FUSION_PAIRS: tuple[tuple[str, str], ...] = (
    ("conv", "relu"),
    ("conv", "hardswish"),
    ("conv", "sigmoid"),
    ("conv", "batchnorm"),
    ("conv", "add"),
    ("add", "relu"),
    ("dwconv", "relu6"),
)


@dataclass(frozen=True)
class FusionRule:
    first: str
    second: str
    fused: bool
    first_ms: float
    second_ms: float
    chained_ms: float
    kernels_in_chain: int


def _fusion_model(ops: Sequence[str], c: int = 32, hw: int = 28) -> onnx.ModelProto:
    builder = NetworkBuilder(rng=np.random.default_rng(1), hw=hw, in_channels=c)
    x = builder.input()
    for op in ops:
        if op in ("conv", "dwconv"):
            # Bias instead of BN here: the pair under test decides whether a BatchNormalization node exists.
            k = 3
            weight = builder._const(
                np.random.default_rng(2).standard_normal((c, 1 if op == "dwconv" else c, k, k)).astype(np.float32)
                * 0.1,
                "w",
            )
            (y,) = builder._node(
                "Conv", [x.name, weight], kernel_shape=[k, k], pads=[k // 2] * 4, group=c if op == "dwconv" else 1
            )
            x = type(x)(y, c, hw)
        elif op == "batchnorm":
            x = builder.batchnorm(x)
        elif op == "add":
            x = builder.add(x, builder.input())
        else:
            x = builder.act(x, op)
    return builder.build(x)


def detect_fusions(
    backend: Backend, config: MeasurementConfig | None = None, *, pairs: Sequence[tuple[str, str]] = FUSION_PAIRS
) -> list[FusionRule]:
    """Time A, B and A→B as whole models: they fuse when T(A) + T(B) − T(A→B) > α·min(T(A), T(B)).

    Every model pays the per-run constant once, so it is subtracted from each time before the comparison; the number
    of kernels in the optimised A→B graph is recorded alongside as the runtime's own account of the fusion.
    """
    config = config or IN_CONTEXT_CONFIG

    def kernel_count(model_bytes: bytes) -> int:
        return len([n for n in optimise(backend, model_bytes).graph.node if not n.op_type.startswith("Reorder")])

    rules = []
    for first, second in pairs:
        models = [_fusion_model(ops).SerializeToString() for ops in ([first], [second], [first, second])]
        runnables = [backend.prepare_model(model_bytes) for model_bytes in models] + [backend.prepare_empty()]
        try:
            # A, B, A→B and the empty model interleaved over rounds, best median of each kept: a burst from another
            # process lands on one model only and only adds time, and the per-run constant is timed beside the
            # models it is subtracted from (a 4 µs ReLU model minus a constant timed earlier went negative here).
            best = [float("inf")] * len(runnables)
            for _ in range(FUSION_ROUNDS):
                for index, runnable in enumerate(runnables):
                    best[index] = min(best[index], measure(runnable, config).median_ms)
        finally:
            for runnable in runnables:
                runnable.close()
        overhead = best[3]
        t_first, t_second, t_chain = (max(t - overhead, 1e-6) for t in best[:3])
        n_chain = kernel_count(models[2])
        fused = t_first + t_second - t_chain > FUSION_ALPHA * min(t_first, t_second)
        rules.append(FusionRule(first, second, bool(fused), t_first, t_second, t_chain, n_chain))
    return rules
