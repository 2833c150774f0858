"""The frozen reference policy pi_ref of the KL penalty: a frozen copy, or the LoRA policy with its adapters off."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

from torch import nn

from proxrl.errors import UserError
from proxrl.lm.heads import PolicyWithValueHead, is_peft

__all__ = ["freeze", "reference_from_policy", "reference_context"]


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter. Returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def reference_from_policy(policy: Any, use_lora_adapters: bool = False) -> Any:
    """The frozen reference model pi_ref for the KL penalty.

    * ``use_lora_adapters=False``: a deep copy of the policy's LM (without any value head), frozen, eval mode.
    * ``use_lora_adapters=True`` (PEFT LoRA policy): no copy; returns the policy's LM itself. Run reference
      forwards inside ``with reference_context(ref):`` which disables the adapters (pi_ref = the base model).

    Always wrapping reference forwards in :func:`reference_context` works for both cases.
    """
    lm = policy.policy if isinstance(policy, PolicyWithValueHead) else policy
    if use_lora_adapters:
        if not is_peft(lm):
            raise UserError("use_lora_adapters=True needs a PEFT LoRA policy (see apply_lora); the policy has "
                            "no adapters")
        return lm
    return freeze(copy.deepcopy(lm))


@contextlib.contextmanager
def reference_context(model: Any) -> Iterator[Any]:
    """Context in which ``model`` computes the reference distribution; yields the module to call.

    For a PEFT model: adapters disabled and eval mode (restored on exit). For any other model: a no-op.
    """
    lm = model.policy if isinstance(model, PolicyWithValueHead) else model
    if not is_peft(lm):
        yield lm
        return
    was_training = lm.training
    lm.eval()
    try:
        with lm.disable_adapter():
            yield lm
    finally:
        lm.train(was_training)
