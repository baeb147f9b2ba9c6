"""How this host's speed moves, and whether any way of summarising timings repeats within 2 % despite it.

Two parts, both on the clock gate's reference kernel (a 3×3 conv 32→32 at 16 px, onnxruntime, 1 thread):

``--trace-s S``: times the reference back to back for S seconds (medians of 9 runs) and prints its distribution,
the share of time in the fastest state and the per-second medians.  A host with a steady clock shows one level.

``--estimators``: measures the kernels >= 100 µs of the ``standard`` sample that ``bench_profiling.py --sample 200
--seed 2`` draws, in two fresh processes, ``--repeats`` times each, every time on 3 freshly built sessions of 0.4 s
of 12 ms chunks with a reference check (2 refill runs + 9 timed) between chunks; then summarises the same samples six
ways and reports, for each, the share of kernels whose two processes agree within 2 %:

- ``plain``: median of all samples (per session; median of the session medians, as every estimator here);
- ``gate``: samples of chunks whose reference ran within 4 % of the fastest reference seen (least slow chunks fill
  up to 15 samples), the service's protocol;
- ``ratio``: chunk medians divided by the reference's slowdown (assumes every kernel slows as the reference does);
- ``regression``: log(chunk median) against log(slowdown) per session, slope clipped to [0, 1], read at slowdown 1;
- ``p10``: 10th percentile of the chunk medians; ``min``: the fastest chunk.

    python bench/bench_host_drift.py --trace-s 30
    python bench/bench_host_drift.py --estimators --repeats 3        # ~10 min
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_profiling import sample_ops
from latency_service.backends import create_backend
from latency_service.clock_gate import CHUNK_S, ClockGate, select_chunks
from predictors.ops import op_from_dict

SESSION_S = 0.4
ESTIMATORS = ("plain", "gate", "ratio", "regression", "p10", "min")


def _reference_check(gate: ClockGate) -> float:
    """One check of the service's clock gate, in seconds rather than as a ratio to the nominal time."""
    return gate.check() * gate.nominal_s


def trace(seconds: float) -> str:
    gate = ClockGate.for_backend(create_backend("onnxruntime", intra_op_threads=1))
    medians, stamps = [], []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        medians.append(_reference_check(gate) * 1e6)
        stamps.append(time.perf_counter() - started)
    values = np.array(medians)
    fastest = float(values.min())
    seconds_index = np.floor(np.array(stamps)).astype(int)
    per_second = [float(np.median(values[seconds_index == s])) for s in range(int(seconds_index.max()) + 1)]
    quantiles = np.percentile(values, [1, 5, 25, 50, 75, 95, 99])
    return "\n".join(
        [
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average {os.getloadavg()[0]:.1f}",
            f"reference checks: {len(values)} in {seconds:.0f} s; fastest {fastest:.2f} µs",
            "percentiles 1/5/25/50/75/95/99 (µs): " + " / ".join(f"{q:.1f}" for q in quantiles),
            f"share within 4 % of the fastest: {np.mean(values <= fastest * 1.04):.1%}; "
            f"median / fastest: {np.median(values) / fastest:.3f}",
            "per-second medians (µs): " + ", ".join(f"{v:.1f}" for v in per_second),
        ]
    )


def _big_kernels() -> list[dict[str, Any]]:
    """The sample bench_profiling.py --sample 200 --seed 2 draws, kept to what is >= 100 µs here (a quick look)."""
    ops = sample_ops("standard", 200, seed=2)
    backend = create_backend("onnxruntime", intra_op_threads=1)
    big = []
    for op in ops:
        runnable = backend.prepare_op(op)
        for _ in range(3):
            runnable.time_once()
        if float(np.median([runnable.time_once() for _ in range(9)])) >= 0.9e-4:
            big.append(op.to_dict())
        runnable.close()
    return big


def run_worker(ops_file: Path, repeats: int) -> None:
    """Chunk-level timings of every op, ``repeats`` times, as one JSON document on stdout."""
    ops = [op_from_dict(d) for d in json.loads(ops_file.read_text())]
    backend = create_backend("onnxruntime", intra_op_threads=1)
    gate = ClockGate.for_backend(backend)
    # Real-time priority as the service's protocol takes it; where it is not permitted the numbers carry more noise.
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    records = []
    for repeat in range(repeats):
        for op in ops:
            sessions = [backend.prepare_op(op) for _ in range(3)]
            chunks_per_session = []
            for runnable in sessions:
                for _ in range(3):
                    runnable.time_once()
                chunks = []
                started = time.perf_counter()
                before = _reference_check(gate)
                while time.perf_counter() - started < SESSION_S:
                    runnable.time_once()  # pays for the caches the reference used
                    chunk: list[float] = []
                    chunk_start = time.perf_counter()
                    while time.perf_counter() - chunk_start < CHUNK_S or not chunk:
                        chunk.append(runnable.time_once())
                    after = _reference_check(gate)
                    chunks.append([before, after, chunk])
                    before = after
                chunks_per_session.append(chunks)
            for runnable in sessions:
                runnable.close()
            records.append({"key": op.key, "repeat": repeat, "sessions": chunks_per_session})
    print(json.dumps(records))


def _session_value(chunks: list[Any], nominal: float, estimator: str) -> float:
    slowdown = np.array([np.sqrt(c[0] * c[1]) for c in chunks]) / nominal
    worst = np.array([max(c[0], c[1]) for c in chunks]) / nominal
    medians = np.array([np.median(c[2]) for c in chunks])
    if estimator == "plain":
        return float(np.median(np.concatenate([c[2] for c in chunks])))
    if estimator == "gate":
        pairs = [(float(w), c[2]) for c, w in zip(chunks, worst, strict=True)]
        return float(np.median(select_chunks(pairs, tolerance=0.04, min_runs=15).samples_s))
    if estimator == "ratio":
        return float(np.median(medians / slowdown))
    if estimator == "regression":
        x, y = np.log(slowdown), np.log(medians)
        slope = float(np.clip(np.polyfit(x, y, 1)[0], 0.0, 1.0)) if x.std() > 1e-3 else 0.0
        return float(np.exp(np.median(y - slope * x)))
    if estimator == "p10":
        return float(np.percentile(medians, 10))
    return float(medians.min())


def estimators(repeats: int) -> str:
    ops = _big_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        ops_file = Path(tmp) / "ops.json"
        ops_file.write_text(json.dumps(ops))
        command = [sys.executable, __file__, "--worker", str(ops_file), "--repeats", str(repeats)]
        passes = [
            json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout) for _ in range(2)
        ]
    checks = [c[0] for records in passes for r in records for s in r["sessions"] for c in s]
    nominal = float(min(checks))
    values = {
        (e, p, r["repeat"], r["key"]): float(np.median([_session_value(s, nominal, e) for s in r["sessions"]]))
        for e in ESTIMATORS
        for p, records in enumerate(passes)
        for r in records
    }
    keys = sorted({r["key"] for r in passes[0]})

    def rel(a: float, b: float) -> float:
        return abs(a - b) / ((a + b) / 2)

    lines = [
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(keys)} kernels >= ~100 µs, "
        f"{repeats} repeats per process, 2 processes; reference slowdown over the run: median "
        f"{np.median(checks) / nominal:.3f}, p90 {np.percentile(checks, 90) / nominal:.3f}",
        "",
        "| estimator | two processes within 2 % | median difference | p90 | same process, repeats within 2 % |",
        "|---|---|---|---|---|",
    ]
    for e in ESTIMATORS:
        cross = np.array([rel(values[(e, 0, r, k)], values[(e, 1, r, k)]) for r in range(repeats) for k in keys])
        within = np.array(
            [
                rel(values[(e, p, r1, k)], values[(e, p, r2, k)])
                for p in (0, 1)
                for r1, r2 in itertools.combinations(range(repeats), 2)
                for k in keys
            ]
            or [np.nan]
        )
        lines.append(
            f"| {e} | {np.mean(cross <= 0.02):.1%} | {np.median(cross):.2%} | {np.percentile(cross, 90):.2%} "
            f"| {np.mean(within <= 0.02):.1%} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace-s", type=float, default=0.0, help="trace the reference kernel for this long")
    parser.add_argument("--estimators", action="store_true", help="compare summaries of the same chunk timings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.repeats)
        return 0
    if args.trace_s <= 0 and not args.estimators:
        parser.error("give --trace-s S and/or --estimators")
    if args.trace_s > 0:
        print(trace(args.trace_s))
    if args.estimators:
        print(estimators(args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
