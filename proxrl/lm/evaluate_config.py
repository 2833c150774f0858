"""Options of ``proxrl evaluate`` (held-out evaluation of a policy against a reference; no torch import here).

The logic lives in :mod:`proxrl.lm.heldout`; ``proxrl evaluate --help`` builds its flags from this module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from proxrl.config import check, opt

__all__ = ["EvaluateConfig"]

DATA_FORMATS = "JSONL, JSON, CSV, Parquet, a save_to_disk directory or a hub name org/name[:split]"


@dataclass
class EvaluateConfig:
    """Options of :func:`proxrl.lm.heldout.run_evaluate` (one ``proxrl evaluate --flag`` each)."""

    # ---- models, prompts, reward
    policy: str = opt("", "directory of the causal LM to evaluate (e.g. a PPO run's RUN_DIR/policy)")
    reference: str | None = opt(None, "directory of the reference causal LM (e.g. the SFT model): its samples are scored by the same scorer for the win rate, and the KL(policy || reference) is measured on the policy's samples; none = policy-only metrics")
    prompts: str = opt("", f"held-out prompts: {DATA_FORMATS} with a prompt column (a string or a list of messages per row), or a built-in task name (its held-out split)")
    prompt_column: str = opt("prompt", "column of --prompts holding the prompt")
    reward_model: str | None = opt(None, "directory of a scalar reward model (proxrl reward-model output); give this or --reward-fn")
    reward_fn: str | None = opt(None, "reward function 'pkg.module:func' or 'path/file.py:func' called as func(prompts, completions) -> list of floats; give this or --reward-model")
    reward_timeout: float = opt(300.0, "seconds a reward function may take for one batch before the evaluation stops with an error")
    chat_template: str = opt("auto", "auto (the policy tokenizer's own template, if any), none (plain text) or PATH.jinja; prompts are rendered with the generation prompt and the template's end-of-turn token ends a completion")
    # ---- sampling
    max_new_tokens: int = opt(32, "maximum tokens sampled per completion")
    max_prompt_length: int = opt(256, "prompts longer than this many tokens keep their last tokens")
    temperature: float = opt(0.7, "sampling temperature (PPO's default); 0 = greedy. Log-probs for the KL are taken at this temperature (at 1 when greedy)")
    stop_strings: str = opt("", "comma-separated strings that end a completion (like EOS; '\\n' = newline); empty = none")
    seed: int = opt(0, "sampling seed; the policy and the reference are sampled with the same seed")
    num_prompts: int = opt(256, "evaluate the first N prompts; 0 = all")
    batch_size: int = opt(16, "prompts per generation / scoring batch")
    # ---- output
    out: str = opt("runs/evaluate", "directory for report.json, rewards.png, samples.md and completions.jsonl (files there of the same names are replaced)")
    sample_rows: int = opt(8, "rows of the side-by-side table in samples.md")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default")
    device: str = opt("auto", "where the models run: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps")
    trust_remote_code: bool = opt(False, "allow model code shipped in a model directory (off: only built-in architectures)")

    def __post_init__(self) -> None:
        check(bool(self.reward_model) != bool(self.reward_fn),
              "give exactly one of --reward-model DIR or --reward-fn module:function (got "
              + ("both" if self.reward_model else "neither") + ")")
        check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        check(self.max_prompt_length >= 1, f"max_prompt_length={self.max_prompt_length} must be >= 1")
        check(self.temperature >= 0 and math.isfinite(self.temperature),
              f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        check(self.num_prompts >= 0, f"num_prompts={self.num_prompts} must be >= 0 (0 = all)")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.sample_rows >= 0, f"sample_rows={self.sample_rows} must be >= 0")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")
        check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device.strip().lower())
              is not None, f"device={self.device!r} must be auto, cpu, cuda, cuda:N or mps")
        check(self.reward_timeout > 0 and math.isfinite(self.reward_timeout),
              f"reward_timeout={self.reward_timeout} must be > 0 seconds")
        check(bool(self.out), "out is empty; give --out DIR")
        check(bool(self.prompt_column), "prompt_column is empty; give --prompt-column NAME")
        check(self.chat_template.strip() != "", "chat_template is empty; give auto, none or PATH.jinja")

    @property
    def stop_string_list(self) -> tuple[str, ...]:
        """``stop_strings`` split at commas, ``\\n`` read as a newline (as ``proxrl ppo`` reads it)."""
        return tuple(p.replace("\\n", "\n") for p in self.stop_strings.split(",") if p)
