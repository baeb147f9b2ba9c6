"""In-context profiling: reconciliation to wall time, per-network samples, fusion detection by measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from model_latency_helpers import QUICK

from latency_service.fusion_rules import detect_fusions
from latency_service.kernel_generator import SamplingPrior, random_network
from latency_service.kernel_profiling import (
    WALL_TRUST_BAND,
    block_size,
    fit_inflation,
    profile_network,
    reconcile,
)


def test_reconciled_times_sum_to_wall_minus_overhead() -> None:
    profiled = [0.010, 0.200, 0.004, 1.500]
    times, trusted = reconcile(profiled, wall_ms=1.70, overhead_ms=0.01, inflation_ms=0.002)
    assert trusted
    assert math.isclose(sum(times), 1.70 - 0.01, rel_tol=1e-12)
    # Subtracting a per-node constant shrinks the small nodes' share, not only a proportional scale.
    assert times[2] / times[3] < profiled[2] / profiled[3]


def test_a_disturbed_wall_is_not_believed() -> None:
    profiled = [0.5, 0.5]
    times, trusted = reconcile(profiled, wall_ms=2.0 * (1 + 2 * WALL_TRUST_BAND), overhead_ms=0.0, inflation_ms=0.0)
    assert not trusted
    assert times == pytest.approx(profiled)


def test_inflation_fit_recovers_a_per_node_constant() -> None:
    # Synthetic networks whose profiler adds exactly 3 µs per node.
    from latency_service.kernel_profiling import ProfiledNetwork

    rng = np.random.default_rng(0)
    fakes = []
    for i in range(10):
        true = rng.uniform(0.005, 0.1, size=20)
        fakes.append(ProfiledNetwork(f"n{i}", {}, [], list(true + 0.003), float(true.sum()) + 0.01, 0.01))
    assert fit_inflation(fakes) == pytest.approx(0.003, abs=1e-9)


def test_profiled_networks_add_up(profiled) -> None:
    for network in profiled:
        assert len(network.reconciled_ms) == len(network.kernels) > 0
        assert all(t > 0 for t in network.reconciled_ms)
        assert math.isclose(network.truth_ms, network.overhead_ms + sum(network.reconciled_ms), rel_tol=1e-9)
        if network.wall_trusted:
            assert math.isclose(network.truth_ms, network.wall_ms, rel_tol=1e-9)
    # Tiny networks (<= 5e6 MACs) are where a constant per-node profiler cost fits worst: with walls gated on the
    # reference kernel 53-75 % of them were credible here (35 % ungated); a broken reconciliation gives ~0.
    assert np.mean([n.wall_trusted for n in profiled]) > 0.4
    classes = {s.kernel_class for n in profiled for s in n.samples()}
    assert {"conv", "reorder", "gemm"} <= classes


def test_profile_network_attributes_every_kernel(backend) -> None:
    model, description = random_network(
        np.random.default_rng(3), SamplingPrior(resolutions=(32,), resolution_weights=(1,))
    )
    network = profile_network(
        backend, model, QUICK, overhead_ms=0.003, block=block_size(backend), network_id="t", description=description
    )
    # The profiler counts whole microseconds, so a Reshape may read 0; what matters is that no kernel is missing.
    # Known gap: nodes the optimiser creates without a name share one profiler entry and are not attributed yet.
    missing = [name for name in network.description["unprofiled"] if not name.startswith("unnamed:")]
    assert missing == [], "every named kernel of the optimised graph gets a profiled time"
    assert all(p >= 0 for p in network.profiled_ms) and sum(network.profiled_ms) > 0


def test_block_size_is_a_power_of_two(backend) -> None:
    assert block_size(backend) in (1, 4, 8, 16, 32)


def test_fusion_verdict_follows_the_measured_times(backend) -> None:
    # The verdict is checked against the times it was made from, not against "fused" itself: on this CPU the fused
    # ReLU still costs 2-5 µs of its ~4 µs standalone time, so nn-Meter's α = 0.5 test sits on the noise edge for
    # Conv+ReLU (4 "not fused" verdicts in 14 quiet runs).  The optimised graph's kernel count is deterministic.
    rules = detect_fusions(backend, QUICK, pairs=[("conv", "relu"), ("conv", "batchnorm")])
    for rule in rules:
        assert rule.kernels_in_chain == 1, rule
        assert min(rule.first_ms, rule.second_ms, rule.chained_ms) > 0, rule
        margin = rule.first_ms + rule.second_ms - rule.chained_ms
        assert rule.fused == (margin > 0.5 * min(rule.first_ms, rule.second_ms)), rule
