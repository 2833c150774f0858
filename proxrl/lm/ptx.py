"""PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): a language-modelling loss on pretraining text mixed into PPO.

InstructGPT maximises, over the RL policy pi_phi,

    objective(phi) = E_{(x, y) ~ D_pi}[ r_theta(x, y) - beta * log(pi_phi(y | x) / pi_SFT(y | x)) ]
                     + gamma * E_{x ~ D_pretrain}[ log pi_phi(x) ]

The first expectation is what PPO optimises (reward with the per-token KL penalty to the reference). The second
term keeps the policy a good language model of the pretraining distribution ("PPO-ptx"); as a loss to minimise it
is ``gamma * ptx_loss``, where :func:`ptx_loss` is the mean next-token negative log-likelihood of a batch of
pretraining text under the current policy, and :class:`PtxBatches` supplies those batches (fixed-length blocks of
tokenized text, in a seeded order that a checkpoint can resume exactly).

A trainer adds ``ptx_coef * ptx_loss(policy, batch["input_ids"], batch["attention_mask"])`` to the PPO loss of
each minibatch (one ptx batch per optimizer step) and logs it separately.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from proxrl.errors import UserError
from proxrl.lm.heads import unwrap_model
from proxrl.lm.logprobs import logprobs_from_logits
from proxrl.lm.positions import position_ids_from_mask

__all__ = ["ptx_loss", "PtxBatches"]


def ptx_loss(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token negative log-likelihood (nats per token) of a batch of text under a causal LM.

    Args:
        model: a causal LM (HF, PEFT-wrapped with its adapters active, or a
            :class:`~proxrl.lm.heads.PolicyWithValueHead`, whose LM is used).
        input_ids: (B, T) long.  attention_mask: (B, T) 0/1, left or right padding.

    Returns:
        0-d float32: ``-mean log pi(x_t | x_<t)`` over the targets t >= 1 whose token and preceding token both
        have mask 1 (the first real token of a row has no context and is not a target). Position ids come from
        the mask, as everywhere in proxrl. Differentiable; 0 (still attached to the graph) if there is no target.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         f"must both be (B, T)")
    lm = unwrap_model(model)
    mask = attention_mask.long()
    logits = lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=False).logits
    logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # (B, T-1) float32
    target = (mask[:, 1:] * mask[:, :-1]).to(logp.dtype)
    return -(logp * target).sum() / target.sum().clamp(min=1.0)


class PtxBatches:
    """An endless, seeded iterator of fixed-length batches of pretraining text for :func:`ptx_loss`.

    The texts are tokenized (no added special tokens), each followed by EOS (``add_eos``), joined into one token
    stream and cut into ``num_blocks`` blocks of ``seq_len`` tokens (the incomplete last block is dropped; a
    stream shorter than ``seq_len`` is one shorter block). Each epoch visits every block once, in an order drawn
    from ``(seed, epoch)``; batches run on across epoch boundaries. ``next()`` returns
    ``{"input_ids": (batch_size, L) long, "attention_mask": (batch_size, L) long of ones}``, L = ``block_len``.

    ``state_dict()`` is a small JSON-able dict; ``load_state_dict`` on an iterator built from the same texts,
    tokenizer and settings continues with exactly the batches the original would have produced next.
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, seq_len: int, batch_size: int, seed: int = 0,
                 add_eos: bool = True, source: str = "ptx data") -> None:
        if isinstance(texts, str):
            raise UserError(f"{source}: expected a list of texts, got one string; split it into documents")
        if seq_len < 2:
            raise UserError(f"ptx sequence length {seq_len} must be >= 2 tokens")
        if batch_size < 1:
            raise UserError(f"ptx batch size {batch_size} must be >= 1")
        eos = tokenizer.eos_token_id
        if add_eos and eos is None:
            raise UserError(f"{source}: the tokenizer has no EOS token to separate documents; use one with EOS")
        stream: list[int] = []
        for t in texts:
            if not isinstance(t, str):
                raise UserError(f"{source}: expected text strings, got {type(t).__name__}; give a text column")
            if not t.strip():
                continue
            stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
            if add_eos:
                stream.append(int(eos))
        if len(stream) < 2:
            raise UserError(f"{source} holds no text (empty, blank or fewer than 2 tokens); give a non-empty "
                            f"--ptx-data or drop --ptx-coef")
        length = min(seq_len, len(stream))
        n = len(stream) // length
        self.blocks = torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.source = source
        self.fingerprint = hashlib.sha256(self.blocks.numpy().astype("<i8").tobytes()).hexdigest()[:16]
        self.epoch = 0
        self.index = 0
        self._order: list[int] | None = None

    @property
    def num_blocks(self) -> int:
        """Blocks per epoch."""
        return int(self.blocks.shape[0])

    @property
    def block_len(self) -> int:
        """Tokens per block (= ``seq_len`` unless the whole stream is shorter)."""
        return int(self.blocks.shape[1])

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            order = list(range(self.num_blocks))
            random.Random(f"proxrl-ptx:{self.seed}:{self.epoch}").shuffle(order)
            self._order = order
        return self._order

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        idx: list[int] = []
        while len(idx) < self.batch_size:
            order = self._epoch_order()
            take = order[self.index: self.index + self.batch_size - len(idx)]
            idx += take
            self.index += len(take)
            if self.index >= self.num_blocks:
                self.epoch += 1
                self.index = 0
                self._order = None
        ids = self.blocks[idx]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "epoch", "index", "num_blocks", "block_len", "batch_size", "fingerprint"}`` (JSON-able)."""
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "num_blocks": self.num_blocks,
                "block_len": self.block_len, "batch_size": self.batch_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict`.

        Raises:
            UserError: the state was saved for other ptx data, block length, batch size or seed.
        """
        mine = self.state_dict()
        for key in ("fingerprint", "num_blocks", "block_len", "batch_size", "seed"):
            if state.get(key) != mine[key]:
                raise UserError(f"{self.source}: the checkpoint's ptx data state has {key}={state.get(key)!r} but "
                                f"this run has {mine[key]!r}; resume with the same --ptx-data and settings")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.num_blocks:
            raise UserError(f"{self.source}: invalid ptx position epoch={epoch}, index={index} in the checkpoint")
        self.epoch, self.index, self._order = epoch, index, None
