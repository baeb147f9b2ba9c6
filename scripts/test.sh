#!/usr/bin/env bash
# The README's test command: set up, lint, type-check, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system_deps.sh
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy latency_service predictors search
pytest -q -ra "$@"
