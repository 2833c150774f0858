"""A PPO fine-tuning run of a causal LM (RLHF): models, rollouts, the KL controller, checkpoints, metrics, samples.

Per update: sample ``rollout_size`` prompts x ``group_size`` completions (:func:`proxrl.lm.rollout.collect_rollout`),
run :func:`proxrl.lm.ppo.ppo_update` on them, adapt the KL coefficient, log, and every ``checkpoint_every`` updates
save everything needed for a bit-exact resume (:mod:`proxrl.lm.train_state`: weights, AdamW state, LR schedule,
RNG and generator states, the KL controller, the PPO-ptx data position). The run directory follows
:mod:`proxrl.runs.rundir`'s order: its lock for the life of the run, every input validated (config, resume
checkpoint, models, prompts, chat template, reward, ptx data), and only then the tree and ``config.yaml`` written.

Chat models (``--chat-template``): prompts (strings or lists of messages) are rendered with the generation prompt,
the template's end-of-turn token ends a completion like EOS, and the template is saved with the final policy.
With ``--eval-prompts`` the policy is evaluated against the reference (:func:`proxrl.lm.heldout.evaluate_policy`)
every ``eval_every`` updates and at the end, logged as ``eval/*``.

Devices and processes (docs/distributed.md): the models, rollouts, advantages and AdamW state live on ``--device``;
reward functions still get strings. Under ``torchrun --nproc_per_node N`` every rank draws the same prompts and
keeps its contiguous share of the rollout (whole groups), samples its rows with its rows of the whole rollout's
uniforms (so a sample does not depend on N), and trains with DDP (``--fsdp``: policy and critic sharded with FSDP2;
reference and reward model replicated). Only rank 0 writes the run directory, metrics, samples, checkpoints and
the progress bar; checkpoints hold whole tensors, so a run resumes with another N, device or ``--fsdp`` setting.
"""
from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from proxrl import distributed as D
from proxrl.config import RUN_INFO_KEY, to_dict
from proxrl.core import AdaptiveKLController, FixedKLController
from proxrl.errors import UserError
from proxrl.lm.builders import scalar_model_from_causal
from proxrl.lm.chat import end_of_turn_token_ids, is_conversational, require_template, resolve_chat_template
from proxrl.lm.data import load_rows
from proxrl.lm.heads import PolicyWithValueHead, TokenValues, policy_with_value_head, unwrap_model
from proxrl.lm.heldout import evaluate_policy
from proxrl.lm.layers import disable_dropout
from proxrl.lm.loading import load_causal_lm, load_scalar_model, save_model_and_tokenizer, unsharded_copy
from proxrl.lm.lora import apply_lora
from proxrl.lm.plots import plot_run
from proxrl.lm.positions import left_pad
from proxrl.lm.ppo import ppo_update
from proxrl.lm.ppo_config import PPOConfig, PPOSizes, ResolvedOptions
from proxrl.lm.prompts import PROMPTS_FILE, keep_prompts, load_prompts, prompt_texts, tokenize_prompts
from proxrl.lm.ptx import PtxBatches
from proxrl.lm.reference import reference_from_policy
from proxrl.lm.rollout import ModelSet, Rollout, collect_rollout
from proxrl.lm.scoring import make_scorer, move_scorer
from proxrl.lm.tokenization import check_tokenizer_fits, load_tokenizer
from proxrl.lm.train_state import load_train_state, resume_checkpoint, save_train_state
from proxrl.runs import (
    MetricsLogger,
    RunDir,
    atomic_write,
    checkpoint_step,
    generator_state,
    progress_bar,
    set_generator_state,
)
from proxrl.runs.finite import NonFiniteError

__all__ = ["train_ppo", "PPOTrainer"]

SAMPLES_FILE = "samples.md"
# files a run writes before its first checkpoint (a directory holding only these is reusable after a failure)
RUN_OUTPUTS = (SAMPLES_FILE, PROMPTS_FILE)
# what a PPO checkpoint's train-state "loop" must hold (train_state checks its own keys)
LOOP_KEYS = ("kl_controller", "sample_gen")
# config.yaml's section describing where the latest session ran (device, processes); not an option


def train_ppo(cfg: PPOConfig, prompts: Sequence[str] | None = None, *, reward_fn: Callable | None = None,
              resume: bool = False, progress: bool = True) -> dict[str, float]:
    """Run PPO fine-tuning as configured; returns the metrics of the last update.

    Args:
        cfg: the :class:`PPOConfig`.
        prompts: prompt strings or lists of messages (overrides ``cfg.prompts``; kept in run_dir/prompts.jsonl for a
            CLI resume).
        reward_fn: a Python callable ``fn(prompts, completions) -> list[float]``, or a list of them (overrides
            ``cfg.reward_fn``; combined with ``cfg.reward_model`` if set, weighted by ``cfg.reward_weights``).
        resume: continue ``cfg.run_dir`` (wherever it now lives) from its latest checkpoint; the result is
            bit-identical to an uninterrupted run with the same config (``total_updates`` may be raised to train
            longer, never lowered below the updates done).
        progress: show a progress bar.

    Under torchrun every process calls it (see the module doc); rank 0 holds the run directory's lock.
    """
    device = D.resolve_device(cfg.device)
    if cfg.bf16:
        D.require_native_bf16(device)
    if cfg.fsdp:
        D.require_distributed("--fsdp")
    dist = D.init_distributed(device)
    D.configure_device(device)
    with RunDir(cfg.run_dir).lock() if dist.is_main else contextlib.nullcontext():
        return PPOTrainer(cfg, prompts, reward_fn=reward_fn, resume=resume, progress=progress, device=device,
                          dist=dist).run()


class PPOTrainer:
    """Holds the models, optimizer and state of one PPO run; :meth:`run` trains. Use :func:`train_ppo`, which also
    holds the run directory's lock."""

    # ------------------------------------------------------------------------------------------- main loop
    def run(self) -> dict[str, float]:
        """Train from the current update to ``cfg.total_updates``; save the final checkpoint, policy/ and critic/."""
        cfg = self.cfg
        logger = (MetricsLogger(self.run_dir, resume_from_step=self.update if self.update else None) if self.main
                  else None)
        bar = progress_bar(cfg.total_updates, desc="ppo", unit="update",
                           disable=None if self.progress and self.main else True)
        bar.update(self.update)
        last: dict[str, float] = {}
        try:
            while self.update < cfg.total_updates:
                last = self._one_update()
                self.update += 1
                if self.eval_prompts and (self.update == cfg.total_updates or (
                        cfg.eval_every and self.update % cfg.eval_every == 0)):
                    last.update(self._evaluate())
                if logger is not None:
                    logger.log(self.update, last)
                bar.update(1)
                bar.set_postfix({"reward": last["reward"], "kl": last["ref_kl"],
                                 "tok/s": last["tokens_per_second"]})
                if cfg.checkpoint_every and self.update % cfg.checkpoint_every == 0 and self.update < cfg.total_updates:
                    self._save()
            if self.last_good is None or self.update != checkpoint_step(self.last_good):
                self._save()
            self._save_final()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if cfg.plot and self.main:
            try:
                plot_run(self.run_dir)
            except UserError:  # no metrics (resumed a finished run)
                pass
        return last

    def _one_update(self) -> dict[str, float]:
        """Rollout, the PPO update on it, the KL controller's step; returns the update's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        ids, mask, prompts = self._prompt_batch()
        sampler_state = self.sample_gen.get_state()
        ro = collect_rollout(
            self.models, self.tokenizer, ids, mask, prompts, self.score_fn,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            stop_strings=self.opts.stop_strings, generator=self.sample_gen, bf16=cfg.bf16,
            eos_token_id=self.eos_ids, forward_batch_size=cfg.forward_batch_size,
            uniforms=self._uniforms(), check_every=1 if self.device.type == "cpu" else 8,
            all_done=_all_ranks_done if cfg.fsdp else None,
        )
        self._advance_sampler(sampler_state, ro.response_mask.shape[1])
        _reshard(self.models)
        kl_coef = self.kl_ctl.coef
        t1 = time.perf_counter()
        try:
            if cfg.gradient_checkpointing:
                _arm_gradient_checkpointing(self.models)
            m = ppo_update(ro, self.models, self.optimizer, cfg, self.sizes, self.opts, kl_coef, self.data_gen,
                           where=f"update {self.update + 1}", ptx=self.ptx)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e}; last good checkpoint: {self.last_good or 'none yet'} (lower "
                                 f"--learning-rate or check the reward)") from e
        t2 = time.perf_counter()
        self.scheduler.step()
        self.kl_ctl.update(m["ref_kl"], self.sizes.batch_size)
        n_tokens = float(D.all_reduce_sum(ro.lengths.sum().reshape(1))[0])  # of the whole rollout
        m.update(kl_coef=kl_coef, lr=lr, progress=self.update / cfg.total_updates,
                 time_generation=ro.timings["generation"], time_forward=ro.timings["forward"],
                 time_scoring=ro.timings["scoring"], time_training=t2 - t1, time_update=t2 - t0,
                 tokens_per_second=n_tokens / max(t2 - t0, 1e-9),
                 generation_tokens_per_second=n_tokens / max(ro.timings["generation"], 1e-9))
        m.update({f"reward/{name}": float(D.all_gather_cat(s.reshape(-1), equal_sizes=True).mean())
                  for name, s in ro.score_parts.items()})
        if cfg.sample_every and (self.update + 1) % cfg.sample_every == 0 and self.main:
            self._sample_table(ro)
        return m

    def _evaluate(self) -> dict[str, float]:
        """``eval/*`` metrics of the policy against the reference on the held-out prompts (own seeded generator:
        the training RNG streams are untouched, so a resume stays bit-exact)."""
        cfg = self.cfg
        result = evaluate_policy(  # every rank evaluates the same prompts (the same forwards, as FSDP needs)
            D.unwrap_model(self.models.policy), self.models.ref, self.tokenizer, self.eval_prompts, self.score_fn,
            template=self.template, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
            batch_size=cfg.forward_batch_size or cfg.rollout_size * cfg.group_size,
            max_prompt_length=cfg.max_prompt_length, stop_strings=self.opts.stop_strings, eos_token_id=self.eos_ids,
            cache=self.eval_cache)
        _reshard(self.models)
        return {f"eval/{k}": float(v) for k, v in result["metrics"].items()}

    def _prompt_batch(self) -> tuple[torch.Tensor, torch.Tensor, list]:
        cfg, n = self.cfg, len(self.prompts)
        if n >= cfg.rollout_size:
            idx = torch.randperm(n, generator=self.data_gen)[: cfg.rollout_size]
        else:
            idx = torch.randint(n, (cfg.rollout_size,), generator=self.data_gen)
        idx = idx.repeat_interleave(cfg.group_size).tolist()  # groups are contiguous
        ids, mask = left_pad([self.prompt_ids[i] for i in idx], self.tokenizer.pad_token_id)
        # this rank's share of the rollout (all of it with one process), padded as the whole rollout is
        s = self.shard
        return ids[s].to(self.device), mask[s].to(self.device), [self.prompts[i] for i in idx[s]]

    def _uniforms(self) -> torch.Tensor:
        """This rank's columns of the whole rollout's sampling uniforms, (max_new_tokens, rows) on the device: the
        draws one process makes step after step (row t = step t, one per sequence), so a sample depends on its
        position in the rollout only, not on the number of processes."""
        u = torch.rand((self.cfg.max_new_tokens, self.sizes.batch_size), generator=self.sample_gen,
                       dtype=torch.float64)
        return u[:, self.shard].to(self.device)

    def _advance_sampler(self, state: torch.Tensor, steps: int) -> None:
        """Leave the sampling generator where one process leaves it: after ``steps`` (the most any rank ran) rows
        of the whole rollout's uniforms."""
        steps = int(D.all_reduce_max(torch.tensor([steps]))[0])
        self.sample_gen.set_state(state)
        torch.rand(steps * self.sizes.batch_size, generator=self.sample_gen, dtype=torch.float64)

    def _sample_table(self, ro: Rollout) -> None:
        """Print a prompt/completion/score table and append it to run_dir/samples.md."""
        def cell(s: str) -> str:
            s = s.replace("|", "\\|").replace("\n", "\u21b5")
            return s if len(s) <= 120 else s[:117] + "..."

        assert ro.shaped_scores is not None
        lines = [f"### update {self.update + 1}", "", "| # | prompt | completion | score | reward |",
                 "|---|---|---|---|---|"]
        texts = prompt_texts(self.tokenizer, self.template, ro.prompts[: self.cfg.sample_rows])
        for i in range(min(self.cfg.sample_rows, len(ro.prompts))):
            lines.append(f"| {i} | {cell(texts[i])} | {cell(ro.completions[i])} | "
                         f"{ro.scores[i].item():.4g} | {ro.shaped_scores[i].item():.4g} |")
        text = "\n".join(lines) + "\n"
        tqdm.write(text)
        with open(self.run_dir.path / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    # ------------------------------------------------------------------------------------------- setup
    def __init__(self, cfg: PPOConfig, prompts: Sequence | None = None, *,
                 reward_fn: Callable | Sequence[Callable] | None = None, resume: bool = False,
                 progress: bool = True, device: torch.device | None = None, dist: D.DistInfo | None = None) -> None:
        self.cfg = cfg
        self.sizes = PPOSizes.from_config(cfg)
        self.opts = ResolvedOptions.from_config(cfg)
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device if device is not None else D.resolve_device(cfg.device)
        self.dist = dist if dist is not None else D.init_distributed(self.device)
        self.main = self.dist.is_main
        world = self.dist.world_size
        self.shard = D.shard_indices(self.sizes.batch_size, self.dist.rank, world, cfg.group_size,
                                     what="rollout_size x group_size")
        if cfg.minibatch_size % (world * cfg.grad_accum_steps):
            raise UserError(f"minibatch_size={cfg.minibatch_size} cannot be split into {world} process(es) x "
                            f"grad_accum_steps={cfg.grad_accum_steps} equal micro-batches; make it a multiple of "
                            f"{world * cfg.grad_accum_steps}")
        self.run_dir = run = RunDir(cfg.run_dir)
        # everything is validated before the run directory is written, so a refused command changes nothing
        start = None
        if resume:
            # newest checkpoint, checksums verified: rank 0 picks it, every rank reads it
            start = resume_checkpoint(run) if self.main else None
            start = Path(D.broadcast_object(str(start) if start is not None else ""))
            done = checkpoint_step(start)
            if cfg.total_updates < done:
                raise UserError(f"--total-updates {cfg.total_updates} is below the {done} updates {run.path} has "
                                f"already done; give at least {done}")
        elif run.has_run() and self.main:
            run.create(exist_ok=False, outputs=RUN_OUTPUTS)  # "already exists; pass --resume" (or reuse debris)
        self.prompts = load_prompts(cfg.prompts, prompts, run.path, cfg.prompt_column)
        self.eval_prompts = load_prompts(cfg.eval_prompts, None, None, cfg.prompt_column, split="eval",
                                         what="eval prompts") if cfg.eval_prompts else []
        if cfg.eval_num_prompts:
            self.eval_prompts = self.eval_prompts[: cfg.eval_num_prompts]
        if not cfg.policy:
            raise UserError("no policy: give --policy DIR (a causal LM saved with save_pretrained)")
        torch.manual_seed(cfg.seed)  # heads / LoRA init
        self.tokenizer = load_tokenizer(cfg.policy)
        self.template = require_template(
            resolve_chat_template(self.tokenizer, cfg.chat_template), cfg.chat_template,
            any(is_conversational(p) for p in [*self.prompts, *self.eval_prompts]),
            f"the policy's tokenizer in {str(cfg.policy)!r}")
        self.eos_ids = end_of_turn_token_ids(self.tokenizer, self.template) or None  # end-of-turn counts as EOS
        self.prompt_ids = tokenize_prompts(self.tokenizer, self.prompts, cfg.max_prompt_length, self.template)
        eval_ids = tokenize_prompts(self.tokenizer, self.eval_prompts, cfg.max_prompt_length, self.template)
        self.models = self._build_models()
        model_cfg = unwrap_model(self.models.policy).config
        ctx = getattr(model_cfg, "n_positions", None) or getattr(model_cfg, "max_position_embeddings", None)
        longest = max(len(t) for t in [*self.prompt_ids, *eval_ids])
        if ctx is not None and longest + cfg.max_new_tokens > ctx:
            raise UserError(f"prompts of up to {longest} tokens + max_new_tokens {cfg.max_new_tokens} exceed the "
                            f"policy's context of {ctx} tokens; lower --max-prompt-length or --max-new-tokens")
        self.score_fn = make_scorer(cfg, self.tokenizer, reward_fn, self.template)
        move_scorer(self.score_fn, self.device)  # reward models: a whole copy per process
        self.models = self._place_models(self.models)  # on the device; DDP-wrapped / FSDP-sharded under torchrun
        self.eval_cache: dict = {}
        self.ptx = self._ptx_batches() if cfg.ptx_coef > 0 else None
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler(done=0)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.sample_gen = torch.Generator().manual_seed(cfg.seed)          # token sampling
        self.data_gen = torch.Generator().manual_seed(cfg.seed + 1)        # prompt choice and minibatch order
        self.update = 0
        self.last_good: Path | None = None
        if start is not None:
            self._load(start)

        if not self.main:
            return
        run.create(exist_ok=resume, outputs=RUN_OUTPUTS)
        if resume:
            _drop_sample_tables_after(run.path / SAMPLES_FILE, self.update)
        elif prompts is not None:
            keep_prompts(run.path, self.prompts)
        run.write_config({**to_dict(cfg), RUN_INFO_KEY: {"device": str(self.device), "processes": world}})
        print(f"ppo: device {self.device}" + (f", {world} processes (torchrun" + (", FSDP)" if cfg.fsdp else ")")
                                             if world > 1 else ""), flush=True)

    def _build_models(self) -> ModelSet:
        """Policy (LoRA, shared-trunk value head as configured), frozen reference, critic; dropout off everywhere."""
        cfg, tok = self.cfg, self.tokenizer
        policy = load_causal_lm(cfg.policy, trust_remote_code=cfg.trust_remote_code)
        check_tokenizer_fits(policy, tok, cfg.policy, what="policy")
        disable_dropout(policy)
        if cfg.lora_r:
            policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
            ref = reference_from_policy(policy, use_lora_adapters=True)
        else:
            ref = reference_from_policy(policy)
        if cfg.gradient_checkpointing:
            _enable_checkpointing(unwrap_model(policy))
        critic = None
        if self.opts.uses_critic and cfg.value_head_on_policy:
            policy = policy_with_value_head(policy, head_std=0.0)
        elif self.opts.uses_critic:
            if cfg.critic == "policy":
                critic = scalar_model_from_causal(cfg.policy, trust_remote_code=cfg.trust_remote_code, head_std=0.0)
            else:
                critic = load_scalar_model(cfg.critic, trust_remote_code=cfg.trust_remote_code, allow_new_head=True)
                check_tokenizer_fits(critic, tok, cfg.critic, what="critic")
            disable_dropout(critic).eval()
            if cfg.gradient_checkpointing:
                _enable_checkpointing(critic)
        policy.eval()
        return ModelSet(policy=policy, ref=ref, critic=critic)

    def _ptx_batches(self) -> PtxBatches:
        """The PPO-ptx text (``--ptx-data``, column ``--ptx-column``) as seeded batches of ``ptx_seq_len`` tokens."""
        cfg = self.cfg
        rows = load_rows(cfg.ptx_data, columns={"text": cfg.ptx_column}, what="ptx data")
        return PtxBatches([r["text"] for r in rows], self.tokenizer, cfg.ptx_seq_len,
                          cfg.ptx_batch_size or self.sizes.micro_batch_size, seed=cfg.seed,
                          source=f"ptx data {cfg.ptx_data!r}")

    def _make_optimizer(self) -> torch.optim.AdamW:
        """One AdamW, a param group per model; a shared-trunk value head gets the critic's learning rate."""
        cfg, policy, critic = self.cfg, D.unwrap_model(self.models.policy), self.models.critic
        lr, critic_lr = cfg.learning_rate, self.opts.critic_learning_rate
        trainable = [p for p in policy.parameters() if p.requires_grad]
        if isinstance(policy, PolicyWithValueHead):
            head = {id(p) for p in policy.value_head.parameters()}
            groups = [{"params": [p for p in trainable if id(p) not in head], "lr": lr},
                      {"params": list(policy.value_head.parameters()), "lr": critic_lr}]
        else:
            groups = [{"params": trainable, "lr": lr}]
        if critic is not None:
            groups.append({"params": [p for p in critic.parameters() if p.requires_grad], "lr": critic_lr})
        # fused: one kernel per step instead of a per-parameter loop (117 -> 26 ms a step on a 39M-parameter pair)
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, eps=1e-8, fused=True)

    def _make_scheduler(self, done: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The learning-rate schedule over updates (constant, or linear to 0 at ``total_updates``), positioned at
        update ``done``: each param group's lr becomes its initial lr times the factor of update ``done``."""
        linear, total = self.cfg.lr_schedule == "linear", self.cfg.total_updates
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda u: 1.0 - u / total if linear else 1.0,
                                                 last_epoch=done - 1)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _modules(self) -> nn.ModuleDict:
        """The trained models under one module: checkpoint tensors ``model.policy.*`` and ``model.critic.*`` (the
        bare models inside DDP / :class:`~proxrl.lm.heads.TokenValues`, whichever the layout)."""
        named = {"policy": D.unwrap_model(self.models.policy)}
        if self.models.critic is not None:
            critic = D.unwrap_model(self.models.critic)
            named["critic"] = critic.model if isinstance(critic, TokenValues) else critic
        return nn.ModuleDict(named)

    def _save(self) -> Path:
        loop = {"kl_controller": self.kl_ctl.state_dict(), "sample_gen": generator_state(self.sample_gen)}
        if self.ptx is not None:
            loop["ptx"] = self.ptx.state_dict()
        try:
            path = save_train_state(self.run_dir, self.update, self._modules(), self.optimizer, self.scheduler,
                                    self.data_gen, loop, keep=self.cfg.keep_checkpoints)
        except UserError as e:  # non-finite weights: keep the previous checkpoint as the newest
            raise UserError(f"{e}; last good checkpoint: {self.last_good or 'none yet'}") from e
        self.last_good = path
        return path

    def _load(self, path: Path) -> None:
        self.update, loop = load_train_state(path, self._modules(), self.optimizer, self.scheduler, self.data_gen)
        missing = [k for k in LOOP_KEYS if k not in loop]
        if missing:
            raise UserError(f"checkpoint {path} lacks 'loop.{missing[0]}' in state.json; it was edited or written by "
                            f"another proxrl version: delete it or use another checkpoint")
        self.kl_ctl.load_state_dict(loop["kl_controller"])
        set_generator_state(self.sample_gen, loop["sample_gen"])
        if self.ptx is not None:
            if "ptx" not in loop:
                raise UserError(f"checkpoint {path} was saved without PPO-ptx; resume it without --ptx-coef/--ptx-data")
            self.ptx.load_state_dict(loop["ptx"])
        # this config's schedule from here on: a resume may have raised total_updates (same lrs when it did not)
        self.scheduler = self._make_scheduler(done=self.update)
        self.last_good = path

    def _save_final(self) -> None:
        """run_dir/policy/ (a plain model, LoRA merged; with its value head) and run_dir/critic/: HF directories
        loadable with ``from_pretrained``; the chat template in use is saved as the tokenizer's ``chat_template``."""
        if self.template is not None:
            self.tokenizer.chat_template = self.template
        mods = self._modules()
        if self.cfg.fsdp:  # gather the shards (every rank), rank 0 saves whole copies
            state = D.full_state_dict(mods)
            if not self.main:
                return
            mods = self._whole_models(state)
        elif not self.main:
            return
        save_model_and_tokenizer(mods["policy"], self.tokenizer, self.run_dir.path / "policy",
                                 merge_lora=bool(self.cfg.lora_r))
        if "critic" in mods:
            save_model_and_tokenizer(mods["critic"], self.tokenizer, self.run_dir.path / "critic")

    def _place_models(self, models: ModelSet) -> ModelSet:
        """The models on the device; under torchrun the policy and critic (as a
        :class:`~proxrl.lm.heads.TokenValues`) DDP-wrapped, or sharded with FSDP2 (``--fsdp``); the reference stays
        a replicated frozen copy (with LoRA and DDP: the policy's own base, adapters off)."""
        cfg, dev = self.cfg, self.device
        policy, critic = models.policy.to(dev), models.critic
        ref = models.ref if cfg.lora_r else models.ref.to(dev)
        if critic is not None:
            critic = critic.to(dev)
        if self.dist.distributed:
            if critic is not None:
                critic = TokenValues(critic)
            if cfg.fsdp:
                policy = D.fsdp_shard(policy, dev, cfg.bf16)
                critic = D.fsdp_shard(critic, dev, cfg.bf16) if critic is not None else None
            else:
                policy = D.wrap_ddp(policy, dev)
                critic = D.wrap_ddp(critic, dev) if critic is not None else None
        return ModelSet(policy=policy, ref=ref, critic=critic)

    def _whole_models(self, state: dict[str, torch.Tensor]) -> nn.ModuleDict:
        """Plain CPU copies of the policy and critic holding ``state`` (:meth:`_modules`' whole state dict), built
        from the run's model directories: what rank 0 saves at the end of an FSDP run."""
        cfg = self.cfg
        out = {}
        policy = D.unwrap_model(self.models.policy)
        if cfg.lora_r:  # a PEFT model: rebuild it as the run did (the base from --policy, the same adapters)
            plain = apply_lora(load_causal_lm(cfg.policy, trust_remote_code=cfg.trust_remote_code), r=cfg.lora_r,
                               alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
            plain.load_state_dict({k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")},
                                  strict=True)
            out["policy"] = plain.eval()
        else:
            out["policy"] = unsharded_copy(policy, {k[len("policy."):]: v for k, v in state.items()
                                                    if k.startswith("policy.")})
        if self.models.critic is not None:
            critic = self._modules()["critic"]
            out["critic"] = unsharded_copy(critic, {k[len("critic."):]: v for k, v in state.items()
                                                    if k.startswith("critic.")})
        return nn.ModuleDict(out)


def _all_ranks_done(done_here: bool) -> bool:
    """True on every rank once every rank's rows have finished (FSDP: every rank runs the same forwards)."""
    return not D.all_ranks_agree_stop(not done_here)


def _reshard(models: ModelSet) -> None:
    """Reshard FSDP roots after no-grad forwards: FSDP2 keeps a root's parameters gathered after its forward until
    a backward, and until then ``parameters()`` yields the gathered copies, not the shards the optimizer updates."""
    for m in (models.policy, models.critic):
        if m is not None and hasattr(m, "reshard"):
            m.reshard()


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing of every layer of a HF model, non-reentrant (works with frozen embeddings, as
    under LoRA, and needs no input gradients); ``activation_checkpointing_enable`` where transformers has it."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _arm_gradient_checkpointing(models: ModelSet) -> None:
    """Let the gradient-checkpointed layers recompute in this update's backward.

    HF checkpoints a layer only while it is in training mode; the PPO models stay in eval mode (no dropout, so the
    first ratio is exactly 1), so only the ``training`` flag of the modules that checkpoint is set (not of their
    children): dropout and attention dropout stay off, and generation's ``eval()`` resets it after each update.
    """
    for model in (models.policy, models.critic):
        if model is None:
            continue
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True


def _drop_sample_tables_after(path: Path, update: int) -> None:
    """Remove the sample tables of updates after ``update`` from samples.md (written by a run that was stopped after
    its last checkpoint; the resumed run writes them again)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"(?m)^(?=### update \d+$)", text)
    kept = [p for p in parts if not (m := re.match(r"### update (\d+)$", p, re.M)) or int(m.group(1)) <= update]
    if len(kept) != len(parts):
        atomic_write(path, "".join(kept))
