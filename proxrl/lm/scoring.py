"""PPO's scorer: one function that scores a batch of completed sequences, from reward functions and/or a reward model.

``score_fn(input_ids, attention_mask, prompt_len, response_mask, prompts, completions) -> (B,) float32`` is what
:func:`proxrl.lm.rollout.collect_rollout` (and :func:`proxrl.lm.heldout.evaluate_policy`) calls once per batch.
``prompts`` are the prompts as given (strings, or lists of messages for a chat model); ``completions`` the decoded
responses (special tokens skipped).

A :class:`Scorer` is the weighted sum of named components (``--reward-fn`` may be given several times, with or
without ``--reward-model``; ``--reward-weights w1,w2,...`` in that order, default all 1). Each component's raw
scores of the last call are kept in :attr:`Scorer.last_components` (the trainer logs their means as
``reward/<name>``); the total is what PPO optimises.

* A reward function (:func:`reward_fn_component`) gets the prompt texts (a string as it is, a list of messages
  rendered with the policy's chat template) and the completions.
* A reward model (:func:`reward_model_component`) that shares the policy's tokenizer and chat template scores the
  policy's token ids directly, read at each row's last response token. One with its own tokenizer or template (any
  ``AutoModelForSequenceClassification`` with one label, as found on the hub) gets the decoded completions
  re-encoded with its tokenizer and template (:meth:`proxrl.lm.rewards.RewardModelScorer.score_texts`), in batches.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from proxrl.errors import UserError
from proxrl.lm import tasks
from proxrl.lm.chat import render_prompt, resolve_chat_template
from proxrl.lm.positions import last_token_index
from proxrl.lm.ppo_config import PPOConfig
from proxrl.lm.rewards import RewardFunction, RewardModelScorer, call_reward_fn, check_finite_scores, load_reward_fn
from proxrl.lm.rollout import autocast_ctx

__all__ = ["ScoreFn", "Scorer", "make_scorer", "reward_model_scorer", "reward_model_component",
           "reward_fn_component", "split_reward_fns", "parse_reward_weights", "REWARD_MODEL_NAME"]

ScoreFn = Callable[[Tensor, Tensor, int, Tensor, list, list], Tensor]
REWARD_MODEL_NAME = "reward_model"


class Scorer:
    """A :data:`ScoreFn` summing named, weighted components: ``total = sum_i w_i * score_i`` (B,) float32.

    Attributes:
        names: the component names, in order (unique).
        weights: their weights.
        last_components: ``{name: (B,) float32 raw scores}`` of the last call.
    """

    def __init__(self, components: Sequence[tuple[str, float, ScoreFn]]) -> None:
        if not components:
            raise ValueError("a Scorer needs at least one component")
        self.components = list(components)
        self.names = [n for n, _, _ in self.components]
        self.weights = [float(w) for _, w, _ in self.components]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"component names must be unique: {self.names}")
        self.last_components: dict[str, Tensor] = {}

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, response_mask: Tensor,
                 prompts: list, completions: list) -> Tensor:
        parts: dict[str, Tensor] = {}
        total: Tensor | None = None
        for name, w, fn in self.components:
            s = torch.as_tensor(fn(input_ids, attention_mask, prompt_len, response_mask, prompts, completions))
            s = s.detach().float().reshape(-1).cpu()
            parts[name] = s
            total = w * s if total is None else total + w * s
        self.last_components = parts
        assert total is not None
        return total


def split_reward_fns(spec: str | None) -> list[str]:
    """``"a.mod:f,path/r.py:g"`` -> ``["a.mod:f", "path/r.py:g"]`` (``--reward-fn`` given several times is joined
    with commas)."""
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def parse_reward_weights(text: str | None) -> list[float]:
    """``"1,0.5"`` -> ``[1.0, 0.5]``; ``""`` -> ``[]``.

    Raises:
        UserError: a weight that is not a finite number.
    """
    out = []
    for part in (text or "").split(","):
        if not part.strip():
            continue
        try:
            w = float(part)
        except ValueError:
            raise UserError(f"reward_weights: {part.strip()!r} is not a number; give comma-separated numbers like "
                            f"1,0.5") from None
        if not math.isfinite(w):
            raise UserError(f"reward_weights: {part.strip()!r} is not finite; give finite numbers")
        out.append(w)
    return out


def _fn_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, RewardFunction):
        return fn.spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return getattr(fn, "__name__", None) or type(fn).__name__


def reward_fn_component(fn: Callable[..., Any], tokenizer: Any, template: str | None,
                        timeout: float | None) -> ScoreFn:
    """A :data:`ScoreFn` calling ``fn(prompt_texts, completions)`` through
    :func:`~proxrl.lm.rewards.call_reward_fn` (with ``timeout``); a list-of-messages prompt is given as its
    rendering with ``template`` (the text the policy saw, generation prompt included)."""

    def score_fn(ids: Tensor, attn: Tensor, p: int, rmask: Tensor, prompts: list, completions: list) -> Tensor:
        texts = [q if isinstance(q, str) else render_prompt(tokenizer, template, q, f"prompt {i + 1}")
                 for i, q in enumerate(prompts)]
        return call_reward_fn(fn, texts, completions, timeout=timeout)

    return score_fn


def reward_model_component(model_dir: str, policy_tokenizer: Any, policy_template: str | None = None, *,
                           chat_template: str = "auto", bf16: bool = False, batch_size: int = 0,
                           trust_remote_code: bool = False) -> ScoreFn:
    """A :data:`ScoreFn` of the reward model in ``model_dir`` (one label), ``batch_size`` rows per forward (0: all).

    The reward model's chat template: ``chat_template`` ``"auto"`` is its tokenizer's own template, else (a reward
    model sharing the policy's tokenizer) the policy's ``policy_template``, else none; ``"none"`` or a ``.jinja``
    path as for the policy. When the reward model shares the policy's tokenizer and template (and reads a
    per-position head), the policy's ids are scored as they are at each row's last response token (EOS /
    end-of-turn included), the position the reward model was trained to score; otherwise each (prompt, decoded
    completion) pair is re-encoded with the reward model's tokenizer and template
    (:meth:`~proxrl.lm.rewards.RewardModelScorer.score_texts`).
    """
    scorer = RewardModelScorer(model_dir, policy_tokenizer=policy_tokenizer, trust_remote_code=trust_remote_code)
    spec = str(chat_template or "none").strip()
    if spec.lower() == "auto":
        own = resolve_chat_template(scorer.tokenizer, "auto") if scorer.tokenizer is not policy_tokenizer else None
        template = own if own is not None else (policy_template if scorer.same_tokenizer else None)
    else:
        template = resolve_chat_template(scorer.tokenizer, spec)
    scorer.template = template
    retokenize = not (scorer.same_tokenizer and scorer.per_position and template == policy_template)

    def score_fn(ids: Tensor, attn: Tensor, p: int, rmask: Tensor, prompts: list, completions: list) -> Tensor:
        with autocast_ctx(bf16, ids.device):
            if retokenize:
                return scorer.score_texts(prompts, completions, batch_size=batch_size)
            last = p + last_token_index(rmask)  # explicit index of the last response token
            step = batch_size if batch_size > 0 else max(ids.shape[0], 1)
            s = torch.cat([scorer.score_ids(ids[i:i + step], attn[i:i + step], last[i:i + step]).float()
                           for i in range(0, ids.shape[0], step)])
        check_finite_scores(s, "reward model", "check the reward model",
                            lambda i: f"completion {completions[i][:60]!r}")
        return s

    score_fn.retokenize = retokenize  # type: ignore[attr-defined]
    score_fn.scorer = scorer  # type: ignore[attr-defined]
    return score_fn


def reward_model_scorer(model_dir: str, tokenizer: Any, bf16: bool = False, trust_remote_code: bool = False, *,
                        template: str | None = None, chat_template: str = "auto", batch_size: int = 0) -> Scorer:
    """A :class:`Scorer` of one reward model (see :func:`reward_model_component`; ``tokenizer`` / ``template``
    are the policy's)."""
    return Scorer([(REWARD_MODEL_NAME, 1.0, reward_model_component(
        model_dir, tokenizer, template, chat_template=chat_template, bf16=bf16, batch_size=batch_size,
        trust_remote_code=trust_remote_code))])


def move_scorer(score_fn: Any, device: Any) -> None:
    """Move the reward models inside a :class:`Scorer` to ``device`` (reward functions are unaffected: they get
    strings). Under torchrun every process holds a whole copy of each reward model (replicated, not sharded)."""
    for _, _, fn in getattr(score_fn, "components", ()):
        scorer = getattr(fn, "scorer", None)
        if scorer is not None and getattr(scorer, "model", None) is not None:
            scorer.model.to(device)


def make_scorer(cfg: PPOConfig, tokenizer: Any, reward_fn: Callable | Sequence[Callable] | None = None,
                template: str | None = None) -> Scorer:
    """The scorer of a PPO run: the reward functions (``reward_fn`` if given: a callable or a list of them, else
    ``cfg.reward_fn``'s comma-separated specs, called with ``cfg.reward_timeout``), then ``cfg.reward_model``;
    with neither, the reward function of the built-in task named by ``cfg.prompts``. Weighted by
    ``cfg.reward_weights`` (default 1 each). ``tokenizer`` and ``template`` are the policy's.

    Raises:
        UserError: no reward at all, a weight count that does not match the components, or what loading a reward
        function or the reward model raises.
    """
    if reward_fn is not None:
        fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
    else:
        specs = split_reward_fns(cfg.reward_fn)
        if not specs and not cfg.reward_model and cfg.prompts in tasks.REWARD_FNS:
            specs = [tasks.REWARD_FNS[cfg.prompts]]  # a built-in task brings its own reward
        fns = [load_reward_fn(s) for s in specs]  # a bad spec fails before the reward model loads
    components: list[tuple[str, ScoreFn]] = []
    for fn in fns:
        name, k = _fn_name(fn), 2
        while name in [n for n, _ in components]:
            name, k = f"{_fn_name(fn)}_{k}", k + 1
        components.append((name, reward_fn_component(fn, tokenizer, template, cfg.reward_timeout)))
    if cfg.reward_model:
        components.append((REWARD_MODEL_NAME, reward_model_component(
            cfg.reward_model, tokenizer, template, chat_template=cfg.reward_model_chat_template, bf16=cfg.bf16,
            batch_size=cfg.forward_batch_size, trust_remote_code=cfg.trust_remote_code)))
    if not components:
        raise UserError("no reward: give --reward-model DIR or --reward-fn module:function")
    weights = parse_reward_weights(cfg.reward_weights) or [1.0] * len(components)
    if len(weights) != len(components):
        names = ", ".join(n for n, _ in components)
        raise UserError(f"--reward-weights gives {len(weights)} weights for {len(components)} reward components "
                        f"({names}); give one weight per --reward-fn, in order, then one for --reward-model")
    return Scorer([(n, w, fn) for (n, fn), w in zip(components, weights)])
