"""TRL side of benchmarks/lm_bench.py: TRL 1.12's PPOTrainer (``trl.experimental.ppo``) on the workload of
``_lm_workload.py``, with per-update timing split into generation / scoring / training.

Run by lm_bench.py in its own subprocess (so its peak RSS is its own); writes one JSON file.
Needs ``pip install "trl==1.12.0" datasets`` (TRL is not a dependency of proxrl).

TRL's batch arithmetic: batch = per_device_train_batch_size x gradient_accumulation_steps, minibatch =
batch / num_mini_batches, and its micro-batch loop steps the optimizer once per minibatch when
gradient_accumulation_steps = 1. So per_device 64, ga 1, num_mini_batches 4 gives 64 sequences per update and
4 x 4 = 16 optimizer steps of 16 sequences (counted with optimizer hooks and checked).

Timing is done by wrapping TRL's module-level helpers (no TRL code is changed): ``batch_generation`` marks the
end of generation, the first grad-enabled ``forward`` marks the start of training, and a callback's
``on_step_end`` marks the end of an update; one update = from the previous ``on_step_end`` to this one.

Usage: python benchmarks/_trl_side.py --size small --updates 4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _lm_workload as W  # noqa: E402  (sets the offline / OMP env vars before torch is imported)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(W.CONFIGS), default="small")
    ap.add_argument("--updates", type=int, default=4, help="total updates (warm-up included)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    import trl.experimental.ppo.ppo_trainer as tp
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(a.threads)
    shape = W.CONFIGS[a.size]
    t_setup = time.perf_counter()
    tok = W.build_tokenizer()
    prompts = W.build_prompts(tok)
    policy, ref, value, reward = W.build_models(tok, **shape)
    checks = {"policy": W.checksum(policy), "value": W.checksum(value), "reward": W.checksum(reward)}

    now = time.perf_counter
    cur: dict[str, float] = defaultdict(float)
    records: list[dict[str, float]] = []

    orig_gen = tp.batch_generation

    def gen_wrapper(model, queries, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        t0 = now()
        qr, logits = orig_gen(model, queries, *args, **kw)
        cur["gen_end"] = now()
        cur["gen_s"] = cur["gen_end"] - t0
        cur["prompt_width"] = queries.shape[1]
        cur["new_tokens"] = qr.shape[1] - queries.shape[1]
        cur["n_seq"] = qr.shape[0]
        return qr, logits

    orig_fwd = tp.forward

    def fwd_wrapper(model, query_responses, pad_token_id):  # noqa: ANN001
        if torch.is_grad_enabled() and "train_start" not in cur:
            cur["train_start"] = now()
        return orig_fwd(model, query_responses, pad_token_id)

    tp.batch_generation, tp.forward = gen_wrapper, fwd_wrapper

    class UpdateEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            cur["start"] = now()
            cur["cpu_start"] = time.process_time()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            nonlocal cur
            t, c = now(), time.process_time()
            total = t - cur["start"]
            gen, train = cur["gen_s"], t - cur["train_start"]
            records.append({
                "total_s": total, "gen_s": gen, "score_s": cur["train_start"] - cur["gen_end"],
                "train_s": train, "other_s": total - gen - (cur["train_start"] - cur["gen_end"]) - train,
                "prompt_width": int(cur["prompt_width"]), "new_tokens": int(cur["new_tokens"]),
                "n_seq": int(cur["n_seq"]), "opt_steps": int(cur["opt_steps"]), "cpu_s": c - cur["cpu_start"],
                "ru_maxrss_mb": W.peak_rss_mb(), "vm_hwm_mb": W.vm_hwm_mb(),
            })
            cur = defaultdict(float)
            cur["start"], cur["cpu_start"] = t, c

    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="lm_bench_trl_"),
        per_device_train_batch_size=W.BATCH,
        gradient_accumulation_steps=1,
        num_mini_batches=W.MINIBATCHES,
        num_ppo_epochs=W.EPOCHS,
        response_length=W.RESPONSE_LEN,
        total_episodes=W.BATCH * a.updates,
        local_rollout_forward_batch_size=W.BATCH,
        learning_rate=W.LEARNING_RATE,
        temperature=1.0,
        stop_token=None,
        missing_eos_penalty=None,
        kl_coef=W.KL_COEF,
        seed=0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        num_sample_generations=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": prompts}), value_model=value,
                         callbacks=[UpdateEnd()])
    if args.batch_size != W.BATCH:
        raise SystemExit(f"TRL batch_size {args.batch_size} != {W.BATCH}")

    def count_step(*_):  # noqa: ANN002
        cur["opt_steps"] += 1

    trainer.optimizer.optimizer.register_step_post_hook(count_step)  # the torch AdamW inside accelerate's wrapper
    setup_s = time.perf_counter() - t_setup
    rss_before = W.vm_hwm_mb()

    import contextlib
    import io

    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRL prints a metrics dict per update
        trainer.train()

    out = {
        "side": "trl",
        "size": a.size,
        **shape,
        "policy_params": W.nparams(policy),
        "value_params": W.nparams(value),
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "shared_critic": False,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "numpy": np.__version__},
        "checksums": checks,
        "setup_s": setup_s,
        "hwm_before_train_mb": rss_before,
        "updates": records,
    }
    Path(a.json).write_text(json.dumps(out, indent=1))
    bad = [r["opt_steps"] for r in records if r["opt_steps"] != W.EPOCHS * W.MINIBATCHES]
    if bad:
        raise SystemExit(f"TRL ran {bad[0]} optimizer steps in an update, expected {W.EPOCHS * W.MINIBATCHES}")


if __name__ == "__main__":
    main()
