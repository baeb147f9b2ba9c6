"""Whole-model validation: ≥ 50 never-seen CNNs, both exporters, measured end to end vs predicted from the kernels.

Steps (each one's time is reported):

1. Draw random members of every family in :mod:`bench.model_families` and export each with both ``torch.onnx.export``
   paths (TorchScript opset 17 and dynamo); exports are cached in ``--cache`` so a rerun skips them.
2. Run the in-context kernel profiling exactly as the ``standard`` preset does (same budget, same code), compare the
   regressors on held-out networks and fit the winner: the service state a new device has after ``standard``.
3. Measure every exported model with the service's measurement protocol, predict it from that state, and compute
   the naive per-layer sum (each torch layer — conv-bn-act, linear, pool, standalone BN/activation — timed alone as
   an operator variant; residual adds and concats are not layers and are left out, which only flatters it).

    python bench/bench_model_latency.py --models 52 --cache /tmp/figs-bench-models --out /tmp/bench_model_latency.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency_service.backends.onnxruntime import OnnxRuntimeBackend
from latency_service.clock_gate import ClockGate
from latency_service.kernel_fit import KernelPredictor, compare_methods, fit_kernel_predictor
from latency_service.kernel_profiling import (
    STANDARD_BUDGET_S,
    ProfiledNetwork,
    block_size,
    profile_kernels_in_context,
)
from latency_service.measurement import MeasurementConfig, measure_sessions
from latency_service.model_latency import predict_with
from latency_service.reconciliation import reconcile_networks

NAIVE_CONFIG = MeasurementConfig(warmup_runs=3, warmup_s=0.02, min_runs=10, min_time_s=0.04, max_time_s=0.4, sessions=3)


def export_models(n_models: int, cache: Path, seed: int) -> list[dict]:
    """Export (or load from the cache) n_models random family members with both exporters."""
    from bench.model_families import FAMILIES, random_member

    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(n_models):
        family = FAMILIES[i % len(FAMILIES)]
        member_seed = int(rng.integers(1 << 31))
        for exporter in ("torchscript", "dynamo"):
            path = cache / f"{i:03d}_{family}_{exporter}_{member_seed}.onnx"
            meta = path.with_suffix(".json")
            if not path.exists():
                from bench.model_families import export_onnx

                model, resolution = random_member(family, np.random.default_rng(member_seed))
                exported = export_onnx(model, resolution, dynamo=exporter == "dynamo")
                # The metadata first: a file's existence is what tells another run that the export is complete.
                meta.write_text(json.dumps({"resolution": resolution, "layers": _layer_specs(model, resolution)}))
                path.write_bytes(exported)
            info = json.loads(meta.read_text())
            entries.append({"index": i, "family": family, "exporter": exporter, "path": path, **info})
    return entries


def _layer_specs(model: object, resolution: int) -> list[dict]:
    """Operator specs of the model's layers as a per-layer table would list them (conv+bn+act as one variant)."""
    import torch
    from torch import nn

    assert isinstance(model, nn.Module)
    acts = {
        nn.ReLU: "relu",
        nn.ReLU6: "relu6",
        nn.Hardswish: "hardswish",
        nn.Hardsigmoid: "hardsigmoid",
        nn.Sigmoid: "sigmoid",
        nn.SiLU: "silu",
    }
    order: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: order.append((mod, tuple(inp[0].shape))))
        for m in model.modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    specs: list[dict] = []
    i = 0
    while i < len(order):
        module, shape = order[i]
        if isinstance(module, nn.Conv2d):
            spec = {
                "op": "conv2d",
                "cin": module.in_channels,
                "cout": module.out_channels,
                "hw": shape[-1],
                "k": module.kernel_size[0],
                "stride": module.stride[0],
                "groups": module.groups,
            }
            if i + 1 < len(order) and isinstance(order[i + 1][0], nn.BatchNorm2d):
                spec["bn"] = True
                i += 1
            if i + 1 < len(order) and type(order[i + 1][0]) in acts:
                spec["act"] = acts[type(order[i + 1][0])]
                i += 1
            specs.append(spec)
        elif isinstance(module, nn.Linear):
            specs.append({"op": "linear", "cin": module.in_features, "cout": module.out_features})
        elif isinstance(module, nn.BatchNorm2d):
            specs.append({"op": "batchnorm", "c": shape[1], "hw": shape[-1]})
        elif type(module) in acts and len(shape) == 4:
            specs.append({"op": acts[type(module)], "c": shape[1], "hw": shape[-1]})
        elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            stride = module.stride if isinstance(module.stride, int) else module.stride[0]
            kind = "maxpool" if isinstance(module, nn.MaxPool2d) else "avgpool"
            if k <= shape[-1]:
                specs.append({"op": kind, "c": shape[1], "hw": shape[-1], "k": k, "stride": stride})
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            specs.append({"op": "global_avgpool", "c": shape[1], "hw": shape[-1]})
        i += 1
    return specs


def measure_model_bytes(
    backend: OnnxRuntimeBackend, model_bytes: bytes, config: MeasurementConfig, gate: ClockGate | None
) -> Any:
    return measure_sessions(lambda: backend.prepare_model(model_bytes), config, gate=gate).stats


def naive_layer_sum(
    backend: OnnxRuntimeBackend, specs: list[dict], cache: dict[str, float], gate: ClockGate | None
) -> float:
    """Σ standalone-measured layer medians (cached by variant key across models)."""
    from predictors.ops import op_from_dict

    total = 0.0
    for raw in specs:
        try:
            op = op_from_dict(raw)
        except ValueError:
            continue
        if op.key not in cache:
            stats = measure_sessions(functools.partial(backend.prepare_op, op), NAIVE_CONFIG, gate=gate).stats
            cache[op.key] = stats.median_ms
        total += cache[op.key]
    return total


def fit_state(
    backend: OnnxRuntimeBackend, budget_s: float, seed: int, networks_file: Path | None, gate: ClockGate | None
) -> tuple[KernelPredictor, dict]:
    """Profile (or reload a previous run's profiled networks), compare regressors, fit the winner."""
    networks: list[ProfiledNetwork] = []
    start = time.monotonic()
    if networks_file is not None and networks_file.exists():
        saved = json.loads(networks_file.read_text())
        networks = [ProfiledNetwork.from_json(n) for n in saved["networks"]]
        reconcile_networks(networks)
        profiling_s = float(saved["profiling_s"])
    else:
        profile_kernels_in_context(backend, budget_s=budget_s, seed=seed, networks_out=networks, gate=gate)
        profiling_s = time.monotonic() - start
        if networks_file is not None:
            payload = {"profiling_s": profiling_s, "networks": [n.to_json() for n in networks]}
            networks_file.write_text(json.dumps(payload))
    start = time.monotonic()
    samples = [s for n in networks for s in n.samples()]
    comparison = compare_methods(networks)
    method = max(comparison, key=lambda r: (r["network_within_10pct"], -r["network_rmspe"]))["method"]
    overhead = float(np.median([n.overhead_ms for n in networks]))
    predictor = fit_kernel_predictor(samples, overhead_ms=overhead, block_size=block_size(backend), method=method)
    fit_s = time.monotonic() - start
    info = {
        "profiling_s": profiling_s,
        "fit_s": fit_s,
        "networks": len(networks),
        "samples": len(samples),
        "comparison": comparison,
        "method": method,
        "wall_trusted": float(np.mean([n.wall_trusted for n in networks])),
    }
    return predictor, info


def _pct(values: np.ndarray, bound: float) -> str:
    return f"{100 * float(np.mean(np.abs(values) <= bound)):.1f} %"


def _truth_table(rows: list[dict]) -> list[str]:
    """The kernel predictor against each pass on its own and against their mean: how much the truth moves."""
    if not rows or "measured_second_ms" not in rows[0]:
        return []
    truths = {
        "lower of the two passes (above)": [r["measured_ms"] for r in rows],
        "first pass": [r["measured_first_ms"] for r in rows],
        "second pass": [r["measured_second_ms"] for r in rows],
        "mean of the two passes": [(r["measured_first_ms"] + r["measured_second_ms"]) / 2 for r in rows],
    }
    lines = ["Against which measurement (the same predictions):", ""]
    lines += ["| truth | within ±5 % | within ±10 % | mean error |", "|---|---|---|---|"]
    for name, values in truths.items():
        e = np.array([r["predicted_ms"] for r in rows]) / np.array(values) - 1
        lines.append(f"| {name} | {_pct(e, 0.05)} | {_pct(e, 0.10)} | {100 * np.mean(e):+.1f} % |")
    return [*lines, ""]


def report(rows: list[dict], info: dict, args: argparse.Namespace, elapsed: dict[str, float]) -> str:
    err = np.array([r["predicted_ms"] / r["measured_ms"] - 1 for r in rows])
    naive = np.array([r["naive_ms"] / r["measured_ms"] - 1 for r in rows])
    load = os.getloadavg()
    lines = [
        "# Whole-model latency: predicted vs measured",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
        f"- command: `python bench/bench_model_latency.py {' '.join(sys.argv[1:])}`",
        f"- models: {len(rows)} ONNX files ({len({r['index'] for r in rows})} networks × both exporters), none used "
        f"for fitting; onnxruntime 1 thread, ORT_ENABLE_ALL",
        f"- in-context profiling (the `standard` preset's part): {info['profiling_s']:.0f} s, {info['networks']} "
        f"networks, {info['samples']} kernel samples, walls credible for {100 * info['wall_trusted']:.0f} %; "
        f"regressor fit {info['fit_s']:.0f} s; kept: **{info['method']}**",
        f"- times: export {elapsed['export']:.0f} s, measure+predict+naive {elapsed['evaluate']:.0f} s; every model "
        "measured twice (two passes) with the service protocol, the lower median kept; the passes agreed within "
        f"2 % for {100 * info['truth_repeat'][0]:.0f} % of models, "
        f"within 5 % for {100 * info['truth_repeat'][1]:.0f} %",
        "",
        "| predictor | within ±5 % | within ±10 % | RMSPE | median abs error |",
        "|---|---|---|---|---|",
        f"| kernels in context ({info['method']}) | {_pct(err, 0.05)} | {_pct(err, 0.10)} | "
        f"{100 * np.sqrt(np.mean(err**2)):.1f} % | {100 * np.median(np.abs(err)):.1f} % |",
        f"| naive per-layer sum | {_pct(naive, 0.05)} | {_pct(naive, 0.10)} | "
        f"{100 * np.sqrt(np.mean(naive**2)):.1f} % | {100 * np.median(np.abs(naive)):.1f} % |",
        "",
        *_truth_table(rows),
        "Regressors compared on held-out generated networks (grouped CV) and held-out kernels:",
        "",
        "| method | networks within ±10 % | within ±5 % | network RMSPE | kernel MAPE |",
        "|---|---|---|---|---|",
    ]
    for c in info["comparison"]:
        lines.append(
            f"| {c['method']} | {100 * c['network_within_10pct']:.1f} % | {100 * c['network_within_5pct']:.1f} % | "
            f"{100 * c['network_rmspe']:.1f} % | {100 * c['kernel_mape']:.1f} % |"
        )
    header = "| family | n | within ±10 % | RMSPE | mean error | naive mean error |"
    lines += ["", "Per family (both exporters):", "", header, "|---|---|---|---|---|---|"]
    for family in sorted({r["family"] for r in rows}):
        sel = [i for i, r in enumerate(rows) if r["family"] == family]
        e, ne = err[sel], naive[sel]
        lines.append(
            f"| {family} | {len(sel)} | {_pct(e, 0.10)} | {100 * np.sqrt(np.mean(e**2)):.1f} % | "
            f"{100 * np.mean(e):+.1f} % | {100 * np.mean(ne):+.1f} % |"
        )
    for exporter in ("torchscript", "dynamo"):
        sel = [i for i, r in enumerate(rows) if r["exporter"] == exporter]
        lines.append(
            f"| *all {exporter}* | {len(sel)} | {_pct(err[sel], 0.10)} | "
            f"{100 * np.sqrt(np.mean(err[sel] ** 2)):.1f} % | {100 * np.mean(err[sel]):+.1f} % | "
            f"{100 * np.mean(naive[sel]):+.1f} % |"
        )
    lines += [
        "",
        "Worst five:",
        "",
        "| model | resolution | measured ms | predicted ms | error | unmodelled |",
        "|---|---|---|---|---|---|",
    ]
    for i in np.argsort(-np.abs(err))[:5]:
        r = rows[i]
        lines.append(
            f"| {r['path'].name} | {r['resolution']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
            f"{100 * err[i]:+.1f} % | {r['unmodelled']} |"
        )
    unmodelled = sum(r["unmodelled"] for r in rows)
    lines += ["", f"Unmodelled kernels over all models: {unmodelled}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=52, help="networks (each exported twice)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/figs-bench-models"))
    parser.add_argument("--budget-s", type=float, default=STANDARD_BUDGET_S, help="in-context profiling budget")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--networks", type=Path, default=None, help="save (or reuse) the profiled networks here")
    parser.add_argument("--naive-from", type=Path, default=None, help="reuse the naive column of an earlier --rows")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here too")
    parser.add_argument("--rows", type=Path, default=None, help="write per-model JSON rows here")
    args = parser.parse_args()
    backend = OnnxRuntimeBackend(intra_op_threads=1, optimization_level="all")
    elapsed: dict[str, float] = {}
    start = time.monotonic()
    entries = export_models(args.models, args.cache, args.seed)
    elapsed["export"] = time.monotonic() - start
    gate = ClockGate.for_backend(backend)
    predictor, info = fit_state(backend, args.budget_s, args.seed % 1000, args.networks, gate)
    start = time.monotonic()
    config = MeasurementConfig()
    naive_cache: dict[str, float] = {}
    # The naive column does not depend on the predictor: a rerun may take it from an earlier run's rows.
    previous_naive: dict[str, float] = {}
    if args.naive_from is not None:
        previous_naive = {Path(r["path"]).name: r["naive_ms"] for r in json.loads(args.naive_from.read_text())}
    rows = []
    for entry in entries:
        model_bytes = entry["path"].read_bytes()
        stats = measure_model_bytes(backend, model_bytes, config, gate)
        prediction = predict_with(predictor, backend, model_bytes)
        name = entry["path"].name
        naive = (
            previous_naive[name]
            if name in previous_naive
            else naive_layer_sum(backend, entry["layers"], naive_cache, gate)
        )
        rows.append(
            {
                **entry,
                "measured_ms": stats.median_ms,
                "flagged": stats.flagged,
                "predicted_ms": prediction["total_ms"],
                "naive_ms": naive,
                "unmodelled": len(prediction["unmodelled"]),
            }
        )
        print(
            f"{entry['path'].name}: measured {stats.median_ms:.3f} predicted {prediction['total_ms']:.3f} "
            f"naive {naive:.3f}",
            flush=True,
        )
    # A second pass, later in time, over every model (chosen without looking at predictions): on a shared CPU a
    # median taken while another process held the core is the other process's number, not the model's.
    for row in rows:
        again = measure_model_bytes(backend, row["path"].read_bytes(), config, gate)
        row["measured_first_ms"] = row["measured_ms"]
        row["measured_second_ms"] = again.median_ms
        row["measured_ms"] = min(row["measured_ms"], again.median_ms)
    elapsed["evaluate"] = time.monotonic() - start
    passes = np.array([abs(r["measured_first_ms"] / r["measured_ms"] - 1) for r in rows])
    info["truth_repeat"] = (float(np.mean(passes <= 0.02)), float(np.mean(passes <= 0.05)))
    text = report(rows, info, args, elapsed)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.rows:
        args.rows.write_text(json.dumps([{**r, "path": str(r["path"])} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
