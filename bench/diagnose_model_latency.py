"""Where a whole-model prediction goes wrong: profile benchmark models in context and compare kernel by kernel.

``bench_model_latency.py --networks N.json --rows R.json`` saves the generated networks and the benchmark rows.
This script fits the predictor from N.json (as refit does), then profiles each benchmark model the way a generated
network is profiled (per-node profile + un-profiled wall, reconciled with the fitted inflation) and prints, per
kernel class, the kernels' reconciled time inside that model against the prediction.  A class whose predictions run
above its in-context times in many models is where a benchmark bias comes from.

    python bench/diagnose_model_latency.py --networks n.json --rows r.json [--method gradient_boosting]
        [--models 20] [--drift 40]

``--drift N`` first re-measures N first-round generated networks (regenerated from the seed in their ids) and
N/2 benchmark models, and prints now/then ratios: a shift of the host between the profiling phase and the
benchmark's measurements would show in both.  Every model is profiled once (~1 s each); run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.kernel_fit import METHODS, KernelPredictor, fit_kernel_predictor
from latency_service.kernel_generator import SamplingPrior, random_network
from latency_service.kernel_profiling import IN_CONTEXT_CONFIG, ProfiledNetwork, block_size, profile_network
from latency_service.measurement import MeasurementConfig, measure_overhead, measure_sessions
from latency_service.reconciliation import reconcile, reconcile_networks
from predictors.kernels import CONV, FEATURE_NAMES, kernel_bytes, network_kernel_bytes


def print_drift(backend: OnnxRuntimeBackend, saved: list[dict], rows: list[dict], count: int) -> None:
    """Re-measure first-round generated networks and benchmark models; print now / then."""
    seed = int(saved[0]["network_id"].split("-")[1])
    rng = np.random.default_rng(seed)
    first_round = []
    for entry in saved:
        if entry["description"].get("round") != 0:
            break
        model, description = random_network(rng, SamplingPrior())
        if description["macs"] != entry["description"]["macs"]:
            print("drift: the generator no longer reproduces these networks; skipped")
            return
        first_round.append((model.SerializeToString(), float(entry["wall_ms"])))
    picks = np.random.default_rng(1).choice(len(first_round), min(count, len(first_round)), replace=False)
    generated, benchmark = [], []
    for j, index in enumerate(picks):
        model_bytes, wall = first_round[index]
        now = measure_sessions(functools.partial(backend.prepare_model, model_bytes), IN_CONTEXT_CONFIG).stats.median_ms
        generated.append(now / wall)
        if j % 2 == 0:
            row = rows[int(np.random.default_rng(2 + j).integers(len(rows)))]
            data = Path(row["path"]).read_bytes()
            now = measure_sessions(functools.partial(backend.prepare_model, data), MeasurementConfig()).stats.median_ms
            benchmark.append(now / float(row.get("measured_first_ms", row["measured_ms"])))
    print(f"drift: generated networks now/profiled {np.median(generated):.3f} (n={len(generated)}), "
          f"benchmark models now/first pass {np.median(benchmark):.3f} (n={len(benchmark)})")  # fmt: skip


def diagnose(
    backend: OnnxRuntimeBackend, predictor: KernelPredictor, inflation_ms: float, rows: list[dict]
) -> list[tuple[str, str, tuple[float, ...], float, float, float]]:
    """Per kernel of every credibly reconciled model: (model, class, features, in context, predicted, footprint)."""

    block = block_size(backend)
    overhead = measure_overhead(backend, IN_CONTEXT_CONFIG)
    kernels_out = []
    errors = []
    for row in rows:
        name = Path(row["path"]).name
        network = profile_network(backend, onnx.load(row["path"]), IN_CONTEXT_CONFIG, overhead_ms=overhead,
                                  block=block, network_id=name)  # fmt: skip
        reconciled, trusted = reconcile(network.profiled_ms, network.wall_ms, network.overhead_ms, inflation_ms)
        predicted = predictor.predict(network.kernels)
        total = predictor.overhead_ms + math.fsum(ms for ms, _ in predicted)
        errors.append(total / network.wall_ms - 1)
        if not trusted:
            continue
        footprint = network_kernel_bytes(network.kernels)
        for kernel, in_context, (ms, _) in zip(network.kernels, reconciled, predicted, strict=True):
            kernels_out.append((name, str(kernel.kernel_class), kernel.features, in_context, ms, footprint))
    e = np.array(errors)
    print(f"{len(rows)} models against their walls measured now: within ±10 % {np.mean(np.abs(e) <= 0.10):.1%}, "
          f"mean {e.mean():+.1%}")  # fmt: skip
    return kernels_out


def print_breakdown(kernels: list[tuple[str, str, tuple[float, ...], float, float, float]], n_models: int) -> None:
    by_class: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for _, kernel_class, _, kernel_in_context, kernel_predicted, _ in kernels:
        entry = by_class[kernel_class]
        entry[0] += 1
        entry[1] += kernel_in_context
        entry[2] += kernel_predicted
    print("\nper class, summed over the models: in context vs predicted")
    for kernel_class, (count, seen_ms, predicted_ms) in sorted(by_class.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kernel_class:14s} n={int(count):5d}  in context {seen_ms:9.3f} ms  predicted {predicted_ms:9.3f} ms"
              f"  ratio {predicted_ms / max(seen_ms, 1e-9):.3f}")  # fmt: skip
    names = FEATURE_NAMES[CONV]
    convs = [k for k in kernels if k[1] == CONV]
    if not convs:
        return
    hw_out = np.array([k[2][names.index("hw_out")] for k in convs])
    own_bytes = np.array([kernel_bytes(CONV, k[2]) for k in convs])
    footprint = np.array([k[5] for k in convs])
    in_context = np.array([k[3] for k in convs])
    predicted = np.array([k[4] for k in convs])

    def show(title: str, mask_rows: list[tuple[str, np.ndarray]]) -> None:
        print(title)
        for label, mask in mask_rows:
            if mask.any():
                excess = (predicted[mask] - in_context[mask]).sum() * 1e3 / n_models
                seen, guessed = in_context[mask].sum() * 1e3, predicted[mask].sum() * 1e3
                print(f"  {label:22s} n={int(mask.sum()):5d}  in context {seen:9.1f} µs  predicted {guessed:9.1f} µs  "
                      f"excess per model {excess:+7.2f} µs")  # fmt: skip

    show("convs by output map", [(f"hw_out {lo}-{hi - 1}", (hw_out >= lo) & (hw_out < hi))
                                 for lo, hi in [(1, 2), (2, 4), (4, 8), (8, 16), (16, 64), (64, 1000)]])  # fmt: skip
    small = (hw_out == 1) & (own_bytes < 1e5)
    show("1-px convs under 100 kB by the model's footprint", [
        (f"model {lo / 1e6:g}-{hi / 1e6:g} MB", small & (footprint >= lo) & (footprint < hi))
        for lo, hi in [(0, 8e6), (8e6, 3e7), (3e7, 1e12)]
    ])  # fmt: skip


def print_training_coverage(networks: list[ProfiledNetwork]) -> None:
    """The same small 1-px convs in the generated networks: their reconciled and profiled medians by footprint."""
    names = FEATURE_NAMES[CONV]
    rows = [
        (network_kernel_bytes(n.kernels), r, p)
        for n in networks
        for k, r, p in zip(n.kernels, n.reconciled_ms, n.profiled_ms, strict=True)
        if k.kernel_class == CONV and k.features[names.index("hw_out")] == 1 and kernel_bytes(CONV, k.features) < 1e5
    ]
    if not rows:
        return
    a = np.array(rows)
    print("the generated networks' 1-px convs under 100 kB (training samples)")
    for lo, hi in [(0, 8e6), (8e6, 3e7), (3e7, 1e12)]:
        m = (a[:, 0] >= lo) & (a[:, 0] < hi)
        if m.any():
            print(f"  model {lo / 1e6:g}-{hi / 1e6:g} MB  n={int(m.sum()):4d}  reconciled median "
                  f"{np.median(a[m, 1]) * 1e3:.2f} µs  profiled median {np.median(a[m, 2]) * 1e3:.2f} µs")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=Path, required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--method", choices=METHODS, default="gradient_boosting")
    parser.add_argument("--models", type=int, default=0, help="diagnose only the first N rows (0: all)")
    parser.add_argument("--drift", type=int, default=0, help="first re-measure this many generated networks")
    args = parser.parse_args()
    for path in (args.networks, args.rows):
        if not path.exists():
            parser.error(f"{path}: no such file")
    saved = json.loads(args.networks.read_text())["networks"]
    rows = json.loads(args.rows.read_text())
    rows = rows[: args.models] if args.models > 0 else rows
    backend = OnnxRuntimeBackend(intra_op_threads=1, optimization_level="all")
    if args.drift > 0:
        print_drift(backend, saved, rows, args.drift)
    networks = [ProfiledNetwork.from_json(n) for n in saved]
    inflation = reconcile_networks(networks)
    samples = [s for n in networks for s in n.samples()]
    overhead = float(np.median([n.overhead_ms for n in networks]))
    predictor = fit_kernel_predictor(samples, overhead_ms=overhead, block_size=block_size(backend), method=args.method)
    kernels = diagnose(backend, predictor, inflation, rows)
    print_breakdown(kernels, len(rows))
    print_training_coverage(networks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
