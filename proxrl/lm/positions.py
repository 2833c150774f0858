"""Left padding, position ids and last-token indices: the batch conventions every ``proxrl.lm`` forward follows.

* Prompts are LEFT-padded and every batch carries an explicit ``attention_mask`` (B, T) of 0/1; masks are never
  inferred from ``pad_token_id`` (the pad token may equal EOS).
* Position ids are always ``cumsum(mask) - 1`` clamped at 0 (:func:`position_ids_from_mask`), in generation and
  in every later forward pass, so a token gets the same position whatever the amount of left padding in its batch.
* Scalar heads and rewards are read at an explicit index (:func:`last_token_index`), never at "the first pad".
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["left_pad", "position_ids_from_mask", "last_token_index"]


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists. Returns ``(input_ids (B, P) long, attention_mask (B, P) long)``."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if len(toks):
            ids[i, width - len(toks):] = torch.as_tensor(list(toks), dtype=torch.long)
            mask[i, width - len(toks):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) 0/1 mask -> (B, T) long positions ``cumsum(mask) - 1`` clamped at 0 (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def last_token_index(mask: Tensor) -> Tensor:
    """(B, T) 0/1 mask -> (B,) long index of the last position whose mask is 1 (0 for an all-zero row).

    On an attention mask: the last real token of each sequence; on a response mask (B, R): the last response
    token (EOS included), where the sequence score is placed.
    """
    t = mask.shape[-1]
    ar = torch.arange(t, device=mask.device)
    return (mask.bool() * ar).max(dim=-1).values
