"""Tokenizers and models for RLHF: loading, tiny builders, scalar heads, log-probs, reference models, LoRA.

Conventions used across ``proxrl.lm``:

* Prompts are LEFT-padded. Every batch carries an explicit ``attention_mask`` (B, T) of 0/1; masks are never
  inferred from ``pad_token_id`` (the pad token may equal EOS).
* Position ids are always derived from the attention mask, ``cumsum(mask) - 1`` clamped at 0
  (:func:`position_ids_from_mask`), both in generation and in every later forward pass, so a token gets the same
  position whatever the amount of left padding in its batch.
* Scalar heads (critic, reward model) read the hidden state at an explicit position: :func:`token_values`
  applies the head to every position, :func:`sequence_scores` at a given ``last_index``. HF's own
  "last non-pad token" logic (which looks for ``pad_token_id`` in ``input_ids``) is never used.

Nothing here downloads anything: models and tokenizers are built from configs or loaded from local directories.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from proxrl.errors import UserError

TOKENIZER_FINGERPRINT_FILE = "tokenizer_fingerprint.json"
VALUE_HEAD_FILE = "value_head.safetensors"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``TypeName: message`` squeezed onto one line (UserError messages are one line)."""
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
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


# ----------------------------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: str | Path, padding_side: str = "left") -> Any:
    """Load a tokenizer from a local directory, ready for batched left-padded generation.

    If it has no pad token, the EOS token becomes the pad token (safe: masks are always explicit in proxrl);
    if it has no EOS either, a ``<pad>`` token is added (the model's embeddings must then cover
    ``len(tokenizer)``; see :func:`check_tokenizer_fits`). ``padding_side`` is set to ``"left"``.

    Raises:
        UserError: the directory is missing or holds no loadable tokenizer.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"tokenizer directory {str(path)!r} does not exist; pass a local directory written by "
                        f"save_pretrained (nothing is downloaded)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad directory from the user's point of view
        raise UserError(f"could not load a tokenizer from {str(path)!r} ({_one_line(e)}); pass a directory "
                        f"written by tokenizer.save_pretrained") from e
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    tok.padding_side = padding_side
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                        min_frequency: int = 2) -> Any:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``; special tokens ``<pad>`` (id 0), ``<eos>`` (id 1).

    Returns a ``PreTrainedTokenizerFast`` with ``pad_token="<pad>"``, ``eos_token=bos_token="<eos>"`` and left
    padding. Byte-level means every string is encodable (no unknown token). If ``out_dir`` is given the
    tokenizer is saved there with ``save_pretrained`` (loadable by :func:`load_tokenizer` /
    ``AutoTokenizer.from_pretrained``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258 + 2:
        raise UserError(f"vocab_size {vocab_size} is too small for a byte-level BPE (256 bytes + 2 special "
                        f"tokens); use at least 260")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<eos>")
    fast.padding_side = "left"
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A sha256 hex digest of the tokenizer's full vocabulary (token -> id, added tokens included) and EOS token.

    Two tokenizers with the same fingerprint map every string to the same ids. The pad token is left out on
    purpose (:func:`load_tokenizer` may set pad = EOS; masks are explicit, so the pad choice changes no score).
    """
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps({"eos": str(tokenizer.eos_token)}).encode())
    return h.hexdigest()


def write_tokenizer_fingerprint(model_dir: str | Path, tokenizer: Any) -> Path:
    """Record which tokenizer a model was trained with: ``model_dir/tokenizer_fingerprint.json``."""
    path = Path(model_dir) / TOKENIZER_FINGERPRINT_FILE
    path.write_text(json.dumps({"fingerprint": tokenizer_fingerprint(tokenizer), "len": len(tokenizer)}) + "\n")
    return path


def read_tokenizer_fingerprint(model_dir: str | Path) -> dict | None:
    """The dict written by :func:`write_tokenizer_fingerprint`, or None if the model dir has none."""
    path = Path(model_dir) / TOKENIZER_FINGERPRINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable tokenizer fingerprint ({_one_line(e)}); delete the file or re-save "
                        f"the model with save_model_and_tokenizer") from e


def save_model_and_tokenizer(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """``save_pretrained`` both into ``out_dir`` plus the tokenizer fingerprint (checked when loading scorers)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_tokenizer_fingerprint(out, tokenizer)
    return out


def _saved_tokenizer(model_dir: Path) -> Any | None:
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return load_tokenizer(model_dir)
    except UserError:
        return None


def check_tokenizer_fits(model: Any, tokenizer: Any, model_dir: str | Path | None = None, what: str = "model") -> None:
    """Raise UserError unless ``tokenizer`` can feed ``model``.

    Checks that ``len(tokenizer)`` <= the model's embedding rows, and, when ``model_dir`` is given, that the
    tokenizer matches the one the model was saved with: the fingerprint file written by
    :func:`save_model_and_tokenizer` if present, else a tokenizer saved in ``model_dir`` if any.
    """
    rows = _unwrap(model).get_input_embeddings().weight.shape[0]
    n = len(tokenizer)
    if n > rows:
        raise UserError(f"tokenizer has {n} tokens but the {what} embedding has only {rows} rows; use the "
                        f"tokenizer the {what} was trained with (or resize its embeddings)")
    if model_dir is None:
        return
    saved = read_tokenizer_fingerprint(model_dir)
    if saved is None:
        other = _saved_tokenizer(Path(model_dir))
        if other is None:
            return
        saved = {"fingerprint": tokenizer_fingerprint(other), "len": len(other)}
    fp = tokenizer_fingerprint(tokenizer)
    if saved.get("fingerprint") != fp or saved.get("len", n) != n:
        raise UserError(f"the {what} in {str(model_dir)!r} was saved with a different tokenizer "
                        f"(len {saved.get('len')} vs {n}, fingerprint {str(saved.get('fingerprint'))[:12]} vs "
                        f"{fp[:12]}); use the tokenizer saved next to it")


# ----------------------------------------------------------------------------------------------- loading


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' "LOAD REPORT" warning (a table of missing/unexpected weights) while installed on
    the ``transformers.modeling_utils`` logger; :meth:`release` re-emits what it held."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True

    def release(self, logger: logging.Logger) -> None:
        for record in self.held:
            logger.handle(record)
        self.held.clear()


def fast_activations(model: Any) -> Any:
    """Swap transformers' Python ``gelu_new`` (``NewGELUActivation``, ~8 kernels and several saved tensors) for
    ``nn.GELU(approximate="tanh")``: the same function (max difference ~2e-7), one fused kernel forward and backward.

    It was ~23% of CPU time in PPO on GPT-2 (benchmarks/README.md). The saved config is unchanged, so the model
    still loads as before elsewhere. Returns ``model`` (modified in place).
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:  # pragma: no cover - older/newer transformers
        return model
    for module in list(_unwrap(model).modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def _from_pretrained(auto_cls: Any, path: str | Path, what: str, dtype: Any, trust_remote_code: bool,
                     expected_missing: Callable[[str], bool] | None = None, **kw: Any) -> tuple[Any, dict]:
    """``auto_cls.from_pretrained`` on a local directory -> ``(model, loading_info)``; UserError on failure.

    ``expected_missing(key)`` names parameters the caller expects to be absent from the checkpoint (a scalar head
    initialised from a causal LM): transformers' LOAD REPORT table is then not printed when those are the only
    keys it lists (and no checkpoint key went unused). Any other report, and every error, is shown as usual.
    """
    p = _check_model_dir(path, what)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: noise for a local directory of one file
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    hf_logger.addFilter(hold)
    try:
        model, info = auto_cls.from_pretrained(
            str(p), dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True,
            output_loading_info=True, **kw)
    except UserError:
        hf_logger.removeFilter(hold)
        hold.release(hf_logger)
        raise
    except Exception as e:  # noqa: BLE001
        hf_logger.removeFilter(hold)
        hold.release(hf_logger)
        raise UserError(f"could not load the {what} from {str(path)!r} ({_one_line(e)}); check that the "
                        f"directory holds config.json and complete weights written by save_pretrained") from e
    hf_logger.removeFilter(hold)
    only_expected = (expected_missing is not None and not info.get("unexpected_keys")
                     and not info.get("mismatched_keys") and not info.get("error_msgs")
                     and all(expected_missing(k) for k in info.get("missing_keys") or ()))
    if not only_expected:
        hold.release(hf_logger)
    fast_activations(model)
    return model, info


def load_causal_lm(path: str | Path, dtype: str | torch.dtype | None = None,
                   trust_remote_code: bool = False) -> Any:
    """Load a causal LM (``AutoModelForCausalLM``) from a local directory, in eval mode.

    Raises:
        UserError (one line, naming the path): missing directory, no config.json, weights missing, corrupt or
        incomplete (any parameter that would silently stay randomly initialised).
    """
    from transformers import AutoModelForCausalLM

    model, info = _from_pretrained(AutoModelForCausalLM, path, "causal LM", dtype, trust_remote_code)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"causal LM in {str(path)!r} lacks weights for {len(missing)} parameters (e.g. "
                        f"{missing[0]!r}); is it a causal LM checkpoint with complete weights?")
    return model.eval()


def _head_keys(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.split(".")[0] in ("score", "classifier")]


def load_scalar_model(path: str | Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
                      allow_new_head: bool = False) -> Any:
    """Load ``AutoModelForSequenceClassification(num_labels=1)`` (reward model / critic) from a local directory.

    Args:
        allow_new_head: if False (default) the directory must contain a trained scalar head (a saved reward model);
            if True a causal-LM checkpoint is accepted and the head is freshly initialised (critic init).

    Raises:
        UserError: missing/invalid directory, failed weight loading, trunk weights missing, or (unless
        ``allow_new_head``) no trained head in the checkpoint.
    """
    from transformers import AutoModelForSequenceClassification

    def head_key(k: str) -> bool:
        return k.split(".")[0] in ("score", "classifier")

    model, info = _from_pretrained(AutoModelForSequenceClassification, path, "scalar model", dtype,
                                   trust_remote_code, expected_missing=head_key if allow_new_head else None,
                                   num_labels=1)
    missing = list(info.get("missing_keys") or [])
    heads = set(_head_keys(model))
    trunk_missing = [k for k in missing if k not in heads]
    if trunk_missing:
        raise UserError(f"scalar model in {str(path)!r} lacks trunk weights for {len(trunk_missing)} parameters "
                        f"(e.g. {trunk_missing[0]!r}); check the checkpoint")
    if missing and not allow_new_head:
        raise UserError(f"{str(path)!r} has no trained scalar head ({missing[0]!r} missing): it is not a saved "
                        f"reward model; train one first or initialise with scalar_model_from_causal")
    _ensure_pad_id(model)
    return model.eval()


def is_scalar_model_dir(path: str | Path) -> bool:
    """True if ``path/config.json`` names a sequence-classification architecture (a saved reward model / critic);
    False for a causal LM, or when the directory or its config is missing or unreadable (loading then reports)."""
    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in archs or ())


def _ensure_pad_id(model: Any) -> None:
    # HF seq-cls forward() refuses batches > 1 without a pad id; proxrl never relies on it, but keep it usable.
    cfg = model.config
    if getattr(cfg, "pad_token_id", None) is None:
        eos = getattr(cfg, "eos_token_id", None)
        cfg.pad_token_id = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else 0


def _init_head(model: Any, head_std: float | None) -> None:
    if head_std is None:
        return
    head = _head(model)
    with torch.no_grad():
        if head_std == 0:
            head.weight.zero_()
        else:
            head.weight.normal_(0.0, head_std)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def scalar_model_from_causal(path_or_model: str | Path | Any, dtype: str | torch.dtype | None = None,
                             trust_remote_code: bool = False, head_std: float | None = None) -> Any:
    """A ``num_labels=1`` sequence-classification model whose trunk is a copy of a causal LM's trunk.

    Args:
        path_or_model: a local causal-LM directory, or an in-memory causal LM (a PEFT LoRA model is merged into
            a copy first). The source model is never modified and shares no parameters with the result.
        head_std: None keeps HF's head init (normal, std ``initializer_range``); 0 zero-initialises the head
            (critic starts at V=0); any other value draws the weights from N(0, head_std^2).

    Returns:
        the new model (train mode if built from a module, eval mode if loaded from a path).
    """
    from transformers import AutoModelForSequenceClassification

    if isinstance(path_or_model, (str, Path)):
        model = load_scalar_model(path_or_model, dtype=dtype, trust_remote_code=trust_remote_code,
                                  allow_new_head=True)
        _init_head(model, head_std)
        return model
    src = path_or_model
    if _is_peft(src):
        src = copy.deepcopy(src).merge_and_unload()
    src = _unwrap(src)
    cfg = copy.deepcopy(src.config)
    cfg.num_labels = 1
    try:
        model = AutoModelForSequenceClassification.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"model type {getattr(cfg, 'model_type', '?')!r} has no sequence-classification class "
                        f"({_one_line(e)}); use a GPT-2/Llama-style causal LM") from e
    trunk_state = _trunk(src).state_dict()
    missing, unexpected = _trunk(model).load_state_dict(trunk_state, strict=False)
    if missing or unexpected:
        raise UserError(f"could not copy the causal LM trunk into the scalar model (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]})")
    param = next(src.parameters())
    model.to(dtype=_resolve_dtype(dtype) if dtype not in (None, "auto") else param.dtype, device=param.device)
    _ensure_pad_id(model)
    _init_head(model, head_std)
    fast_activations(model)
    model.train(src.training)
    return model


def build_tiny_gpt2(tokenizer: Any, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 256,
                    seed: int | None = None, dropout: float = 0.0, **config_kwargs: Any) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` sized for ``tokenizer`` (vocab = ``len(tokenizer)``).

    Dropout defaults to 0 (PPO's probability ratio must be exactly 1 before the first update). ``seed`` makes
    the init reproducible without touching the global RNG. Extra keyword arguments go to ``GPT2Config``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise UserError(f"n_embd {n_embd} is not divisible by n_head {n_head}; pick n_head dividing n_embd")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, summary_first_dropout=dropout,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
        else eos, **config_kwargs)
    if seed is None:
        model = GPT2LMHeadModel(cfg)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    return fast_activations(model)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set p=0 on every ``nn.Dropout`` in ``model`` (PPO ratios must be 1 on unchanged weights). Returns model."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


# ----------------------------------------------------------------------------------------------- trunks & heads


def _is_peft(model: Any) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def _unwrap(model: Any) -> Any:
    """The HF ``PreTrainedModel`` inside a PEFT wrapper / :class:`PolicyWithValueHead` (LoRA layers stay active)."""
    if isinstance(model, PolicyWithValueHead):
        model = model.policy
    if _is_peft(model):
        model = model.get_base_model()
    return model


def _trunk(model: Any) -> nn.Module:
    """The transformer body (embeddings + blocks + final norm) that returns ``last_hidden_state``."""
    model = _unwrap(model)
    trunk = getattr(model, "base_model", None)
    if trunk is not None and trunk is not model:
        return trunk
    for name in ("model", "transformer", "gpt_neox"):
        sub = getattr(model, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise UserError(f"cannot find the transformer trunk of {type(model).__name__}; use a GPT-2/Llama-style model")


def _head(model: Any) -> nn.Module:
    model = _unwrap(model)
    for name in ("score", "classifier"):
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


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, T) 0/1 mask -> (B, T) long positions ``cumsum(mask) - 1`` clamped at 0 (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) 0/1 mask -> (B,) long index of the last position whose mask is 1 (0 for an all-zero row)."""
    t = attention_mask.shape[-1]
    ar = torch.arange(t, device=attention_mask.device)
    return (attention_mask.bool() * ar).max(dim=-1).values


def hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Final hidden states (B, T, H) of ``model``'s trunk, with position ids from the mask."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = _trunk(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_values(seqcls_model: Any, input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Tensor | None = None) -> Tensor:
    """The scalar head applied at every position: (B, T) long ids, (B, T) mask -> (B, T) float32.

    Values at masked positions are computed but meaningless; mask them downstream.
    """
    h = hidden_states(seqcls_model, input_ids, attention_mask, position_ids)
    return _head(seqcls_model)(h).squeeze(-1).float()


def sequence_scores(seqcls_model: Any, input_ids: Tensor, attention_mask: Tensor, last_index: Tensor,
                    position_ids: Tensor | None = None) -> Tensor:
    """The scalar head at an explicit position per row: ids/mask (B, T), ``last_index`` (B,) long -> (B,) float32.

    Use ``last_index = last_token_index(attention_mask)`` for "score of the whole sequence".
    """
    if last_index.shape != input_ids.shape[:1]:
        raise ValueError(f"last_index must have shape ({input_ids.shape[0]},), got {tuple(last_index.shape)}")
    h = hidden_states(seqcls_model, input_ids, attention_mask, position_ids)
    rows = torch.arange(h.shape[0], device=h.device)
    return _head(seqcls_model)(h[rows, last_index.to(h.device)]).squeeze(-1).float()


# ----------------------------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``: (..., V) and (...) long -> (...) float32.

    Memory: computed as ``logit[token] - logsumexp(logits)`` one batch row at a time, so no (…, V) log-prob
    tensor is materialised or kept for backward (logsumexp's backward reuses ``logits``); a temperature other
    than 1 costs one scaled copy. Low-precision logits (bf16/fp16) are upcast to float32 row by row.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree")
    if temperature != 1.0:
        logits = logits / temperature
    tokens = tokens.long().unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, tokens).squeeze(-1)
        if logits.dim() > 2:
            lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        else:
            lse = torch.logsumexp(logits, dim=-1)
        return picked - lse
    if logits.dim() > 2:
        return torch.stack([torch.log_softmax(row.float(), -1).gather(-1, t).squeeze(-1)
                            for row, t in zip(logits, tokens)])
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens).squeeze(-1)


def response_logprobs(model: Any, sequences: Tensor, attention_mask: Tensor, prompt_len: int,
                      temperature: float = 1.0) -> Tensor:
    """Log-probs of the response tokens under ``model`` in one full forward pass.

    Args:
        sequences: (B, P + R) prompt (left-padded) + response ids; attention_mask: (B, P + R).
        prompt_len: P.
    Returns:
        (B, R) float32 ``log_softmax(logits / temperature)`` at ``sequences[:, P:]`` — the same quantity
        :func:`proxrl.lm.generation.generate` returns (mask with the response mask).
    """
    m = _unwrap(model)
    pos = position_ids_from_mask(attention_mask)
    logits = m(input_ids=sequences, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits
    return logprobs_from_logits(logits[:, prompt_len - 1:-1], sequences[:, prompt_len:], temperature)


# ----------------------------------------------------------------------------------------------- shared-trunk critic


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on the trunk's last hidden state (shared-trunk critic).

    ``forward(input_ids, attention_mask)`` returns ``(logits (B, T, V), values (B, T) float32)`` from ONE trunk
    pass: logits come from the LM's output embedding applied to the final hidden state, values from
    ``value_head`` applied to the same hidden state. The LM may be a PEFT LoRA model.
    """

    def __init__(self, policy: Any, head_std: float | None = 0.0) -> None:
        super().__init__()
        base = _unwrap(policy)
        cfg = base.config
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(cfg, attr, None) not in (None, 1, 1.0):
                raise UserError(f"{cfg.model_type} applies {attr} to its logits; the shared-trunk value head "
                                f"supports plain lm_head models only (use a separate critic)")
        self.policy = policy
        hidden = cfg.hidden_size
        param = next(base.parameters())
        self.value_head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            std = 1.0 / math.sqrt(hidden + 1) if head_std is None else head_std
            if std == 0:
                self.value_head.weight.zero_()
            else:
                self.value_head.weight.normal_(0.0, std)
            self.value_head.bias.zero_()

    @property
    def config(self) -> Any:
        return _unwrap(self.policy).config

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, T) ids and mask -> (logits (B, T, V), values (B, T) float32)."""
        h = hidden_states(self.policy, input_ids, attention_mask, position_ids)
        logits = _unwrap(self.policy).get_output_embeddings()(h)
        values = self.value_head(h).squeeze(-1).float()
        return logits, values

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """The LM via its own ``save_pretrained`` (adapter only for PEFT) + ``value_head.safetensors``."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(str(out))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()},
                  str(out / VALUE_HEAD_FILE))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None) -> "PolicyWithValueHead":
        """Load a full (non-PEFT) model saved by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        policy = load_causal_lm(path, dtype=dtype)
        obj = cls(policy)
        head_path = Path(path) / VALUE_HEAD_FILE
        if not head_path.is_file():
            raise UserError(f"{str(path)!r} has no {VALUE_HEAD_FILE}; it was not saved by PolicyWithValueHead")
        try:
            obj.value_head.load_state_dict(load_file(str(head_path)))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{head_path}: cannot load the value head ({_one_line(e)})") from e
        return obj


def policy_with_value_head(policy: Any, head_std: float | None = 0.0) -> PolicyWithValueHead:
    """Wrap a causal LM with a shared-trunk scalar value head (``head_std`` 0 = zero init; None = 1/sqrt(H+1))."""
    return PolicyWithValueHead(policy, head_std=head_std)


# ----------------------------------------------------------------------------------------------- reference, LoRA


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
        if not _is_peft(lm):
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
    if not _is_peft(lm):
        yield lm
        return
    was_training = lm.training
    lm.eval()
    try:
        with lm.disable_adapter():
            yield lm
    finally:
        lm.train(was_training)


def apply_lora(model: Any, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Iterable[str] | None = None) -> Any:
    """Wrap ``model`` with PEFT LoRA adapters (only adapter weights, and a seq-cls head, stay trainable).

    ``target_modules=None`` lets peft choose its default for the architecture (``c_attn`` for GPT-2).
    Sequence-classification models get ``task_type=SEQ_CLS`` (their head is trained in full).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if r <= 0:
        raise UserError(f"LoRA rank r={r} must be a positive integer")
    base = _unwrap(model)
    seqcls = any(isinstance(getattr(base, n, None), nn.Module) for n in ("score", "classifier"))
    kw: dict[str, Any] = {}
    if getattr(base.config, "model_type", None) == "gpt2":
        kw["fan_in_fan_out"] = True  # GPT-2 uses Conv1D (transposed Linear)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(target_modules) if target_modules is not None else None,
                     task_type=TaskType.SEQ_CLS if seqcls else TaskType.CAUSAL_LM, **kw)
    try:
        return get_peft_model(model, cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot apply LoRA to {type(base).__name__} ({_one_line(e)}); pass target_modules "
                        f"naming its linear layers") from e
