"""Which regressor predicts operator latency best here: a per-kind table of cross-validated candidates.

Measures operator variants with the service's own onnxruntime backend and measurement protocol (graphs from
``latency_service.backends.onnx_graphs``), caches the medians in a JSON file so that refits do not re-measure, fits
with :func:`predictors.fitting.fit_predictors` and prints, per kind, every candidate's cross-validated MAPE and share
within ±10 %, the winner, fit time, and the time of 100k ``predict_ms`` calls on a channel grid.

    python bench/bench_predictors.py --preset standard --per-kind 80 --cache /tmp/predictor_bench.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from predictors.fitting import CANDIDATES, DEFAULT_CANDIDATES, FitReport, LatencyPredictor, fit_predictors
from predictors.ops import Conv2d, OpSpec, op_from_dict


def _select(ops: list[OpSpec], per_kind: int, seed: int) -> list[OpSpec]:
    # Convolutions carry most of a network's time and the widest shape space, so they get four times the share.
    by_kind: dict[str, list[OpSpec]] = defaultdict(list)
    for op in ops:
        by_kind[op.kind].append(op)
    rng = random.Random(seed)
    chosen: list[OpSpec] = []
    for kind, variants in sorted(by_kind.items()):
        quota = per_kind * (4 if kind == "conv2d" else 1)
        chosen += variants if len(variants) <= quota else rng.sample(variants, quota)
    return chosen


def _measure(ops: list[OpSpec], cache: Path) -> list[tuple[OpSpec, float]]:
    from latency_service.backends.onnxruntime import OnnxRuntimeBackend
    from latency_service.measurement import MeasurementConfig, measure

    stored: dict[str, dict[str, object]] = json.loads(cache.read_text()) if cache.exists() else {}
    backend = OnnxRuntimeBackend(intra_op_threads=1, optimization_level="all")
    config = MeasurementConfig()
    started = time.perf_counter()
    todo = [op for op in ops if op.key not in stored]
    for i, op in enumerate(todo):
        runnable = backend.prepare_op(op)
        try:
            stats = measure(runnable, config)
        finally:
            runnable.close()
        stored[op.key] = {"op": op.to_dict(), "median_ms": stats.median_ms, "cv": stats.cv, "flagged": stats.flagged}
        if (i + 1) % 50 == 0:
            cache.write_text(json.dumps(stored))
            print(f"  measured {i + 1}/{len(todo)} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    cache.write_text(json.dumps(stored))
    if todo:
        print(f"measured {len(todo)} variants in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return [(op, float(stored[op.key]["median_ms"])) for op in ops]  # type: ignore[arg-type]


def _load_cached(caches: list[Path]) -> list[tuple[OpSpec, float]]:
    # Several runs merge to the lowest median per variant: on a shared machine contention only ever adds time
    # (two runs here at load 6-17 differed by a median 4.5 %, and a quarter of the variants by more than 29 %).
    best: dict[str, tuple[OpSpec, float]] = {}
    for cache in caches:
        for key, entry in json.loads(cache.read_text()).items():
            ms = float(entry["median_ms"])
            if key not in best or ms < best[key][1]:
                best[key] = (op_from_dict(entry["op"]), ms)
    return list(best.values())


def _table(reports: list[FitReport]) -> str:
    names = sorted({name for r in reports for name in r.candidates})
    header = "| kind | n | " + " | ".join(names) + " | winner | within ±10 % |"
    lines = [header, "|" + "---|" * (len(names) + 4)]
    for r in reports:
        cells = []
        for name in names:
            mape, share = r.candidates.get(name), r.candidates_within_10pct.get(name)
            cells.append("–" if mape is None or share is None else f"{100 * mape:.1f} % / {100 * share:.0f} %")
        winner_share = "n/a" if r.within_10pct is None else f"{100 * r.within_10pct:.0f} %"
        lines.append(f"| {r.op} | {r.n_samples} | " + " | ".join(cells) + f" | {r.model} | {winner_share} |")
    return "\n".join(lines)


def _score_holdout(predictor: LatencyPredictor, preset: str, caches: list[Path]) -> None:
    """Regressor error on variants of another preset, none of them in the fitting grid (the table is bypassed)."""
    from latency_service.presets import PRESETS

    ops = [op for op in PRESETS[preset].build() if op.kind in predictor.kinds]
    _measure(ops, caches[0])
    measured = _load_cached([c for c in caches if c.exists()])
    wanted = {op.key for op in ops}
    unseen = [
        (op, ms) for op, ms in measured if op.key in wanted and op.key not in predictor.kind_predictor(op.kind).table
    ]
    predicted = predictor.predict_ms([op for op, _ in unseen])
    truth = np.array([ms for _, ms in unseen])
    errors = np.abs(predicted - truth) / truth
    print(
        f"\nheld-out {preset!r} preset: {len(unseen)} variants never fitted, MAPE {100 * errors.mean():.1f} %, "
        f"{100 * (errors <= 0.1).mean():.0f} % within ±10 %, median error {100 * np.median(errors):.1f} %"
    )
    by_kind: dict[str, list[float]] = defaultdict(list)
    for (op, _), error in zip(unseen, errors, strict=True):
        by_kind[op.kind].append(float(error))
    print("  " + ", ".join(f"{kind} {100 * np.mean(e):.0f} % (n={len(e)})" for kind, e in sorted(by_kind.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="standard", help="operator grid from latency_service.presets")
    parser.add_argument("--per-kind", type=int, default=80, help="variants per kind (conv2d gets 4x)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/predictor_bench.json"), help="measurements file")
    parser.add_argument(
        "--no-measure", action="store_true", help="fit on the cached measurements only (plus any --merge files)"
    )
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="other runs' caches, merged by minimum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-candidates", action="store_true", help="also plain trees on log latency")
    parser.add_argument("--save", type=Path, default=None, help="write the fitted predictor's JSON here")
    parser.add_argument(
        "--holdout-preset", default=None, help="also measure this preset (cached apart) and score the regressors on it"
    )
    args = parser.parse_args()

    if not args.no_measure:
        from latency_service.presets import PRESETS

        _measure(_select(PRESETS[args.preset].build(), args.per_kind, args.seed), args.cache)
    samples = _load_cached([args.cache, *args.merge])

    candidates = list(CANDIDATES) if args.all_candidates else list(DEFAULT_CANDIDATES)
    started, started_cpu = time.perf_counter(), time.process_time()
    predictor, reports = fit_predictors(samples, seed=args.seed, candidates=candidates)
    fit_s, fit_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    print(f"{len(samples)} measured variants, {len(reports)} kinds, fit with 5-fold CV in {fit_s:.1f} s wall, "
          f"{fit_cpu_s:.1f} s CPU (wall time grows with whatever else runs on the machine)\n")  # fmt: skip
    if args.save:
        args.save.write_text(json.dumps(predictor.to_json()))
        print(f"predictor {predictor.version} saved to {args.save} ({args.save.stat().st_size / 1e6:.1f} MB)\n")
    print("cross-validated MAPE / share within ±10 % per candidate\n")
    print(_table(reports))
    weights = np.array([r.n_samples for r in reports], dtype=float)
    within = np.array([r.within_10pct or 0.0 for r in reports])
    print(f"\nall kinds, variant-weighted: {100 * float(weights @ within / weights.sum()):.1f} % within ±10 %")

    if args.holdout_preset:
        holdout_caches = [c.with_suffix(".holdout.json") for c in [args.cache, *args.merge]]
        _score_holdout(predictor, args.holdout_preset, holdout_caches)

    grid = [Conv2d(cin=a, cout=b, hw=28, k=3, act="relu") for a in range(1, 65) for b in range(1, 65)] * 25
    started, started_cpu = time.perf_counter(), time.process_time()
    predictor.predict_ms(grid)
    print(f"predict_ms for {len(grid)} conv2d variants: {time.perf_counter() - started:.2f} s wall, "
          f"{time.process_time() - started_cpu:.2f} s CPU")  # fmt: skip


if __name__ == "__main__":
    main()
