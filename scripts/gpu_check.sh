#!/usr/bin/env bash
# The GPU check of issue 7, for a lent GPU machine; about 4-6 minutes on one H200 (budget: 8).
#
#   1. the `cuda`-marked tests (pytest -m cuda; they skip on machines without CUDA);
#   2. LM PPO tokens/s and peak GPU memory, proxrl vs TRL 1.12 on the same GPU, on the LM benchmark workload
#      of benchmarks/_lm_workload.py (64 prompts x 32 sampled tokens per update, 4 epochs x 4 minibatches of
#      16, separate frozen reference, critic and reward model, k1 KL penalty 0.05, GAE gamma 1 lambda 0.95)
#      scaled to a GPT-2-124M-shaped random model: 12 layers, d=768, 12 heads (the workload's 1024-token
#      vocabulary, so ~86M parameters per model rather than GPT-2's 124M, whose 50257 x 768 embedding
#      is the difference). Sides:
#        trl          TRL 1.12.0's PPOTrainer (benchmarks/_trl_side.py), fp32, its defaults;
#        proxrl       proxrl ppo with TRL's settings: fp32 (TF32 matmuls), separate critic;
#        proxrl_fast  proxrl ppo --bf16 true --value-head-on-policy true (proxrl's fast options).
#      Issue 7's targets: proxrl_fast >= 2x TRL's tokens/s, peak GPU memory <= 0.7x TRL's.
#   3. with 2+ GPUs: proxrl_fast under `torchrun --standalone --nproc_per_node 2` (global batch unchanged).
#
# The proxrl sides run `proxrl ppo --device cuda` (TF32 matmuls; `--bf16 true` = bf16 autocast of every forward,
#   weights and AdamW state fp32) in-process, so the CUDA allocator's peak is the run's own; under torchrun each
#   process takes cuda:LOCAL_RANK and the global batch (64 prompts, minibatch 16) is split over the GPUs. A CLI
#   without --device (an old checkout) makes the script skip them rather than silently measure the CPU.
#
# Usage, in the repository root of the GPU machine:  bash scripts/gpu_check.sh [RESULTS_DIR]
#   env: PYTHON (default python3), UPDATES (updates per run incl. 1 warm-up, default 5), SKIP_TRL=1,
#        DEVICE (default cuda; DEVICE=cpu SHAPE=2,128,4 UPDATES=2 SKIP_TRL=1 is a quick smoke run on a CPU),
#        SHAPE (n_layer,n_embd,n_head; default 12,768,12).
# Results: RESULTS_DIR/gpu_check.json (+ per-side JSON and logs); default $OUT if set, else a temp dir.
#
# Packages the GPU image lacks (trl, datasets and its dill/multiprocess, gymnasium) travel as wheels in .whl/;
# prepare them once on the development machine, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl trl==1.12.0 datasets dill multiprocess gymnasium farama-notifications
# and carry `.whl` with the run; this script installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
UPDATES=${UPDATES:-5}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-12,768,12}
RES=${1:-${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}}
mkdir -p "$RES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_EXPERIMENTAL_SILENCE=1
t_start=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - t_start ))"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    say "installing carried wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

say "machine"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
    | tee "$RES/gpu.txt" || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
    | tee -a "$RES/gpu.txt"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" != cpu ] && [ "$NGPU" -lt 1 ]; then echo "no CUDA device visible; nothing to check" >&2; exit 1; fi

# ------------------------------------------------------------------------------------------- 1. cuda tests
say "1. cuda-marked tests"
set +e
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$RES/cuda_tests.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e
# pytest exit 5 = no test collected (e.g. before any cuda test exists): not a failure of the check
[ "$TESTS_RC" = 5 ] && TESTS_RC=0

# ------------------------------------------------------------------------------------------- 2. workload
WD="$RES/workload"
say "2. workload: GPT-2 shape $SHAPE (benchmarks/_lm_workload.py)"
"$PY" - "$WD" "$SHAPE" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import _lm_workload as W

wd, (n_layer, n_embd, n_head) = Path(sys.argv[1]), map(int, sys.argv[2].split(","))
W.save_workload(wd, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
tok = W.build_tokenizer()
# proxrl's CLI takes prompt strings: the workload's prompt ids, decoded (byte-level BPE re-encodes them)
lines = [json.dumps({"prompt": tok.decode(ids)}) for ids in W.load_prompt_ids(wd)]
(wd / "prompts.jsonl").write_text("\n".join(lines) + "\n")
print("saved", wd, "prompts", len(lines))
EOF

HAS_DEVICE=0
"$PY" -m proxrl.cli ppo --help 2>/dev/null | grep -q -- "--device" && HAS_DEVICE=1

# One proxrl side: `proxrl ppo` in-process (so the CUDA allocator's peak is this run's), fixed workload flags.
cat > "$RES/proxrl_side.py" <<'EOF'
import json, os, statistics, sys
from pathlib import Path
import torch

wd, run, updates, name, device, has_device, *extra = sys.argv[1:]
rank = int(os.environ.get("RANK", "0"))
flags = ["ppo", "--policy", f"{wd}/policy", "--reward-model", f"{wd}/reward", "--critic", f"{wd}/value",
         "--prompts", f"{wd}/prompts.jsonl", "--run-dir", run, "--seed", "0", "--total-updates", updates,
         "--rollout-size", "64", "--group-size", "1", "--minibatch-size", "16", "--grad-accum-steps", "1",
         "--epochs", "4", "--learning-rate", "1e-5", "--lr-schedule", "linear", "--max-grad-norm", "none",
         "--gamma", "1.0", "--gae-lambda", "0.95", "--clip-coef", "0.2", "--value-clip-coef", "0.2",
         "--value-coef", "0.1", "--entropy-coef", "0.0", "--kl-coef", "0.05", "--max-new-tokens", "32",
         "--temperature", "1.0", "--sample-every", "0", "--checkpoint-every", "0", "--plot", "false", *extra]
if has_device == "1":
    flags += ["--device", device]  # issue 7's option; never run a CUDA check without it (it would use the CPU)
from proxrl.cli import main

cuda = torch.cuda.is_available() and device != "cpu"
if cuda:
    torch.cuda.reset_peak_memory_stats()
rc = main(flags)
if rc:
    sys.exit(rc)
if rank == 0:
    rows = [json.loads(line) for line in open(Path(run) / "metrics.jsonl")]
    steady = rows[1:] or rows[-1:]  # the first update is the warm-up
    out = {
        "side": name, "updates_measured": len(steady),
        # tokens/s = generated tokens / (rollout + advantages + training) seconds of the update (proxrl's metric)
        "tok_per_s": statistics.median(r["tokens_per_second"] for r in steady),
        "s_per_update": statistics.median(r["time_update"] for r in steady),
        "gen_s": statistics.median(r["time_generation"] for r in steady),
        "train_s": statistics.median(r["time_training"] for r in steady),
        "response_length": statistics.median(r["response_length"] for r in steady),
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    Path(f"{run}.json").write_text(json.dumps(out, indent=1))
    print("RESULT", json.dumps(out))
EOF

run_proxrl() {  # name, launcher ("" or torchrun), extra flags...
    local name=$1 launcher=$2
    shift 2
    say "proxrl side: $name"
    local cmd=("$PY")
    [ -n "$launcher" ] && cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node 2)
    set +e
    timeout 300 "${cmd[@]}" "$RES/proxrl_side.py" "$WD" "$RES/run_$name" "$UPDATES" "$name" "$DEVICE" \
        "$HAS_DEVICE" "$@" 2>&1 | tee "$RES/$name.log"
    local rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" = 0 ] || echo "!! proxrl side $name failed (exit $rc); see $RES/$name.log"
}

if [ "$HAS_DEVICE" = 1 ] || [ "$DEVICE" = cpu ]; then
    run_proxrl proxrl "" --bf16 false --value-head-on-policy false
    run_proxrl proxrl_fast "" --bf16 true --value-head-on-policy true
else
    say "SKIPPED proxrl sides: this checkout's 'proxrl ppo' has no --device option"
fi

if [ "${SKIP_TRL:-0}" != 1 ]; then
    say "TRL side (TRL 1.12 PPOTrainer, fp32, on $DEVICE)"
    set +e
    timeout 300 "$PY" - "$RES/trl.json" "$UPDATES" "$SHAPE" "$DEVICE" <<'EOF' 2>&1 | tee "$RES/trl.log"
import json, statistics, sys
sys.path.insert(0, "benchmarks")
import _lm_workload as W

out, updates, shape, device = sys.argv[1:]
n_layer, n_embd, n_head = map(int, shape.split(","))
W.CONFIGS["check"] = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
import torch
import trl.experimental.ppo as tep

if device != "cpu":
    orig = tep.PPOConfig

    def on_gpu(**kw):  # _trl_side.py pins the CPU (use_cpu=True) for the CPU benchmark; here TRL uses the GPU
        kw["use_cpu"] = False
        return orig(**kw)

    tep.PPOConfig = on_gpu
    torch.cuda.reset_peak_memory_stats()
import _trl_side

sys.argv = ["_trl_side.py", "--size", "check", "--updates", updates, "--threads", "4", "--json", out]
_trl_side.main()
res = json.load(open(out))
steady = res["updates"][1:] or res["updates"][-1:]
summary = {
    "side": "trl", "updates_measured": len(steady),
    "tok_per_s": statistics.median(W.BATCH * W.RESPONSE_LEN / u["total_s"] for u in steady),
    "s_per_update": statistics.median(u["total_s"] for u in steady),
    "gen_s": statistics.median(u["gen_s"] for u in steady),
    "train_s": statistics.median(u["train_s"] for u in steady),
    "response_length": W.RESPONSE_LEN,
    "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None,
    "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device != "cpu" else None,
    "world_size": 1,
}
json.dump(summary, open(out.replace(".json", "_summary.json"), "w"), indent=1)
print("RESULT", json.dumps(summary))
EOF
    TRL_RC=${PIPESTATUS[0]}
    set -e
    [ "$TRL_RC" = 0 ] || echo "!! TRL side failed (exit $TRL_RC); see $RES/trl.log (needs trl==1.12.0 and datasets)"
fi

# ------------------------------------------------------------------------------------------- 3. two GPUs
if [ "$NGPU" -ge 2 ] && [ "$HAS_DEVICE" = 1 ]; then
    run_proxrl proxrl_fast_2gpu torchrun --bf16 true --value-head-on-policy true
else
    say "3. skipped the 2-process run ($NGPU GPU(s) visible)"
fi

# ------------------------------------------------------------------------------------------- summary
say "summary"
"$PY" - "$RES" "$TESTS_RC" "$SHAPE" <<'EOF'
import json, sys
from pathlib import Path

res, tests_rc, shape = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sides = {}
for name, f in (("trl", "trl_summary.json"), ("proxrl", "run_proxrl.json"), ("proxrl_fast", "run_proxrl_fast.json"),
                ("proxrl_fast_2gpu", "run_proxrl_fast_2gpu.json")):
    if (res / f).is_file():
        sides[name] = json.loads((res / f).read_text())
print(f"model shape (n_layer, n_embd, n_head) = {shape}; cuda tests exit code {tests_rc}")
print(f"{'side':18s} {'tok/s':>9s} {'s/update':>9s} {'gen s':>7s} {'train s':>8s} {'peak alloc GiB':>15s} {'x TRL tok/s':>12s} {'x TRL mem':>10s}")
trl = sides.get("trl")
ratios = {}
for name, s in sides.items():
    r_tps = s["tok_per_s"] / trl["tok_per_s"] if trl else float("nan")
    r_mem = (s["peak_alloc_gib"] / trl["peak_alloc_gib"]) if trl and s["peak_alloc_gib"] and trl["peak_alloc_gib"] else float("nan")
    ratios[name] = {"tok_per_s_vs_trl": r_tps, "peak_mem_vs_trl": r_mem}
    peak = f"{s['peak_alloc_gib']:.2f}" if s["peak_alloc_gib"] is not None else "-"
    print(f"{name:18s} {s['tok_per_s']:9.0f} {s['s_per_update']:9.3f} {s['gen_s']:7.3f} {s['train_s']:8.3f} {peak:>15s} {r_tps:12.2f} {r_mem:10.2f}")
if "proxrl_fast" in ratios and trl:
    r = ratios["proxrl_fast"]
    print(f"targets (issue 7): tokens/s >= 2x TRL: {'MET' if r['tok_per_s_vs_trl'] >= 2 else 'NOT MET'} "
          f"({r['tok_per_s_vs_trl']:.2f}x); peak memory <= 0.7x TRL: "
          f"{'MET' if r['peak_mem_vs_trl'] <= 0.7 else 'NOT MET'} ({r['peak_mem_vs_trl']:.2f}x)")
(res / "gpu_check.json").write_text(json.dumps({"shape": shape, "cuda_tests_rc": tests_rc, "sides": sides,
                                                "ratios": ratios}, indent=1))
print("wrote", res / "gpu_check.json")
EOF
say "done"
exit "$TESTS_RC"
