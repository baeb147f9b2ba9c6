"""Search benchmark: does the exported network meet its latency target on a real device service?

For each data set, three latency targets spread over the range the space can reach, and for each target:
the measured latency of the exported network vs the target (goal ±10 %), its accuracy vs a uniform width-multiplier
baseline of the same space at the same measured latency, the exact vs plug-in expectation (value gap and hit rate),
search wall time vs plain training of the same supernet, and the cost terms' share of a training step (goal ≤ 5 %).

It starts its own latency service on a loopback port (or uses ``--device URL``), profiles the space's own layers
at a few widths, fits, calibrates the table → measured map with uniform-width models, and searches; the final
width is chosen by measurement (``search.refine.select_width``), then fine-tuned and measured once more.

    python bench/bench_search.py --quick            # digits, 1 seed (~10 minutes on 2 cores)
    python bench/bench_search.py                    # digits and mnist5k, 3 seeds
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_cost_overhead import step_overhead
from bench.local_service import local_service
from predictors.ops import OpSpec
from search.costs import CostModel
from search.data import DataBundle, load_dataset
from search.export import LatencyCalibration, calibrate_device, compact_aligned, evaluate, onnx_bytes
from search.gates import GateConfig
from search.refine import WidthKnob, compact_searched, refine_to_measured, select_width
from search.service_client import DeviceService, ServiceError, dense_tables, table_layers
from search.spaces.base import SearchSpace, create_space
from search.trainer import SearchConfig, finetune, run_search, train_plain

MULTIPLIERS = (0.25, 0.5, 0.75, 1.0)
CHANNEL_MULTIPLE = 8  # onnxruntime's blocked layout wants aligned widths (see search.export.align_channel_counts)
TARGET_FRACTIONS = (0.3, 0.55, 0.8)  # of the way from the narrowest to the full uniform model's measured latency


@dataclass
class Mode:
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    search_steps: int
    finetune_steps: int
    profile_fractions: tuple[float, ...]
    overhead_steps: int
    refine_rounds: int  # table-target corrections with more search steps, before the width selection
    refine_steps: int
    max_measurements: int = 8  # of the width selection (0: export the searched widths)
    tolerance: float = 0.05


QUICK = Mode(("digits",), (0,), 250, 120, (0.25, 0.5, 1.0), 40, 0, 80)
FULL = Mode(("digits", "mnist5k"), (0, 1, 2), 600, 300, (0.125, 0.25, 0.5, 0.75, 1.0), 100, 0, 150)


@contextmanager
def given_service(url: str) -> Iterator[str]:
    yield url


def space_profile_ops(space: SearchSpace, fractions: tuple[float, ...]) -> list[OpSpec]:
    """The space's own layers at a few widths: the tables then interpolate between measured neighbours."""
    ops: dict[str, OpSpec] = {}
    for layer in space.latency_layers():
        cins = {max(1, round(layer.cin * f)) for f in fractions} if layer.input_gated else {layer.cin}
        couts = {max(1, round(layer.cout * f)) for f in fractions} if layer.output_gated else {layer.cout}
        for cin in cins:
            for cout in couts:
                op = layer.op_at(cin, cout)
                ops[op.key] = op
    return list(ops.values())


def uniform_space(bundle: DataBundle, multiplier: float) -> SearchSpace:
    return create_space(
        "blocks",
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
        width_multiplier=multiplier,
    )


def search_once(
    bundle: DataBundle,
    service: DeviceService,
    tables: list[torch.Tensor],
    calibration: LatencyCalibration,
    target_ms: float,
    seed: int,
    mode: Mode,
    expectation: str,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    space = create_space(
        "blocks", in_channels=bundle.in_channels, num_classes=bundle.num_classes, image_size=bundle.image_size
    )
    config = SearchConfig(
        steps=mode.search_steps,
        target_latency_ms={"cpu": calibration.to_table(target_ms)},
        expectation=expectation,  # type: ignore[arg-type]
        seed=seed,
    )
    result = run_search(config, space, bundle, {"cpu": tables}, progress=False)

    def measure(model: torch.nn.Module) -> dict[str, float]:
        return {"cpu": service.measure_model(onnx_bytes(model, bundle.in_channels, bundle.image_size)).median_ms}

    started = time.perf_counter()
    config, rounds = refine_to_measured(
        config,
        space,
        bundle,
        {"cpu": tables},
        targets_ms={"cpu": target_ms},
        measure=measure,
        scales={"cpu": calibration.scale},
        rounds=mode.refine_rounds,
        steps=mode.refine_steps,
        compact=lambda s: compact_searched(s, multiple=CHANNEL_MULTIPLE),
        tolerance=mode.tolerance,
    )
    refine_seconds = time.perf_counter() - started
    started = time.perf_counter()
    knob = WidthKnob(space, multiple=CHANNEL_MULTIPLE)
    predict = knob.predictor({"cpu": tables}, {"cpu": calibration})
    plan = knob.searched
    selection = None
    if mode.max_measurements:
        selection = select_width(
            knob,
            measure,
            {"cpu": target_ms},
            predict=predict,
            tolerance=mode.tolerance,
            max_measurements=mode.max_measurements,
        )
        plan = selection.plan
    select_seconds = time.perf_counter() - started
    compact, arch = knob.compact(plan)
    knob.restore()
    started = time.perf_counter()
    finetune(compact, bundle, mode.finetune_steps, seed=seed)
    finetune_seconds = time.perf_counter() - started
    onnx = onnx_bytes(compact, bundle.in_channels, bundle.image_size)
    measured = service.measure_model(onnx).median_ms
    try:
        predicted: float | None = service.predict_model(onnx).total_ms
    except ServiceError:  # no whole-model predictor until the service has run its 'standard' preset
        predicted = None
    assert bundle.test is not None
    return {
        "target_ms": target_ms,
        "seed": seed,
        "expectation": expectation,
        "expected_table_ms": result.final_costs["latency_ms/cpu"],
        "expected_ms": calibration.to_measured(result.final_costs["latency_ms/cpu"]),
        "predicted_ms": predicted,
        "measured_before_refine_ms": rounds[0].measured_ms["cpu"],
        "error_before_refine": rounds[0].measured_ms["cpu"] / target_ms - 1,
        "refine_rounds": len(rounds) - 1,
        "expected_selected_ms": predict(plan)["cpu"],
        "selection_measurements": len(selection.measurements) if selection else 0,
        "selection_within_tolerance": selection.within_tolerance if selection else None,
        "selected_scale": plan.scale,
        "selected_operator_level": plan.operators,
        "measured_selected_ms": next(m.measured_ms["cpu"] for m in selection.measurements if m.index == plan.index)
        if selection
        else None,
        "measured_ms": measured,
        "error": measured / target_ms - 1,
        "accuracy": evaluate(compact, bundle.test).accuracy,
        "search_seconds": result.wall_seconds,
        "refine_seconds": refine_seconds,
        "select_seconds": select_seconds,
        "finetune_seconds": finetune_seconds,
        "cost_seconds": result.cost_seconds,
        "steps": result.steps_done,
        "nodes": len(arch["nodes"]),
        "width_selection": asdict(selection) if selection else None,
    }


def baseline_once(
    bundle: DataBundle, service: DeviceService, multiplier: float, seed: int, steps: int
) -> dict[str, Any]:
    """The uniform-width model trained for as many steps as search plus fine-tune took."""
    torch.manual_seed(seed)
    model, _ = compact_aligned(uniform_space(bundle, multiplier), multiple=CHANNEL_MULTIPLE)
    train_plain(model, bundle, steps, seed=seed)
    measured = service.measure_model(onnx_bytes(model, bundle.in_channels, bundle.image_size)).median_ms
    assert bundle.test is not None
    return {
        "multiplier": multiplier,
        "seed": seed,
        "measured_ms": measured,
        "accuracy": evaluate(model, bundle.test).accuracy,
    }


def multiplier_for(calibration: LatencyCalibration, target_ms: float) -> float:
    """The widest uniform multiplier whose model measured within the target (+10 %), else the fastest one.

    Measured latency is not monotone in the multiplier here (aligned widths run several times faster), so the
    measured calibration models are searched rather than interpolated.
    """
    measured = [p[1] for p in calibration.points]
    fitting = [m for m, ms in zip(MULTIPLIERS, measured, strict=True) if ms <= target_ms * 1.10]
    return max(fitting) if fitting else MULTIPLIERS[int(np.argmin(measured))]


def plain_training_seconds(bundle: DataBundle, steps: int) -> float:
    """Wall time of training the same supernet without gates or costs (all gates fixed on)."""
    space = create_space(
        "blocks",
        in_channels=bundle.in_channels,
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
        gate=GateConfig(fixed_on=True),
    )
    started = time.perf_counter()
    train_plain(space, bundle, steps)
    return time.perf_counter() - started


def bench_dataset(name: str, service: DeviceService, mode: Mode) -> dict[str, Any]:
    bundle = load_dataset(name)
    supernet = create_space(
        "blocks", in_channels=bundle.in_channels, num_classes=bundle.num_classes, image_size=bundle.image_size
    )
    layers = supernet.latency_layers()
    tables = dense_tables(layers, service.latency_tables(table_layers(layers, 4)))
    uniform = [uniform_space(bundle, m) for m in MULTIPLIERS]
    calibration = calibrate_device(
        service, uniform, in_channels=bundle.in_channels, image_size=bundle.image_size, multiple=CHANNEL_MULTIPLE
    )
    points = ", ".join(f"({t:.4f}, {m:.4f})" for t, m in calibration.points)
    print(f"[{name}] calibration: measured = {calibration.offset_ms:.4f} + {calibration.scale:.4f} · table; {points}")
    # The fitted line, not the raw points: one disturbed measurement must not move the targets.
    low, high = (calibration.to_measured(p[0]) for p in (calibration.points[0], calibration.points[-1]))
    targets = [low + f * (high - low) for f in TARGET_FRACTIONS]
    runs: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    for target in targets:
        for seed in mode.seeds:
            for expectation in ("exact", "plugin"):
                run = search_once(bundle, service, tables, calibration, target, seed, mode, expectation)
                runs.append(run)
                print(f"[{name}] {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()})}")
            multiplier = multiplier_for(calibration, target)
            base = baseline_once(bundle, service, multiplier, seed, mode.search_steps + mode.finetune_steps)
            base["target_ms"] = target
            baselines.append(base)
            print(f"[{name}] baseline {json.dumps(base)}")
    overhead = step_overhead(bundle, tables, mode.overhead_steps)
    plain_seconds = plain_training_seconds(bundle, mode.search_steps)
    gap = exact_vs_plugin_gap(supernet, tables)
    return {
        "dataset": name,
        "calibration": {"offset_ms": calibration.offset_ms, "scale": calibration.scale, "points": calibration.points},
        "targets_ms": targets,
        "runs": runs,
        "baselines": baselines,
        "overhead": overhead,
        "plain_training_seconds": plain_seconds,
        "exact_vs_plugin": gap,
    }


def exact_vs_plugin_gap(space: SearchSpace, tables: list[torch.Tensor], draws: int = 20) -> dict[str, float]:
    """Relative gap between plug-in and exact expected latency over random gate states of the supernet."""
    exact = CostModel.from_space(space, {"cpu": tables}, mode="exact")
    plugin = CostModel.from_space(space, {"cpu": tables}, mode="plugin")
    generator = torch.Generator().manual_seed(0)
    gaps = []
    with torch.no_grad():
        for _ in range(draws):
            for gate in space.gates():
                gate.log_odds.copy_(torch.randn(gate.log_odds.shape, generator=generator) * 2.0)
            e, p = float(exact.expected_latency_ms("cpu")), float(plugin.expected_latency_ms("cpu"))
            gaps.append(p / e - 1)
    return {"mean_gap": float(np.mean(gaps)), "max_abs_gap": float(np.max(np.abs(gaps))), "draws": draws}


def summarise(results: list[dict[str, Any]]) -> str:
    lines = [
        "| data | expectation | target ms | measured ms: searched widths | after width selection (measurements) "
        "| operator level | error | within ±10 % | accuracy | uniform baseline acc. (width, ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for target in result["targets_ms"]:
            base = [b for b in result["baselines"] if b["target_ms"] == target]
            for expectation in ("exact", "plugin"):
                runs = [r for r in result["runs"] if r["target_ms"] == target and r["expectation"] == expectation]
                hits = sum(abs(r["error"]) <= 0.10 for r in runs)
                counts = "/".join(str(r["selection_measurements"]) for r in runs)
                levels = "/".join(f"{r.get('selected_operator_level', 0):+d}" for r in runs)
                lines.append(
                    f"| {result['dataset']} | {expectation} | {target:.4f} | "
                    f"{np.mean([r['measured_before_refine_ms'] for r in runs]):.4f} "
                    f"({np.mean([r['error_before_refine'] for r in runs]):+.0%}) | "
                    f"{np.mean([r['measured_ms'] for r in runs]):.4f} ({counts}) | {levels} | "
                    f"{np.mean([r['error'] for r in runs]):+.1%} | "
                    f"{hits}/{len(runs)} | {np.mean([r['accuracy'] for r in runs]):.3f} | "
                    f"{np.mean([b['accuracy'] for b in base]):.3f} (×{base[0]['multiplier']:.2f}, "
                    f"{np.mean([b['measured_ms'] for b in base]):.4f}) |"
                )
    for result in results:
        o = result["overhead"]
        search_s = np.mean([r["search_seconds"] for r in result["runs"] if r["expectation"] == "exact"])
        lines.append("")
        lines.append(
            f"{result['dataset']}: cost terms {o['overhead']:+.1%} of a step ({o['step_ms_with_costs']:.1f} vs "
            f"{o['step_ms_without_costs']:.1f} ms; timed directly {o['cost_ms']:.2f} ms, {o['cost_share']:.1%}); "
            f"search {search_s:.1f} s vs plain training "
            f"{result['plain_training_seconds']:.1f} s; plug-in vs exact expected latency: mean gap "
            f"{result['exact_vs_plugin']['mean_gap']:+.1%}, max |gap| {result['exact_vs_plugin']['max_abs_gap']:.1%}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, one seed, shorter searches")
    parser.add_argument("--device", help="use this latency service instead of starting one (it must be profiled)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/search.json"))
    parser.add_argument("--datasets", help="comma-separated, overrides the mode's (e.g. mnist5k)")
    parser.add_argument("--refine-rounds", type=int, help="table-target corrections before the width selection")
    parser.add_argument("--max-measurements", type=int, help="of the width selection (0: searched widths)")
    args = parser.parse_args()
    # SIGTERM must unwind through local_service() so the service process it started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = QUICK if args.quick else FULL
    if args.datasets:
        mode = replace(mode, datasets=tuple(args.datasets.split(",")))
    if args.refine_rounds is not None:
        mode = replace(mode, refine_rounds=args.refine_rounds)
    if args.max_measurements is not None:
        mode = replace(mode, max_measurements=args.max_measurements)
    torch.set_num_threads(1)  # the service measures on the other core; keep training off it
    with given_service(args.device) if args.device else local_service() as url:
        service = DeviceService(url)
        if not args.device:
            ops: dict[str, OpSpec] = {}
            for name in mode.datasets:
                bundle = load_dataset(name)
                for op in space_profile_ops(
                    create_space(
                        "blocks",
                        in_channels=bundle.in_channels,
                        num_classes=bundle.num_classes,
                        image_size=bundle.image_size,
                    ),
                    mode.profile_fractions,
                ):
                    ops[op.key] = op
            started = time.perf_counter()
            job = service.wait_job(service.submit_job(ops=ops.values()), timeout=3600)
            print(f"profiled {job['done']} variants ({job['failed']} failed) in {time.perf_counter() - started:.0f} s")
            fit = service.fit()
            print("fit:", json.dumps(fit)[:400])
        results = [bench_dataset(name, service, mode) for name in mode.datasets]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(summarise(results))


if __name__ == "__main__":
    main()
