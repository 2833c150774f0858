"""Configuration of PPO on Gymnasium environments: :class:`ControlConfig` and the sizes derived from it.

Every field is declared with :func:`proxrl.config.opt` so the CLI can expose it as ``--field-name`` with its
help text. Defaults follow CleanRL's ``ppo.py`` / ``ppo_continuous_action.py`` and Stable-Baselines3's ``PPO``
where those agree; each help text says where a default comes from. Tuned per-environment values live in
:mod:`proxrl.control.presets`. ``ControlConfig.renamed_fields`` maps old option names to new ones (a config
file with an old name gets a one-line error naming the new one); ``ControlConfig.resumable_fields`` lists the
options a ``--resume`` may change (:func:`proxrl.config.resume_config`).
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from proxrl.config import RUN_INFO_KEY, check, opt
from proxrl.errors import UserError

__all__ = ["ControlConfig", "Sizes", "sizes", "check_env_id", "parse_hidden_sizes", "RUN_INFO_KEY", "config_values"]

#: Key of config.yaml's section that describes the run rather than configures it (the device and number of
#: processes of the latest session, the Atari preprocessing); readers drop it (:func:`config_values`).


def config_values(saved: dict[str, Any]) -> dict[str, Any]:
    """The :class:`ControlConfig` options of a run's config.yaml mapping (without its ``run_info`` section)."""
    return {k: v for k, v in saved.items() if k != RUN_INFO_KEY}


def parse_hidden_sizes(text: str) -> tuple[int, ...]:
    """``"64,64"`` -> ``(64, 64)``; ``""`` -> ``()`` (linear policy). UserError on anything else."""
    text = text.strip()
    if not text:
        return ()
    try:
        sizes_ = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"hidden_sizes={text!r} is not a comma-separated list of integers; use e.g. '64,64'") from None
    if any(s < 1 for s in sizes_):
        raise UserError(f"hidden_sizes={text!r} has a layer width below 1; use positive widths such as '64,64'")
    return sizes_


def check_env_id(env_id: str) -> None:
    """UserError unless ``env_id`` is a registered Gymnasium id or a ``module:function`` factory path.

    For an unknown id the message lists the closest registered ids (``difflib``), e.g.
    ``unknown Gymnasium env id 'CartPole-v0'; did you mean 'CartPole-v1'?``.
    """
    import gymnasium as gym

    from proxrl.control.envs_extra import require_extra_for

    if not env_id:
        raise UserError("env_id is empty; give a Gymnasium id such as 'CartPole-v1' or a factory 'pkg.module:make_env'")
    require_extra_for(env_id)  # registers the ALE/ ids; names the extra an Atari or MuJoCo id needs
    if env_id in gym.registry:
        return
    if ":" in env_id and "/" not in env_id.split(":")[0]:
        # "pkg.module:function" factory (or gymnasium's own "module:EnvId" form, left to gym.make).
        return
    close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; list ids with gymnasium.registry"
    raise UserError(f"unknown Gymnasium env id {env_id!r}{hint}")


@dataclass
class ControlConfig:
    """PPO hyperparameters and run settings for one Gymnasium environment (see each field's help)."""

    env_id: str = opt(
        "CartPole-v1",
        "Gymnasium environment id (e.g. CartPole-v1) or a factory 'pkg.module:function' returning a gymnasium.Env.",
    )
    seed: int = opt(
        1, "Seed in [0, 2**63) for the network init, action sampling, minibatch order and environments (CleanRL default 1)."
    )
    total_steps: int = opt(100_000, "Environment steps to train for, summed over the parallel envs.")
    num_envs: int = opt(8, "Parallel environments in the vector env (rl-zoo CartPole value; CleanRL uses 4).")
    rollout_steps: int = opt(128, "Steps collected per env before each update (CleanRL num_steps default 128).")
    num_minibatches: int = opt(
        4,
        "Random minibatches per epoch: the rollout's transitions (num_envs*rollout_steps less the NEXT_STEP reset steps, "
        "which are dropped) are split into this many near-equal parts (CleanRL default 4).",
    )
    epochs: int = opt(4, "Passes over the rollout batch per update (CleanRL update_epochs default 4).")
    learning_rate: float = opt(2.5e-4, "Adam learning rate at the start of training (CleanRL ppo.py default 2.5e-4).")
    lr_schedule: Literal["constant", "linear"] = opt(
        "linear", "How the learning rate evolves: 'linear' decays it to 0 at total_steps (CleanRL anneal_lr default)."
    )
    gamma: float = opt(0.99, "Discount factor in (0, 1] (CleanRL and SB3 default 0.99).")
    gae_lambda: float = opt(0.95, "GAE lambda in [0, 1] (Schulman et al. 2016; CleanRL and SB3 default 0.95).")
    clip_coef: float = opt(0.2, "PPO ratio clip epsilon at the start of training (Schulman et al. 2017; default 0.2).")
    clip_schedule: Literal["constant", "linear"] = opt(
        "constant", "How the clip epsilon evolves: 'linear' decays it to 0 at total_steps (SB3 default constant)."
    )
    value_clip_coef: float | None = opt(
        None,
        "Clip the value update to +-this around the old values and take the larger of the clipped and unclipped "
        "squared errors (baselines/CleanRL; SB3's clip_range_vf uses the clipped prediction only); "
        "none = unclipped value loss (SB3 default).",
    )
    value_coef: float = opt(
        0.5,
        "Weight of the value loss, which is 0.5*mean((V-R)^2): 0.5 matches CleanRL's effective weight and is half of "
        "SB3's (SB3's value loss is the plain MSE, so SB3's vf_coef=0.5 is value_coef=1 here).",
    )
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus (SB3 default 0.0; CleanRL uses 0.01 for Atari/CartPole).")
    max_grad_norm: float | None = opt(
        0.5, "Clip the global gradient norm to this; none = no clipping (CleanRL and SB3 default 0.5)."
    )
    target_kl: float | None = opt(
        None,
        "Stop the update's remaining minibatches and epochs once a minibatch's approx KL (k3) exceeds target_kl "
        "(CleanRL's threshold, checked after every minibatch; SB3 stops at 1.5*target_kl); none = never stop early.",
    )
    normalize_advantages: bool = opt(
        True, "Normalise advantages per minibatch to mean 0, std 1 (CleanRL and SB3 default true)."
    )
    norm_obs: bool = opt(False, "Normalise observations with running mean/std, clipped to +-obs_clip (SB3 VecNormalize).")
    norm_reward: bool = opt(
        False, "Divide rewards by the running std of the discounted return, clipped to +-reward_clip (SB3 VecNormalize)."
    )
    obs_clip: float = opt(10.0, "Clip normalised observations to +-this (SB3 VecNormalize default 10).")
    reward_clip: float = opt(10.0, "Clip scaled rewards to +-this (SB3 VecNormalize default 10).")
    hidden_sizes: str = opt("64,64", "Hidden layer widths of the separate actor and critic MLPs (CleanRL default "
                           "'64,64'); vector observations only (the Nature CNN of image observations is fixed).")
    activation: Literal["tanh", "relu"] = opt("tanh", "Hidden activation of both MLPs (CleanRL and SB3 default tanh); "
                                                     "vector observations only.")
    init_log_std: float = opt(0.0, "Initial log std of the Gaussian policy for Box actions (CleanRL and SB3 default 0).")
    ortho_init: bool = opt(
        True,
        "Orthogonal init of the MLPs (gain sqrt(2), policy head 0.01, value head 1, zero biases; CleanRL and SB3 "
        "default); false keeps PyTorch's default Linear init (SB3 ortho_init=False, as rl-baselines3-zoo's "
        "HalfCheetah and Hopper entries).",
    )
    eval_every: int = opt(10_000, "Run an evaluation every this many env steps; 0 = only at the end.")
    eval_episodes: int = opt(10, "Episodes per evaluation (deterministic policy: argmax / mean action).")
    eval_deterministic: bool = opt(
        True,
        "Evaluate the greedy policy (argmax / mean action); false samples actions from the policy with a seeded "
        "generator, as rl-baselines3-zoo evaluates Atari (greedy Atari policies often stall).",
    )
    target_return: float | None = opt(
        None,
        "Stop training at the first evaluation whose mean return reaches this (like SB3's "
        "StopTrainingOnRewardThreshold); schedules still span total_steps. none = always train total_steps.",
    )
    checkpoint_every: int = opt(
        50_000,
        "Write a checkpoint every this many env steps (and always at the end); 0 = only at the end. "
        "Envs are re-seeded at each checkpoint boundary so that resuming is exact.",
    )
    vector_mode: Literal["auto", "native", "sync", "async"] = opt(
        "auto",
        "How envs are vectorised: the env's own vector implementation (native), one process (sync) or one "
        "process per env (async); auto = native when the env id has one, else sync. For ALE/... ids native = "
        "ale-py's AtariVectorEnv (same preprocessing in C++ threads, ~5x async's frames/s; auto keeps async).",
    )
    keep_checkpoints: int = opt(2, "Keep only this many newest checkpoints in run_dir/checkpoints (at least 1).")
    grad_backend: Literal["auto", "numpy", "autograd"] = opt(
        "auto",
        "How the PPO loss gradient is computed: 'numpy' in closed form with hand-written MLP backward (fast; MLP "
        "policies of Linear/Tanh/ReLU layers only), 'autograd' with torch autograd (any policy, the reference), "
        "'auto' = numpy when the policy supports it, else autograd.",
    )
    threads: int = opt(
        1,
        "torch.set_num_threads for training. 1 is fastest for small MLPs (CartPole) and the only safe choice on a "
        "busy machine. 2 trains HalfCheetah's 256x256 MLPs ~15% faster on 2 idle cores (the large products and "
        "Adam split in two); `proxrl train --threads N>1` then lets OpenMP's threads spin briefly between ops "
        "instead of sleeping (OMP_WAIT_POLICY=PASSIVE otherwise), which makes them several times slower if another "
        "process needs those cores.",
    )
    device: str = opt(
        "auto",
        "Where the policy trains: auto (CUDA when available, else CPU), cpu, cuda (cuda:LOCAL_RANK under torchrun), "
        "cuda:N or mps. On CPU the MLP policies take the numpy fast path (grad_backend auto); on a GPU the torch "
        "autograd path. Envs always run on the CPU. The device used is printed and saved in config.yaml.",
    )
    bf16: bool = opt(
        False,
        "Run the CNN policy's convolutions and matmuls under torch.autocast(bfloat16) (CUDA, and CPUs with "
        "AVX512-BF16/AMX, ~2x faster there; refused on other CPUs, where bf16 is emulated ~10x slower); weights, "
        "optimizer, log-probs and losses stay float32. Image (CNN) policies only, autograd backend.",
    )
    video_every: int = opt(
        0,
        "Record one greedy evaluation episode as a video into run_dir/videos every this many env steps (MP4 with "
        "moviepy, else GIF; needs the env to render rgb_array); 0 = never.",
    )
    tensorboard: bool = opt(True, "Also write TensorBoard events to run_dir/tb.")

    renamed_fields: ClassVar[dict[str, str]] = {
        "clip_value_coef": "value_clip_coef",
        "norm_adv": "normalize_advantages",
    }
    # What a --resume may change: the budget, evaluation, checkpointing and logging, never the learning itself.
    resumable_fields: ClassVar[frozenset[str]] = frozenset({
        "total_steps", "target_return", "eval_every", "eval_episodes", "eval_deterministic", "checkpoint_every",
        "keep_checkpoints",
        "threads", "tensorboard", "device", "video_every",
    })

    def __post_init__(self) -> None:
        check(isinstance(self.env_id, str), f"env_id={self.env_id!r} must be a string")
        for name, value in vars(self).items():  # also for configs built in Python, not only from flags / YAML
            check(not isinstance(value, float) or math.isfinite(value), f"{name}={value} must be a finite number")
        check(0 <= self.seed < 2**63, f"seed={self.seed} must be in [0, 2**63)")
        check(self.total_steps >= 1, f"total_steps={self.total_steps} must be at least 1")
        check(self.num_envs >= 1, f"num_envs={self.num_envs} must be at least 1")
        check(self.rollout_steps >= 1, f"rollout_steps={self.rollout_steps} must be at least 1")
        check(self.num_minibatches >= 1, f"num_minibatches={self.num_minibatches} must be at least 1")
        batch = self.num_envs * self.rollout_steps
        check(
            self.num_minibatches <= batch,
            f"num_minibatches={self.num_minibatches} exceeds the rollout batch num_envs*rollout_steps={batch}; "
            "use fewer minibatches or a longer rollout",
        )
        check(self.epochs >= 1, f"epochs={self.epochs} must be at least 1")
        check(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate={self.learning_rate} must be a positive number",
        )
        check(0 < self.gamma <= 1, f"gamma={self.gamma} must be in (0, 1]")
        check(0 <= self.gae_lambda <= 1, f"gae_lambda={self.gae_lambda} must be in [0, 1]")
        check(math.isfinite(self.clip_coef) and self.clip_coef > 0, f"clip_coef={self.clip_coef} must be positive")
        check(
            self.value_clip_coef is None or self.value_clip_coef > 0,
            f"value_clip_coef={self.value_clip_coef} must be positive or none (unclipped)",
        )
        check(self.value_coef >= 0, f"value_coef={self.value_coef} must be >= 0")
        check(self.entropy_coef >= 0, f"entropy_coef={self.entropy_coef} must be >= 0")
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm={self.max_grad_norm} must be positive; use none to disable gradient clipping",
        )
        check(self.target_kl is None or self.target_kl > 0, f"target_kl={self.target_kl} must be positive or none")
        check(self.obs_clip > 0, f"obs_clip={self.obs_clip} must be positive")
        check(self.reward_clip > 0, f"reward_clip={self.reward_clip} must be positive")
        parse_hidden_sizes(self.hidden_sizes)
        check(self.eval_every >= 0, f"eval_every={self.eval_every} must be >= 0 (0 = only at the end)")
        check(self.eval_episodes >= 1, f"eval_episodes={self.eval_episodes} must be at least 1")
        check(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0 (0 = only at the end)")
        check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be at least 1")
        check(self.threads >= 1, f"threads={self.threads} must be at least 1")
        check(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device.strip().lower())
              is not None, f"device={self.device!r} must be auto, cpu, cuda, cuda:N or mps")
        check(self.video_every >= 0, f"video_every={self.video_every} must be >= 0 (0 = no videos during training)")
        check(
            self.grad_backend in ("auto", "numpy", "autograd"),
            f"grad_backend={self.grad_backend!r} must be one of auto, numpy, autograd",
        )
        for name in ("lr_schedule", "clip_schedule"):
            value = getattr(self, name)
            check(value in ("constant", "linear"), f"{name}={value!r} must be 'constant' or 'linear'")
        check(self.activation in ("tanh", "relu"), f"activation={self.activation!r} must be 'tanh' or 'relu'")
        check(not (self.bf16 and self.grad_backend == "numpy"),
              "bf16=true needs grad_backend auto or autograd (the numpy backend computes in float64/float32)")
        check(
            self.vector_mode in ("auto", "native", "sync", "async"),
            f"vector_mode={self.vector_mode!r} must be one of auto, native, sync, async",
        )
        check_env_id(self.env_id)


@dataclass(frozen=True)
class Sizes:
    """Quantities derived from a :class:`ControlConfig` (never written back into it)."""

    batch_size: int  # num_envs * rollout_steps env steps per update
    num_updates: int  # ceil(total_steps / batch_size); the last update may overshoot total_steps


def sizes(cfg: ControlConfig) -> Sizes:
    """Derived batch sizes and number of updates for ``cfg``."""
    batch = cfg.num_envs * cfg.rollout_steps
    return Sizes(
        batch_size=batch,
        num_updates=max(1, math.ceil(cfg.total_steps / batch)),
    )
