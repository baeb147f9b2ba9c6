"""Constants shared by this directory's tests (imported by name; pytest puts this directory on sys.path)."""

from __future__ import annotations

from latency_service.kernel_generator import SamplingPrior
from latency_service.measurement import MeasurementConfig

# Small, fast networks: the tests check plumbing and invariants, the benchmark checks accuracy.
TINY_PRIOR = SamplingPrior(resolutions=(32, 48), resolution_weights=(1.0, 1.0), width_scale=0.5, max_macs=5e6)
QUICK = MeasurementConfig(warmup_runs=2, warmup_s=0.01, min_runs=10, min_time_s=0.03, max_time_s=0.3)
