"""Scalar heads on a causal LM's trunk: per-position values, a score at an explicit position, a shared-trunk
value head.

* :func:`token_values` applies a sequence-classification model's head at every position (critic);
  :func:`sequence_scores` at a given ``last_index`` per row (reward model). HF's own "last non-pad token" logic
  (which looks for ``pad_token_id`` in ``input_ids``) is never used.
* :class:`PolicyWithValueHead` puts a value head on the policy's own trunk: one forward gives logits and values.
* :func:`unwrap_model` reaches the HF ``PreTrainedModel`` inside a DDP or PEFT wrapper or a
  :class:`PolicyWithValueHead`.
* :class:`TokenValues` is a critic in the form DDP and FSDP wrap: a module whose own ``forward`` gives the values.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from proxrl.errors import UserError
from proxrl.lm.messages import describe
from proxrl.lm.positions import position_ids_from_mask

__all__ = ["VALUE_HEAD_FILE", "is_peft", "unwrap_model", "merged_copy", "model_trunk", "scalar_head",
           "init_linear_head", "hidden_states", "token_values", "sequence_scores", "TokenValues", "SequenceScores",
           "PolicyWithValueHead", "policy_with_value_head", "is_value_head_policy", "model_device"]

VALUE_HEAD_FILE = "value_head.safetensors"
HEAD_NAMES = ("score", "classifier")  # the scalar head of HF sequence-classification models


def is_peft(model: Any) -> bool:
    """True for a PEFT (LoRA) wrapper."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _unwrap_ddp(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def unwrap_model(model: Any) -> Any:
    """The HF ``PreTrainedModel`` inside a DDP / PEFT wrapper / :class:`PolicyWithValueHead` / :class:`TokenValues`
    (LoRA layers stay active)."""
    model = _unwrap_ddp(model)
    if isinstance(model, (TokenValues, SequenceScores)):
        model = model.model
    if isinstance(model, PolicyWithValueHead):
        model = model.policy
    if is_peft(model):
        model = model.get_base_model()
    return model


def merged_copy(model: Any) -> Any:
    """A plain model: a copy of a PEFT LoRA model with the adapters merged in (``model`` itself if not PEFT)."""
    return copy.deepcopy(model).merge_and_unload() if is_peft(model) else model


def model_trunk(model: Any) -> nn.Module:
    """The transformer body (embeddings + blocks + final norm, returning ``last_hidden_state``) of a causal LM or a
    sequence-classification model, through PEFT and value-head wrappers."""
    model = unwrap_model(model)
    trunk = getattr(model, "base_model", None)
    if trunk is not None and trunk is not model:
        return trunk
    for name in ("model", "transformer", "gpt_neox"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise UserError(f"cannot find the transformer trunk of {type(model).__name__}; use a GPT-2/Llama-style model")


def scalar_head(model: Any) -> nn.Module:
    """The per-position linear scalar head (``score`` / ``classifier``) of a sequence-classification model."""
    model = unwrap_model(model)
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if head is None:
            continue
        # peft's ModulesToSaveWrapper forwards to the active copy; plain Linear heads are used as is.
        inner = getattr(head, "modules_to_save", None)
        if inner is not None and not isinstance(head, nn.Linear):
            active = getattr(head, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) else active
            if active in inner:
                return inner[active]
            return head.original_module
        if isinstance(head, nn.Linear):
            return head
        raise UserError(f"{type(model).__name__}.{name} is a {type(head).__name__}, not a per-position linear "
                        f"head; use a decoder model whose sequence-classification head is a Linear 'score'")
    raise UserError(f"{type(model).__name__} has no 'score' or 'classifier' head; load it with load_scalar_model")


def hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Final hidden states (B, T, H) of ``model``'s trunk, with position ids from the mask."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model_trunk(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_values(seqcls_model: Any, input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Tensor | None = None) -> Tensor:
    """The scalar head applied at every position: (B, T) long ids, (B, T) mask -> (B, T) float32.

    Values at masked positions are computed but meaningless; mask them downstream. A :class:`TokenValues` (maybe
    inside DDP) is called through its own ``forward``, so DDP's and FSDP's hooks run.
    """
    if isinstance(_unwrap_ddp(seqcls_model), TokenValues):
        return seqcls_model(input_ids, attention_mask, position_ids)
    h = hidden_states(seqcls_model, input_ids, attention_mask, position_ids)
    return scalar_head(seqcls_model)(h).squeeze(-1).float()


def sequence_scores(seqcls_model: Any, input_ids: Tensor, attention_mask: Tensor, last_index: Tensor,
                    position_ids: Tensor | None = None) -> Tensor:
    """The scalar head at an explicit position per row: ids/mask (B, T), ``last_index`` (B,) long -> (B,) float32.

    Use ``last_index = last_token_index(attention_mask)`` for "score of the whole sequence". A
    :class:`SequenceScores` (maybe inside DDP) is called through its own ``forward``, so DDP's and FSDP's hooks run.
    """
    if last_index.shape != input_ids.shape[:1]:
        raise ValueError(f"last_index must have shape ({input_ids.shape[0]},), got {tuple(last_index.shape)}")
    if isinstance(_unwrap_ddp(seqcls_model), SequenceScores):
        return seqcls_model(input_ids, attention_mask, last_index, position_ids)
    device = model_device(seqcls_model)
    if input_ids.device != device:  # e.g. ids encoded on the CPU for a reward model on a GPU
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = position_ids.to(device) if position_ids is not None else None
    h = hidden_states(seqcls_model, input_ids, attention_mask, position_ids)
    rows = torch.arange(h.shape[0], device=h.device)
    return scalar_head(seqcls_model)(h[rows, last_index.to(h.device)]).squeeze(-1).float()


class TokenValues(nn.Module):
    """A sequence-classification model whose ``forward`` applies its scalar head at every position.

    The critic of a multi-process run: DDP averages gradients and FSDP gathers parameters in hooks on a module's
    own ``forward``, which :func:`token_values` on the bare model bypasses (it calls the trunk and the head
    directly). ``forward(input_ids (B, T), attention_mask (B, T), position_ids=None) -> (B, T) float32``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        h = hidden_states(self.model, input_ids, attention_mask, position_ids)
        return scalar_head(self.model)(h).squeeze(-1).float()


class SequenceScores(nn.Module):
    """A sequence-classification model whose ``forward`` reads its scalar head at an explicit position per row: the
    reward model in the form DDP and FSDP wrap (see :class:`TokenValues`).
    ``forward(input_ids (B, T), attention_mask (B, T), last_index (B,), position_ids=None) -> (B,) float32``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, last_index: Tensor,
                position_ids: Tensor | None = None) -> Tensor:
        return sequence_scores(self.model, input_ids, attention_mask, last_index, position_ids)


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (its local shard's under FSDP); the CPU for a model without any."""
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        return local.device
    return torch.device("cpu")


def is_value_head_policy(model: Any) -> bool:
    """True for a :class:`PolicyWithValueHead`, also inside DDP (FSDP keeps the class: it subclasses it)."""
    return isinstance(_unwrap_ddp(model), PolicyWithValueHead)


def init_linear_head(head: nn.Module, std: float) -> None:
    """Weights from N(0, std^2) (zeros when ``std`` is 0), bias zero."""
    with torch.no_grad():
        if std == 0:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, std)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on the trunk's last hidden state (shared-trunk critic).

    ``forward(input_ids, attention_mask)`` returns ``(logits (B, T, V), values (B, T) float32)`` from ONE trunk
    pass: logits come from the LM's output embedding applied to the final hidden state, values from
    ``value_head`` applied to the same hidden state. The LM may be a PEFT LoRA model.
    """

    def __init__(self, policy: Any, head_std: float | None = 0.0) -> None:
        super().__init__()
        base = unwrap_model(policy)
        cfg = base.config
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(cfg, attr, None) not in (None, 1, 1.0):
                raise UserError(f"{cfg.model_type} applies {attr} to its logits; the shared-trunk value head "
                                f"supports plain lm_head models only (use a separate critic)")
        self.policy = policy
        hidden = cfg.hidden_size
        param = next(base.parameters())
        self.value_head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
        init_linear_head(self.value_head, 1.0 / math.sqrt(hidden + 1) if head_std is None else head_std)

    @property
    def config(self) -> Any:
        return unwrap_model(self.policy).config

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) ids and mask -> (logits (B, T, V), values (B, T) float32)."""
        h = hidden_states(self.policy, input_ids, attention_mask, position_ids)
        logits = unwrap_model(self.policy).get_output_embeddings()(h)
        values = self.value_head(h).squeeze(-1).float()
        return logits, values

    def save_pretrained(self, out_dir: str | Path, merge_lora: bool = False) -> Path:
        """The LM via its own ``save_pretrained`` + ``value_head.safetensors``.

        A PEFT LM is saved as its adapter only, unless ``merge_lora`` (then a merged copy is saved as a plain
        model; this wrapper's LM is untouched).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (merged_copy(self.policy) if merge_lora else self.policy).save_pretrained(str(out))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                  str(out / VALUE_HEAD_FILE))
        return out

    def load_value_head(self, model_dir: str | Path) -> "PolicyWithValueHead":
        """Load ``model_dir/value_head.safetensors`` (written by :meth:`save_pretrained`) into the head."""
        head_path = Path(model_dir) / VALUE_HEAD_FILE
        if not head_path.is_file():
            raise UserError(f"{str(model_dir)!r} has no {VALUE_HEAD_FILE}; it was not saved by PolicyWithValueHead")
        try:
            self.value_head.load_state_dict(load_file(str(head_path)))
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign file
            raise UserError(f"{head_path}: cannot load the value head ({describe(e)})") from e
        return self


def policy_with_value_head(policy: Any, head_std: float | None = 0.0) -> PolicyWithValueHead:
    """Wrap a causal LM with a shared-trunk scalar value head (``head_std`` 0 = zero init; None = 1/sqrt(H+1))."""
    return PolicyWithValueHead(policy, head_std=head_std)
