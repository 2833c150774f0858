"""Tokenizers: loading one ready for left-padded batches, training a byte-level BPE, and checking that a tokenizer
is the one a model was trained with (a fingerprint of its vocabulary, saved next to the model).

Nothing here downloads anything: tokenizers are trained here or loaded from local directories.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from proxrl.errors import UserError
from proxrl.lm.heads import unwrap_model
from proxrl.lm.messages import describe

__all__ = ["TOKENIZER_FINGERPRINT_FILE", "load_tokenizer", "train_bpe_tokenizer", "tokenizer_fingerprint",
           "write_tokenizer_fingerprint", "read_tokenizer_fingerprint", "saved_tokenizer", "check_tokenizer_fits"]

TOKENIZER_FINGERPRINT_FILE = "tokenizer_fingerprint.json"


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
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad directory from the user's point of view
        raise UserError(f"could not load a tokenizer from {str(path)!r} ({describe(e)}); pass a directory "
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
        raise UserError(f"{path}: unreadable tokenizer fingerprint ({describe(e)}); delete the file or re-save "
                        f"the model with save_model_and_tokenizer") from e


def saved_tokenizer(model_dir: str | Path) -> Any | None:
    """The tokenizer saved in ``model_dir`` (via :func:`load_tokenizer`), or None when it holds no loadable one."""
    model_dir = Path(model_dir)
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
    ``save_model_and_tokenizer`` if present, else a tokenizer saved in ``model_dir`` if any.
    """
    rows = unwrap_model(model).get_input_embeddings().weight.shape[0]
    n = len(tokenizer)
    if n > rows:
        raise UserError(f"tokenizer has {n} tokens but the {what} embedding has only {rows} rows; use the "
                        f"tokenizer the {what} was trained with (or resize its embeddings)")
    if model_dir is None:
        return
    saved = read_tokenizer_fingerprint(model_dir)
    if saved is None:
        other = saved_tokenizer(model_dir)
        if other is None:
            return
        saved = {"fingerprint": tokenizer_fingerprint(other), "len": len(other)}
    fp = tokenizer_fingerprint(tokenizer)
    if saved.get("fingerprint") != fp or saved.get("len", n) != n:
        raise UserError(f"the {what} in {str(model_dir)!r} was saved with a different tokenizer "
                        f"(len {saved.get('len')} vs {n}, fingerprint {str(saved.get('fingerprint'))[:12]} vs "
                        f"{fp[:12]}); use the tokenizer saved next to it")
