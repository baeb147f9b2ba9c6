"""Latency of the prediction endpoints over real HTTP: ``POST /v1/predict`` with 100 ops, and ``POST /v1/tables``.

Starts a real ``latency-service serve`` on a loopback port with a throwaway SQLite store, profiles a small explicit
grid (short measurement settings: the point here is the API, not the timings), fits, then times the requests from a
client in this process.  Prints a Markdown table.

    python bench/bench_predict_api.py [--requests 50]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.local_service import local_service
from predictors.ops import Conv2d, OpSpec, op_from_dict


def profiling_grid() -> list[OpSpec]:
    rng = random.Random(0)
    ops: list[OpSpec] = []
    for _ in range(40):
        cin, cout = rng.choice([8, 12, 16, 24, 32, 48, 64]), rng.choice([8, 16, 24, 32, 64])
        ops.append(Conv2d(cin=cin, cout=cout, hw=rng.choice([8, 14, 28]), k=rng.choice([1, 3])))
    for c in (8, 16, 32, 64):
        ops.append(op_from_dict({"op": "relu", "c": c, "hw": 14}))
    return ops


def request_ops(n: int) -> list[dict[str, object]]:
    rng = random.Random(1)
    out: list[dict[str, object]] = []
    for _ in range(n):
        cin, cout = rng.randint(4, 96), rng.randint(4, 96)
        out.append(Conv2d(cin=cin, cout=cout, hw=rng.choice([7, 14, 28]), k=rng.choice([1, 3, 5])).to_dict())
    return out


def timed(client: httpx.Client, path: str, body: dict[str, object], requests: int) -> list[float]:
    client.post(path, json=body).raise_for_status()  # warm-up: first request loads the predictor
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        client.post(path, json=body).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as lock_dir:
        # Short measurement settings and a private lock: the point here is the API, not the timings.
        settings = {
            "FIGS_MIN_TIME_S": "0.05",
            "FIGS_MAX_TIME_S": "0.2",
            "FIGS_MEASURE_LOCK_PATH": str(Path(lock_dir) / "measure.lock"),
        }
        with local_service(settings) as url, httpx.Client(base_url=url, timeout=600) as client:
            job = client.post("/v1/jobs", json={"ops": [op.to_dict() for op in profiling_grid()]}).json()
            while client.get(f"/v1/jobs/{job['id']}").json()["status"] in ("queued", "running"):
                time.sleep(0.5)
            client.post("/v1/predictors/fit").raise_for_status()
            predict = timed(client, "/v1/predict", {"ops": request_ops(100)}, args.requests)
            full = Conv2d(cin=64, cout=64, hw=14, k=1).to_dict()
            counts = list(range(1, 65))
            table_body = {"layers": [{"op": full, "cin_counts": counts, "cout_counts": counts}] * 10}
            tables = timed(client, "/v1/tables", table_body, max(5, args.requests // 5))
    load = os.getloadavg()
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"date {now}; load average {load[0]:.1f}; {os.cpu_count()} cpus")
    print("| request | n | median ms | p90 ms |")
    print("|---|---|---|---|")
    for name, values in (("POST /v1/predict, 100 conv ops", predict), ("POST /v1/tables, 10 layers × 64×64", tables)):
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"| {name} | {len(values)} | {statistics.median(values):.1f} | {p90:.1f} |")


if __name__ == "__main__":
    main()
