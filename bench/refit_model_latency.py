"""Refit the whole-model predictor from saved in-context networks and score it against saved measured truths.

``bench_model_latency.py --networks N.json --rows R.json`` saves both; this script then tries a fitting change in
about a minute instead of re-profiling (8 min) and re-measuring (9 min).  The truths stay fixed, so two variants
are compared on the same measurements — on this shared machine a re-measured truth moves by a few percent.

    python bench/refit_model_latency.py --networks n.json --rows r.json [--method random_forest]
        [--inflation-scale 1.0] [--more-networks m.json ...] [--cv] [--no-context] [--conv-taps all]

``--cv`` first prints the primary metric: grouped cross-validation over the generated networks themselves (each
network's un-profiled wall predicted by a model fitted on the other folds), which needs no benchmark truths.

``--no-context`` drops the network-footprint column; ``--conv-taps all`` counts every k×k tap of a conv in its FLOPs and
bytes (the rule before padding-aware work) instead of only the taps inside the map.  Saved networks carry the features
of the code that profiled them, so both rules are re-derived here from the stored shapes, for the saved networks and
the benchmark models alike (padding k//2, which the generator and the benchmark families use); a networks file
written by this code is read as it is.

Not a substitute for the benchmark: a change tuned here against these truths must be confirmed on fresh models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.kernel_fit import METHODS, fit_kernel_predictor, network_errors
from latency_service.kernel_profiling import ProfiledNetwork, block_size, optimise
from latency_service.model_latency import validate_model
from latency_service.reconciliation import fit_inflation, reconcile
from predictors.kernel_shapes import static_shapes
from predictors.kernels import Kernel, decompose, rederive_conv_work


def benchmark_kernels(backend: OnnxRuntimeBackend, model_bytes: bytes, block: int) -> list[Kernel]:
    original = validate_model(model_bytes)
    return decompose(optimise(backend, model_bytes), block_size=block, known_shapes=static_shapes(original))


def load_networks(paths: list[Path], inflation_scale: float, in_map_only: bool) -> list[ProfiledNetwork]:
    networks = [ProfiledNetwork.from_json(n) for p in paths for n in json.loads(p.read_text())["networks"]]
    if not in_map_only:  # from_json already counts in-map taps only
        for network in networks:
            network.kernels = [rederive_conv_work(k, in_map_only=False) for k in network.kernels]
    inflation = fit_inflation(networks) * inflation_scale
    for network in networks:
        network.reconciled_ms, network.wall_trusted = reconcile(
            network.profiled_ms, network.wall_ms, network.overhead_ms, inflation
        )
    return networks


def print_network_cv(networks: list[ProfiledNetwork], method: str, use_context: bool) -> None:
    """Held-out generated networks against their own walls (a trusted network's truth is its wall), by wall size."""
    trusted = [n for n in networks if n.wall_trusted]
    errors = np.array(network_errors(trusted, method=method, use_context=use_context))
    walls = np.array([n.wall_ms for n in trusted])
    print(
        f"grouped CV, {len(trusted)} trusted networks: within ±10 % {np.mean(np.abs(errors) <= 0.10):.1%}, "
        f"within ±5 % {np.mean(np.abs(errors) <= 0.05):.1%}, RMSPE {np.sqrt(np.mean(errors**2)):.1%}, "
        f"mean {errors.mean():+.1%}"
    )
    for low, high in [(0.0, 0.1), (0.1, 0.3), (0.3, 1.0), (1.0, 3.0), (3.0, np.inf)]:
        band = errors[(walls >= low) & (walls < high)]
        if band.size:
            print(f"  wall {low:g}-{high:g} ms  n={band.size:3d}  within ±10 % {np.mean(np.abs(band) <= 0.10):6.1%}  "
                  f"mean {band.mean():+.1%}")  # fmt: skip


def truth_ms(row: dict, which: str) -> float:
    """The measured median a benchmark row is scored against; rows from before the two passes carry only one."""
    first = float(row.get("measured_first_ms", row["measured_ms"]))
    second = float(row.get("measured_second_ms", row["measured_ms"]))
    return {"lower": float(row["measured_ms"]), "first": first, "second": second, "mean": (first + second) / 2}[which]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=Path, required=True)
    parser.add_argument("--more-networks", type=Path, nargs="*", default=[])
    parser.add_argument("--rows", type=Path, required=True, help="per-model rows written by bench_model_latency")
    parser.add_argument("--method", choices=METHODS, default="random_forest")
    parser.add_argument(
        "--inflation-scale",
        type=float,
        default=1.0,
        help="multiply the fitted profiler inflation (it decides which walls are trusted; a trusted network's "
        "own inflation comes from its wall)",
    )
    parser.add_argument(
        "--truth",
        choices=("lower", "first", "second", "mean"),
        default="lower",
        help="which saved measurement of each benchmark model to score against (the bench keeps the lower pass)",
    )
    parser.add_argument("--cv", action="store_true", help="also score held-out generated networks (grouped CV)")
    parser.add_argument("--no-context", action="store_true", help="fit without the network-footprint column")
    parser.add_argument("--conv-taps", choices=("in_map", "all"), default="in_map", help="conv work: which taps count")
    args = parser.parse_args()
    for path in [args.networks, *args.more_networks, args.rows]:
        if not path.exists():
            parser.error(f"{path}: no such file")
    in_map_only = args.conv_taps == "in_map"
    use_context = not args.no_context
    networks = load_networks([args.networks, *args.more_networks], args.inflation_scale, in_map_only)
    print(f"conv taps: {args.conv_taps}, network context: {'on' if use_context else 'off'}")
    if args.cv:
        print_network_cv(networks, args.method, use_context)
    backend = OnnxRuntimeBackend()
    block = block_size(backend)
    samples = [s for n in networks for s in n.samples()]
    overhead = float(np.median([n.overhead_ms for n in networks]))
    predictor = fit_kernel_predictor(
        samples, overhead_ms=overhead, block_size=block, method=args.method, use_context=use_context
    )
    errors: dict[str, list[float]] = {}
    for row in json.loads(args.rows.read_text()):
        kernels = benchmark_kernels(backend, Path(row["path"]).read_bytes(), block)
        if not in_map_only:
            kernels = [rederive_conv_work(k, in_map_only=False) for k in kernels]
        predicted = predictor.overhead_ms + math.fsum(ms for ms, _ in predictor.predict(kernels))
        errors.setdefault(row["family"], []).append(predicted / truth_ms(row, args.truth) - 1)
    every = np.array([e for family in errors.values() for e in family])
    print(
        f"{args.method}, {len(networks)} networks, inflation x{args.inflation_scale}: "
        f"within ±10 % {np.mean(np.abs(every) <= 0.10):.1%}, within ±5 % {np.mean(np.abs(every) <= 0.05):.1%}, "
        f"RMSPE {np.sqrt(np.mean(every**2)):.1%}, mean {every.mean():+.1%}"
    )
    for family, values in sorted(errors.items()):
        e = np.array(values)
        print(f"  {family:18s} n={len(e):3d}  within ±10 % {np.mean(np.abs(e) <= 0.10):6.1%}  mean {e.mean():+.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
