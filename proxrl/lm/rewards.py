"""Rewards for RLHF: user reward functions ("module:function") and a trained reward model scorer.

A reward function takes two lists of strings and returns one float per completion::

    def reward(prompts: list[str], completions: list[str]) -> list[float]: ...

Every failure mode (import error, exception on some sample, wrong count, NaN/inf) becomes a one-line
:class:`~proxrl.errors.UserError` naming the function, the sample index and what to do.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from proxrl.errors import UserError

__all__ = ["RewardFunction", "load_reward_fn", "call_reward_fn", "RewardModelScorer"]


def _one_line(text: Any, limit: int = 200) -> str:
    msg = " ".join(str(text).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _short(text: str, limit: int = 40) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


class RewardFunction:
    """A user reward function with the spec it was loaded from (used in error messages). Calls through."""

    def __init__(self, fn: Callable[..., Any], spec: str) -> None:
        self.fn = fn
        self.spec = spec

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"RewardFunction({self.spec!r})"


_SPEC_HELP = "use 'package.module:function' or 'path/to/file.py:function'"


def _import_file(path_str: str, spec: str) -> Any:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UserError(f"reward function {spec}: file {path_str!r} does not exist; {_SPEC_HELP}")
    name = "proxrl_user_reward_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UserError(f"reward function {spec}: cannot import {path_str!r} as a Python file; {_SPEC_HELP}")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module  # lets dataclasses/pickle inside the file find their module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - anything the user's file raises while importing
        sys.modules.pop(name, None)
        raise UserError(f"reward function {spec}: importing {path_str!r} raised {type(e).__name__}: "
                        f"{_one_line(e)}; fix the file") from e
    return module


def _import_module(mod_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UserError(f"reward function {spec}: no module named {mod_name!r} (is it installed / on "
                            f"PYTHONPATH?); {_SPEC_HELP}") from e
        raise UserError(f"reward function {spec}: importing {mod_name!r} failed: {_one_line(e)}; install the "
                        f"missing dependency") from e
    except Exception as e:  # noqa: BLE001
        raise UserError(f"reward function {spec}: importing {mod_name!r} raised {type(e).__name__}: "
                        f"{_one_line(e)}; fix the module") from e


def load_reward_fn(spec: str) -> RewardFunction:
    """Import a reward function from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The attribute may be dotted (``"mod:Class.method"``). Raises UserError (one line) if the spec is malformed,
    the module/file is missing or fails to import, the attribute is missing, or it is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise UserError(f"reward function {spec!r} has no ':function' part; {_SPEC_HELP}")
    where, attr = spec.rsplit(":", 1)
    if not where or not attr:
        raise UserError(f"reward function {spec!r} is incomplete; {_SPEC_HELP}")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where, spec) if is_file else _import_module(where, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"define {part}(prompts, completions) there"
            raise UserError(f"reward function {spec}: {where!r} has no attribute {part!r}; {hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward function {spec}: {attr!r} is a {type(obj).__name__}, not a function; point at a "
                        f"callable taking (prompts, completions)")
    return RewardFunction(obj, spec)


def _name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, RewardFunction):
        return fn.spec
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}:{qual}" if mod else qual


def call_reward_fn(fn: Callable[..., Any], prompts: Sequence[str], completions: Sequence[str],
                   **extra: Sequence[Any]) -> Tensor:
    """Score ``completions`` with a user reward function: ``fn(prompts, completions, **extra)`` -> (B,) float32.

    ``extra`` holds optional per-sample lists (e.g. reference answers) passed through as keyword arguments.

    Raises:
        UserError: if ``fn`` raises (it is then called again one sample at a time to name the first failing
        sample), returns something that is not B numbers, or returns NaN/inf (naming the sample and value).
    """
    name = _name(fn)
    prompts, completions = list(prompts), list(completions)
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} completions")
    try:
        raw = fn(prompts, completions, **extra)
    except Exception as batch_err:  # noqa: BLE001 - locate the failing sample
        for i in range(n):
            try:
                fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in extra.items()})
            except Exception as e:  # noqa: BLE001
                raise UserError(f"reward function {name} raised {type(e).__name__} on sample {i} (prompt "
                                f"{_short(prompts[i])}, completion {_short(completions[i])}): {_one_line(e)}"
                                ) from e
        raise UserError(f"reward function {name} raised {type(batch_err).__name__} on the batch of {n} but on no "
                        f"single sample: {_one_line(batch_err)}") from batch_err
    try:
        if isinstance(raw, Tensor):
            scores = raw.detach().to(device="cpu", dtype=torch.float32)
        else:
            scores = torch.as_tensor(raw if not isinstance(raw, (list, tuple)) else [float(x) for x in raw],
                                     dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"reward function {name} returned {type(raw).__name__} ({_one_line(raw, 60)}), not "
                        f"numbers; return one float per completion") from e
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.dim() != 1 or scores.shape[0] != n:
        got = "a single number" if scores.dim() == 0 else f"shape {tuple(scores.shape)}"
        if scores.dim() == 1:
            got = f"{scores.shape[0]} scores"
        raise UserError(f"reward function {name} returned {got} for {n} completions; expected {n} scores, one "
                        f"float per completion")
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise UserError(f"reward function {name} returned {scores[i].item()} for sample {i} (prompt "
                        f"{_short(prompts[i])}, completion {_short(completions[i])}); return finite floats")
    return scores


class RewardModelScorer:
    """Scores token sequences with a trained scalar reward model, reading the head at an explicit index.

    Args:
        model: a seq-cls model (num_labels=1) or a local directory saved by ``save_model_and_tokenizer``.
        tokenizer: the reward model's tokenizer; default: the one saved in the model directory.
        policy_tokenizer: the tokenizer that produced the ids given to :meth:`score_ids` (the policy's). It must
            be the reward model's tokenizer: checked by fingerprint (if the directory has one / a saved
            tokenizer) and by size (``len(tokenizer)`` <= embedding rows).

    Raises:
        UserError: on a load failure, a tokenizer larger than the embedding, or a tokenizer mismatch.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, policy_tokenizer: Any = None,
                 model_dir: str | Path | None = None, dtype: Any = None, trust_remote_code: bool = False) -> None:
        from proxrl.lm import models as M

        if isinstance(model, (str, Path)):
            model_dir = Path(model)
            model = M.load_scalar_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        if tokenizer is None and model_dir is not None:
            tokenizer = M._saved_tokenizer(Path(model_dir))
        if tokenizer is None and policy_tokenizer is None:
            raise UserError("RewardModelScorer needs a tokenizer: none was given and none is saved next to the "
                            "reward model; pass tokenizer=")
        if tokenizer is not None and policy_tokenizer is not None:
            if M.tokenizer_fingerprint(tokenizer) != M.tokenizer_fingerprint(policy_tokenizer):
                where = f" in {str(model_dir)!r}" if model_dir is not None else ""
                raise UserError(f"the reward model{where} uses a different tokenizer than the policy (len "
                                f"{len(tokenizer)} vs {len(policy_tokenizer)}); train the reward model with the "
                                f"policy's tokenizer")
        self.tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
        M.check_tokenizer_fits(model, self.tokenizer, model_dir, what="reward model")
        if policy_tokenizer is not None and policy_tokenizer is not self.tokenizer:
            M.check_tokenizer_fits(model, policy_tokenizer, model_dir, what="reward model")
        self.model = model.eval()
        self.vocab_rows = M._unwrap(model).get_input_embeddings().weight.shape[0]

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor, last_index: Tensor | None = None,
                  prompts: Sequence[str] | None = None, completions: Sequence[str] | None = None) -> Tensor:
        """(B, T) ids + mask -> (B,) float32 scores at ``last_index`` (default: last position whose mask is 1).

        ``prompts``/``completions`` are accepted for call-site symmetry with reward functions and unused.
        """
        from proxrl.lm import models as M

        hi = int(input_ids.max()) if input_ids.numel() else 0
        if hi >= self.vocab_rows or (input_ids.numel() and int(input_ids.min()) < 0):
            raise UserError(f"token id {hi} is outside the reward model's vocabulary of {self.vocab_rows}; use the "
                            f"tokenizer the reward model was trained with")
        if last_index is None:
            last_index = M.last_token_index(attention_mask)
        return M.sequence_scores(self.model, input_ids, attention_mask, last_index)

    def encode(self, prompts: Sequence[str], completions: Sequence[str], append_eos: bool = True,
               max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Prompt and completion tokenized separately, concatenated (+ EOS), LEFT-padded: ids, mask (B, T)."""
        tok = self.tokenizer
        rows = []
        for p, c in zip(prompts, completions, strict=True):
            ids = list(tok(p, add_special_tokens=False)["input_ids"]) if p else []
            ids += list(tok(c, add_special_tokens=False)["input_ids"]) if c else []
            if append_eos and tok.eos_token_id is not None:
                ids.append(tok.eos_token_id)
            if max_length is not None:
                ids = ids[-max_length:]
            rows.append(ids or [tok.eos_token_id if tok.eos_token_id is not None else 0])
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return input_ids, mask

    def score_texts(self, prompts: Sequence[str], completions: Sequence[str], append_eos: bool = True,
                    max_length: int | None = None, batch_size: int = 64) -> Tensor:
        """Score text pairs (encoded by :meth:`encode`) -> (B,) float32; UserError on NaN/inf."""
        prompts, completions = list(prompts), list(completions)
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.encode(prompts[i:i + batch_size], completions[i:i + batch_size], append_eos,
                                    max_length)
            out.append(self.score_ids(ids, mask))
        scores = torch.cat(out) if out else torch.zeros(0)
        bad = (~torch.isfinite(scores)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise UserError(f"reward model returned {scores[i].item()} for sample {i} (prompt {_short(prompts[i])}); "
                            f"check the reward model weights")
        return scores

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> Tensor:
        """Reward-function interface: ``scorer(prompts, completions)`` -> (B,) float32."""
        return self.score_texts(prompts, completions)
