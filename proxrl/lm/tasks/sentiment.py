"""Built-in preference task: make Jane Austen continue her sentences more positively (offline RLHF).

The classic RLHF demo shape (GPT-2 + IMDB "positive continuation", Ziegler et al. 2019) on public-domain text:

* corpus: ~21k sentences from Jane Austen's six novels (public domain; shipped gzip-compressed in
  ``proxrl/lm/tasks/data/austen_sentences.txt.gz``, built by ``scripts/build_austen_data.py`` from the text
  packaged by the R package janeaustenr);
* prompts: the first few words of held-out sentences;
* scorer ("human labeller" stand-in): VADER (Hutto & Gilbert 2014, ``vaderSentiment``, MIT licence) compound
  sentiment of the completion, in [-1, 1]. Preference pairs are labelled by it; it is also the reward function
  ``"proxrl.lm.tasks.sentiment:reward_fn"`` and the evaluation metric (:func:`evaluate_sentiment`).
"""
from __future__ import annotations

import gzip
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from proxrl.errors import UserError
from proxrl.lm.evaluation import diversity, mean, sample

try:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
except ImportError:  # optional until the task is used: _analyzer() then says how to install it
    SentimentIntensityAnalyzer = None

DATA_FILE = Path(__file__).with_name("data") / "austen_sentences.txt.gz"
LICENCE = "Jane Austen's novels (1811-1818) are in the public domain"


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    if not DATA_FILE.is_file():
        raise UserError(f"built-in data file {DATA_FILE} is missing; reinstall proxrl (or run scripts/build_austen_data.py)")
    return tuple(ln for ln in gzip.decompress(DATA_FILE.read_bytes()).decode("utf-8").splitlines() if ln.strip())


def load_sentences() -> list[str]:
    """All shipped Austen sentences, in novel order (offline; no download)."""
    return list(_sentences())


def split_sentences(eval_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out) sentences: a deterministic shuffled split."""
    s = load_sentences()
    random.Random(seed).shuffle(s)
    n = max(1, int(len(s) * eval_fraction))
    return s[n:], s[:n]


def make_prompts(sentences: Sequence[str], seed: int = 0, min_words: int = 2, max_words: int = 4) -> list[str]:
    """The first k words of each sentence (k uniform in [min_words, max_words], fewer than the sentence has).

    Sentences of fewer than ``min_words + 2`` words are skipped (nothing left to continue).
    """
    rng = random.Random(seed)
    out = []
    for s in sentences:
        words = s.split()
        if len(words) < min_words + 2:
            continue
        k = rng.randint(min_words, min(max_words, len(words) - 2))
        out.append(" ".join(words[:k]))
    return out


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    if SentimentIntensityAnalyzer is None:
        raise UserError("the sentiment task needs the 'vaderSentiment' package; install it with "
                        "`pip install vaderSentiment` (or `pip install proxrl[lm]`)")
    return SentimentIntensityAnalyzer()


def vader_scores(texts: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (0 for empty / neutral text)."""
    an = _analyzer()
    return [float(an.polarity_scores(t)["compound"]) if t.strip() else 0.0 for t in texts]


def reward_fn(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """VADER compound score of each completion (the prompt is ignored): one float in [-1, 1] per sample."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return vader_scores(completions)


def evaluate_sentiment(policy: Any, ref: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                       temperature: float, seed: int,
                       rm_score: Callable[[list[str], list[str], list[bool]], list[float]] | None = None
                       ) -> dict[str, Any]:
    """Sample one completion per prompt from the SFT model (``ref``, "before") and from ``policy`` ("after") with the
    same seed and measure both sets: mean VADER, fraction positive (VADER > 0.05), KL(model || SFT) in nats per
    completion, EOS rate, :func:`~proxrl.lm.evaluation.diversity`, and with ``rm_score(prompts, completions,
    finished)`` the mean reward-model score.

    Returns ``{"before": metrics, "after": metrics, "completions": {"before": [...], "after": [...]},
    "vader": {"before": [...], "after": [...]}}``.
    """
    out: dict[str, Any] = {"completions": {}, "vader": {}}
    for name, model in (("before", ref), ("after", policy)):
        s = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   ref_model=ref)
        vader = vader_scores(s["completions"])
        metrics = {"vader": mean(vader), "vader_positive_fraction": mean([float(v > 0.05) for v in vader])}
        if rm_score is not None:
            metrics["rm_score"] = mean(rm_score(list(prompts), s["completions"], s["finished"]))
        metrics.update(kl_to_sft=mean(s["kl"]), finished_fraction=mean([float(f) for f in s["finished"]]),
                       **diversity(s["completions"]))
        out[name] = metrics
        out["completions"][name] = s["completions"]
        out["vader"][name] = vader
    return out
