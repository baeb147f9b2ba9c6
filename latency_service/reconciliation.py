"""Reconcile onnxruntime's per-node profile of a network with its un-profiled wall time.

The profiler inflates every node (timestamps and memory statistics per node) so per-node times sum
to more than the un-profiled wall time.  On 529 generated networks the excess Σ profiled − (wall − per-run constant)
is ~2.1 µs per node and does not grow with the node's own time (a robust fit of a + b·profiled gives b ≈ 0.002), so
each trusted network's nodes get one common per-node amount subtracted, chosen so that they sum exactly to
``wall - per-run constant`` (the per-run constant is the empty model's time).  Equal subtraction, not a pro-rata
scale: a wall that differs from the fitted inflation's prediction is a per-node cost of that network, and scaling
would push it into the big kernels.  No node keeps a share of its profiled time: a 2 µs Reshape is ~all profiler.

Two limits on that (the evidence is beside their constants): the common amount is capped at a few fitted per-node
costs and the rest of a residual is shared in proportion, as a change of speed between the two timings; and a wall
outside the trust band is still believed when the per-node cost it implies is within the spread seen over short
networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from latency_service.kernel_profiling import ProfiledNetwork

# The least a reconciled node keeps (ms).  Not a share of the profiled time: keeping 15 % of it gave every 2-3 µs
# node ~0.4 µs of profiler time, and grouped CV on generated networks went from 85.8 % within ±10 % to 90.6 % when
# that clamp became this floor (1e-6 and 3e-5 score the same).
RECONCILED_FLOOR_MS = 1e-5
# Starting value of the per-node profiler inflation before enough networks exist to fit it.
DEFAULT_INFLATION_MS = 0.002
# A wall within this relative distance of the deflated node sum is believed; further away one of the two timings
# was disturbed (another process took the core), and the network is profiled again, at most PROFILE_ATTEMPTS times.
WALL_TRUST_BAND = 0.15
# A credible wall's residual is taken from every node alike up to this multiple of the fitted per-node inflation;
# the rest is a change of speed between the profiled runs and the wall (a clock state, a neighbour) and is shared in
# proportion.  Uncapped, a 4-26 ms network whose wall sat 10 % below its profile lost 20-230 µs from every node: its
# 60-500 µs Gemms were stored as ~0 µs and the forest then predicted a VGG's 680 µs 2048x2048 Gemm at 63 µs.  Grouped
# CV on 463 generated networks, within ±10 %: uncapped 86.8 %, pro rata only 88.1 %, cap 1x 87.5 %, 2x 88.8 %,
# 3x 89.0 %, 5x and 10x 89.2 % (the smallest cap within noise of the best).
MAX_OWN_DEFLATION = 3.0
# A wall outside WALL_TRUST_BAND is still credible when the per-node profiler cost it implies lies in this range of
# the fitted one (its spread over short networks here: p5-p95 0.55-1.45x).  A network of many sub-µs nodes
# (ShuffleNet splits and shuffles at 2x2 px) pays ~1.9 µs per node where the median is 2.4 µs, so its deflated sum
# sits >15 % below a clean wall: with the band alone 33 of 496 networks, 26 of them at 32-48 px, were never believed.
# Adding them: grouped CV on the other 463 went from 89.0 % to 91.1 % within ±10 %, and 32 of the 33 are within
# ±10 % themselves.  (A benchmark ShuffleNet V2 at 32 px, 153 kernels, stays 17 % low: its per-node cost is lower
# still, and no per-class inflation fit explained it.)
OWN_INFLATION_RANGE = (0.5, 1.5)
# Networks this short are rarely preempted (a scheduler slice is ~4 ms): they calibrate the inflation.
SHORT_NETWORK_MS = 2.0


def reconcile(
    profiled_ms: Sequence[float], wall_ms: float, overhead_ms: float, inflation_ms: float
) -> tuple[list[float], bool]:
    """Per-node times with the profiler's inflation removed, summing to ``wall - overhead`` when the wall is credible.

    Returns the times and whether the wall was used.  ``inflation_ms`` (the per-node inflation fitted over many
    networks) decides credibility: on a shared CPU a run longer than a scheduler slice (~4 ms here) is often
    preempted, which adds whole slices to the un-profiled median while per-node medians stay clean, so a wall more
    than WALL_TRUST_BAND away from the deflated node sum is not believed and the deflated times are kept.  A credible
    wall sets this network's own per-node inflation (:func:`common_deflation`, at most MAX_OWN_DEFLATION times the
    fitted one); what that leaves over is a change of speed and scales every node alike.
    """
    profiled = np.asarray(profiled_ms, dtype=np.float64)
    if profiled.size == 0:
        return [], False
    deflated = np.maximum(profiled - inflation_ms, RECONCILED_FLOOR_MS)
    target = wall_ms - overhead_ms
    if not wall_credible(profiled, wall_ms, overhead_ms, inflation_ms):
        return [float(v) for v in deflated], False
    own = min(max(common_deflation(profiled, target), 0.0), MAX_OWN_DEFLATION * inflation_ms)
    kept = np.maximum(profiled - own, RECONCILED_FLOOR_MS)
    return [float(v) for v in kept * (target / float(kept.sum()))], True


def wall_credible(
    profiled_ms: Sequence[float] | np.ndarray, wall_ms: float, overhead_ms: float, inflation_ms: float
) -> bool:
    """Whether the un-profiled wall and the per-node profile tell one story (see :func:`reconcile`).

    Yes when the wall is within WALL_TRUST_BAND of the deflated node sum, or when the per-node profiler cost it
    implies, (Σ profiled − (wall − overhead)) / n, lies within OWN_INFLATION_RANGE of the fitted one.
    """
    profiled = np.asarray(profiled_ms, dtype=np.float64)
    if profiled.size == 0:
        return False
    if abs(wall_ratio(profiled, wall_ms, overhead_ms, inflation_ms) - 1.0) <= WALL_TRUST_BAND:
        return True
    low, high = OWN_INFLATION_RANGE
    return low * inflation_ms <= implied_inflation(profiled, wall_ms, overhead_ms) <= high * inflation_ms


def wall_ratio(profiled: np.ndarray, wall_ms: float, overhead_ms: float, inflation_ms: float) -> float:
    """(wall − overhead) / Σ deflated node times: 1 when the profile and the un-profiled wall tell the same story."""
    deflated = np.maximum(profiled - inflation_ms, RECONCILED_FLOOR_MS)
    return max(wall_ms - overhead_ms, 1e-6) / float(deflated.sum())


def implied_inflation(profiled: Sequence[float] | np.ndarray, wall_ms: float, overhead_ms: float) -> float:
    """The per-node profiler cost a wall implies: (Σ profiled − (wall − overhead)) / n."""
    return (float(sum(profiled)) - (wall_ms - overhead_ms)) / len(profiled)


def common_deflation(profiled: np.ndarray, target_ms: float) -> float:
    """The amount d with Σ max(profiled − d, floor) = ``target_ms`` (exact; d < 0 when the target exceeds the sum).

    The sum falls piecewise linearly in d; with the nodes sorted by time, the k largest stay above the floor and
    d = (Σ top k − target + (n − k)·floor) / k for the one k where that is consistent.
    """
    n = profiled.size
    if target_ms <= n * RECONCILED_FLOOR_MS:
        return float(profiled.max())  # nothing is left for any node: all sit at the floor
    ordered = np.sort(profiled)[::-1]
    kept = np.arange(1, n + 1)
    candidates = (np.cumsum(ordered) - target_ms + (n - kept) * RECONCILED_FLOOR_MS) / kept
    smallest_kept_above = ordered - candidates >= RECONCILED_FLOOR_MS - 1e-12
    next_at_floor = np.append(ordered[1:] - candidates[:-1] <= RECONCILED_FLOOR_MS + 1e-12, True)
    k = int(np.flatnonzero(smallest_kept_above & next_at_floor)[0])
    return float(candidates[k])


def agreement(network: ProfiledNetwork, inflation_ms: float = DEFAULT_INFLATION_MS) -> float:
    """:func:`wall_ratio` of a profiled network."""
    return wall_ratio(np.asarray(network.profiled_ms, dtype=np.float64), network.wall_ms, network.overhead_ms,
                      inflation_ms)  # fmt: skip


def fit_inflation(networks: Sequence[ProfiledNetwork]) -> float:
    """The per-node profiler inflation δ: the median over short networks of (Σ profiled − (wall − overhead)) / n.

    Only networks shorter than SHORT_NETWORK_MS enter: they are rarely preempted, so their walls are clean.
    """
    estimates = [
        implied_inflation(n.profiled_ms, n.wall_ms, n.overhead_ms)
        for n in networks
        if n.profiled_ms and n.wall_ms < SHORT_NETWORK_MS
    ]
    if len(estimates) < 3:
        return DEFAULT_INFLATION_MS
    return float(np.clip(np.median(estimates), 0.0, 0.01))


def reconcile_networks(networks: Sequence[ProfiledNetwork]) -> float:
    inflation = fit_inflation(networks)
    for network in networks:
        network.reconciled_ms, network.wall_trusted = reconcile(
            network.profiled_ms, network.wall_ms, network.overhead_ms, inflation
        )
        network.description["inflation_ms"] = inflation
        network.description["wall_trusted"] = network.wall_trusted
    return inflation
