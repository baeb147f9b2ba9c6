#!/usr/bin/env bash
# Creates .venv and installs the project with the search client and dev tools.
# torch is pinned to 2.13.0: on this CPU machine that is a local CPU wheel; any other version pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[search,postgres,litert,dev]"
echo "setup: $(python -c 'import torch, onnxruntime, sklearn; print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, scikit-learn {sklearn.__version__}")')"
