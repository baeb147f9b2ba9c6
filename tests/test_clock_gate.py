"""The reference-kernel gate: samples taken while the machine ran slow are set aside, on real timings."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.clock_gate import ClockGate
from latency_service.measurement import MeasurementConfig, measure, measure_sessions
from predictors.ops import Conv2d


class Machine:
    """A clock that a background thread switches between normal and half speed every ``period_s``."""

    def __init__(self, period_s: float, slow_first: bool = False) -> None:
        self.slow = slow_first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flip, args=(period_s,), daemon=True)

    def _flip(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.slow = not self.slow

    def __enter__(self) -> Machine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class SleepKernel:
    """A runnable whose run is a real sleep of ``base_s``, twice as long while the machine is slow."""

    def __init__(self, machine: Machine, base_s: float) -> None:
        self.machine, self.base_s = machine, base_s

    def time_once(self) -> float:
        start = time.perf_counter()
        time.sleep(self.base_s * (2.0 if self.machine.slow else 1.0))
        return time.perf_counter() - start

    def close(self) -> None:
        pass


def test_gate_keeps_the_fast_state_of_a_machine_that_switches_speed() -> None:
    config = MeasurementConfig(
        warmup_runs=1, warmup_s=0.0, min_runs=20, min_time_s=0.05, max_time_s=3.0, realtime=False
    )
    with Machine(period_s=0.15) as machine:
        gate = ClockGate(SleepKernel(machine, 0.0002), tolerance=0.25, calibration_s=0.4)
        kernel = SleepKernel(machine, 0.002)
        ungated = [measure(kernel, config).median_ms for _ in range(6)]
        gated = [measure(kernel, config, gate=gate).median_ms for _ in range(6)]
    fast = float(np.median(gated))
    # Every gated median sits at the fast level; ungated ones land on either level, whichever the window caught.
    assert max(gated) < 1.3 * fast
    assert max(ungated) > 1.5 * fast


def test_gate_flags_a_measurement_that_saw_only_the_slow_state() -> None:
    config = MeasurementConfig(
        warmup_runs=1, warmup_s=0.0, min_runs=10, min_time_s=0.02, max_time_s=0.15, realtime=False, max_attempts=1
    )
    machine = Machine(period_s=60.0)
    gate = ClockGate(SleepKernel(machine, 0.0002), tolerance=0.25, calibration_s=0.1)
    machine.slow = True  # from now on the reference runs at twice its nominal time
    stats = measure(SleepKernel(machine, 0.002), config, gate=gate)
    assert stats.flagged and stats.flag_reason is not None and "clock" in stats.flag_reason
    assert stats.n >= config.min_samples


def test_a_slow_clock_state_is_not_re_measured() -> None:
    # The state outlasts the window (as the host's slow states do): another attempt would only spend the time budget.
    # No contention probe: a busy neighbour (a parallel CI run) would add its own flag and retry, not the clock's.
    config = MeasurementConfig(
        warmup_runs=1, warmup_s=0.0, min_runs=10, min_time_s=0.02, max_time_s=0.15, realtime=False, max_attempts=3,
        contention_threshold=None,
    )  # fmt: skip
    machine = Machine(period_s=60.0)
    gate = ClockGate(SleepKernel(machine, 0.0002), tolerance=0.25, calibration_s=0.1)
    machine.slow = True
    stats = measure(SleepKernel(machine, 0.002), config, gate=gate)
    assert stats.flagged and stats.flag_reason is not None and stats.flag_reason.startswith("clock:")
    assert stats.attempts == 1


def test_patience_ends_the_wait_for_a_fast_state_the_host_no_longer_visits() -> None:
    machine = Machine(period_s=60.0)
    gate = ClockGate(SleepKernel(machine, 0.0002), tolerance=0.25, calibration_s=0.1, fast_memory_s=1.0)
    machine.slow = True
    kernel = SleepKernel(machine, 0.001)
    options = {"min_runs": 10, "min_time_s": 0.02, "max_time_s": 1.5, "max_runs": 100_000, "min_samples": 5}
    # The fast state was seen during calibration: the gate waits for it until that memory (1 s) runs out.
    started = time.perf_counter()
    gate.collect(kernel.time_once, **options, patience_s=0.1)
    recent_s = time.perf_counter() - started
    # Now it has not been seen for over 1 s: the gate stops soon after its patience is spent.
    started = time.perf_counter()
    patient = gate.collect(kernel.time_once, **options, patience_s=0.1)
    patient_s = time.perf_counter() - started
    assert 0.9 <= recent_s < 1.5 and patient_s < 0.5
    assert patient.samples_s.size >= 10 and patient.reference_ratio > 1.25


def test_gate_on_a_real_onnxruntime_kernel() -> None:
    backend = OnnxRuntimeBackend()
    gate = ClockGate.for_backend(backend)
    try:
        assert 0 < gate.nominal_s < 0.01
        config = MeasurementConfig(warmup_runs=2, warmup_s=0.0, min_runs=10, min_time_s=0.02, sessions=2)
        result = measure_sessions(lambda: backend.prepare_op(Conv2d(cin=16, cout=32, hw=14, k=3)), config, gate=gate)
        assert result.stats.sessions == 2 and result.stats.n >= 20 and result.stats.median_ms > 0
    finally:
        gate.close()


def test_bad_tolerance_names_the_field() -> None:
    machine = Machine(period_s=60.0)
    with pytest.raises(ValueError, match="tolerance"):
        ClockGate(SleepKernel(machine, 0.0001), tolerance=0.0)
