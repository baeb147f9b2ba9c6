"""Statistics of timed samples: one attempt's summary with its noise flags, and several sessions combined.

The statistic choices (median, robust CV, block spread, the flags) are explained in :mod:`latency_service.measurement`,
which is the protocol that produces the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from latency_service.measurement import MeasurementConfig

# MAD -> standard deviation for normally distributed samples.
_MAD_TO_STD = 1.4826
# The prefix of the flag a clock gate sets when its reference ran slow for the whole window.
CLOCK_FLAG = "clock:"


@dataclass(frozen=True)
class MeasurementStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    cv: float
    n: int
    spread: float
    attempts: int
    flagged: bool
    flag_reason: str | None
    overhead_ms: float | None
    sessions: int = 1
    # (max - min) / median of the per-session medians; 0 for one session.
    session_spread: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_spread(samples_ms: np.ndarray, blocks: int) -> float:
    """Relative range of the medians of ``blocks`` consecutive, equal-sized blocks of the samples."""
    if blocks < 2 or len(samples_ms) < blocks:
        return 0.0
    medians = [float(np.median(block)) for block in np.array_split(samples_ms, blocks)]
    centre = float(np.median(samples_ms))
    return (max(medians) - min(medians)) / centre if centre > 0 else 0.0


def robust_cv(samples_ms: np.ndarray) -> float:
    median = float(np.median(samples_ms))
    if median <= 0:
        return 0.0
    mad = float(np.median(np.abs(samples_ms - median)))
    return _MAD_TO_STD * mad / median


def summarize(
    samples_ms: np.ndarray,
    config: MeasurementConfig,
    *,
    attempts: int = 1,
    overhead_ms: float | None = None,
    other_load: float | None = None,
    clock_ratio: float | None = None,
    clock_tolerance: float = 0.04,
) -> MeasurementStats:
    """Statistics of one attempt's samples (milliseconds), with the noise flag that the thresholds imply.

    ``other_load`` is the number of cores other processes kept busy meanwhile (None where it cannot be read);
    ``clock_ratio`` is how slow a :class:`~latency_service.clock_gate.ClockGate`'s reference ran (None ungated).
    """
    p10, median, p90 = (float(v) for v in np.percentile(samples_ms, [10, 50, 90]))
    cv = robust_cv(samples_ms)
    spread = block_spread(samples_ms, config.blocks)
    reasons = []
    if cv > config.cv_threshold:
        reasons.append(f"cv {cv:.3f} > {config.cv_threshold}")
    if spread > config.spread_threshold:
        reasons.append(f"spread {spread:.3f} > {config.spread_threshold}")
    threshold = config.contention_threshold
    if other_load is not None and threshold is not None and other_load > threshold:
        reasons.append(f"contention: other processes kept {other_load:.2f} cores busy > {threshold}")
    if clock_ratio is not None and clock_ratio > 1 + clock_tolerance:
        reasons.append(f"{CLOCK_FLAG} the reference kernel ran {clock_ratio:.2f}x its nominal time")
    return MeasurementStats(
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        mean_ms=float(np.mean(samples_ms)),
        cv=cv,
        n=len(samples_ms),
        spread=spread,
        attempts=attempts,
        flagged=bool(reasons),
        flag_reason="; ".join(reasons) if reasons else None,
        overhead_ms=overhead_ms,
    )


def noise_score(stats: MeasurementStats, other_load: float | None, config: MeasurementConfig) -> float:
    """How far past its thresholds an attempt is (<= 1 means within all of them)."""
    parts = [
        stats.cv / config.cv_threshold if config.cv_threshold > 0 else 0.0,
        stats.spread / config.spread_threshold if config.spread_threshold > 0 else 0.0,
        (other_load or 0.0) / config.contention_threshold if config.contention_threshold else 0.0,
    ]
    return max(parts)


def combine_sessions(per_session: Sequence[MeasurementStats], samples_ms: Sequence[np.ndarray]) -> MeasurementStats:
    """One variant's statistics from its sessions: the median of the session medians, percentiles of all samples.

    Flagged when more than half of the sessions stayed noisy after their re-measurements: a minority of noisy
    sessions cannot move the median of medians far.
    """
    if not per_session or len(per_session) != len(samples_ms):
        raise ValueError("per_session: need one stats and one sample array per session")
    if len(per_session) == 1:
        return per_session[0]
    medians = np.array([s.median_ms for s in per_session])
    pooled = np.concatenate([np.asarray(a, dtype=np.float64) for a in samples_ms])
    median = float(np.median(medians))
    p10, p90 = (float(v) for v in np.percentile(pooled, [10, 90]))
    noisy = [s for s in per_session if s.flagged]
    flagged = 2 * len(noisy) > len(per_session)
    reason = None
    if flagged:
        reason = f"{len(noisy)} of {len(per_session)} sessions noisy: {noisy[0].flag_reason}"
    return MeasurementStats(
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        mean_ms=float(np.mean(pooled)),
        cv=float(np.median([s.cv for s in per_session])),
        n=int(pooled.size),
        spread=float(np.median([s.spread for s in per_session])),
        attempts=sum(s.attempts for s in per_session),
        flagged=flagged,
        flag_reason=reason,
        overhead_ms=per_session[0].overhead_ms,
        sessions=len(per_session),
        session_spread=float((medians.max() - medians.min()) / median) if median > 0 else 0.0,
    )


__all__ = [
    "CLOCK_FLAG",
    "MeasurementStats",
    "block_spread",
    "combine_sessions",
    "noise_score",
    "robust_cv",
    "summarize",
]
