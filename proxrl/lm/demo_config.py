"""Options and sizes of ``proxrl demo`` (no torch import here: ``proxrl demo --help`` builds its flags from this)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from proxrl.config import check, opt

__all__ = ["DemoConfig", "DemoSizes", "SIZES"]


@dataclass
class DemoConfig:
    """Options of ``proxrl demo``."""

    task: Literal["sentiment", "arithmetic"] = opt("sentiment", "built-in task: 'sentiment' (Austen + VADER preferences -> reward model -> PPO) or 'arithmetic' (addition, exact-match reward)")
    run_dir: str | None = opt(None, "directory for every stage's output (default: runs/demo_<task>_<timestamp>)")
    seed: int = opt(0, "random seed of every stage")
    quick: bool = opt(False, "tiny sizes: a smoke test of the whole pipeline in well under a minute (no real improvement expected)")
    threads: int = opt(2, "torch CPU threads (0 = torch's default)")
    samples: int = opt(4, "before/after samples printed at the end")
    progress: bool = opt(True, "progress bars (shown on a terminal only)")
    device: str = opt("auto", "where the SFT, reward-model and PPO stages train: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps (the before/after evaluation runs on the CPU)")

    def __post_init__(self) -> None:
        check(self.task in ("sentiment", "arithmetic"), f"task={self.task!r} must be 'sentiment' or 'arithmetic'")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")
        check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device.strip().lower())
              is not None, f"device={self.device!r} must be auto, cpu, cuda, cuda:N or mps")
        check(self.samples >= 0, f"samples={self.samples} must be >= 0")
        check(self.run_dir is None or bool(self.run_dir), "run_dir is empty; give --run-dir DIR")


@dataclass(frozen=True)
class DemoSizes:
    """Every size of one demo run (derived from task and ``quick``; never part of the user config)."""

    # model
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    max_length: int
    # SFT
    sft_examples: int
    sft_steps: int
    sft_batch: int
    sft_lr: float
    # preference data + reward model (sentiment)
    pair_prompts: int
    pair_samples: int
    rm_epochs: float
    rm_batch: int
    rm_lr: float
    # PPO
    ppo_updates: int
    ppo_rollout: int
    ppo_minibatch: int
    ppo_epochs: int
    ppo_lr: float
    kl_coef: float
    max_new_tokens: int
    temperature: float
    # evaluation
    eval_prompts: int
    # arithmetic: probability that the SFT labeller drops the carries of a problem that carries
    carry_error: float = 0.0
    # PPO KL control: adaptive beta (Ziegler et al. 2019) towards kl_target nats per completion
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    entropy_coef: float = 0.0


SIZES: dict[tuple[str, bool], DemoSizes] = {
    ("sentiment", False): DemoSizes(
        vocab_size=2048, n_layer=4, n_embd=128, n_head=4, n_positions=96, max_length=48,
        sft_examples=0, sft_steps=1000, sft_batch=32, sft_lr=2e-3,
        pair_prompts=1000, pair_samples=4, rm_epochs=2.0, rm_batch=32, rm_lr=3e-4,
        # beta 0.3: KL(PPO || SFT) ~2 nats, no collapse onto one stock phrase (see docs/rlhf.md, "The built-in demo")
        ppo_updates=60, ppo_rollout=32, ppo_minibatch=16, ppo_epochs=4, ppo_lr=5e-5, kl_coef=0.3,
        max_new_tokens=20, temperature=0.7, eval_prompts=200),
    ("sentiment", True): DemoSizes(
        vocab_size=300, n_layer=1, n_embd=32, n_head=2, n_positions=64, max_length=32,
        sft_examples=400, sft_steps=20, sft_batch=16, sft_lr=3e-3,
        pair_prompts=48, pair_samples=4, rm_epochs=1.0, rm_batch=8, rm_lr=1e-3,
        ppo_updates=2, ppo_rollout=8, ppo_minibatch=4, ppo_epochs=1, ppo_lr=1e-4, kl_coef=0.3,
        max_new_tokens=8, temperature=0.7, eval_prompts=16),
    ("arithmetic", False): DemoSizes(
        vocab_size=0, n_layer=2, n_embd=96, n_head=4, n_positions=32, max_length=16,
        sft_examples=9000, sft_steps=900, sft_batch=64, sft_lr=3e-3,
        pair_prompts=0, pair_samples=0, rm_epochs=0.0, rm_batch=0, rm_lr=0.0,
        ppo_updates=120, ppo_rollout=64, ppo_minibatch=32, ppo_epochs=4, ppo_lr=3e-5, kl_coef=0.01,
        max_new_tokens=6, temperature=1.0, eval_prompts=500, carry_error=0.6),
    ("arithmetic", True): DemoSizes(
        vocab_size=0, n_layer=1, n_embd=32, n_head=2, n_positions=32, max_length=16,
        sft_examples=400, sft_steps=20, sft_batch=16, sft_lr=3e-3,
        pair_prompts=0, pair_samples=0, rm_epochs=0.0, rm_batch=0, rm_lr=0.0,
        ppo_updates=2, ppo_rollout=8, ppo_minibatch=4, ppo_epochs=1, ppo_lr=1e-4, kl_coef=0.01,
        max_new_tokens=6, temperature=1.0, eval_prompts=32, carry_error=0.6),
}
