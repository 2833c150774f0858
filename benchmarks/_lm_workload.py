"""The LM PPO benchmark workload, defined offline: tokenizer, prompts, random-init GPT-2 models, FLOP counts.

Nothing is downloaded. The tokenizer is a byte-level BPE (vocab 1024, specials ``<pad>`` = 0, ``<eos>`` = 1)
trained with ``tokenizers`` on the Python reference-manual text that ships inside CPython
(``pydoc_data.topics``); the prompts are the first 8..16 tokens of 256 distinct prose lines of that text; the
models are GPT-2s built from a config with random weights: a policy, a frozen reference (an exact copy of the
policy), a value model and a reward model (sequence-classification GPT-2s with a 1-output head).

This is the workload TRL's PPO was measured on for proxrl's comparison (see benchmarks/README.md, section
"LM PPO vs TRL"); both sides of ``benchmarks/lm_bench.py`` build it from here, so they see identical
tokens and identical initial weights.

Imports torch/transformers lazily so the benchmark's parent process stays small (its RSS would otherwise be
inherited into the children's ``ru_maxrss``).
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
from pathlib import Path
from typing import Any

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
               ("TRL_EXPERIMENTAL_SILENCE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(_k, _v)

# named model sizes of the benchmark (both 4 heads, 128 positions)
CONFIGS: dict[str, dict[str, int]] = {
    "small": {"n_layer": 2, "n_embd": 128, "n_head": 4},   # 0.54M parameters
    "large": {"n_layer": 6, "n_embd": 512, "n_head": 4},   # 19.5M parameters
}
VOCAB = 1024
N_PROMPTS = 256
PROMPT_MIN, PROMPT_MAX = 8, 16
N_POSITIONS = 128
# per-update shape of the PPO workload (identical on both sides)
BATCH = 64             # prompts (= sequences) per update
RESPONSE_LEN = 32      # new tokens, no stop token
EPOCHS = 4             # PPO epochs per update
MINIBATCHES = 4        # minibatches per epoch -> 16 sequences each, one optimizer step each
LEARNING_RATE = 1e-5
KL_COEF = 0.05


def corpus_lines() -> list[str]:
    """Lines of the CPython reference-manual topics (pydoc_data.topics, ~465 KB), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics)).splitlines()


def build_tokenizer(vocab_size: int = VOCAB) -> Any:
    """Byte-level BPE trained on :func:`corpus_lines`; a left-padding ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus_lines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")
    tok.padding_side = "left"
    return tok


def build_prompts(tokenizer: Any, n: int = N_PROMPTS, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts of PROMPT_MIN..PROMPT_MAX tokens (uniform): the first tokens of distinct prose
    lines (> 60 characters, starting with a capitalised word) that encode to at least PROMPT_MAX tokens."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    for line in (s.strip() for s in corpus_lines()):
        if len(line) <= 60 or not re.match(r"[A-Z][a-z]", line):
            continue
        ids = tokenizer(line)["input_ids"]
        if len(ids) < PROMPT_MAX:
            continue
        out.append(ids[: rng.randint(PROMPT_MIN, PROMPT_MAX)])
        if len(out) == n:
            return out
    raise RuntimeError(f"the corpus yields only {len(out)} prompts, {n} wanted")


def gpt2_config(tokenizer: Any, n_layer: int, n_embd: int, n_head: int, **extra: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      n_positions=N_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **extra)


def build_models(tokenizer: Any, n_layer: int, n_embd: int, n_head: int, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """(policy, reference, value, reward), random init from ``seed``, in this order (the order fixes the
    weights). The reference is an exact copy of the policy."""
    import torch
    from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = gpt2_config(tokenizer, n_layer, n_embd, n_head)
    policy = GPT2LMHeadModel(cfg)
    ref = GPT2LMHeadModel(cfg)
    ref.load_state_dict(policy.state_dict())
    scalar_cfg = gpt2_config(tokenizer, n_layer, n_embd, n_head, num_labels=1)
    value = AutoModelForSequenceClassification.from_config(scalar_cfg)
    reward = AutoModelForSequenceClassification.from_config(scalar_cfg)
    return policy, ref, value, reward


def save_workload(out_dir: str | Path, n_layer: int, n_embd: int, n_head: int, seed: int = 0) -> Path:
    """Write the workload for loaders that take directories (proxrl): ``policy/``, ``value/``, ``reward/``
    (HF save_pretrained + the tokenizer), ``prompts.json`` (token ids) and ``checksums.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    prompts = build_prompts(tok)
    policy, _ref, value, reward = build_models(tok, n_layer, n_embd, n_head, seed)
    for name, model in (("policy", policy), ("value", value), ("reward", reward)):
        model.save_pretrained(str(out / name))
        tok.save_pretrained(str(out / name))
    (out / "prompts.json").write_text(json.dumps(prompts))
    (out / "checksums.json").write_text(json.dumps(
        {"policy": checksum(policy), "value": checksum(value), "reward": checksum(reward)}))
    return out


def load_prompt_ids(workload_dir: str | Path) -> list[list[int]]:
    return json.loads((Path(workload_dir) / "prompts.json").read_text())


def checksum(model: Any) -> float:
    """Sum of |w| over all parameters: a cheap fingerprint showing both sides start from the same weights."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def nparams(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ FLOPs
def matmul_params(n_layer: int, n_embd: int, vocab: int = VOCAB, lm_head: bool = True) -> int:
    """Weights that take part in a matmul per token: 12 d^2 per block (qkv 3d^2, proj d^2, MLP 8d^2) plus the
    output head (V x d for an LM, d x 1 for a scalar model). Embedding lookups, biases and norms excluded."""
    return n_layer * 12 * n_embd * n_embd + (vocab * n_embd if lm_head else n_embd)


def update_flops(n_layer: int, n_embd: int, prompt_width: int, shared_critic: bool,
                 batch: int = BATCH, response_len: int = RESPONSE_LEN, epochs: int = EPOCHS) -> dict[str, float]:
    """Model FLOPs of one PPO update, ``2 N`` per token per forward and ``6 N`` per token per trained token,
    counting every processed position (padding included) of the B x (P + R) batch:

    * generation: policy forward over B x (P + R) positions (prefill P, then R single-token steps);
    * scoring: reference (LM) + value (scalar; or the policy again when the critic shares its trunk) +
      reward (scalar) forwards over B x (P + R);
    * training: ``epochs`` passes over the B sequences, forward + backward of policy and (separate) critic.
    Attention-score FLOPs (4 T d per token per layer, <= 6% here) are left out.
    """
    n_lm = matmul_params(n_layer, n_embd, lm_head=True)
    n_sc = matmul_params(n_layer, n_embd, lm_head=False)
    tokens = batch * (prompt_width + response_len)
    gen = 2 * n_lm * tokens
    score = 2 * (n_lm + (n_lm if shared_critic else n_sc) + n_sc) * tokens
    train = 6 * (n_lm + (0 if shared_critic else n_sc)) * tokens * epochs
    return {"gen": float(gen), "score": float(score), "train": float(train), "total": float(gen + score + train)}


# ------------------------------------------------------------------------------------------------ memory
def peak_rss_mb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float:
    """Peak RSS of this process's address space (``VmHWM``), not inherited from a parent across exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
