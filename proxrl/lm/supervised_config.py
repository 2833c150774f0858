"""Options of the two supervised LM stages, ``proxrl sft`` and ``proxrl reward-model`` (no torch import here).

Both stages run the one loop of :mod:`proxrl.lm.supervised`; the options of that loop (optimisation, cadence,
checkpoints) are declared once, in :class:`SupervisedOptions`, and mean the same in both.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from proxrl.config import check, opt

__all__ = ["TINY_MODEL", "SupervisedOptions", "SFTConfig", "RewardModelConfig", "check_device_spec", "DEVICE_HELP"]

TINY_MODEL = "tiny-gpt2"
LR_SCHEDULES = ("cosine", "linear", "constant")
DATA_FORMATS = "JSONL, JSON, CSV, Parquet, a save_to_disk directory or a hub name org/name[:split]"
DEVICE_HELP = ("where the model and optimizer state live: auto (CUDA when available, else the CPU), cpu, cuda, cuda:N "
               "or mps; under torchrun each process takes cuda:LOCAL_RANK. The device used is printed and saved in "
               "config.yaml; checkpoints do not depend on it")


def check_device_spec(device: str) -> None:
    """One-line UserError unless ``device`` is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists
    is checked when the run starts, by :func:`proxrl.distributed.resolve_device`)."""
    check(isinstance(device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device.strip().lower()) is not None,
          f"device={device!r} must be auto, cpu, cuda, cuda:N or mps")


@dataclass
class SupervisedOptions:
    """The options of the supervised loop (:mod:`proxrl.lm.supervised`); they mean the same in both stages.

    A stage's config inherits them after its own data and model options (a stage may change a default).
    """

    epochs: float = opt(1.0, "passes over the training data (fractional allowed); ignored if --max-steps > 0")
    max_steps: int = opt(0, "optimizer steps; 0 = derived from --epochs")
    batch_size: int = opt(32, "examples per optimizer step")
    learning_rate: float = opt(1e-3, "peak AdamW learning rate (1e-3 suits tiny models from scratch; ~2e-5 for pretrained ones)")
    lr_schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases/LayerNorm)")
    max_grad_norm: float | None = opt(1.0, "gradient-norm clip; none = no clipping")
    eval_every: int = opt(100, "evaluate on the held-out data every N steps (and at the end)")
    log_every: int = opt(10, "log the training loss every N steps")
    checkpoint_every: int = opt(0, "save a resumable checkpoint (weights, optimizer, data order) to checkpoints/ every N steps; 0 = only the final model")
    keep_checkpoints: int = opt(2, "keep the newest N checkpoints (0 = all)")
    seed: int = opt(0, "random seed (initialisation, data split, order)")
    threads: int = opt(0, "torch CPU threads; 0 = leave torch's setting")
    progress: bool = opt(True, "show a progress bar (on a terminal)")
    device: str = opt("auto", DEVICE_HELP)
    bf16: bool = opt(False, "run forwards under torch.autocast(bfloat16) on CUDA, or on a CPU with native bf16 (AVX512-BF16/AMX; refused on other CPUs, where it runs ~10-20x slower); weights and optimizer stay float32")
    fsdp: bool = opt(False, "shard the model, its gradients and optimizer state over the torchrun processes with FSDP2 (needs several processes); the outputs are still whole from_pretrained directories")

    #: what a ``--resume`` may change: the length of the run, how it is logged and saved, and where it runs (the
    #: device, the number of processes and FSDP: checkpoints hold whole tensors on the CPU)
    resumable_fields: ClassVar[frozenset[str]] = frozenset({
        "max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "threads",
        "progress", "device", "fsdp"})

    def __post_init__(self) -> None:
        check(self.epochs > 0 and math.isfinite(self.epochs), f"epochs={self.epochs} must be > 0")
        check(self.max_steps >= 0, f"max_steps={self.max_steps} must be >= 0")
        check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate),
              f"learning_rate={self.learning_rate} must be > 0")
        check(self.lr_schedule in LR_SCHEDULES,
              f"lr_schedule={self.lr_schedule!r} must be one of {', '.join(repr(s) for s in LR_SCHEDULES)}")
        check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        check(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0,
              f"max_grad_norm={self.max_grad_norm} must be > 0; use none to turn gradient clipping off")
        check(self.eval_every >= 1, f"eval_every={self.eval_every} must be >= 1")
        check(self.log_every >= 1, f"log_every={self.log_every} must be >= 1")
        check(self.checkpoint_every >= 0, f"checkpoint_every={self.checkpoint_every} must be >= 0")
        check(self.keep_checkpoints >= 0, f"keep_checkpoints={self.keep_checkpoints} must be >= 0")
        check(self.threads >= 0, f"threads={self.threads} must be >= 0")
        check_device_spec(self.device)


def _check_data_options(cfg: _SFTData | _RewardModelData) -> None:
    check(bool(cfg.run_dir), "run_dir is empty; give --run-dir")
    check(cfg.max_length >= 2, f"max_length={cfg.max_length} must be >= 2")
    check(0.0 <= cfg.eval_fraction < 1.0, f"eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    check(cfg.chat_template.strip() != "", "chat_template is empty; give auto, none or PATH.jinja")


@dataclass
class _SFTData:
    data: str = opt("", f"training data: .txt/.txt.gz (one document per line), or {DATA_FORMATS} with "
                        f"{{prompt, completion}}, {{text}} or {{messages}} rows")
    model: str = opt(TINY_MODEL, "local HF causal-LM directory to fine-tune, or 'tiny-gpt2' for a fresh tiny GPT-2 (see --n-layer etc.)")
    tokenizer: str | None = opt(None, "tokenizer directory; default: the model directory, or for tiny-gpt2 a byte-level BPE trained on --data")
    run_dir: str = opt("runs/sft", "run directory; the final model and tokenizer are saved at its top level (from_pretrained-loadable)")
    overwrite: bool = opt(False, "allow writing into an existing run directory")
    # tiny model (model == 'tiny-gpt2')
    vocab_size: int = opt(2048, "BPE vocabulary size when a tokenizer is trained (tiny-gpt2 without --tokenizer)")
    n_layer: int = opt(4, "tiny-gpt2: transformer blocks")
    n_embd: int = opt(128, "tiny-gpt2: hidden size")
    n_head: int = opt(4, "tiny-gpt2: attention heads (must divide n_embd)")
    n_positions: int = opt(128, "tiny-gpt2: context length (must be >= max_length and leave room for generation)")
    # data handling
    text_mode: Literal["line", "chunk"] = opt("line", "plain text: 'line' = one example per line; 'chunk' = one stream cut into max_length blocks")
    max_length: int = opt(128, "tokens per example (longer examples are truncated)")
    prompt_column: str = opt("prompt", "data column of the prompt (loss only on the completion)")
    completion_column: str = opt("completion", "data column of the completion (loss only on these tokens + EOS)")
    text_column: str = opt("text", "data column of plain text (loss on every token)")
    messages_column: str = opt("messages", "data column of conversations [{role, content}, ...] (loss on assistant turns only)")
    chat_template: str = opt("auto", "chat template: 'auto' (the tokenizer's own if it has one; data with messages "
                                     "then needs one), 'none' (plain text; message contents joined, EOS after "
                                     "assistant turns) or PATH.jinja")
    add_eos: bool = opt(True, "append the EOS token to every document / completion (teaches the model to stop)")
    eval_fraction: float = opt(0.05, "fraction of examples held out for the eval loss")
    max_eval_examples: int = opt(512, "cap on held-out examples")


@dataclass
class SFTConfig(SupervisedOptions, _SFTData):
    """Options of :func:`proxrl.lm.sft.train_sft` (one ``proxrl sft --flag`` each): the data and model options,
    then those of the loop (:class:`SupervisedOptions`)."""

    stage: ClassVar[str] = "sft"
    renamed_fields: ClassVar[dict[str, str]] = {"prompt_key": "prompt_column", "completion_key": "completion_column"}

    def __post_init__(self) -> None:
        check(bool(self.data), "data is empty; give --data FILE (.txt, .jsonl, .json, .csv, .parquet, ...)")
        check(bool(self.model), "model is empty; give a model directory or 'tiny-gpt2'")
        _check_data_options(self)
        super().__post_init__()
        check(self.vocab_size >= 260, f"vocab_size={self.vocab_size} must be >= 260 (byte-level BPE)")
        check(self.n_layer >= 1 and self.n_embd >= 1 and self.n_head >= 1,
              f"n_layer={self.n_layer}, n_embd={self.n_embd}, n_head={self.n_head} must all be >= 1")
        check(self.n_embd % self.n_head == 0, f"n_head={self.n_head} must divide n_embd={self.n_embd}")
        check(self.model != TINY_MODEL or self.n_positions >= self.max_length,
              f"n_positions={self.n_positions} must be >= max_length={self.max_length}")
        check(self.max_eval_examples >= 1, f"max_eval_examples={self.max_eval_examples} must be >= 1")
        check(all((self.prompt_column, self.completion_column, self.text_column, self.messages_column)),
              "prompt_column, completion_column, text_column and messages_column must be non-empty")


@dataclass
class _RewardModelData:
    data: str = opt("", f"preference data ({DATA_FORMATS}): {{prompt, chosen, rejected}} or {{chosen, rejected}} rows, strings or lists of messages")
    model: str = opt("", "local causal-LM directory whose trunk initialises the reward model (or a saved reward model)")
    tokenizer: str | None = opt(None, "tokenizer directory; default: the model directory")
    run_dir: str = opt("runs/reward_model", "run directory; the final reward model + tokenizer are saved at its top level")
    overwrite: bool = opt(False, "allow writing into an existing run directory")
    max_length: int = opt(128, "tokens per scored sequence (longer ones keep their first max_length tokens)")
    prompt_column: str = opt("prompt", "data column of the prompt (optional: without it chosen/rejected are whole texts)")
    chosen_column: str = opt("chosen", "data column of the preferred completion")
    rejected_column: str = opt("rejected", "data column of the other completion")
    chat_template: str = opt("auto", "chat template: 'auto' (the tokenizer's own if it has one; data with messages "
                                     "then needs one), 'none' (plain text; message contents joined) or PATH.jinja")
    append_eos: bool = opt(True, "append EOS to each completion (PPO scores finished responses at their EOS token)")
    eval_fraction: float = opt(0.1, "fraction of pairs held out for accuracy")
    center_coef: float = opt(0.01, "weight of the (r_chosen + r_rejected)^2 penalty keeping scores centred at 0 (TRL center_rewards_coefficient)")


@dataclass
class RewardModelConfig(SupervisedOptions, _RewardModelData):
    """Options of :func:`proxrl.lm.reward_model.train_reward_model` (one ``proxrl reward-model --flag`` each): the
    data and model options, then those of the loop (:class:`SupervisedOptions`, some defaults changed here)."""

    stage: ClassVar[str] = "reward_model"

    batch_size: int = opt(16, "pairs per optimizer step")
    learning_rate: float = opt(1e-4, "peak AdamW learning rate (InstructGPT RM ~9e-6 for large models; small models tolerate more)")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    eval_every: int = opt(50, "evaluate held-out accuracy every N steps (and at the end)")

    def __post_init__(self) -> None:
        check(bool(self.data), "data is empty; give --data PAIRS (.jsonl, .json, .csv, .parquet, ...)")
        check(bool(self.model), "model is empty; give --model DIR (a causal LM, e.g. an SFT output directory)")
        _check_data_options(self)
        super().__post_init__()
        check(self.center_coef >= 0 and math.isfinite(self.center_coef), f"center_coef={self.center_coef} must be >= 0")
        check(all((self.prompt_column, self.chosen_column, self.rejected_column)),
              "prompt_column, chosen_column and rejected_column must be non-empty")
