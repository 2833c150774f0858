#!/usr/bin/env bash
# Creates .venv (if missing) and installs proxrl with the given extras. torch==2.13.0 goes first: on the
# development and CI machines that is a local CPU wheel; an open range with no torch installed pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-lm}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
log=.venv/pip-install.log
echo "installing proxrl[$extras] into .venv (log: $log) ..."
python -c "import torch" 2>/dev/null || python -m pip install "torch==2.13.0" >"$log" 2>&1 || { cat "$log"; exit 1; }
python -m pip install -e ".[$extras]" >>"$log" 2>&1 || { tail -40 "$log"; exit 1; }
