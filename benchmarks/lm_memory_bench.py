"""PPO on SmolLM2-135M: seconds per update and peak RSS of the compute/memory options of issue 8 section 6.

Variants (each in its own subprocess, so each peak RSS is its own):

* ``vh_extra_forward``: value head on the policy trunk, values from a second policy forward over the finished
  sequences (the rollout before the values came from the generation pass; simulated by wrapping ``generate``);
* ``vh_generation``: value head on the policy trunk, values from the generation pass (no extra forward);
* ``critic``: a separate critic (the default), whole-rollout forwards;
* ``critic_fbs2``: ``--forward-batch-size 2`` (reference, critic and reward forwards 2 rows at a time);
* ``critic_gc``: ``--gradient-checkpointing``.

Workload: the ``arithmetic`` task's prompts rendered with the model's chat template (``--chat-template auto``), its
exact-match reward, LoRA r=8, ``--rollout-size 8`` (one minibatch of 8, 4 epochs), ``--max-new-tokens 24``,
``--threads 1``. Per update: the trainer's own ``time_update``; peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` read
right after the last update (before the final save, which merges LoRA into a copy of the model).

Usage:
    python benchmarks/lm_memory_bench.py --model /tmp/smollm2_model            # all variants, 2 updates each
    python benchmarks/lm_memory_bench.py --model DIR --variants critic,critic_gc --updates 3
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

VARIANTS = {
    "vh_extra_forward": dict(value_head_on_policy=True),
    "vh_generation": dict(value_head_on_policy=True),
    "critic": dict(),
    "critic_fbs2": dict(forward_batch_size=2),
    "critic_gc": dict(gradient_checkpointing=True),
}


def _child(args: argparse.Namespace) -> None:
    import torch

    from proxrl.lm import ppo_trainer, rollout
    from proxrl.lm.logprobs import response_forward
    from proxrl.lm.ppo_config import PPOConfig

    if args.variant == "vh_extra_forward":
        real = rollout.generate

        def generate_then_forward(model, ids, mask, **kw):
            want = kw.pop("return_values", False)
            out = real(model, ids, mask, **kw)
            if want:
                with torch.no_grad():
                    v = response_forward(model, out.sequences, out.attention_mask.long(), out.prompt_len,
                                         kw["temperature"]).values
                out.values = v * out.response_mask
            return out

        rollout.generate = generate_then_forward
    peaks: list[float] = []
    orig = ppo_trainer.PPOTrainer._one_update

    def one_update(self):
        m = orig(self)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)  # GiB (Linux: KiB)
        return m

    ppo_trainer.PPOTrainer._one_update = one_update
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PPOConfig(policy=args.model, prompts="arithmetic", run_dir=os.path.join(tmp, "run"),
                        total_updates=args.updates, rollout_size=8, max_new_tokens=24, lora_r=8, threads=1,
                        learning_rate=1e-4, sample_every=0, checkpoint_every=0, plot=False,
                        **VARIANTS[args.variant])
        ppo_trainer.train_ppo(cfg, progress=False)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "run", "metrics.jsonl"))]
    print(json.dumps({"variant": args.variant, "update_s": [r["time_update"] for r in rows],
                      "generation_s": [r["time_generation"] for r in rows],
                      "forward_s": [r["time_forward"] for r in rows],
                      "training_s": [r["time_training"] for r in rows], "peak_rss_gib": peaks[-1]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="SmolLM2-135M(-Instruct) HF directory")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        _child(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    print("| variant | s / update (each) | generation | ref+critic forwards | training | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--updates", str(args.updates),
                              "--variant", name], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)  # noqa: E731
        print(f"| {name} | {fmt(r['update_s'])} | {fmt(r['generation_s'])} | {fmt(r['forward_s'])} | "
              f"{fmt(r['training_s'])} | {r['peak_rss_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
