"""The one measurement protocol every backend goes through.

A runnable is warmed up (by count and by time), then timed until both a minimum count and a minimum duration are
reached (bounded by a maximum of each).  The samples are split into consecutive blocks; the relative spread of the
block medians says whether the median itself is stable.  A noisy attempt is re-measured a bounded number of times,
the most stable attempt is kept, and it is flagged when even that one exceeds a threshold.

Statistic choices, and why:

- The stored latency is the median.  On this 2-core machine single small kernels show a raw CV of 4-20 %, nearly all
  of it from a few slow outliers (another process, an interrupt); the median ignores them, the mean does not.
- ``cv`` is the *robust* coefficient of variation, 1.4826·MAD/median, which equals std/mean for Gaussian noise but
  is not blown up by a handful of 10x outliers.  The raw mean is still stored, so outliers stay visible.
- ``spread`` is (max − min)/median over the block medians: a direct estimate of how far the stored median would move
  if measured again, which is what the repeatability goal (within 2 %) is about.
- Other processes are watched: ``/proc/stat`` busy time (steal included, for VMs) minus this process's own CPU
  time, over the timing window, gives how many cores others kept busy.  A co-runner on a sibling core slowed a
  memory-bound depthwise conv by 6 % to 1.9x here with a CV that still looked clean, so contention above
  ``contention_threshold`` cores counts as noise like a high CV does.
- The timing thread runs under SCHED_FIFO (priority 1) during each attempt where the OS permits it (root or
  CAP_SYS_NICE), so other processes cannot preempt a run midway: with the load average at 9 on this 2-core machine
  that took the share of >= 100 µs kernels repeating within 2 % across processes from 33 % to 70 % (median
  difference 3.7 % -> 0.8 %).  Between attempts the normal policy is back, and the kernel's RT throttling still
  leaves other tasks 5 % of the core.  ``realtime=False`` turns it off, and a runnable that says it uses more
  than one thread (``runnable.threads > 1``) is timed at normal priority: a FIFO caller spinning on its own pool's
  workers would starve them when they share its core.
- The garbage collector is off while timing: a collection landing inside one run adds 0.1-1 ms to a kernel that
  takes microseconds.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from latency_service.environment import OtherLoadProbe

if TYPE_CHECKING:
    from latency_service.backends.base import Backend, Runnable

# Below this many samples per block a block median is itself noise.
MIN_SAMPLES_PER_BLOCK = 3
# MAD -> standard deviation for normally distributed samples.
_MAD_TO_STD = 1.4826


@dataclass(frozen=True)
class MeasurementConfig:
    """How long and how often to time one runnable.

    The defaults spend about 0.3-0.4 s on a fast kernel (warm-up 0.05 s, timing at least 0.25 s) and at most about
    1.6 s per attempt on a slow one, so that the ``standard`` preset fits its time budget.
    """

    warmup_runs: int = 5
    warmup_s: float = 0.05
    min_runs: int = 25
    min_time_s: float = 0.25
    max_runs: int = 20_000
    max_time_s: float = 1.5
    blocks: int = 3
    cv_threshold: float = 0.10
    spread_threshold: float = 0.03
    max_attempts: int = 3
    # None turns the check off (a host without /proc/stat never has it).
    contention_threshold: float | None = 0.3
    realtime: bool = True
    cores: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("warmup_runs", "min_runs", "max_runs", "blocks", "max_attempts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup_runs" else 1):
                raise ValueError(f"{name}: must be a {'non-negative' if name == 'warmup_runs' else 'positive'} integer")
        for name in (
            "warmup_s",
            "min_time_s",
            "max_time_s",
            "cv_threshold",
            "spread_threshold",
            "contention_threshold",
        ):
            value = getattr(self, name)
            if value is None and name == "contention_threshold":
                continue
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a non-negative number, got {value!r}")
        if self.max_runs < self.min_runs:
            raise ValueError(f"max_runs: {self.max_runs} is below min_runs {self.min_runs}")
        if self.max_time_s < self.min_time_s:
            raise ValueError(f"max_time_s: {self.max_time_s} is below min_time_s {self.min_time_s}")
        if self.cores is not None and (
            not self.cores or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.cores)
        ):
            raise ValueError(f"cores: must be a non-empty tuple of core ids, got {self.cores!r}")

    @property
    def min_samples(self) -> int:
        """The floor that even the time cap respects: enough samples for every block to have a median."""
        return min(self.min_runs, self.blocks * MIN_SAMPLES_PER_BLOCK)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _realtime(enabled: bool) -> Iterator[bool]:
    """SCHED_FIFO for the calling thread while the block runs; yields whether it was granted."""
    granted = False
    previous: tuple[int, os.sched_param] | None = None
    if enabled and hasattr(os, "sched_setscheduler"):
        try:
            previous = (os.sched_getscheduler(0), os.sched_getparam(0))
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            granted = True
        except OSError:  # not root / no CAP_SYS_NICE / a container without the capability: time normally
            granted = False
    try:
        yield granted
    finally:
        if granted and previous is not None:
            os.sched_setscheduler(0, previous[0], previous[1])


@contextmanager
def _gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _warm_up(runnable: Runnable, config: MeasurementConfig) -> None:
    start = time.perf_counter()
    runs = 0
    while runs < config.warmup_runs or (time.perf_counter() - start) < config.warmup_s:
        runnable.time_once()
        runs += 1
        # A kernel slower than the whole time cap must not spend the cap warming up.
        if time.perf_counter() - start >= config.max_time_s:
            break


def _collect_samples(runnable: Runnable, config: MeasurementConfig) -> np.ndarray:
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        samples.append(runnable.time_once())
        elapsed = time.perf_counter() - start
        n = len(samples)
        if n >= config.max_runs:
            break
        if n >= config.min_runs and elapsed >= config.min_time_s:
            break
        if elapsed >= config.max_time_s and n >= config.min_samples:
            break
    return np.asarray(samples, dtype=np.float64) * 1e3


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
) -> MeasurementStats:
    """Statistics of one attempt's samples (milliseconds), with the noise flag that the thresholds imply.

    ``other_load`` is the number of cores other processes kept busy meanwhile (None where it cannot be read).
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


def _noise_score(stats: MeasurementStats, other_load: float | None, config: MeasurementConfig) -> float:
    """How far past its thresholds an attempt is (<= 1 means within all of them)."""
    parts = [
        stats.cv / config.cv_threshold if config.cv_threshold > 0 else 0.0,
        stats.spread / config.spread_threshold if config.spread_threshold > 0 else 0.0,
        (other_load or 0.0) / config.contention_threshold if config.contention_threshold else 0.0,
    ]
    return max(parts)


def measure(runnable: Runnable, config: MeasurementConfig, *, overhead_ms: float | None = None) -> MeasurementStats:
    """Time ``runnable`` with the protocol above; pins the process first when ``config.cores`` is set.

    The returned stats are those of the most stable attempt; ``attempts`` counts how many were made and ``flagged``
    is set (with the threshold that was exceeded in ``flag_reason``) when even the best one is noisy.
    """
    if config.cores is not None:
        pin_to_cores(config.cores)
    best: MeasurementStats | None = None
    best_score = math.inf
    attempts = 0
    probe = OtherLoadProbe()
    with _gc_paused():
        contended_in_a_row = 0
        # Retrying into a load that persisted through two attempts only spends the time budget.
        while attempts < config.max_attempts and (best is None or best.flagged) and contended_in_a_row < 2:
            attempts += 1
            with _realtime(config.realtime and getattr(runnable, "threads", 1) == 1):
                # The probe spans the warm-up too: a fast kernel's timed window alone (20 000 runs of 3 µs) is too
                # short for /proc/stat's 10 ms ticks.
                probe.start()
                _warm_up(runnable, config)
                samples = _collect_samples(runnable, config)
                other_load = probe.stop()
            stats = summarize(samples, config, overhead_ms=overhead_ms, other_load=other_load)
            contended_in_a_row = contended_in_a_row + 1 if "contention" in (stats.flag_reason or "") else 0
            score = _noise_score(stats, other_load, config)
            if score < best_score:
                best, best_score = stats, score
    assert best is not None
    return _with_attempts(best, attempts)


def _with_attempts(stats: MeasurementStats, attempts: int) -> MeasurementStats:
    return MeasurementStats(**{**stats.to_dict(), "attempts": attempts})


def measure_overhead(backend: Backend, config: MeasurementConfig) -> float:
    """Median milliseconds of one call of the backend's empty model: the per-call constant inside every number."""
    runnable = backend.prepare_empty()
    try:
        return measure(runnable, config).median_ms
    finally:
        runnable.close()


def pin_to_cores(cores: Sequence[int] | None) -> list[int] | None:
    """Restrict this process to ``cores`` where the OS allows; returns the resulting core list, or None.

    None comes back when ``cores`` is None, when the OS has no affinity call (macOS, Windows), or when the call is
    not permitted (some containers).  A core id the machine does not have is an error naming the field.
    """
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return None
    wanted = set(cores)
    if not wanted:
        raise ValueError("cores: must name at least one core")
    try:
        os.sched_setaffinity(0, wanted)
    except PermissionError:
        return None
    except OSError as exc:
        allowed = sorted(os.sched_getaffinity(0))
        raise ValueError(f"cores: cannot pin to {sorted(wanted)} (allowed: {allowed}): {exc}") from exc
    return sorted(os.sched_getaffinity(0))


__all__ = [
    "MeasurementConfig",
    "MeasurementStats",
    "block_spread",
    "measure",
    "measure_overhead",
    "pin_to_cores",
    "robust_cv",
    "summarize",
]
