"""Profiling throughput and repeatability of the onnxruntime backend under the shared measurement protocol.

Measures a deterministic sample of a preset (or all of it) in two separate processes, one after the other, and
reports variants per minute (session build included), the projected time of the whole preset, and how well the two
runs' medians agree: the median relative difference, and for kernels of at least 100 µs the share within 2 %.

    python bench/bench_profiling.py --sample 150           # ~3 min here
    python bench/bench_profiling.py --sample 0             # the whole standard preset, twice
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from latency_service.backends import create_backend
from latency_service.clock_gate import ClockGate
from latency_service.environment import host_environment
from latency_service.measurement import MeasurementConfig, measure_overhead, measure_sessions, pin_to_cores
from latency_service.presets import preset_ops
from predictors.ops import OpSpec, op_from_dict

REPEATABLE_KERNEL_MS = 0.1
REPEATABLE_WITHIN = 0.02


def sample_ops(preset: str, size: int, seed: int) -> list[OpSpec]:
    """``size`` variants of ``preset`` drawn with ``seed`` (the whole grid when ``size`` is 0 or too large)."""
    ops = preset_ops(preset)
    if size <= 0 or size >= len(ops):
        return ops
    return random.Random(seed).sample(ops, size)


def run_worker(ops_file: Path, threads: int, cores: tuple[int, ...] | None, sessions: int, clock_gate: bool) -> None:
    """Measure every op in ``ops_file`` and print one JSON line per op (run in a fresh process)."""
    ops = [op_from_dict(d) for d in json.loads(ops_file.read_text())]
    config = MeasurementConfig(cores=cores, sessions=sessions)
    pin_to_cores(cores)
    backend = create_backend("onnxruntime", intra_op_threads=threads)
    gate = ClockGate.for_backend(backend) if clock_gate else None
    overhead = measure_overhead(backend, config, gate=gate)
    started = time.perf_counter()
    for op in ops:
        t0 = time.perf_counter()
        stats = measure_sessions(lambda op=op: backend.prepare_op(op), config, overhead_ms=overhead, gate=gate).stats  # type: ignore[misc]
        record = {"key": op.key, "kind": op.kind, "measure_s": time.perf_counter() - t0}
        print(json.dumps({**record, **stats.to_dict()}), flush=True)
    print(json.dumps({"total_s": time.perf_counter() - started, "overhead_ms": overhead}), flush=True)


def _run_pass(ops_file: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], float]:
    command = [sys.executable, __file__, "--worker", str(ops_file), "--threads", str(args.threads)]
    command += ["--sessions", str(args.sessions)] + (["--no-clock-gate"] if args.no_clock_gate else [])
    if args.cores:
        command += ["--cores", args.cores]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [line for line in lines if "key" in line], float(lines[-1]["total_s"])


def _report(
    first: list[dict[str, Any]],
    second: list[dict[str, Any]],
    totals: list[float],
    args: argparse.Namespace,
    n_preset: int,
) -> str:
    a = np.array([r["median_ms"] for r in first])
    b = np.array([r["median_ms"] for r in second])
    rel = np.abs(a - b) / ((a + b) / 2)
    big = np.minimum(a, b) >= REPEATABLE_KERNEL_MS
    unflagged = np.array([not (r["flagged"] or s["flagged"]) for r, s in zip(first, second, strict=True)])
    clean = big & unflagged
    contended = np.mean(["contention" in str(r["flag_reason"]) for r in first + second])
    per_minute = [len(first) / t * 60 for t in totals]
    flagged = np.mean([r["flagged"] for r in first + second])
    attempts = np.mean([r["attempts"] for r in first + second])
    session_spread = np.median([r["session_spread"] for r in first + second])
    host = host_environment()
    rows = [
        ("date (UTC)", time.strftime("%Y-%m-%d %H:%M", time.gmtime())),
        ("host", f"{host['cpu_model']}, {host['logical_cores']} logical cores, governor {host['governor']}"),
        ("backend", f"onnxruntime, {args.threads} intra-op thread(s), optimization all, cores {args.cores or 'all'}"),
        ("clock gate", "off" if args.no_clock_gate else "on"),
        ("load average (1 min) at start / end", f"{args.load_start} / {_load_average()}"),
        ("variants measured (per pass)", f"{len(first)} of {n_preset} in `{args.preset}`"),
        ("throughput, pass 1 / pass 2", " / ".join(f"{v:.0f} variants/min" for v in per_minute)),
        ("projected whole preset", f"{n_preset / np.mean(per_minute):.1f} min"),
        ("sessions per variant / median session spread", f"{first[0]['sessions']} / {session_spread:.1%}"),
        ("mean attempts / flagged share", f"{attempts:.2f} / {flagged:.1%}"),
        ("median relative difference, all", f"{np.median(rel):.2%}"),
        ("p90 relative difference, all", f"{np.percentile(rel, 90):.2%}"),
        (f"kernels >= {REPEATABLE_KERNEL_MS * 1e3:.0f} µs", f"{int(big.sum())}"),
        ("  median relative difference", f"{np.median(rel[big]):.2%}" if big.any() else "n/a"),
        (
            f"  share within {REPEATABLE_WITHIN:.0%}",
            f"{np.mean(rel[big] <= REPEATABLE_WITHIN):.1%}" if big.any() else "n/a",
        ),
        (f"kernels < {REPEATABLE_KERNEL_MS * 1e3:.0f} µs: share within 5 %", f"{np.mean(rel[~big] <= 0.05):.1%}"),
        (f"kernels >= {REPEATABLE_KERNEL_MS * 1e3:.0f} µs unflagged in both passes", f"{int(clean.sum())}"),
        (
            f"  share within {REPEATABLE_WITHIN:.0%}",
            f"{np.mean(rel[clean] <= REPEATABLE_WITHIN):.1%}" if clean.any() else "n/a",
        ),
        ("contention-flagged share", f"{contended:.1%}"),
    ]
    worst = np.argsort(-np.where(big, rel, -1))[:5]
    lines = ["| metric | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    lines += ["", "Worst kernels >= 100 µs (pass 1 ms, pass 2 ms, difference):", ""]
    lines += [
        f"- {first[i]['kind']} `{first[i]['key']}`: {a[i]:.4f}, {b[i]:.4f}, {rel[i]:.1%}" for i in worst if big[i]
    ]
    return "\n".join(lines)


def _load_average() -> str:
    # Other processes on the host are the main source of cross-run differences: record how busy it was.
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--sample", type=int, default=150, help="variants to measure per pass; 0 = the whole preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cores", default="", help="comma-separated core ids to pin to, e.g. 1")
    parser.add_argument("--sessions", type=int, default=MeasurementConfig.sessions, help="sessions per variant")
    parser.add_argument("--no-clock-gate", action="store_true", help="time without the reference-kernel gate")
    parser.add_argument("--json-out", type=Path, help="write both passes' raw records here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cores = tuple(int(c) for c in args.cores.split(",")) if args.cores else None
    if args.worker:
        run_worker(args.worker, args.threads, cores, args.sessions, not args.no_clock_gate)
        return 0
    args.load_start = _load_average()
    n_preset = len(preset_ops(args.preset))
    ops = sample_ops(args.preset, args.sample, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        ops_file = Path(tmp) / "ops.json"
        ops_file.write_text(json.dumps([op.to_dict() for op in ops]))
        # Sequential on purpose: two concurrent passes would slow each other down.
        first, t1 = _run_pass(ops_file, args)
        second, t2 = _run_pass(ops_file, args)
    if args.json_out:
        args.json_out.write_text(json.dumps({"first": first, "second": second}))
    print(_report(first, second, [t1, t2], args, n_preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
