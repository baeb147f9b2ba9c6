"""Shared fixtures: a backend and one short in-context profiling run reused by every test of this directory."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from model_latency_helpers import QUICK, TINY_PRIOR

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.clock_gate import ClockGate
from latency_service.kernel_fit import MIN_CLASS_SAMPLES
from latency_service.kernel_profiling import ProfiledNetwork, profile_kernels_in_context
from latency_service.reconciliation import reconcile_networks


@pytest.fixture(scope="session")
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(intra_op_threads=1, optimization_level="all")


# The classes a tiny conv net with a linear head is made of: each needs a regressor in the tests that predict one.
NEEDED_CLASSES = ("conv", "reorder", "gemm", "global_pool", "shape_only")
MAX_NETWORKS = 40


@pytest.fixture(scope="session")
def profiled(backend: OnnxRuntimeBackend) -> list[ProfiledNetwork]:
    networks: list[ProfiledNetwork] = []
    seed = 7
    # As the service profiles: walls gated on the reference kernel, so that they and the profiler's clean runs are
    # timed in the same clock state (ungated, only 35 % of these tiny networks' walls were credible here).
    gate = ClockGate.for_backend(backend)
    try:
        # Every needed class must reach MIN_CLASS_SAMPLES samples; a network gives about one Flatten, for example.
        while len(networks) < 10 or (len(networks) < MAX_NETWORKS and _thin_classes(networks)):
            batch: list[ProfiledNetwork] = []
            profile_kernels_in_context(
                backend, QUICK, budget_s=4.0, seed=seed, prior=TINY_PRIOR, networks_out=batch, gate=gate
            )
            networks += batch
            seed += 1
    finally:
        gate.close()
    reconcile_networks(networks)
    return networks


def _thin_classes(networks: list[ProfiledNetwork]) -> list[str]:
    counts = Counter(s.kernel_class for n in networks for s in n.samples())
    return [c for c in NEEDED_CLASSES if counts[c] < MIN_CLASS_SAMPLES]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
