"""Loading and saving models from local directories, with one-line errors and without transformers' log output.

Every load goes through ``from_pretrained(..., output_loading_info=True)`` with transformers' logging at error level
and its progress bars off: the returned loading info (missing / unexpected keys) is checked here and turned into
one :class:`~proxrl.errors.UserError` line when weights are missing, instead of transformers' multi-line report.
Nothing is downloaded (``local_files_only=True``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from proxrl.errors import UserError
from proxrl.lm.heads import HEAD_NAMES, PolicyWithValueHead, merged_copy
from proxrl.lm.layers import fast_activations
from proxrl.lm.messages import describe
from proxrl.lm.tokenization import write_tokenizer_fingerprint

__all__ = ["load_causal_lm", "load_scalar_model", "load_policy_with_value_head", "save_model_and_tokenizer",
           "is_scalar_model_dir", "resolve_dtype", "ensure_pad_id", "unsharded_copy"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype from a name (``"bf16"``, ``"float32"``, ...); None and ``"auto"`` pass through."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, auto")
    return _DTYPES[key]


def _check_model_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} directory {str(path)!r} does not exist; pass a local directory written by "
                        f"save_pretrained (nothing is downloaded)")
    if not p.is_dir():
        raise UserError(f"{what} path {str(path)!r} is a file, not a directory; pass the directory that holds "
                        f"config.json and the weights")
    if not (p / "config.json").is_file():
        raise UserError(f"{what} directory {str(path)!r} has no config.json; pass a directory written by "
                        f"save_pretrained")
    return p


def _architectures(path: Path) -> list[str]:
    """``architectures`` of ``path/config.json`` ([] when missing or unreadable: loading then reports)."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return [a for a in archs or () if isinstance(a, str)]


def is_scalar_model_dir(path: str | Path) -> bool:
    """True if ``path/config.json`` names a sequence-classification architecture (a saved reward model / critic);
    False for a causal LM, or when the directory or its config is missing or unreadable (loading then reports)."""
    return any(a.endswith("ForSequenceClassification") for a in _architectures(Path(path).expanduser()))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logging at error level (no load reports, no warnings) and no progress bars, inside the block."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: noise for a local directory
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _from_pretrained(auto_cls: Any, path: Path, what: str, dtype: Any, trust_remote_code: bool,
                     **kw: Any) -> tuple[Any, dict]:
    """``auto_cls.from_pretrained`` on a local directory -> ``(model, loading_info)``; UserError on failure."""
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(
                str(path), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True,
                output_loading_info=True, **kw)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load the {what} from {str(path)!r} ({describe(e)}); check that the "
                        f"directory holds config.json and complete weights written by save_pretrained") from e
    fast_activations(model)
    return model, info


def _warn_unused(info: dict, path: Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    unused = [k for k in info.get("unexpected_keys") or () if not k.startswith(ignore)]
    if unused:
        warnings.warn(f"{len(unused)} weights in {str(path)!r} are not used by the {what} (e.g. {unused[0]!r})",
                      stacklevel=3)


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = None,
                   trust_remote_code: bool = False) -> Any:
    """Load a causal LM (``AutoModelForCausalLM``) from a local directory, in eval mode.

    Raises:
        UserError (one line, naming the path): missing directory, no config.json, a reward-model / critic
        directory, weights missing, corrupt or incomplete (any parameter that would silently stay randomly
        initialised).
    """
    p = _check_model_dir(path, "causal LM")
    if is_scalar_model_dir(p):
        raise UserError(f"{str(path)!r} holds a sequence-classification model ({', '.join(_architectures(p))}: a "
                        f"reward model or critic), not a causal LM; pass a policy directory (e.g. RUN_DIR/policy)")
    model, info = _from_pretrained(AutoModelForCausalLM, p, "causal LM", dtype, trust_remote_code)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"causal LM in {str(path)!r} lacks weights for {len(missing)} parameters (e.g. "
                        f"{missing[0]!r}); is it a causal LM checkpoint with complete weights?")
    _warn_unused(info, p, "causal LM")
    return model.eval()


def _is_head_key(name: str) -> bool:
    return name.split(".")[0] in HEAD_NAMES


def load_scalar_model(path: str | Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
                      allow_new_head: bool = False) -> Any:
    """Load ``AutoModelForSequenceClassification(num_labels=1)`` (reward model / critic) from a local directory.

    Args:
        allow_new_head: if False (default) the directory must contain a trained scalar head (a saved reward model);
            if True a causal-LM checkpoint is accepted and the head is freshly initialised (critic init).

    Raises:
        UserError: missing/invalid directory, failed weight loading, trunk weights missing, or (unless
        ``allow_new_head``) a causal-LM directory / no trained head in the checkpoint.
    """
    p = _check_model_dir(path, "scalar model")
    archs = _architectures(p)
    if not allow_new_head and archs and not is_scalar_model_dir(p):
        raise UserError(f"{str(path)!r} holds a {', '.join(archs)}, not a reward model (a sequence-classification "
                        f"model with a trained scalar head); train one with `proxrl reward-model`")
    model, info = _from_pretrained(AutoModelForSequenceClassification, p, "scalar model", dtype, trust_remote_code,
                                   num_labels=1)
    missing = list(info.get("missing_keys") or [])
    trunk_missing = [k for k in missing if not _is_head_key(k)]
    if trunk_missing:
        raise UserError(f"scalar model in {str(path)!r} lacks trunk weights for {len(trunk_missing)} parameters "
                        f"(e.g. {trunk_missing[0]!r}); check the checkpoint")
    if missing and not allow_new_head:
        raise UserError(f"{str(path)!r} has no trained scalar head ({missing[0]!r} missing): it is not a saved "
                        f"reward model; train one first or initialise with scalar_model_from_causal")
    # a causal LM's own output layer is expectedly unused when a critic is initialised from it
    _warn_unused(info, p, "scalar model", ignore=("lm_head.",) if allow_new_head else ())
    ensure_pad_id(model)
    return model.eval()


def ensure_pad_id(model: Any) -> None:
    """Give ``model.config`` a pad id (EOS, else 0) if it has none.

    HF's sequence-classification ``forward()`` refuses batches > 1 without one; proxrl never relies on it (scores
    are read at explicit indices), but the model stays usable with plain ``transformers``.
    """
    cfg = model.config
    if getattr(cfg, "pad_token_id", None) is None:
        eos = getattr(cfg, "eos_token_id", None)
        cfg.pad_token_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0


def load_policy_with_value_head(path: str | Path, dtype: str | torch.dtype | None = None) -> PolicyWithValueHead:
    """Load a full (non-PEFT) :class:`PolicyWithValueHead` saved by its ``save_pretrained``."""
    return PolicyWithValueHead(load_causal_lm(path, dtype=dtype)).load_value_head(path)


def unsharded_copy(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A plain CPU copy of an HF ``model`` (e.g. one sharded in place by FSDP2, whose class then subclasses
    ``FSDPModule``) holding ``state``, its whole state dict (:func:`proxrl.distributed.full_state_dict`): what rank 0
    saves with ``save_pretrained`` at the end of a sharded run. Built from ``model.config``; loading is strict."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        cls = next(b for b in cls.__mro__[1:] if not issubclass(b, FSDPModule))
    with quiet_transformers():
        plain = cls(copy.deepcopy(model.config))
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def save_model_and_tokenizer(model: Any, tokenizer: Any, out_dir: str | Path, merge_lora: bool = False) -> Path:
    """``save_pretrained`` of model and tokenizer into ``out_dir`` plus the tokenizer fingerprint (checked when
    loading scorers). A :class:`PolicyWithValueHead` writes its value head too; with ``merge_lora`` a PEFT LoRA
    model is saved merged into a plain model (loadable with ``from_pretrained``; ``model`` is untouched)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PolicyWithValueHead):
        model.save_pretrained(out, merge_lora=merge_lora)
    else:
        (merged_copy(model) if merge_lora else model).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_tokenizer_fingerprint(out, tokenizer)
    return out
