"""PPO's scorer: one function that scores a batch of completed sequences, from a reward function or a reward model.

``score_fn(input_ids, attention_mask, prompt_len, response_mask, prompts, completions) -> (B,) float32`` is what
:func:`proxrl.lm.rollout.collect_rollout` calls once per rollout.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from proxrl.errors import UserError
from proxrl.lm import tasks
from proxrl.lm.positions import last_token_index
from proxrl.lm.ppo_config import PPOConfig
from proxrl.lm.rewards import RewardModelScorer, call_reward_fn, check_finite_scores, load_reward_fn
from proxrl.lm.rollout import autocast_ctx

__all__ = ["ScoreFn", "make_scorer", "reward_model_scorer"]

ScoreFn = Callable[[Tensor, Tensor, int, Tensor, list, list], Tensor]


def make_scorer(cfg: PPOConfig, tokenizer: Any, reward_fn: Callable | None = None) -> ScoreFn:
    """The scorer of a PPO run: ``reward_fn`` if given, else ``cfg.reward_fn`` (called with ``cfg.reward_timeout``),
    else ``cfg.reward_model``, else the reward function of the built-in task named by ``cfg.prompts``."""
    spec = cfg.reward_fn
    if reward_fn is None and not spec and not cfg.reward_model:
        spec = tasks.REWARD_FNS.get(cfg.prompts)  # a built-in task brings its own reward
    if reward_fn is not None or spec:
        fn = reward_fn if reward_fn is not None else load_reward_fn(spec)

        def score_fn(ids: Tensor, attn: Tensor, p: int, rmask: Tensor, prompts: list, completions: list) -> Tensor:
            return call_reward_fn(fn, prompts, completions, timeout=cfg.reward_timeout)

        return score_fn
    if not cfg.reward_model:
        raise UserError("no reward: give --reward-model DIR or --reward-fn module:function")
    return reward_model_scorer(cfg.reward_model, tokenizer, bf16=cfg.bf16, trust_remote_code=cfg.trust_remote_code)


def reward_model_scorer(model_dir: str, tokenizer: Any, bf16: bool = False,
                        trust_remote_code: bool = False) -> ScoreFn:
    """Score with the reward model in ``model_dir`` (trained on ``tokenizer``), read at each row's last response
    token (EOS included): the same position the reward model was trained to score."""
    scorer = RewardModelScorer(model_dir, policy_tokenizer=tokenizer, trust_remote_code=trust_remote_code)

    def score_fn(ids: Tensor, attn: Tensor, p: int, rmask: Tensor, prompts: list, completions: list) -> Tensor:
        last = p + last_token_index(rmask)  # explicit index of the last response token
        with autocast_ctx(bf16):
            s = scorer.score_ids(ids, attn, last).float()
        check_finite_scores(s, "reward model", "check the reward model",
                            lambda i: f"completion {completions[i][:60]!r}")
        return s

    return score_fn
