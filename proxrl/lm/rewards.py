"""Rewards for RLHF: user reward functions ("module:function") and a trained reward model scorer.

A reward function takes two lists of strings and returns one real number per completion::

    def reward(prompts: list[str], completions: list[str]) -> list[float]: ...

Every failure mode becomes a one-line error naming the function, the sample index and what to do: a bad value
(wrong count, a value that is not a real number such as ``"1.5"``, ``True`` or ``None``, NaN/inf) is a
:class:`~proxrl.errors.UserError` (exit 2); a failure inside the function (an import error, an exception, a
``sys.exit()`` / ``KeyboardInterrupt`` it raises, or not returning within the timeout) is a
:class:`~proxrl.errors.UserCodeError` (exit 1).

Timeout: with ``timeout`` set, :func:`call_reward_fn` runs the function in a daemon worker thread and waits at
most ``timeout`` seconds for it (a thread, not ``signal.alarm``: it works in any thread and on any OS). A function
that does not return in time cannot be stopped from outside; it is abandoned, keeps running in the background
until it returns or the process exits, and the run stops with the one-line error.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import numbers
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from proxrl.errors import UserCodeError, UserError
from proxrl.lm.chat import is_conversational, preference_texts
from proxrl.lm.heads import sequence_scores, unwrap_model
from proxrl.lm.loading import load_scalar_model
from proxrl.lm.messages import describe, one_line, short_repr
from proxrl.lm.positions import last_token_index
from proxrl.lm.tokenization import check_tokenizer_fits, saved_tokenizer, tokenizer_fingerprint
from proxrl.runs.finite import first_non_finite

__all__ = ["RewardFunction", "load_reward_fn", "call_reward_fn", "check_finite_scores", "RewardModelScorer",
           "reward_model_labels"]


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
        raise UserCodeError(f"reward function {spec}: importing {path_str!r} raised {type(e).__name__}: "
                            f"{one_line(e)}; fix the file") from e
    return module


def _import_module(mod_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UserError(f"reward function {spec}: no module named {mod_name!r} (is it installed / on "
                            f"PYTHONPATH?); {_SPEC_HELP}") from e
        raise UserError(f"reward function {spec}: importing {mod_name!r} failed: {one_line(e)}; install the "
                        f"missing dependency") from e
    except Exception as e:  # noqa: BLE001
        raise UserCodeError(f"reward function {spec}: importing {mod_name!r} raised {type(e).__name__}: "
                            f"{one_line(e)}; fix the module") from e


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


def call_reward_fn(fn: Callable[..., Any], prompts: Sequence[str], completions: Sequence[str], *,
                   timeout: float | None = None, **extra: Sequence[Any]) -> Tensor:
    """Score ``completions`` with a user reward function: ``fn(prompts, completions, **extra)`` -> (B,) float32.

    ``extra`` holds optional per-sample lists (e.g. reference answers) passed through as keyword arguments.
    ``timeout``: seconds to wait for each call (None: call directly, no limit); see the module docstring.

    Raises:
        UserCodeError: ``fn`` raises (it is then called again one sample at a time to name the first failing
            sample), raises ``SystemExit`` / ``KeyboardInterrupt``, or does not return within ``timeout``.
        UserError: ``fn`` returns something that is not B real numbers, or NaN/inf (naming the sample and value).
    """
    name = _name(fn)
    prompts, completions = list(prompts), list(completions)
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} completions")
    raw, batch_err = _run(fn, name, timeout, f"the batch of {n}", prompts, completions, **extra)
    if batch_err is not None:  # locate the failing sample
        for i in range(n):
            _, e = _run(fn, name, timeout, f"sample {i}", [prompts[i]], [completions[i]],
                        **{k: [v[i]] for k, v in extra.items()})
            if e is not None:
                raise UserCodeError(f"reward function {name} raised {type(e).__name__} on sample {i} (prompt "
                                    f"{short_repr(prompts[i])}, completion {short_repr(completions[i])}): "
                                    f"{one_line(e)}") from e
        raise UserCodeError(f"reward function {name} raised {type(batch_err).__name__} on the batch of {n} but on "
                            f"no single sample: {one_line(batch_err)}") from batch_err
    scores = _as_scores(raw, name, n)
    check_finite_scores(scores, f"reward function {name}", "return finite floats",
                        lambda i: f"prompt {short_repr(prompts[i])}, completion {short_repr(completions[i])}")
    return scores


def check_finite_scores(scores: Tensor, source: str, fix: str, sample: Callable[[int], str]) -> None:
    """UserError ``"<source> returned <value> for sample <i> (<sample(i)>); <fix>"`` at the first NaN/inf score."""
    bad = first_non_finite(scores)
    if bad is not None:
        (i,), value = bad
        raise UserError(f"{source} returned {value} for sample {i} ({sample(i)}); {fix}")


def _run(fn: Callable[..., Any], name: str, timeout: float | None, what: str, *args: Any,
         **kwargs: Any) -> tuple[Any, Exception | None]:
    """``(fn(*args, **kwargs), None)``, or ``(None, exception)`` if it raised an Exception.

    SystemExit / KeyboardInterrupt (and other BaseExceptions) raised by ``fn`` and a call running past ``timeout``
    seconds become a UserCodeError. Without ``timeout`` the call runs in this thread and a KeyboardInterrupt is
    left alone (it may be the user's Ctrl-C); with one, it runs in a daemon worker thread (Ctrl-C still reaches
    this thread, which is only waiting).
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - whatever user code raises is reported below
            box["error"] = e

    if timeout is None:
        try:
            return fn(*args, **kwargs), None
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            return None, e
        except BaseException as e:  # noqa: BLE001 - SystemExit, GeneratorExit
            box["error"] = e
    else:
        worker = threading.Thread(target=work, name="proxrl-reward-function", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise UserCodeError(f"reward function {name} did not return within {timeout:g} s on {what}; make it "
                                f"faster, or allow more time with --reward-timeout SECONDS")
    err = box.get("error")
    if err is None:
        return box.get("value"), None
    if isinstance(err, Exception):
        return None, err
    raise UserCodeError(f"reward function {name} raised {describe(err)} on {what}; a reward function must "
                        f"return one score per completion, not exit or interrupt the run") from err


def _is_real(x: Any) -> bool:
    """A real number: int/float (numpy's too) or a one-element real tensor; not a bool, string or None."""
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.dtype.is_complex and x.dtype != torch.bool
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _as_scores(raw: Any, name: str, n: int) -> Tensor:
    """``raw`` as a (B,) float32 tensor; UserError naming the first value that is not a real number."""
    fix = "return one real number (int or float) per completion"
    if isinstance(raw, (Tensor, np.ndarray)):
        real = (raw.dtype != torch.bool and not raw.dtype.is_complex) if isinstance(raw, Tensor) \
            else raw.dtype.kind in "fiu"
        if not real:
            raise UserError(f"reward function {name} returned a {type(raw).__name__} of {raw.dtype}, not real "
                            f"numbers; {fix}")
        scores = torch.as_tensor(raw.detach() if isinstance(raw, Tensor) else raw).to("cpu", torch.float32)
    elif isinstance(raw, (list, tuple)):
        for i, x in enumerate(raw):
            if not _is_real(x):
                raise UserError(f"reward function {name} returned {one_line(repr(x), 40)} ({type(x).__name__}, "
                                f"not a real number) for sample {i}; {fix}")
        scores = torch.tensor([float(x) for x in raw], dtype=torch.float32)
    elif _is_real(raw):
        scores = torch.tensor(float(raw), dtype=torch.float32)
    else:
        raise UserError(f"reward function {name} returned {type(raw).__name__} ({one_line(raw, 60)}), not a list "
                        f"of numbers; {fix}")
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.dim() != 1 or scores.shape[0] != n:
        got = "a single number" if scores.dim() == 0 else f"shape {tuple(scores.shape)}"
        if scores.dim() == 1:
            got = f"{scores.shape[0]} scores"
        raise UserError(f"reward function {name} returned {got} for {n} completions; expected {n} scores, one "
                        f"float per completion")
    return scores


def reward_model_labels(model_dir: str | Path) -> int | None:
    """The number of labels ``model_dir/config.json`` declares (``id2label`` / ``num_labels``; a
    sequence-classification config without either has transformers' default of 2), None for another config (a
    causal LM's: loading then decides)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("id2label"), dict):
        return len(cfg["id2label"])
    n = cfg.get("num_labels")
    if isinstance(n, int):
        return n
    archs = cfg.get("architectures") or []
    return 2 if any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs) else None


class RewardModelScorer:
    """Scores sequences with a scalar reward model: any ``AutoModelForSequenceClassification`` with one label.

    Two ways in:

    * :meth:`score_ids`: token ids of the reward model's own tokenizer (the policy's, when they are the same), read
      at an explicit index per row: the last real token for a decoder whose ``score`` head applies at every
      position (GPT-2, Llama, ... and every proxrl reward model); a model with another head (an encoder such as
      BERT / DeBERTa with a pooled ``classifier``) is called through its own ``forward`` on right-padded rows and
      its single logit taken (:attr:`per_position` False).
    * :meth:`score_texts`: prompt and completion texts encoded with the reward model's tokenizer and chat template
      (:meth:`encode`); the way in when the policy's tokenizer or template differs from the reward model's.

    Args:
        model: a seq-cls model or a local directory (loaded with ``num_labels=1``; a directory declaring more than
            one label is refused).
        tokenizer: the reward model's tokenizer; default: the one saved in the model directory, else
            ``policy_tokenizer``.
        policy_tokenizer: the policy's tokenizer; :attr:`same_tokenizer` says whether its ids can be scored as
            they are (same vocabulary fingerprint, and it fits the embedding).
        template: the reward model's chat template (resolved, e.g. by
            :func:`proxrl.lm.chat.resolve_chat_template`) used by :meth:`encode`, or None for plain text.

    Raises:
        UserError: on a load failure, more than one label, or a tokenizer larger than the embedding.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, policy_tokenizer: Any = None,
                 model_dir: str | Path | None = None, dtype: Any = None, trust_remote_code: bool = False,
                 template: str | None = None) -> None:
        if isinstance(model, (str, Path)):
            model_dir = Path(model)
            n_labels = reward_model_labels(model_dir) if model_dir.is_dir() else None
            if n_labels is not None and n_labels != 1:
                raise UserError(f"the reward model in {str(model_dir)!r} has {n_labels} labels; PPO needs a scalar "
                                f"reward model with one label (num_labels=1), e.g. one trained with `proxrl "
                                f"reward-model`")
            model = load_scalar_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        if tokenizer is None and model_dir is not None:
            tokenizer = saved_tokenizer(model_dir)
        if tokenizer is None and policy_tokenizer is None:
            raise UserError("RewardModelScorer needs a tokenizer: none was given and none is saved next to the "
                            "reward model; pass tokenizer=")
        self.tokenizer = tokenizer if tokenizer is not None else policy_tokenizer
        check_tokenizer_fits(model, self.tokenizer, model_dir, what="reward model")
        self.same_tokenizer = policy_tokenizer is None or policy_tokenizer is self.tokenizer or (
            tokenizer_fingerprint(self.tokenizer) == tokenizer_fingerprint(policy_tokenizer))
        self.template = template
        self.model = model.eval()
        base = unwrap_model(model)
        self.vocab_rows = base.get_input_embeddings().weight.shape[0]
        self.per_position = isinstance(getattr(base, "score", None), torch.nn.Module)
        self.model_dir = model_dir

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor, last_index: Tensor | None = None) -> Tensor:
        """(B, T) ids of the reward model's tokenizer + mask -> (B,) float32 scores at ``last_index`` (default:
        the last position whose mask is 1). A model without a per-position head ignores ``last_index`` and reads
        each row's tokens (mask 1) right-padded through its own forward."""
        hi = int(input_ids.max()) if input_ids.numel() else 0
        if hi >= self.vocab_rows or (input_ids.numel() and int(input_ids.min()) < 0):
            raise UserError(f"token id {hi} is outside the reward model's vocabulary of {self.vocab_rows}; use the "
                            f"tokenizer the reward model was trained with")
        if not self.per_position:
            return self._forward_scores(input_ids, attention_mask)
        if last_index is None:
            last_index = last_token_index(attention_mask)
        return sequence_scores(self.model, input_ids, attention_mask, last_index)

    def _forward_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        rows = [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long, device=input_ids.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=input_ids.device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        return logits.reshape(len(rows), -1)[:, 0].float()

    def encode(self, prompts: Sequence[Any], completions: Sequence[str], append_eos: bool = True,
               max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Prompt and completion tokenized separately with the reward model's tokenizer, concatenated, LEFT-padded:
        ids, mask (B, T).

        A prompt is a string or a list of messages. With :attr:`template` (or a list of messages) the pair is
        rendered as the reward model was trained on it (:func:`proxrl.lm.chat.preference_texts`: the prompt with
        the generation prompt, the completion as an assistant turn closed by the end-of-turn marker) and no EOS is
        added; without one EOS is appended (``append_eos``), as ``proxrl reward-model`` encodes plain pairs.
        """
        tok = self.tokenizer
        rows = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            eos = append_eos
            if self.template is not None or is_conversational(p):
                p, c, _ = preference_texts(tok, self.template, p, c, c, f"reward model input {i + 1}")
                eos = append_eos and self.template is None
            ids = list(tok(p, add_special_tokens=False)["input_ids"]) if p else []
            ids += list(tok(c, add_special_tokens=False)["input_ids"]) if c else []
            if eos and tok.eos_token_id is not None:
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

    def score_texts(self, prompts: Sequence[Any], completions: Sequence[str], append_eos: bool = True,
                    max_length: int | None = None, batch_size: int = 64) -> Tensor:
        """Score (prompt, completion) pairs encoded by :meth:`encode`, ``batch_size`` rows per forward ->
        (B,) float32; UserError on NaN/inf."""
        prompts, completions = list(prompts), list(completions)
        batch_size = batch_size if batch_size > 0 else max(len(prompts), 1)
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.encode(prompts[i:i + batch_size], completions[i:i + batch_size], append_eos,
                                    max_length)
            out.append(self.score_ids(ids, mask))
        scores = torch.cat(out) if out else torch.zeros(0)
        check_finite_scores(scores, "reward model", "check the reward model weights",
                            lambda i: f"prompt {short_repr(prompts[i])}")
        return scores

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str]) -> Tensor:
        """Reward-function interface: ``scorer(prompts, completions)`` -> (B,) float32."""
        return self.score_texts(prompts, completions)
