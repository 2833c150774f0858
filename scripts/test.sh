#!/usr/bin/env bash
# The test command: installs everything into .venv, then runs the suite (long end-to-end runs marked
# `slow` are skipped; pass --all to run them too).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
. .venv/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--all" ]; then shift; exec python -m pytest -q "$@"; fi
exec python -m pytest -q -m "not slow" "$@"
