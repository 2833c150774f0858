#!/usr/bin/env bash
# The main job: installs proxrl into .venv, then runs the offline RLHF pipeline (SFT -> reward model -> PPO)
# on the built-in default task and prints before/after samples and the metric PPO improved.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh lm
. .venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec proxrl demo "$@"
