"""Shared fixtures: a backend and one short in-context profiling run reused by every test of this directory."""

from __future__ import annotations

import numpy as np
import pytest
from model_latency_helpers import QUICK, TINY_PRIOR

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.kernel_profiling import ProfiledNetwork, profile_kernels_in_context, reconcile_networks


@pytest.fixture(scope="session")
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(intra_op_threads=1, optimization_level="all")


@pytest.fixture(scope="session")
def profiled(backend: OnnxRuntimeBackend) -> list[ProfiledNetwork]:
    networks: list[ProfiledNetwork] = []
    seed = 7
    # Every class a tiny conv net uses needs MIN_CLASS_SAMPLES (8) samples; one network gives at least one each.
    while len(networks) < 10:
        batch: list[ProfiledNetwork] = []
        profile_kernels_in_context(backend, QUICK, budget_s=4.0, seed=seed, prior=TINY_PRIOR, networks_out=batch)
        networks += batch
        seed += 1
    reconcile_networks(networks)
    return networks


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
