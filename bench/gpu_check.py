"""GPU check: on a real CUDA GPU, run the torch-CUDA (and, where installed, TensorRT) backend through the service.

For each backend: start ``latency-service serve --backend NAME`` on a loopback port with a throwaway SQLite store,
profile a grid of conv variants through ``POST /v1/jobs``, fit (``POST /v1/predictors/fit``), predict held-out
variants (``POST /v1/predict``), then measure those held-out variants too and print a Markdown table of predicted vs
measured latency with the card's name, ready for BENCHMARKS.md.

    python bench/gpu_check.py                       # torch_cuda and tensorrt, whichever are available
    python bench/gpu_check.py --backends onnxruntime  # the same code path on a CPU, to check the script itself

Without a CUDA device it prints why and exits 0: there is nothing to check.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from latency_service.backends import BackendUnavailable, backend_class
from predictors.ops import Conv2d, OpSpec

TOKEN = "gpu-check"


def training_grid() -> list[OpSpec]:
    """Channel sweeps of the convs GPUs see most, at two resolutions (the staircase shows up in channels)."""
    ops: list[OpSpec] = []
    for hw in (28, 56):
        for k in (1, 3):
            for c in (16, 32, 48, 64, 96, 128, 192, 256):
                ops.append(Conv2d(cin=c, cout=c, hw=hw, k=k, bn=True, act="relu"))
        ops.append(Conv2d(cin=64, cout=64, hw=hw, k=3, groups=64, bn=True, act="relu"))
        ops.append(Conv2d(cin=128, cout=128, hw=hw, k=3, groups=128, bn=True, act="relu"))
    return ops


def held_out_grid() -> list[OpSpec]:
    return [
        Conv2d(cin=c, cout=2 * c, hw=hw, k=k, bn=True, act="relu")
        for hw, k, c in ((28, 1, 40), (28, 3, 80), (56, 1, 112), (56, 3, 24), (28, 3, 160), (56, 3, 72))
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_job(client: httpx.Client, job_id: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed", "cancelled"):
            return dict(job)
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s} s")


def check_backend(name: str, data_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Serve ``name``, profile, fit, predict, measure; returns the rows of the report."""
    port = _free_port()
    command = [sys.executable, "-m", "latency_service", "serve", "--backend", name, "--port", str(port)]
    command += ["--db", f"sqlite:///{data_dir / f'{name}.db'}", "--token", TOKEN, "--data-dir", str(data_dir)]
    log = (data_dir / f"{name}.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60.0) as client:
            for _ in range(120):
                try:
                    if client.get("/v1/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            device = client.get("/v1/device").json()
            started = time.monotonic()
            job = client.post("/v1/jobs", json={"ops": [op.to_dict() for op in training_grid()]}).json()
            finished = _wait_job(client, job["id"], timeout_s)
            profile_s = time.monotonic() - started
            fit = client.post("/v1/predictors/fit").json()
            held_out = held_out_grid()
            predicted = client.post("/v1/predict", json={"ops": [op.to_dict() for op in held_out]}).json()
            job = client.post("/v1/jobs", json={"ops": [op.to_dict() for op in held_out]}).json()
            _wait_job(client, job["id"], timeout_s)
            measured = {m["key"]: m["median_ms"] for m in client.get("/v1/measurements?limit=1000").json()["items"]}
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = [
        {"op": op, "predicted_ms": p, "source": src, "measured_ms": measured.get(op.key)}
        for op, p, src in zip(held_out, predicted["latency_ms"], predicted["source"], strict=True)
    ]
    return {"device": device, "job": finished, "profile_s": profile_s, "fit": fit, "rows": rows}


def _describe(op: OpSpec) -> str:
    assert isinstance(op, Conv2d)
    return f"conv {op.cin}->{op.cout} k{op.k} @{op.hw}px"


def markdown(name: str, card: str, result: dict[str, Any]) -> str:
    environment = result["device"]
    lines = [
        f"### {name} on {card}",
        "",
        f"Backend version {environment.get('backend_version')}; profiled {result['job']['done']} variants "
        f"({result['job']['failed']} failed) in {result['profile_s']:.0f} s; predictor {result['fit']['version']}: "
        + ", ".join(
            f"{p['op']} MAPE {p['mape'] * 100:.1f} % ({p['within_10pct'] * 100:.0f} % within ±10 %)"
            for p in result["fit"]["predictors"]
        ),
        "",
        "| held-out variant | predicted ms | source | measured ms | error |",
        "|---|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        measured = row["measured_ms"]
        error = f"{(row['predicted_ms'] - measured) / measured * 100:+.1f} %" if measured else "n/a"
        measured_text = f"{measured:.4f}" if measured else "n/a"
        cells = [_describe(row["op"]), f"{row['predicted_ms']:.4f}", row["source"], measured_text, error]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _card_name(name: str) -> str:
    if name in ("torch_cuda", "tensorrt"):
        import torch

        return str(torch.cuda.get_device_name(0))
    return f"{platform.processor() or platform.machine()} CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch_cuda,tensorrt", help="comma-separated backend names")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="limit per profiling job")
    args = parser.parse_args(argv)
    available, reasons = [], []
    for name in args.backends.split(","):
        try:
            status = backend_class(name).status()
        except (KeyError, BackendUnavailable) as exc:
            reasons.append(f"{name}: {exc}")
            continue
        (available.append(name) if status.available else reasons.append(f"{name}: {status.reason}"))
    for reason in reasons:
        print(f"skipped {reason}", file=sys.stderr)
    if not available:
        print("gpu_check: no requested backend can run here; nothing measured.", file=sys.stderr)
        return 0
    sections = []
    with tempfile.TemporaryDirectory(prefix="figs-gpu-check-") as tmp:
        for name in available:
            result = check_backend(name, Path(tmp), args.timeout_s)
            sections.append(markdown(name, _card_name(name), result))
    print(
        f"<!-- bench/gpu_check.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, host {os.uname().nodename} -->"
    )
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
