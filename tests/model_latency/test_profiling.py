"""In-context profiling: reconciliation to wall time, per-network samples, fusion detection by measurement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from model_latency_helpers import QUICK

from latency_service.fusion_rules import detect_fusions
from latency_service.kernel_generator import SamplingPrior, random_network
from latency_service.kernel_profiling import ProfiledNetwork, block_size, profile_network
from latency_service.reconciliation import (
    MAX_OWN_DEFLATION,
    RECONCILED_FLOOR_MS,
    WALL_TRUST_BAND,
    common_deflation,
    fit_inflation,
    reconcile,
    wall_credible,
)


def test_reconciled_times_sum_to_wall_minus_overhead() -> None:
    profiled = [0.010, 0.200, 0.004, 1.500]
    times, trusted = reconcile(profiled, wall_ms=1.70, overhead_ms=0.01, inflation_ms=0.002)
    assert trusted
    assert math.isclose(sum(times), 1.70 - 0.01, rel_tol=1e-12)
    # Subtracting a per-node constant shrinks the small nodes' share, not only a proportional scale.
    assert times[2] / times[3] < profiled[2] / profiled[3]


def test_the_wall_residual_is_a_per_node_cost_not_a_scale() -> None:
    # Nodes above the floor lose one common amount, so differences between them survive; a pro-rata scale would
    # shrink the 1.5 ms node by ~1 % (15 µs) for a residual of a few µs that the runtime pays per node.
    profiled = [0.0020, 0.0030, 0.0400, 1.5000]
    times, trusted = reconcile(profiled, wall_ms=1.530, overhead_ms=0.0025, inflation_ms=0.0021)
    assert trusted
    assert math.isclose(sum(times), 1.530 - 0.0025, rel_tol=1e-12)
    assert times[0] == RECONCILED_FLOOR_MS  # a 2 µs node is profiler cost, not a kernel that keeps a share of it
    assert times[3] - times[2] == pytest.approx(profiled[3] - profiled[2], abs=1e-12)


def test_a_slower_wall_is_shared_in_proportion_beyond_a_few_per_node_costs() -> None:
    # A long network whose wall came out 10 % below its profile (the clock state changed in between): subtracting
    # one common amount (~90 µs) would leave the 60 µs Gemm with nothing; past MAX_OWN_DEFLATION per-node costs the
    # residual is a speed change, and every node keeps its share of it.
    profiled = [0.060, 0.500, 2.000, 3.000, 0.004]
    target = 0.9 * sum(profiled)
    times, trusted = reconcile(profiled, wall_ms=target + 0.0025, overhead_ms=0.0025, inflation_ms=0.0024)
    assert trusted
    assert math.isclose(sum(times), target, rel_tol=1e-12)
    assert times[0] == pytest.approx(0.9 * (0.060 - MAX_OWN_DEFLATION * 0.0024), rel=0.01)
    assert times[3] / times[2] == pytest.approx(1.5, rel=0.01)


def test_common_deflation_solves_the_sum_exactly() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        profiled = rng.choice([0.0, 0.001, 0.002, 0.003, 0.012, 0.4], size=int(rng.integers(1, 40)))
        target = float(rng.uniform(0.2, 1.5) * profiled.sum() + 1e-4)
        kept = np.maximum(profiled - common_deflation(profiled, target), RECONCILED_FLOOR_MS)
        assert kept.sum() == pytest.approx(target, rel=1e-9, abs=1e-12)
        assert kept.min() >= RECONCILED_FLOOR_MS


def _simulated_profile(true_ms: np.ndarray, per_node_ms: float, rng: np.random.Generator) -> list[float]:
    """What onnxruntime's profiler reports: the kernel plus its per-node cost, truncated to whole microseconds."""
    jitter = rng.uniform(-0.0004, 0.0004, size=true_ms.size)
    return list(np.floor((true_ms + per_node_ms + jitter) * 1e3) / 1e3)


def test_tiny_kernels_get_their_true_time_back() -> None:
    # A 32 px network: a few real convs and many sub-microsecond reorders/reshapes, profiled with a per-node cost
    # that differs a little between networks (2.0-2.6 µs; truncation makes the fitted mean ~1.8 µs).  The previous
    # rule (keep 15 % of each reading, then scale pro rata to the wall) gave the tiny nodes 2.3x their true time and
    # took it from the convs (5.3 % low on average); equal subtraction gives 1.14x and -0.7 %.
    rng = np.random.default_rng(5)
    recovered_tiny, true_tiny = 0.0, 0.0
    conv_errors: list[float] = []
    for _ in range(50):
        tiny = rng.uniform(0.00005, 0.0002, size=30)
        convs = rng.uniform(0.004, 0.03, size=6)
        true = np.concatenate([tiny, convs])
        per_node = float(rng.uniform(0.0020, 0.0026))
        times, trusted = reconcile(
            _simulated_profile(true, per_node, rng), float(true.sum()) + 0.0025, 0.0025, inflation_ms=0.0018
        )
        assert trusted
        recovered_tiny += sum(times[:30])
        true_tiny += float(tiny.sum())
        conv_errors.extend(np.asarray(times[30:]) / convs - 1.0)
    assert recovered_tiny < 1.5 * true_tiny
    assert abs(float(np.mean(conv_errors))) < 0.02


def test_networks_saved_before_this_format_still_load() -> None:
    saved = {
        "network_id": "gen-26-0",
        "description": {"family": "plain", "hw": 32, "inflation_ms": 0.0021, "wall_trusted": True},
        "kernels": [
            {"name": "relu_8_nchwc", "op_type": "Conv", "domain": "com.microsoft.nchwc", "kernel_class": "conv",
             "features": [3.0, 32.0, 32.0, 32.0, 3.0, 1.0, 1.0, 1.0, 0.0, 1.0, 27.0, 32768.0, 1769472.0, 146560.0],
             "input_shapes": [[1, 3, 32, 32], [32, 3, 3, 3], [32]], "output_shapes": [[1, 32, 32, 32]],
             "fused": ["Relu"]},
        ],
        "profiled_ms": [0.011],
        "wall_ms": 0.0115,
        "overhead_ms": 0.0025,
    }  # fmt: skip
    network = ProfiledNetwork.from_json(saved)
    network.reconciled_ms, network.wall_trusted = reconcile(network.profiled_ms, 0.0115, 0.0025, 0.0021)
    assert network.wall_trusted and network.truth_ms == pytest.approx(0.0115)
    assert ProfiledNetwork.from_json(network.to_json()).to_json() == network.to_json()


def test_a_disturbed_wall_is_not_believed() -> None:
    profiled = [0.5, 0.5]
    times, trusted = reconcile(profiled, wall_ms=2.0 * (1 + 2 * WALL_TRUST_BAND), overhead_ms=0.0, inflation_ms=0.0)
    assert not trusted
    assert times == pytest.approx(profiled)


def test_inflation_fit_recovers_a_per_node_constant() -> None:
    # Synthetic networks whose profiler adds exactly 3 µs per node.
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


def test_a_wall_is_believed_when_its_per_node_cost_is_a_usual_one() -> None:
    # 150 sub-µs nodes profiled at ~3 µs each: a clean wall implies 1.9 µs per node where 2.4 µs was fitted, so the
    # deflated sum is 45 % below it (outside the band) — but 1.9 µs is a per-node cost short networks show.
    profiled = [0.0030] * 150
    wall = 150 * (0.0030 - 0.0019) + 0.0025
    assert abs((wall - 0.0025) / (150 * (0.0030 - 0.0024)) - 1.0) > WALL_TRUST_BAND
    assert wall_credible(profiled, wall, 0.0025, 0.0024)
    times, trusted = reconcile(profiled, wall, 0.0025, 0.0024)
    assert trusted and math.isclose(sum(times), wall - 0.0025, rel_tol=1e-12)
    # A wall that implies no profiler cost at all (a preempted un-profiled run) is still not believed.
    assert not wall_credible(profiled, 150 * 0.0030 + 0.0025, 0.0025, 0.0024)


def test_the_standard_preset_shares_its_twenty_minutes_with_the_operator_grid() -> None:
    from latency_service.kernel_profiling import (
        AFTER_PROFILING_RESERVE_S,
        MIN_IN_CONTEXT_BUDGET_S,
        STANDARD_BUDGET_S,
        STANDARD_PRESET_S,
        in_context_budget,
    )

    assert in_context_budget(300.0) == STANDARD_BUDGET_S  # a fast grid leaves more than the cap
    slow_grid = 723.0  # the 932-variant grid on the Intel dev host
    assert in_context_budget(slow_grid) == pytest.approx(STANDARD_PRESET_S - slow_grid - AFTER_PROFILING_RESERVE_S)
    assert slow_grid + in_context_budget(slow_grid) + AFTER_PROFILING_RESERVE_S <= STANDARD_PRESET_S
    assert in_context_budget(STANDARD_PRESET_S) == MIN_IN_CONTEXT_BUDGET_S  # never nothing


def test_the_job_passes_the_budget_the_grid_left(monkeypatch) -> None:
    from types import SimpleNamespace

    import latency_service.model_latency as model_latency
    from latency_service import jobs
    from latency_service.kernel_profiling import in_context_budget

    budgets: list[float] = []
    monkeypatch.setattr(model_latency, "run_in_context_profiling", lambda **kw: budgets.append(kw["budget_s"]))
    measuring = SimpleNamespace(settings=SimpleNamespace(kernel_budget_s=None, resolved_device_class="cpu"))
    jobs._profile_in_context(device_id="d", session_factory=None, measuring=measuring, grid_elapsed_s=800.0)
    measuring.settings.kernel_budget_s = 30.0
    jobs._profile_in_context(device_id="d", session_factory=None, measuring=measuring, grid_elapsed_s=800.0)
    assert budgets == [in_context_budget(800.0), 30.0]
