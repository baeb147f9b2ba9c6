"""The measurement protocol: statistics, bounds, noise flags, GC, pinning, contention and host facts."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.environment import host_environment
from latency_service.measurement import (
    MeasurementConfig,
    MeasurementStats,
    block_spread,
    combine_sessions,
    measure,
    measure_overhead,
    measure_sessions,
    pin_to_cores,
    robust_cv,
    summarize,
)
from predictors.ops import Conv2d

FAST = MeasurementConfig(warmup_runs=2, warmup_s=0.0, min_runs=30, min_time_s=0.03, max_time_s=0.5, max_attempts=2)


class SleepingRunnable:
    """A real runnable whose run is a sleep of a random length: as noisy as a timing can get."""

    def __init__(self, low_s: float, high_s: float, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.low_s, self.high_s = low_s, high_s
        self.calls = 0
        self.gc_seen: set[bool] = set()

    def time_once(self) -> float:
        self.calls += 1
        self.gc_seen.add(gc.isenabled())
        start = time.perf_counter()
        time.sleep(self.rng.uniform(self.low_s, self.high_s))
        return time.perf_counter() - start

    def close(self) -> None:
        pass


def test_stats_of_a_real_kernel_are_consistent() -> None:
    runnable = OnnxRuntimeBackend().prepare_op(Conv2d(cin=16, cout=16, hw=14, act="relu"))
    stats = measure(runnable, FAST, overhead_ms=0.004)
    runnable.close()
    assert stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.n >= FAST.min_runs and 1 <= stats.attempts <= FAST.max_attempts
    assert stats.overhead_ms == 0.004 and stats.cv >= 0 and stats.spread >= 0
    assert stats.flagged == (stats.flag_reason is not None)
    assert set(stats.to_dict()) == {f for f in MeasurementStats.__dataclass_fields__}


def test_noisy_runnable_is_flagged_after_bounded_attempts() -> None:
    noisy = SleepingRunnable(0.0002, 0.003)
    # Contention off: on a loaded machine it would (rightly) stop the retries early and make the count vary.
    config = MeasurementConfig(
        warmup_runs=1, warmup_s=0.0, min_runs=30, min_time_s=0.02, max_attempts=3, contention_threshold=None
    )
    stats = measure(noisy, config)
    assert stats.flagged and stats.attempts == 3
    assert stats.flag_reason is not None and "cv" in stats.flag_reason
    # Three attempts of about 30 runs each plus warm-up: bounded, not "until quiet".
    assert noisy.calls <= 3 * (30 + 5)


def test_gc_is_off_while_timing_and_restored_after() -> None:
    runnable = SleepingRunnable(0.0001, 0.0001)
    assert gc.isenabled()
    measure(runnable, FAST)
    assert runnable.gc_seen == {False} and gc.isenabled()


def test_time_cap_stops_a_slow_kernel_but_keeps_enough_samples_for_the_blocks() -> None:
    slow = SleepingRunnable(0.02, 0.02)
    config = MeasurementConfig(warmup_runs=1, warmup_s=0.0, min_runs=200, min_time_s=0.1, max_time_s=0.15)
    started = time.perf_counter()
    stats = measure(slow, config)
    assert config.min_samples <= stats.n < 200
    assert time.perf_counter() - started < 3 * stats.attempts * (0.15 + 0.05)


def test_run_cap_stops_a_fast_kernel() -> None:
    fast = SleepingRunnable(0.0, 0.0)
    stats = measure(fast, MeasurementConfig(min_runs=10, max_runs=40, min_time_s=5.0, max_time_s=10.0))
    assert stats.n == 40


def test_spread_and_cv_on_known_samples() -> None:
    samples = np.array([1.0] * 10 + [1.1] * 10 + [1.0] * 10)
    assert block_spread(samples, 3) == pytest.approx(0.1)
    assert robust_cv(np.full(50, 2.0)) == 0.0
    config = MeasurementConfig(spread_threshold=0.05)
    stats = summarize(samples, config)
    assert stats.flagged and "spread" in str(stats.flag_reason)
    contended = summarize(np.full(30, 1.0), config, other_load=1.2)
    assert contended.flagged and "contention" in str(contended.flag_reason)
    assert not summarize(np.full(30, 1.0), MeasurementConfig(contention_threshold=None), other_load=1.2).flagged


def test_contention_from_another_process_is_detected() -> None:
    if not os.path.exists("/proc/stat"):
        pytest.skip("contention detection reads /proc/stat, which this OS lacks")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.2)
        config = MeasurementConfig(warmup_runs=1, min_runs=10, min_time_s=0.4, max_attempts=3, cv_threshold=10.0)
        stats = measure(SleepingRunnable(0.001, 0.001), config)
    finally:
        busy.kill()
        busy.wait()
    assert stats.flagged and "contention" in str(stats.flag_reason)
    # A load that outlasts two attempts is not retried a third time.
    assert stats.attempts == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"min_runs": 0}, "min_runs"),
        ({"max_runs": 5, "min_runs": 10}, "max_runs"),
        ({"min_time_s": 2.0, "max_time_s": 1.0}, "max_time_s"),
        ({"cv_threshold": -1.0}, "cv_threshold"),
        ({"cores": ()}, "cores"),
        ({"blocks": 1.5}, "blocks"),
        ({"sessions": 0}, "sessions"),
    ],
)
def test_bad_config_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MeasurementConfig(**changes)  # type: ignore[arg-type]


def test_overhead_is_a_small_positive_constant() -> None:
    overhead = measure_overhead(OnnxRuntimeBackend(), FAST)
    assert 0 < overhead < 0.5


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="this OS has no sched_setaffinity")
def test_pinning_restricts_the_process_and_can_be_undone() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    try:
        assert pin_to_cores([allowed[-1]]) == [allowed[-1]]
        assert sorted(os.sched_getaffinity(0)) == [allowed[-1]]
        with pytest.raises(ValueError, match="cores"):
            pin_to_cores([10_000])
    finally:
        os.sched_setaffinity(0, allowed)
    assert pin_to_cores(None) is None


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="this OS has no sched_setscheduler")
def test_realtime_timing_restores_the_normal_policy() -> None:
    seen: list[int] = []

    class PolicyRecorder(SleepingRunnable):
        def time_once(self) -> float:
            seen.append(os.sched_getscheduler(0))
            return super().time_once()

    before = os.sched_getscheduler(0)
    measure(PolicyRecorder(0.0, 0.0), FAST)
    assert os.sched_getscheduler(0) == before
    expected = os.SCHED_FIFO if host_environment()["realtime_priority_allowed"] else before
    assert set(seen) == {expected}
    # A runnable with its own worker threads is never timed under FIFO: it would starve them.
    seen.clear()
    pooled = PolicyRecorder(0.0, 0.0)
    pooled.threads = 2  # type: ignore[attr-defined]
    measure(pooled, FAST)
    assert set(seen) == {before}


def test_host_environment_names_the_machine() -> None:
    env = host_environment()
    assert env["cpu_model"] and env["logical_cores"] >= 1 and env["machine"]
    assert env["python_version"].count(".") == 2
    if hasattr(os, "sched_getaffinity"):
        assert env["allowed_cores"] == sorted(os.sched_getaffinity(0))
    assert env["governor"] is None or isinstance(env["governor"], str)
    assert host_environment() is not host_environment()  # callers may mutate their copy


def _session_stats(median_ms: float, *, flagged: bool = False) -> MeasurementStats:
    return MeasurementStats(
        median_ms=median_ms,
        p10_ms=median_ms,
        p90_ms=median_ms,
        mean_ms=median_ms,
        cv=0.01,
        n=3,
        spread=0.0,
        attempts=1,
        flagged=flagged,
        flag_reason="cv 0.2 > 0.1" if flagged else None,
        overhead_ms=None,
    )


def test_median_of_session_medians_ignores_a_minority_mode() -> None:
    # The shape measured here: most sessions on one level, a minority 25 % faster or 14 % slower.
    medians = [0.20, 0.15, 0.20, 0.228, 0.201]
    stats = combine_sessions([_session_stats(m) for m in medians], [np.full(3, m) for m in medians])
    assert stats.median_ms == pytest.approx(0.20)
    assert stats.sessions == 5 and stats.n == 15
    assert stats.session_spread == pytest.approx((0.228 - 0.15) / 0.20)
    assert stats.p10_ms < stats.median_ms < stats.p90_ms and not stats.flagged


def test_sessions_flag_only_when_most_are_noisy() -> None:
    two_noisy = [_session_stats(1.0, flagged=i < 2) for i in range(5)]
    three_noisy = [_session_stats(1.0, flagged=i < 3) for i in range(5)]
    samples = [np.ones(3)] * 5
    assert not combine_sessions(two_noisy, samples).flagged
    combined = combine_sessions(three_noisy, samples)
    assert combined.flagged and combined.flag_reason is not None and "3 of 5 sessions" in combined.flag_reason


def test_measure_sessions_builds_distinct_runnables_and_closes_them_all() -> None:
    backend = OnnxRuntimeBackend()
    built: list[Any] = []

    def prepare() -> Any:
        runnable = backend.prepare_op(Conv2d(cin=16, cout=32, hw=14, k=3))
        built.append(runnable)
        return runnable

    config = MeasurementConfig(warmup_runs=1, warmup_s=0.0, min_runs=10, min_time_s=0.01, sessions=3)
    result = measure_sessions(prepare, config, overhead_ms=0.004)
    assert len({id(r) for r in built}) == 3 and result.stats.sessions == 3
    assert result.stats.n >= 30 and result.stats.overhead_ms == 0.004
    # Closed: the runnables dropped their sessions, so none can run again.
    assert all(r._session is None for r in built)
    assert result.stats.median_ms > 0 and result.stats.session_spread >= 0


def test_measure_sessions_closes_what_it_built_when_a_build_fails() -> None:
    backend = OnnxRuntimeBackend()
    built: list[Any] = []

    def prepare() -> Any:
        if len(built) == 2:
            raise ValueError("model: third build refused")
        runnable = backend.prepare_op(Conv2d(cin=8, cout=8, hw=8))
        built.append(runnable)
        return runnable

    with pytest.raises(ValueError, match="third build"):
        measure_sessions(prepare, MeasurementConfig(sessions=3))
    assert len(built) == 2 and all(r._session is None for r in built)
