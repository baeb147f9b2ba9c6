#!/usr/bin/env bash
# The README's main command: set up, start a local latency service (SQLite store, onnxruntime CPU backend), profile
# the `smoke` preset, fit predictors, print predictions, run a short FiGS search on scikit-learn's bundled digits
# with a latency target, export the compact network and print its measured latency next to target and prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

RUN_DIR=${FIGS_DEMO_DIR:-runs/demo}
STEPS=${FIGS_DEMO_STEPS:-300}
TARGET_MS=${FIGS_DEMO_TARGET_MS:-0.06}
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

echo "== starting latency service on $URL (store: $RUN_DIR/service/latency.db)"
latency-service serve --data-dir "$RUN_DIR/service" --port "$PORT" --log-level warning >"$RUN_DIR/service.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true' EXIT
python - "$URL" <<'PY'
import sys, time, httpx
url = sys.argv[1]
for _ in range(300):
    try:
        if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
            print(httpx.get(f"{url}/v1/device", timeout=5).json())
            break
    except httpx.HTTPError:
        time.sleep(0.2)
else:
    sys.exit(f"service at {url} did not come up; see the service log")
PY

echo "== profiling the smoke preset"
figs farm profile --device "$URL" --preset smoke

echo "== fitting predictors"
python - "$URL" <<'PY'
import sys, httpx
from rich.console import Console
from rich.table import Table
url = sys.argv[1]
fit = httpx.post(f"{url}/v1/predictors/fit", timeout=600).raise_for_status().json()
table = Table("operator", "samples", "CV MAPE", "within ±10 %")
for row in fit["predictors"]:
    mape = "n/a" if row["mape"] is None else f"{100 * row['mape']:.1f} %"
    within = "n/a" if row["within_10pct"] is None else f"{100 * row['within_10pct']:.0f} %"
    table.add_row(row["op"], str(row["n_samples"]), mape, within)
Console().print(table)
ops = [
    {"op": "conv2d", "cin": 32, "cout": 64, "hw": 28, "k": 3, "stride": 1, "bn": True, "act": "relu"},
    {"op": "conv2d", "cin": 96, "cout": 96, "hw": 14, "k": 5, "stride": 1, "groups": 96},
    {"op": "conv2d", "cin": 40, "cout": 24, "hw": 28, "k": 1},
    {"op": "linear", "cin": 512, "cout": 10},
    {"op": "hardswish", "c": 64, "hw": 28},
]
pred = httpx.post(f"{url}/v1/predict", json={"ops": ops}, timeout=60).raise_for_status().json()
table = Table("operator", "latency (ms)", "source")
for op, ms, source in zip(ops, pred["latency_ms"], pred["source"]):
    shape = ", ".join(f"{k}={v}" for k, v in op.items() if k != "op")
    table.add_row(f"{op['op']}({shape})", f"{ms:.4f}", source)
Console().print(table)
print(f"total: {pred['total_ms']:.4f} ms")
PY

echo "== searching on digits: target ${TARGET_MS} ms, ${STEPS} steps"
figs search --data digits --device "$URL" --target-latency-ms "$TARGET_MS" --steps "$STEPS" --out "$RUN_DIR/search"
echo "== done: architecture, ONNX model, plots and report in $RUN_DIR/search"
