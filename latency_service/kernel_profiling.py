"""In-context kernel profiling: time every kernel inside generated networks and make the parts add up to the whole.

Why in context: on onnxruntime (1 thread, ORT_ENABLE_ALL) the sum of separately timed layers over-predicts a
MobileNetV2 stack by 83-87 % at 224 px and 250-290 % at 32 px, because a standalone layer pays NCHWc reorders, loses
its fusions and pays a run() of its own.  Here each generated network (:mod:`latency_service.kernel_generator`) runs
once with onnxruntime's profiler, which gives a time per node of the *optimised* graph, and once without it through
the service's measurement protocol, which gives the true end-to-end median.

Reconciliation: the profiler inflates every node (timestamps and memory statistics per node; measured here as
~2-3 µs per node on networks of 20-100 nodes) so per-node times sum to more than the un-profiled wall time.  Each
network's node times get the per-node inflation subtracted (a constant fitted over all profiled networks) and are
then scaled so that they sum exactly to ``wall - per-run constant``; the per-run constant is the empty model's time.
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
from latency_service.kernel_generator import SamplingPrior, random_network
from latency_service.measurement import MeasurementConfig, measure, measure_overhead
from predictors.kernels import Kernel, decompose

# Profiled runs per network after the warm-up; node medians over these are stable to ~1 µs (the profiler's unit).
PROFILE_RUNS = 16
# A profiled run counts as undisturbed when its node sum is within this factor of the fastest run's.
CLEAN_RUN_MARGIN = 1.10
PROFILE_WARMUP = 3
# A reconciled node never drops below this share of its profiled time (guards tiny nodes against the subtraction).
MIN_KEPT_SHARE = 0.15
# Starting value of the per-node profiler inflation before enough networks exist to fit it.
DEFAULT_INFLATION_MS = 0.002
# A wall within this relative distance of the deflated node sum is believed; further away one of the two timings
# was disturbed (another process took the core), and the network is profiled again, at most PROFILE_ATTEMPTS times.
WALL_TRUST_BAND = 0.15
PROFILE_ATTEMPTS = 2
# Networks this short are rarely preempted (a scheduler slice is ~4 ms): they calibrate the inflation.
SHORT_NETWORK_MS = 2.0
# Below this wall a disagreement is the profiler's, not the scheduler's: the per-node inflation of networks under
# 0.1 ms is larger than the fitted constant (median agreement 0.90 over 114 such networks, 28 % outside ±15 %), so
# their walls are believed over a wider band; dropping them kept only the tiny networks whose kernels looked slow,
# and 32 px models were over-predicted by 30-47 %.
TINY_NETWORK_MS = 0.5
TINY_WALL_TRUST_BAND = 0.4

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProfiledNetwork:
        kernels = [
            Kernel(**{**k, "features": tuple(k["features"]), "fused": tuple(k["fused"]),
                      "input_shapes": tuple(tuple(s) for s in k["input_shapes"]),
                      "output_shapes": tuple(tuple(s) for s in k["output_shapes"])})
            for k in data["kernels"]
        ]  # fmt: skip
        return cls(data["network_id"], data["description"], kernels, list(data["profiled_ms"]),
                   float(data["wall_ms"]), float(data["overhead_ms"]))  # fmt: skip

    def samples(self) -> list[KernelSample]:
        """Kernel samples of a network whose profile and wall agree; a disturbed one teaches nothing and gives none."""
        if not self.wall_trusted:
            return []
        return [
            KernelSample(k.kernel_class, k.op_type, k.features, r, p, self.network_id)
            for k, p, r in zip(self.kernels, self.profiled_ms, self.reconciled_ms, strict=True)
            if k.kernel_class is not None
        ]


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
    return optimised, clean_node_medians(node_durations(events, PROFILE_WARMUP + runs))


def unnamed_key(op_type: str, occurrence: int) -> str:
    """The key of the ``occurrence``-th node of ``op_type`` that the optimiser created without a name."""
    return f"unnamed:{op_type}#{occurrence}"


def node_durations(events: Sequence[dict[str, Any]], total_runs: int) -> dict[str, list[float]]:
    """Milliseconds per node and run from the profiler's events.

    Nodes the optimiser created without a name all report as ``_kernel_time``; one shared entry held several
    nodes' times per run (and its kernels got none).  Each run executes the same nodes in the same order, so the
    i-th unnamed event of an op type within a run is that op type's i-th unnamed node: keyed by
    :func:`unnamed_key`, matched to the graph's unnamed nodes of that type in order.
    """
    durations: dict[str, list[float]] = {}
    unnamed_seen: dict[str, int] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        if not node:
            op_type = str(event.get("args", {}).get("op_name", ""))
            seen = unnamed_seen.get(op_type, 0)
            unnamed_seen[op_type] = seen + 1
            node = f"{op_type}\0{seen}"
        durations.setdefault(node, []).append(float(event["dur"]) / 1e3)
    for op_type, count in unnamed_seen.items():
        per_run = max(1, count // max(1, total_runs))
        for seen in range(count):
            times = durations.pop(f"{op_type}\0{seen}")
            durations.setdefault(unnamed_key(op_type, seen % per_run), []).extend(times)
    return durations


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


def reconcile(
    profiled_ms: Sequence[float], wall_ms: float, overhead_ms: float, inflation_ms: float
) -> tuple[list[float], bool]:
    """Per-node times with the profiler's inflation removed, scaled to ``wall - overhead`` when the wall is credible.

    Returns the times and whether the wall was used.  On a shared CPU a run longer than a scheduler slice (~4 ms
    here) is often preempted, which adds whole slices to the un-profiled median while per-node medians stay clean;
    a wall more than WALL_TRUST_BAND away from the deflated node sum is such a case, and the node times are kept.
    """
    profiled = np.asarray(profiled_ms, dtype=np.float64)
    if profiled.size == 0:
        return [], False
    deflated = np.maximum(profiled - inflation_ms, MIN_KEPT_SHARE * profiled)
    deflated = np.maximum(deflated, 1e-5)
    ratio = max(wall_ms - overhead_ms, 1e-6) / float(deflated.sum())
    trusted = abs(ratio - 1.0) <= wall_trust_band(wall_ms)
    scale = ratio if trusted else 1.0
    return [float(v) for v in deflated * scale], trusted


def wall_trust_band(wall_ms: float) -> float:
    """How far (relative) a wall may sit from the deflated node sum and still be believed."""
    return TINY_WALL_TRUST_BAND if wall_ms < TINY_NETWORK_MS else WALL_TRUST_BAND


def agreement(network: ProfiledNetwork, inflation_ms: float = DEFAULT_INFLATION_MS) -> float:
    """(wall − overhead) / Σ deflated node times: 1 when the profile and the un-profiled wall tell the same story."""
    profiled = np.asarray(network.profiled_ms, dtype=np.float64)
    deflated = np.maximum(np.maximum(profiled - inflation_ms, MIN_KEPT_SHARE * profiled), 1e-5)
    return max(network.wall_ms - network.overhead_ms, 1e-6) / float(deflated.sum())


def fit_inflation(networks: Sequence[ProfiledNetwork]) -> float:
    """The per-node profiler inflation δ: the median over short networks of (Σ profiled − (wall − overhead)) / n.

    Only networks shorter than SHORT_NETWORK_MS enter: they are rarely preempted, so their walls are clean.
    """
    estimates = [
        (sum(n.profiled_ms) - (n.wall_ms - n.overhead_ms)) / len(n.profiled_ms)
        for n in networks
        if n.profiled_ms and n.wall_ms < SHORT_NETWORK_MS
    ]
    if len(estimates) < 3:
        return DEFAULT_INFLATION_MS
    return float(np.clip(np.median(estimates), 0.0, 0.01))


def profile_network(
    backend: Backend,
    model: onnx.ModelProto,
    config: MeasurementConfig,
    *,
    overhead_ms: float,
    block: int,
    network_id: str,
    description: dict[str, Any] | None = None,
) -> ProfiledNetwork:
    """Profile one network per node and measure it end to end (un-profiled, the service's protocol)."""
    model_bytes = model.SerializeToString()
    optimised, medians = profile_nodes(backend, model_bytes)
    kernels = decompose(optimised, block_size=block)
    runnable = backend.prepare_model(model_bytes)
    try:
        stats = measure(runnable, config, overhead_ms=overhead_ms)
    finally:
        runnable.close()
    unnamed_count: dict[str, int] = {}
    keys = []
    for kernel in kernels:
        key = kernel.name
        if key.startswith("unnamed:"):
            key = unnamed_key(kernel.op_type, unnamed_count.get(kernel.op_type, 0))
            unnamed_count[kernel.op_type] = unnamed_count.get(kernel.op_type, 0) + 1
        keys.append(key)
    profiled = [medians.get(key, 0.0) for key in keys]
    described = {
        **(description or {}),
        "unprofiled": [k.name for k, key in zip(kernels, keys, strict=True) if key not in medians],
    }
    return ProfiledNetwork(network_id, described, kernels, profiled, stats.median_ms, overhead_ms)


# The `standard` preset's share for in-context profiling (the operator grid takes the rest of its 20 minutes).
STANDARD_BUDGET_S = 480.0
# Networks are generated and measured in rounds; the first round spends this share of the budget on the prior.
FIRST_ROUND_SHARE = 0.6
ROUNDS = 3
# Below this many networks a cross-validated error per network is too noisy to steer sampling (and costs a fit).
MIN_NETWORKS_FOR_ADAPTIVE = 40
# Shorter timing than operator variants: a network's median over ~0.15 s is already within ~1 % here.
IN_CONTEXT_CONFIG = MeasurementConfig(warmup_runs=3, warmup_s=0.03, min_runs=15, min_time_s=0.12, max_time_s=0.8)
# Drift correction: every REFERENCE_EVERY networks one fixed reference network is timed again.  Other processes on
# a shared CPU slow every run without preempting it (caches, memory bandwidth): bench models measured at load 2
# read 1-9 % above their quiet medians, and a profiling run at load 2-4.6 left the whole fit ~8 % high.  Each
# network's timings are scaled by quiet reference / current reference (the quiet one: REFERENCE_QUIET_QUANTILE of
# all reference medians; the current one: the median of the last REFERENCE_WINDOW).
REFERENCE_EVERY = 8
REFERENCE_WINDOW = 3
REFERENCE_QUIET_QUANTILE = 0.1
REFERENCE_SEED = 20261128


def reference_model() -> onnx.ModelProto:
    """The drift reference: a fixed inverted-residual network of ~0.3-1 ms."""
    prior = SamplingPrior(resolutions=(64,), resolution_weights=(1.0,), families=("inverted",), max_macs=3e7)
    model, _ = random_network(np.random.default_rng(REFERENCE_SEED), prior)
    return model


def drift_factors(networks: Sequence[ProfiledNetwork]) -> list[float]:
    """Per network, quiet reference time / reference time when it was profiled (1 where no reference was taken)."""
    refs = [n.description.get("reference_ms") for n in networks]
    known = [float(r) for r in refs if r]
    if not known:
        return [1.0] * len(networks)
    quiet = float(np.quantile(known, REFERENCE_QUIET_QUANTILE))
    return [min(1.0, quiet / float(r)) if r else 1.0 for r in refs]


def _adaptive_prior(bad: Sequence[ProfiledNetwork], rng: np.random.Generator, base: SamplingPrior) -> SamplingPrior:
    """nn-Meter's refinement: new networks like the badly predicted ones, widths scaled by 0.4-1.2."""
    if not bad:
        return base
    seeds = [bad[int(rng.integers(len(bad)))] for _ in range(3)]
    families = tuple(sorted({str(n.description.get("family")) for n in seeds if n.description.get("family")}))
    resolutions = tuple(sorted({int(n.description.get("hw", 64)) for n in seeds}))
    return SamplingPrior(
        resolutions=resolutions or base.resolutions,
        resolution_weights=tuple([1.0] * len(resolutions or base.resolutions)),
        width_scale=float(rng.uniform(0.4, 1.2)),
        families=families or base.families,
        max_macs=base.max_macs,
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
) -> list[KernelSample]:
    """Generate and profile networks until ``budget_s`` is spent; return every kernel's reconciled sample.

    The first ~60 % of the budget draws networks from the prior; later rounds fit the kernel regressors, find the
    networks whose cross-validated prediction is more than 10 % off, and draw new networks like them.
    ``progress(elapsed_s, budget_s)`` is called after every network.  ``networks_out`` receives the profiled
    networks (for persistence and for the held-out-network evaluation).  ``lock`` (the service's measurement lock)
    is held around each network's timing only, so that other measurements can interleave between networks.
    """
    config = config or IN_CONTEXT_CONFIG
    base_prior = prior or SamplingPrior()
    start = time.monotonic()
    guard = lock if lock is not None else nullcontext()
    with guard:
        overhead = measure_overhead(backend, config)
        block = block_size(backend)
    networks: list[ProfiledNetwork] = [] if networks_out is None else networks_out
    reference = backend.prepare_model(reference_model().SerializeToString())
    reference_ms: list[float] = []
    try:
        _profile_rounds(
            backend, config, budget_s, progress, seed, base_prior, networks, guard, start, overhead, block,
            reference, reference_ms,
        )  # fmt: skip
    finally:
        reference.close()
    reconcile_networks(networks)
    return [sample for network in networks for sample in network.samples()]


def _profile_rounds(
    backend: Backend,
    config: MeasurementConfig,
    budget_s: float,
    progress: ProgressCallback | None,
    seed: int,
    base_prior: SamplingPrior,
    networks: list[ProfiledNetwork],
    guard: AbstractContextManager[Any],
    start: float,
    overhead: float,
    block: int,
    reference: Any,
    reference_ms: list[float],
) -> None:
    from latency_service.kernel_fit import network_errors

    rng = np.random.default_rng(seed)
    round_ends = [FIRST_ROUND_SHARE + (1 - FIRST_ROUND_SHARE) * r / (ROUNDS - 1) for r in range(ROUNDS)]
    current_prior = base_prior
    bad: list[ProfiledNetwork] = []
    for round_index, share in enumerate(round_ends):
        while time.monotonic() - start < share * budget_s:
            use_adaptive = round_index > 0 and rng.random() < 0.7
            draw_prior = _adaptive_prior(bad, rng, base_prior) if use_adaptive else current_prior
            model, description = random_network(rng, draw_prior)
            description["round"] = round_index
            if len(networks) % REFERENCE_EVERY == 0:
                with guard:
                    reference_ms.append(measure(reference, config).median_ms)
            description["reference_ms"] = float(np.median(reference_ms[-REFERENCE_WINDOW:]))
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
                        )
                    )
                if abs(agreement(attempts[-1]) - 1.0) <= wall_trust_band(attempts[-1].wall_ms):
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


def reconcile_networks(networks: Sequence[ProfiledNetwork]) -> float:
    inflation = fit_inflation(networks)
    for network, drift in zip(networks, drift_factors(networks), strict=True):
        profiled = [ms * drift for ms in network.profiled_ms]
        network.reconciled_ms, network.wall_trusted = reconcile(
            profiled, network.wall_ms * drift, network.overhead_ms, inflation
        )
        network.description["drift"] = drift
        network.description["inflation_ms"] = inflation
        network.description["wall_trusted"] = network.wall_trusted
    return inflation
