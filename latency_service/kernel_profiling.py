"""In-context kernel profiling: time every kernel inside generated networks and make the parts add up to the whole.

Why in context: on onnxruntime (1 thread, ORT_ENABLE_ALL) the sum of separately timed layers over-predicts a
MobileNetV2 stack by 83-87 % at 224 px and 250-290 % at 32 px, because a standalone layer pays NCHWc reorders, loses
its fusions and pays a run() of its own.  Here each generated network (:mod:`latency_service.kernel_generator`) runs
once with onnxruntime's profiler, which gives a time per node of the *optimised* graph, and once without it through
the service's measurement protocol, which gives the true end-to-end median.

Reconciliation of the per-node times to the wall: :mod:`latency_service.reconciliation`.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from latency_service.backends.base import Backend
from latency_service.clock_gate import ClockGate
from latency_service.kernel_generator import SamplingPrior, random_network
from latency_service.measurement import MeasurementConfig, measure_overhead, measure_sessions
from latency_service.reconciliation import DEFAULT_INFLATION_MS, agreement, reconcile_networks, wall_credible
from predictors.kernels import Kernel, decompose, network_kernel_bytes, rederive_conv_work

# Profiled runs per network after the warm-up; node medians over these are stable to ~1 µs (the profiler's unit).
PROFILE_RUNS = 16
# A profiled run counts as undisturbed when its node sum is within this factor of the fastest run's.
CLEAN_RUN_MARGIN = 1.10
PROFILE_WARMUP = 3
PROFILE_ATTEMPTS = 2

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class KernelSample:
    """One kernel timed inside a network; ``latency_ms`` is its reconciled share of the network's wall time."""

    kernel_class: str
    op_type: str
    features: tuple[float, ...]
    latency_ms: float
    profiled_ms: float
    network_id: str
    network_bytes: float  # Σ kernel bytes of the whole network: its cache footprint, a feature of the big kernels


@dataclass
class ProfiledNetwork:
    """A generated (or user) network: its kernels, their profiled medians, and the un-profiled wall median."""

    network_id: str
    description: dict[str, Any]
    kernels: list[Kernel]
    profiled_ms: list[float]
    wall_ms: float
    overhead_ms: float
    reconciled_ms: list[float] = field(default_factory=list)
    wall_trusted: bool = True

    @property
    def truth_ms(self) -> float:
        """The network's latency as the samples account for it: the wall when credible, else overhead + Σ nodes."""
        return self.overhead_ms + float(sum(self.reconciled_ms)) if self.reconciled_ms else self.wall_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "network_id": self.network_id,
            "description": self.description,
            "kernels": [dataclasses.asdict(k) for k in self.kernels],
            "profiled_ms": self.profiled_ms,
            "wall_ms": self.wall_ms,
            "overhead_ms": self.overhead_ms,
            "conv_taps": "in_map",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProfiledNetwork:
        kernels = [
            Kernel(**{**k, "features": tuple(k["features"]), "fused": tuple(k["fused"]),
                      "input_shapes": tuple(tuple(s) for s in k["input_shapes"]),
                      "output_shapes": tuple(tuple(s) for s in k["output_shapes"])})
            for k in data["kernels"]
        ]  # fmt: skip
        if data.get("conv_taps") != "in_map":  # saved before padding-aware conv work: counted all k×k taps
            kernels = [rederive_conv_work(k, in_map_only=True) for k in kernels]
        return cls(data["network_id"], data["description"], kernels, list(data["profiled_ms"]),
                   float(data["wall_ms"]), float(data["overhead_ms"]))  # fmt: skip

    def samples(self) -> list[KernelSample]:
        """Kernel samples of a network whose profile and wall agree; a disturbed one teaches nothing and gives none."""
        if not self.wall_trusted:
            return []
        footprint = network_kernel_bytes(self.kernels)
        return [KernelSample(k.kernel_class, k.op_type, k.features, r, p, self.network_id, footprint)
            for k, p, r in zip(self.kernels, self.profiled_ms, self.reconciled_ms, strict=True)
            if k.kernel_class is not None]  # fmt: skip


def block_size(backend: Backend) -> int:
    """The runtime's NCHWc channel block: a 4-channel conv gets its weight padded to it (1 when NCHWc is off)."""
    from latency_service.kernel_generator import NetworkBuilder

    builder = NetworkBuilder(rng=np.random.default_rng(0), hw=8, in_channels=4)
    x = builder.conv(builder.input(), 4, k=3, act="relu")
    optimised = optimise(backend, builder.build(x).SerializeToString())
    init = {i.name: list(i.dims) for i in optimised.graph.initializer}
    for node in optimised.graph.node:
        if node.op_type == "Conv" and node.domain.endswith("nchwc"):
            return int(init[node.input[1]][0])
    return 1


def _session_options(backend: Backend) -> Any:
    options_factory = getattr(backend, "session_options", None)
    if options_factory is None:
        raise TypeError(f"in-context profiling needs onnxruntime session options; backend {backend.name} has none")
    return options_factory()


def optimise(backend: Backend, model_bytes: bytes) -> onnx.ModelProto:
    """The graph the backend's session will execute (its optimiser's output) for ``model_bytes``."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="figs-opt-") as tmp:
        options = _session_options(backend)
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def profile_nodes(backend: Backend, model_bytes: bytes, *, runs: int = PROFILE_RUNS) -> tuple[onnx.ModelProto, dict]:
    """Per-node median milliseconds from onnxruntime's profiler, and the optimised graph they refer to."""
    import onnxruntime as ort

    from latency_service.backends.onnx_graphs import random_inputs

    model = onnx.load_model_from_string(model_bytes)
    feeds = random_inputs(model)
    with tempfile.TemporaryDirectory(prefix="figs-prof-") as tmp:
        options = _session_options(backend)
        options.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
        for _ in range(PROFILE_WARMUP + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimised = onnx.load(options.optimized_model_filepath)
    durations: dict[str, list[float]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            durations.setdefault(name[: -len("_kernel_time")], []).append(float(event["dur"]) / 1e3)
    return optimised, clean_node_medians(durations)


def clean_node_medians(durations: dict[str, list[float]]) -> dict[str, float]:
    """Per-node medians over the runs no other process disturbed.

    Every node runs once per run, so the i-th time of each node belongs to run i.  A run during which the scheduler
    gave the core away (a ~4 ms slice on this shared machine) has a node sum far above the others; only runs within
    CLEAN_RUN_MARGIN of the fastest run count (at least three, the fastest ones).
    """
    if not durations:
        return {}
    runs = min(len(v) for v in durations.values())
    matrix = np.array([v[len(v) - runs :] for v in durations.values()])[
        :, PROFILE_WARMUP if runs > PROFILE_WARMUP else 0 :
    ]
    totals = matrix.sum(axis=0)
    clean = totals <= CLEAN_RUN_MARGIN * totals.min()
    if clean.sum() < 3:
        clean = totals <= np.sort(totals)[min(2, len(totals) - 1)]
    medians = np.median(matrix[:, clean], axis=1)
    return {name: float(m) for name, m in zip(durations, medians, strict=True)}


def profile_network(
    backend: Backend,
    model: onnx.ModelProto,
    config: MeasurementConfig,
    *,
    overhead_ms: float,
    block: int,
    network_id: str,
    description: dict[str, Any] | None = None,
    gate: ClockGate | None = None,
) -> ProfiledNetwork:
    """Profile one network per node and measure it end to end (un-profiled, the service's protocol)."""
    model_bytes = model.SerializeToString()
    optimised, medians = profile_nodes(backend, model_bytes)
    kernels = decompose(optimised, block_size=block)
    stats = measure_sessions(
        lambda: backend.prepare_model(model_bytes), config, overhead_ms=overhead_ms, gate=gate
    ).stats
    profiled = [medians.get(k.name, 0.0) for k in kernels]
    described = {**(description or {}), "unprofiled": [k.name for k in kernels if k.name not in medians]}
    return ProfiledNetwork(network_id, described, kernels, profiled, stats.median_ms, overhead_ms)


# The `standard` preset's share for in-context profiling (the operator grid takes the rest of its 20 minutes).
STANDARD_BUDGET_S = 480.0
# The whole `standard` preset, `fit` included, is promised in 20 minutes on the 2-core dev machine.  The operator grid
# took 10.0 min on one host and 12.0 min on another (932 variants), so a fixed 480 s made the total 19.2 and 21.2 min:
# the in-context part gets what the grid leaves, less AFTER_PROFILING_RESERVE_S for what follows it (fusion detection
# ~7 s, fitting and comparing the kernel regressors ~31 s, the operator predictors' `fit` ~27 s, measured on 651
# networks), and never less than MIN_IN_CONTEXT_BUDGET_S: below that too few networks reach the adaptive rounds.
STANDARD_PRESET_S = 1200.0
AFTER_PROFILING_RESERVE_S = 90.0
MIN_IN_CONTEXT_BUDGET_S = 120.0


def in_context_budget(grid_elapsed_s: float) -> float:
    """Seconds of in-context profiling left to the `standard` preset after an operator grid that took this long."""
    left = STANDARD_PRESET_S - grid_elapsed_s - AFTER_PROFILING_RESERVE_S
    return float(min(STANDARD_BUDGET_S, max(MIN_IN_CONTEXT_BUDGET_S, left)))


# Networks are generated and measured in rounds; the first round spends this share of the budget on the prior.
FIRST_ROUND_SHARE = 0.6
ROUNDS = 3
# Below this many networks a cross-validated error per network is too noisy to steer sampling (and costs a fit).
MIN_NETWORKS_FOR_ADAPTIVE = 40
# Shorter timing per session than operator variants: a network's wall time sums many kernels, so its median over
# ~0.05 s per session is already within ~1 %, and the budget buys more networks.
IN_CONTEXT_CONFIG = MeasurementConfig(
    warmup_runs=3, warmup_s=0.02, min_runs=10, min_time_s=0.05, max_time_s=0.4, sessions=3
)


def _adaptive_prior(bad: Sequence[ProfiledNetwork], rng: np.random.Generator, base: SamplingPrior) -> SamplingPrior:
    """nn-Meter's refinement: new networks like the badly predicted ones, widths scaled by 0.4-1.2."""
    if not bad:
        return base
    seeds = [bad[int(rng.integers(len(bad)))] for _ in range(3)]
    families = tuple(sorted({str(n.description.get("family")) for n in seeds if n.description.get("family")}))
    resolutions = tuple(sorted({int(n.description.get("hw", 64)) for n in seeds}))
    activations = tuple(sorted({str(n.description["act"]) for n in seeds if n.description.get("act")}))
    return SamplingPrior(
        resolutions=resolutions or base.resolutions,
        resolution_weights=tuple([1.0] * len(resolutions or base.resolutions)),
        width_scale=float(rng.uniform(0.4, 1.2)),
        families=families or base.families,
        max_macs=base.max_macs,
        activations=activations or base.activations,
        activation_mix=base.activation_mix,
    )


def profile_kernels_in_context(
    backend: Backend,
    config: MeasurementConfig | None = None,
    *,
    budget_s: float,
    progress: ProgressCallback | None = None,
    seed: int = 0,
    prior: SamplingPrior | None = None,
    networks_out: list[ProfiledNetwork] | None = None,
    lock: AbstractContextManager[Any] | None = None,
    gate: ClockGate | None = None,
) -> list[KernelSample]:
    """Generate and profile networks until ``budget_s`` is spent; return every kernel's reconciled sample.

    The first ~60 % of the budget draws networks from the prior; later rounds fit the kernel regressors, find the
    networks whose cross-validated prediction is more than 10 % off, and draw new networks like them.
    ``progress(elapsed_s, budget_s)`` is called after every network.  ``networks_out`` receives the profiled
    networks (for persistence and for the held-out-network evaluation).  ``lock`` (the service's measurement lock)
    is held around each network's timing only, so that other measurements can interleave between networks.
    """
    from latency_service.kernel_fit import network_errors

    config = config or IN_CONTEXT_CONFIG
    rng = np.random.default_rng(seed)
    base_prior = prior or SamplingPrior()
    start = time.monotonic()
    guard = lock if lock is not None else nullcontext()
    with guard:
        overhead = measure_overhead(backend, config, gate=gate)
        block = block_size(backend)
    networks: list[ProfiledNetwork] = [] if networks_out is None else networks_out
    round_ends = [FIRST_ROUND_SHARE + (1 - FIRST_ROUND_SHARE) * r / (ROUNDS - 1) for r in range(ROUNDS)]
    current_prior = base_prior
    bad: list[ProfiledNetwork] = []
    for round_index, share in enumerate(round_ends):
        while time.monotonic() - start < share * budget_s:
            use_adaptive = round_index > 0 and rng.random() < 0.7
            draw_prior = _adaptive_prior(bad, rng, base_prior) if use_adaptive else current_prior
            model, description = random_network(rng, draw_prior)
            description["round"] = round_index
            attempts = []
            for _ in range(PROFILE_ATTEMPTS):
                with guard:
                    attempts.append(
                        profile_network(
                            backend,
                            model,
                            config,
                            overhead_ms=overhead,
                            block=block,
                            network_id=f"gen-{seed}-{len(networks)}",
                            description=description,
                            gate=gate,
                        )
                    )
                last = attempts[-1]
                if wall_credible(last.profiled_ms, last.wall_ms, last.overhead_ms, DEFAULT_INFLATION_MS):
                    break
            network = min(attempts, key=lambda n: abs(agreement(n) - 1.0))
            description["attempts"] = len(attempts)
            networks.append(network)
            if progress is not None:
                progress(int(time.monotonic() - start), int(budget_s))
        if round_index < len(round_ends) - 1 and len(networks) >= MIN_NETWORKS_FOR_ADAPTIVE:
            reconcile_networks(networks)
            trusted = [n for n in networks if n.wall_trusted]
            errors = network_errors(trusted, seed=seed)
            bad = [n for n, e in zip(trusted, errors, strict=True) if abs(e) > 0.10]
    reconcile_networks(networks)
    return [sample for network in networks for sample in network.samples()]
