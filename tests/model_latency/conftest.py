"""Shared fixtures: a backend and one short in-context profiling run reused by every test of this directory."""

from __future__ import annotations

import numpy as np
import pytest

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from model_latency_helpers import QUICK, TINY_PRIOR

from latency_service.kernel_profiling import ProfiledNetwork, profile_kernels_in_context


@pytest.fixture(scope="session")
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(intra_op_threads=1, optimization_level="all")


@pytest.fixture(scope="session")
def profiled(backend: OnnxRuntimeBackend) -> list[ProfiledNetwork]:
    networks: list[ProfiledNetwork] = []
    profile_kernels_in_context(backend, QUICK, budget_s=6.0, seed=7, prior=TINY_PRIOR, networks_out=networks)
    assert len(networks) >= 4, f"only {len(networks)} networks profiled in 6 s"
    return networks


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
