"""PPOConfig: every option of PPO fine-tuning of a causal LM (RLHF), validated on construction.

Defaults follow Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") /
Ouyang et al. 2022 (InstructGPT) where those papers give a value, else TRL's PPOTrainer; each help text
says where its default comes from. Derived values live apart and are never written back: sizes in
:class:`PPOSizes`, options whose default depends on other options in :class:`ResolvedOptions`.

Light on purpose (no torch, no transformers): ``proxrl ppo --help`` builds its flags from this module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from proxrl.config import check, opt


@dataclass
class PPOConfig:
    """Options of :func:`proxrl.lm.ppo_trainer.train_ppo` (one ``proxrl ppo --flag`` each)."""

    # the options ``proxrl ppo --resume RUN_DIR`` may change; any other given option must equal the run's own
    resumable_fields: ClassVar[frozenset[str]] = frozenset({
        "total_updates", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_rows", "plot", "threads",
        "reward_timeout", "eval_prompts", "eval_every", "eval_num_prompts", "forward_batch_size",
        "gradient_checkpointing", "device", "fsdp"})

    # ---- models and data
    policy: str = opt("", "directory of the causal LM to fine-tune (HF format, e.g. an SFT run's output); also the frozen reference")
    reward_model: str | None = opt(None, "directory of a scalar reward model: any AutoModelForSequenceClassification with one label (proxrl reward-model output, or one from the hub with its own tokenizer and chat template: completions are then re-encoded for it)")
    reward_fn: str | None = opt(None, "reward function 'pkg.module:func' or 'path/file.py:func' called as func(prompts, completions) -> list of floats; repeat the flag (or separate with commas) for several, summed with --reward-weights (also with --reward-model)")
    reward_weights: str = opt("", "comma-separated weights of the reward components in order: each --reward-fn, then --reward-model; each is logged as reward/<name>, their weighted sum is the reward; empty = 1 each")
    reward_model_chat_template: str = opt("auto", "chat template the reward model reads completions in: auto (its tokenizer's own, else the policy's when it shares the policy's tokenizer, else none), none or PATH.jinja")
    reward_timeout: float = opt(300.0, "seconds a reward function may take for one batch before the run stops with an error (it runs in a worker thread)")
    critic: str = opt("policy", "value model: a directory of a scalar (seq-cls) model, or 'policy' to initialise it from the policy's trunk (TRL/InstructGPT init from the RM; 'policy' needs no extra model)")
    value_head_on_policy: bool = opt(False, "put the value head on the policy's trunk (shared weights, one forward for logits and values) instead of a separate critic")
    prompts: str = opt("", "prompts: JSONL, JSON, CSV, Parquet, a save_to_disk directory or a hub name org/name[:split] with a prompt column (a string or a list of messages per row), or a built-in task name (the Python API also takes a list)")
    prompt_column: str = opt("prompt", "column of --prompts and --eval-prompts holding the prompt")
    chat_template: str = opt("auto", "auto (the policy tokenizer's own template, if any), none (plain text) or PATH.jinja: prompts are rendered with the generation prompt, the template's end-of-turn token ends a completion (and counts as EOS for --missing-eos-penalty), and the template is saved with the final policy")
    eval_prompts: str = opt("", "held-out prompts (same formats as --prompts; a task name means its held-out split) evaluated every --eval-every updates and at the end: reward, KL to the reference, length, distinct-n, win rate, logged as eval/*")
    eval_every: int = opt(0, "evaluate on --eval-prompts every N updates (and at the end); 0 = only at the end")
    eval_num_prompts: int = opt(64, "evaluate on the first N of --eval-prompts; 0 = all")
    max_prompt_length: int = opt(256, "prompts longer than this many tokens keep their last tokens")
    run_dir: str = opt("runs/ppo", "directory of the run (config, metrics, checkpoints, plots, final policy/ and critic/)")
    seed: int = opt(0, "random seed (sampling, prompt order, minibatch shuffling, model init of heads)")
    # ---- sizes
    total_updates: int = opt(100, "number of PPO updates (rollout + optimisation rounds)")
    rollout_size: int = opt(16, "prompts per update (TRL's batch_size is per-device 64; small here for CPU)")
    group_size: int = opt(1, "samples per prompt; GRPO/RLOO need >= 2 (GRPO paper: 64, TRL GRPO: 8)")
    minibatch_size: int = opt(8, "sequences per optimizer step; must divide rollout_size * group_size")
    grad_accum_steps: int = opt(1, "micro-batches each minibatch is split into (gradient accumulation); must divide minibatch_size")
    epochs: int = opt(4, "optimisation epochs over each rollout (TRL num_ppo_epochs = 4)")
    # ---- optimisation
    learning_rate: float = opt(1e-5, "AdamW learning rate of the policy (InstructGPT ~9.65e-6, TRL 1.41e-5 / 3e-6)")
    critic_learning_rate: float | None = opt(None, "learning rate of the critic / value head; None = same as --learning-rate")
    lr_schedule: Literal["constant", "linear"] = opt("constant", "learning-rate schedule over updates ('linear' decays to 0 like TRL's default)")
    weight_decay: float = opt(0.0, "AdamW weight decay (TRL: 0)")
    max_grad_norm: float | None = opt(1.0, "clip each model's gradient norm to this (TRL max_grad_norm = 1.0); None = no clipping")
    target_kl: float | None = opt(None, "skip the step and stop the update's remaining minibatches and epochs once a minibatch's approx_kl (k3 of KL(old || new)) exceeds this (CleanRL's threshold, checked before each step like SB3, which compares with 1.5 * target_kl); None = off")
    # ---- PPO
    gamma: float = opt(1.0, "discount over response tokens, in (0, 1] (Ziegler et al. 2019: 1)")
    gae_lambda: float = opt(0.95, "GAE lambda over tokens, in [0, 1] (Ziegler et al. 2019 / TRL: 0.95)")
    clip_coef: float = opt(0.2, "PPO ratio clip epsilon (Schulman et al. 2017 / Ziegler et al. 2019: 0.2)")
    value_clip_coef: float | None = opt(0.2, "clip the value prediction to +-this around the rollout value (TRL cliprange_value = 0.2); None = unclipped")
    value_coef: float = opt(0.1, "weight of the value loss (TRL vf_coef = 0.1). proxrl's value loss has a 0.5 factor inside (0.5 * (V - return)^2, as TRL and CleanRL), so 0.5 here is CleanRL's effective weight and half of SB3's (SB3 uses the plain MSE)")
    entropy_coef: float = opt(0.0, "weight of the entropy bonus (RLHF recipes: 0)")
    advantage_estimator: Literal["gae", "grpo", "rloo"] = opt("gae", "'gae': PPO with a critic over tokens; 'grpo': group-normalised sequence scores (Shao et al. 2024), no critic; 'rloo': leave-one-out baseline (Ahmadian et al. 2024), no critic")
    whiten_rewards: bool = opt(False, "scale per-token rewards by their masked std before GAE (TRL whiten_rewards, default False)")
    normalize_advantages: bool = opt(True, "whiten advantages with masked mean/std over the rollout (gae, rloo; GRPO is already normalised per group)")
    # ---- KL to the reference policy
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (TRL kl_coef = 0.05; GRPO paper beta = 0.04)")
    kl_mode: Literal["reward", "loss"] | None = opt(None, "'reward': -beta*KL per token in the reward (Ziegler et al.); 'loss': beta*KL term in the loss (GRPO); None = 'loss' for grpo, else 'reward'")
    kl_estimator: Literal["k1", "k2", "k3"] | None = opt(None, "KL estimator (Schulman's k1/k2/k3); None = k1 in reward mode, k3 in loss mode")
    adaptive_kl: bool = opt(False, "adapt beta towards --kl-target (Ziegler et al. 2019 adaptive controller)")
    kl_target: float = opt(6.0, "target KL in nats per sequence for --adaptive-kl (Ziegler et al. 2019: 6)")
    kl_horizon: int = opt(10000, "horizon of the adaptive KL controller in samples (Ziegler et al. 2019: 10000)")
    # ---- reward shaping
    reward_clip: float | None = opt(None, "clip scores to [-c, c] before use; None = off")
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of completions that did not end with EOS/stop string (TRL missing_eos_penalty); None = off")
    length_penalty: float = opt(0.0, "subtract this times the response length (tokens) from the score")
    # ---- PPO-ptx (InstructGPT eq. 2)
    ptx_coef: float = opt(0.0, "gamma of PPO-ptx: add this times the language-modelling loss on --ptx-data to each optimizer step's loss (InstructGPT: 27.8 with their loss scaling); 0 = off")
    ptx_data: str = opt("", "pretraining text for PPO-ptx (JSONL, JSON, CSV, Parquet, .txt, a save_to_disk directory or a hub name), column --ptx-column")
    ptx_column: str = opt("text", "column of --ptx-data holding the text")
    ptx_seq_len: int = opt(128, "tokens per ptx block (the text is joined with EOS and cut into blocks)")
    ptx_batch_size: int = opt(0, "ptx blocks per optimizer step; 0 = the micro-batch size (minibatch_size / grad_accum_steps)")
    # ---- sampling
    max_new_tokens: int = opt(32, "maximum tokens sampled per completion (TRL response_length = 53)")
    temperature: float = opt(0.7, "sampling temperature > 0; the policy's log-probs are taken at this temperature (TRL: 0.7)")
    top_k: int = opt(0, "sample from the k most likely tokens; 0 = off (off for RL: it biases the log-probs)")
    top_p: float = opt(1.0, "nucleus sampling mass; 1.0 = off (off for RL: it biases the log-probs)")
    stop_strings: str = opt("", "comma-separated strings that end a completion (like EOS; '\\n' = newline); empty = none")
    # ---- systems
    device: str = opt("auto", "where the models, rollouts and optimizer state live: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; under torchrun each process takes cuda:LOCAL_RANK. The device used is printed and saved in config.yaml; checkpoints do not depend on it (a run resumes on another device)")
    bf16: bool = opt(False, "run forwards under torch.autocast(bfloat16) on CUDA, or on a CPU with native bf16 (AVX512-BF16/AMX; refused on other CPUs, where it runs ~10-20x slower); weights and optimizer stay float32")
    fsdp: bool = opt(False, "shard the policy and critic (their weights, gradients and AdamW state) over the torchrun processes with FSDP2; needs several processes; the reference and reward model are replicated; outputs are still whole from_pretrained directories")
    gradient_checkpointing: bool = opt(False, "recompute each transformer layer's activations in the backward pass (less memory, ~30% more training compute)")
    forward_batch_size: int = opt(0, "rows per forward in the rollout's reference, critic and reward-model passes (bounds their memory on long completions); 0 = the whole rollout at once")
    lora_r: int = opt(0, "LoRA rank for the policy (0 = full fine-tuning); with LoRA the reference is the adapters-disabled base")
    lora_alpha: int = opt(16, "LoRA alpha (peft default 8; 16 is common)")
    lora_dropout: float = opt(0.0, "LoRA dropout saved in the adapter config; never applied during PPO: the policy stays in eval mode (dropout off) so the ratio is exactly 1 at the first minibatch")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default")
    sample_every: int = opt(10, "print (and append to run_dir/samples.md) a prompt/completion/reward table every N updates; 0 = never")
    sample_rows: int = opt(4, "rows in each sample table")
    checkpoint_every: int = opt(50, "save a checkpoint every N updates (and always at the end); 0 = only at the end")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints")
    plot: bool = opt(True, "draw PNG plots of the metrics into run_dir/plots at the end (also: proxrl plot RUN_DIR)")
    trust_remote_code: bool = opt(False, "allow model code shipped in a model directory (off: only built-in architectures)")

    def __post_init__(self) -> None:
        check(self.total_updates >= 1, f"total_updates={self.total_updates} must be >= 1")
        check(self.rollout_size >= 1, f"rollout_size={self.rollout_size} must be >= 1")
        check(self.group_size >= 1, f"group_size={self.group_size} must be >= 1")
        batch = self.rollout_size * self.group_size
        check(self.minibatch_size >= 1, f"minibatch_size={self.minibatch_size} must be >= 1")
        check(self.minibatch_size <= batch,
              f"minibatch_size={self.minibatch_size} exceeds rollout_size*group_size={batch}; lower --minibatch-size")
        check(batch % self.minibatch_size == 0,
              f"minibatch_size={self.minibatch_size} does not divide rollout_size*group_size={batch}; pick a divisor")
        check(self.grad_accum_steps >= 1 and self.minibatch_size % self.grad_accum_steps == 0,
              f"grad_accum_steps={self.grad_accum_steps} must be >= 1 and divide minibatch_size={self.minibatch_size}")
        check(self.epochs >= 1, f"epochs={self.epochs} must be >= 1")
        check(_pos(self.learning_rate), f"learning_rate={self.learning_rate} must be > 0")
        check(self.critic_learning_rate is None or _pos(self.critic_learning_rate),
              f"critic_learning_rate={self.critic_learning_rate} must be > 0 (or None)")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.max_grad_norm is None or _pos(self.max_grad_norm), f"max_grad_norm={self.max_grad_norm} must be > 0 (or None)")
        check(self.target_kl is None or _pos(self.target_kl), f"target_kl={self.target_kl} must be > 0 (or None)")
        check(0.0 < self.gamma <= 1.0, f"gamma={self.gamma} must be in (0, 1]")
        check(0.0 <= self.gae_lambda <= 1.0, f"gae_lambda={self.gae_lambda} must be in [0, 1]")
        check(_pos(self.clip_coef), f"clip_coef={self.clip_coef} must be > 0")
        check(self.value_clip_coef is None or _pos(self.value_clip_coef),
              f"value_clip_coef={self.value_clip_coef} must be > 0 (or None for no clipping)")
        check(self.value_coef >= 0 and math.isfinite(self.value_coef), f"value_coef={self.value_coef} must be >= 0")
        check(self.entropy_coef >= 0 and math.isfinite(self.entropy_coef), f"entropy_coef={self.entropy_coef} must be >= 0")
        check(self.kl_coef >= 0 and math.isfinite(self.kl_coef), f"kl_coef={self.kl_coef} must be >= 0")
        check(_pos(self.kl_target), f"kl_target={self.kl_target} must be > 0")
        check(self.kl_horizon >= 1, f"kl_horizon={self.kl_horizon} must be >= 1")
        if self.advantage_estimator in ("grpo", "rloo"):
            check(self.group_size >= 2,
                  f"advantage_estimator={self.advantage_estimator!r} needs group_size >= 2, got {self.group_size}; "
                  "set --group-size (e.g. 4)")
        check(self.reward_clip is None or _pos(self.reward_clip), f"reward_clip={self.reward_clip} must be > 0 (or None)")
        check(self.missing_eos_penalty is None or math.isfinite(self.missing_eos_penalty),
              f"missing_eos_penalty={self.missing_eos_penalty} must be a finite number (or None)")
        check(math.isfinite(self.length_penalty), f"length_penalty={self.length_penalty} must be finite")
        check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        check(self.max_prompt_length >= 1, f"max_prompt_length={self.max_prompt_length} must be >= 1")
        check(_pos(self.temperature), f"temperature={self.temperature} must be > 0 (greedy decoding has no log-probs to optimise)")
        check(self.top_k >= 0, f"top_k={self.top_k} must be >= 0")
        check(0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]")
        check(self.lora_r >= 0, f"lora_r={self.lora_r} must be >= 0")
        check(self.lora_alpha >= 1, f"lora_alpha={self.lora_alpha} must be >= 1")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")
        check(self.sample_every >= 0, f"sample_every={self.sample_every} must be >= 0")
        check(self.sample_rows >= 1, f"sample_rows={self.sample_rows} must be >= 1")
        check(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        check(bool(self.run_dir), "run_dir is empty; give --run-dir")
        for part in (self.reward_weights or "").split(","):
            try:
                w = float(part) if part.strip() else 0.0
            except ValueError:
                w = math.nan
            check(math.isfinite(w), f"reward_weights={self.reward_weights!r}: {part.strip()!r} is not a finite "
                                    f"number; give comma-separated numbers like 1,0.5")
        check(bool(self.prompt_column), "prompt_column is empty; give --prompt-column NAME")
        check(self.chat_template.strip() != "", "chat_template is empty; give auto, none or PATH.jinja")
        check(self.reward_model_chat_template.strip() != "",
              "reward_model_chat_template is empty; give auto, none or PATH.jinja")
        check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0")
        check(self.eval_num_prompts >= 0, f"eval_num_prompts={self.eval_num_prompts} must be >= 0 (0 = all)")
        check(not self.eval_every or bool(self.eval_prompts),
              f"eval_every={self.eval_every} needs held-out prompts; give --eval-prompts")
        check(self.ptx_coef >= 0 and math.isfinite(self.ptx_coef), f"ptx_coef={self.ptx_coef} must be >= 0")
        check(not self.ptx_coef or bool(self.ptx_data), f"ptx_coef={self.ptx_coef} needs pretraining text; give "
                                                        f"--ptx-data")
        check(self.ptx_coef > 0 or not self.ptx_data,
              f"ptx_data={self.ptx_data!r} is given but ptx_coef is 0; give --ptx-coef > 0 (or drop --ptx-data)")
        check(bool(self.ptx_column), "ptx_column is empty; give --ptx-column NAME")
        check(self.ptx_seq_len >= 2, f"ptx_seq_len={self.ptx_seq_len} must be >= 2")
        check(self.ptx_batch_size >= 0, f"ptx_batch_size={self.ptx_batch_size} must be >= 0 (0 = micro-batch size)")
        check(self.forward_batch_size >= 0, f"forward_batch_size={self.forward_batch_size} must be >= 0 (0 = all)")
        check(self.critic != "", "critic is empty; give a directory or 'policy'")
        check(_pos(self.reward_timeout), f"reward_timeout={self.reward_timeout} must be > 0 seconds")
        check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device.strip().lower())
              is not None, f"device={self.device!r} must be auto, cpu, cuda, cuda:N or mps")
        check(not (self.fsdp and self.value_head_on_policy),
              "fsdp with value_head_on_policy is not supported (the generation pass reads the value head outside "
              "the sharded module); use a separate critic (--value-head-on-policy false)")
        check(not (self.fsdp and self.ptx_coef > 0 and self.lora_r),
              "fsdp with PPO-ptx and LoRA is not supported (the ptx forward bypasses the sharded PEFT wrapper); drop "
              "one of --fsdp, --ptx-coef, --lora-r")


def _pos(x: float) -> bool:
    return x > 0 and math.isfinite(x)


@dataclass(frozen=True)
class PPOSizes:
    """Batch sizes derived from a :class:`PPOConfig` (never written back into it)."""

    batch_size: int          # sequences per rollout = rollout_size * group_size
    num_minibatches: int     # optimizer steps per epoch
    micro_batch_size: int    # sequences per forward/backward

    @classmethod
    def from_config(cls, cfg: PPOConfig) -> "PPOSizes":
        batch = cfg.rollout_size * cfg.group_size
        return cls(batch_size=batch, num_minibatches=batch // cfg.minibatch_size,
                   micro_batch_size=cfg.minibatch_size // cfg.grad_accum_steps)


@dataclass(frozen=True)
class ResolvedOptions:
    """The options of a :class:`PPOConfig` whose value depends on other options, resolved once."""

    kl_mode: str                    # "reward" | "loss" (cfg.kl_mode, or by advantage estimator)
    kl_estimator: str               # "k1" | "k2" | "k3" (cfg.kl_estimator, or by KL mode)
    uses_critic: bool               # GAE needs values; GRPO/RLOO do not
    stop_strings: tuple[str, ...]   # cfg.stop_strings split at commas, "\\n" read as a newline
    critic_learning_rate: float     # cfg.critic_learning_rate, or cfg.learning_rate

    @classmethod
    def from_config(cls, cfg: PPOConfig) -> "ResolvedOptions":
        kl_mode = cfg.kl_mode or ("loss" if cfg.advantage_estimator == "grpo" else "reward")
        # "\\n" typed on a command line means a newline
        stops = tuple(p.replace("\\n", "\n") for p in cfg.stop_strings.split(",") if p) if cfg.stop_strings else ()
        return cls(
            kl_mode=kl_mode,
            kl_estimator=cfg.kl_estimator or ("k3" if kl_mode == "loss" else "k1"),
            uses_critic=cfg.advantage_estimator == "gae",
            stop_strings=stops,
            critic_learning_rate=(cfg.critic_learning_rate if cfg.critic_learning_rate is not None
                                  else cfg.learning_rate),
        )
