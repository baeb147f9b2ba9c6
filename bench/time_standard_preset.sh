#!/usr/bin/env bash
# The `standard` preset end to end on a fresh SQLite store, timed: operator grid + in-context kernel profiling
# (both inside `profile`) + operator predictor fits.  Issue 2/3's budget is 20 minutes on the 2-core dev machine.
#   bash bench/time_standard_preset.sh
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=$(mktemp -d /tmp/figs-standard-XXXX)
echo "data dir $data_dir; load average $(cut -d' ' -f1 /proc/loadavg)"
start=$(date +%s)
.venv/bin/latency-service profile --preset standard --data-dir "$data_dir" > "$data_dir/profile.log" 2>&1
profiled=$(date +%s)
.venv/bin/latency-service fit --data-dir "$data_dir" > "$data_dir/fit.log" 2>&1
fitted=$(date +%s)
echo "profile $((profiled - start)) s, fit $((fitted - profiled)) s, total $((fitted - start)) s;" \
  "load average $(cut -d' ' -f1 /proc/loadavg)"
tail -25 "$data_dir/fit.log"
