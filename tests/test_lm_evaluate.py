"""proxrl evaluate (proxrl.lm.heldout): reward, KL, length, distinct-n and win rate on hand-checkable cases, the
command end to end (report.json, PNG, samples), and its bad input (one line, exit 2, nothing written).

A tiny GPT-2 (1 layer, 32 dims) over a handmade character tokenizer keeps each case to about a second.
"""
from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from proxrl.cli import main  # noqa: E402
from proxrl.errors import UserError  # noqa: E402
from proxrl.lm.evaluation import diversity  # noqa: E402

CHARS = list("abcdefghijklmnopqrstuvwxyz .")
PROMPTS = ["the cat", "a dog", "hello", "we go", "sun", "my hat", "ab"]


def _char_tokenizer(out: Path) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0}  # no pad token (load_tokenizer makes pad == eos): every sampled token is visible text or EOS
    for c in CHARS:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>")
    fast.save_pretrained(str(out))
    return out


def _make_lm(root: Path, name: str, seed: int) -> Path:
    from proxrl.lm.builders import build_tiny_gpt2
    from proxrl.lm.loading import save_model_and_tokenizer
    from proxrl.lm.tokenization import load_tokenizer

    tok = load_tokenizer(_char_tokenizer(root / f"tok_{name}"))
    model = build_tiny_gpt2(tok, n_layer=1, n_embd=32, n_head=2, n_positions=64, seed=seed)
    return save_model_and_tokenizer(model, tok, root / name)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    from proxrl.lm.builders import scalar_model_from_causal
    from proxrl.lm.loading import load_causal_lm, save_model_and_tokenizer
    from proxrl.lm.tokenization import load_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    out = {"policy": _make_lm(root, "policy", 0), "reference": _make_lm(root, "reference", 1)}
    tok = load_tokenizer(out["policy"])
    rm = scalar_model_from_causal(load_causal_lm(out["policy"]), head_std=0.02)
    out["reward_model"] = save_model_and_tokenizer(rm, tok, root / "reward_model")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out["prompts"] = root / "prompts.jsonl"
    (root / "questions.jsonl").write_text("".join(json.dumps({"question": p, "id": i}) + "\n"
                                                  for i, p in enumerate(PROMPTS)))
    out["questions"] = root / "questions.jsonl"
    (root / "chat.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n"
                                             for p in PROMPTS))
    out["chat"] = root / "chat.jsonl"
    (root / "rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions):
            return [float(len(c)) for c in completions]

        def strings(prompts, completions):
            return ["1.5"] * len(completions)

        def slow(prompts, completions):
            import time
            time.sleep(3)
            return [0.0] * len(completions)
    """))
    out["reward_fn"] = Path(f"{root / 'rewards.py'}:length")
    return out


def _load(path: Path):
    from proxrl.lm.loading import load_causal_lm
    from proxrl.lm.tokenization import load_tokenizer

    return load_causal_lm(path), load_tokenizer(path)


def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def _scorer(tok, fn=length_reward):
    from proxrl.lm.heldout import make_eval_scorer

    return make_eval_scorer(tok, reward_fn=fn, reward_timeout=None)


# ----------------------------------------------------------------------------------------------- the numbers


def test_policy_equal_to_reference_gives_kl_zero_and_win_rate_half(dirs):
    from proxrl.lm.heldout import evaluate_policy

    policy, tok = _load(dirs["policy"])
    reference, _ = _load(dirs["policy"])  # the same weights, loaded twice
    r = evaluate_policy(policy, reference, tok, PROMPTS, _scorer(tok), max_new_tokens=8, temperature=0.9,
                        seed=3, batch_size=3)
    m, samples = r["metrics"], r["samples"]
    assert m["ref_kl"] == 0.0 and m["ref_kl_k3"] == 0.0
    assert all(s["kl_k1"] == 0.0 and s["kl_k3"] == 0.0 for s in samples)
    # same seed, same batches: the reference draws exactly the policy's completions, so every reward ties
    assert [s["completion"] for s in samples] == [s["reference_completion"] for s in samples]
    assert m["win_rate"] == 0.5
    # the reward is len(completion): check mean, population std, lengths and diversity by hand
    lens = [float(len(s["completion"])) for s in samples]
    assert [s["reward"] for s in samples] == lens
    assert m["reward_mean"] == pytest.approx(sum(lens) / len(lens), abs=1e-12)
    assert m["reward_std"] == pytest.approx(statistics.pstdev(lens), abs=1e-6)
    # a char tokenizer: tokens = characters, + 1 for the EOS of a finished completion
    assert [s["length"] for s in samples] == [len(s["completion"]) + int(s["finished"]) for s in samples]
    assert m["response_length"] == pytest.approx(sum(s["length"] for s in samples) / len(samples))
    assert m["eos_rate"] == pytest.approx(sum(s["finished"] for s in samples) / len(samples))
    div = diversity([s["completion"] for s in samples])
    assert (m["distinct_1"], m["distinct_2"]) == (div["distinct_1"], div["distinct_2"])
    assert m["ref_reward_mean"] == m["reward_mean"] and m["ref_distinct_2"] == m["distinct_2"]


def _sum_logprob(model, ids: list[int], n_prompt: int, temperature: float) -> list[float]:
    """Per-token log-probs of ids[n_prompt:] from an unpadded single-sequence forward at ``temperature``."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    lp = torch.log_softmax(logits / temperature, -1)
    return [float(lp[t - 1, ids[t]]) for t in range(n_prompt, len(ids))]


def _check_kl(policy, reference, tok, samples, temperature) -> tuple[list[float], list[float]]:
    """Each sample's k1/k3 recomputed by hand from unpadded forwards; returns them."""
    k1s, k3s = [], []
    for p, s in zip(PROMPTS, samples):
        pid = tok(p, add_special_tokens=False)["input_ids"]
        resp = tok(s["completion"], add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if s["finished"]
                                                                              else [])
        assert len(resp) == s["length"]
        lp = _sum_logprob(policy, pid + resp, len(pid), temperature)
        lq = _sum_logprob(reference, pid + resp, len(pid), temperature)
        k1 = sum(a - b for a, b in zip(lp, lq))
        k3 = sum(torch.expm1(torch.tensor(b - a)).item() - (b - a) for a, b in zip(lp, lq))
        assert s["kl_k1"] == pytest.approx(k1, abs=1e-4)
        assert s["kl_k3"] == pytest.approx(k3, abs=1e-4)
        k1s.append(k1)
        k3s.append(k3)
    return k1s, k3s


def test_greedy_kl_and_win_rate_match_an_unpadded_recomputation(dirs):
    from proxrl.lm.heldout import evaluate_policy

    policy, tok = _load(dirs["policy"])
    reference, _ = _load(dirs["reference"])
    r = evaluate_policy(policy, reference, tok, PROMPTS, _scorer(tok), max_new_tokens=6, temperature=0.0,
                        seed=0, batch_size=4)  # left padding inside each batch of 4
    m, samples = r["metrics"], r["samples"]
    k1s, k3s = _check_kl(policy, reference, tok, samples, 1.0)  # greedy: log-probs at temperature 1
    assert m["ref_kl"] == pytest.approx(sum(k1s) / len(k1s), abs=1e-4)
    assert m["ref_kl_k3"] == pytest.approx(sum(k3s) / len(k3s), abs=1e-4) and m["ref_kl_k3"] > 0
    wins = [1.0 if s["reward"] > s["reference_reward"] else 0.5 if s["reward"] == s["reference_reward"] else 0.0
            for s in samples]
    assert m["win_rate"] == pytest.approx(sum(wins) / len(wins))
    # greedy is deterministic: the same call gives the same report
    again = evaluate_policy(policy, reference, tok, PROMPTS, _scorer(tok), max_new_tokens=6, temperature=0.0,
                            seed=7, batch_size=4)
    assert again["samples"] == samples


def test_win_rate_counts_ties_half():
    from proxrl.lm.heldout import win_rate

    assert win_rate(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.0, 2.0, 4.0, 5.0])) == pytest.approx(0.5)
    assert win_rate(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0


def test_reference_cache_and_lora_reference(dirs):
    from proxrl.lm.heldout import evaluate_policy
    from proxrl.lm.lora import apply_lora
    from proxrl.lm.reference import reference_from_policy

    policy, tok = _load(dirs["policy"])
    reference, _ = _load(dirs["reference"])
    cache: dict = {}
    kw = dict(max_new_tokens=5, temperature=0.7, seed=1, batch_size=8)
    a = evaluate_policy(policy, reference, tok, PROMPTS, _scorer(tok), cache=cache, **kw)
    assert "reference" in cache
    _check_kl(policy, reference, tok, a["samples"], 0.7)  # sampled: log-probs at the sampling temperature
    b = evaluate_policy(policy, reference, tok, PROMPTS, _scorer(tok), cache=cache, **kw)
    assert a == b
    # a LoRA policy whose reference is itself with the adapters off (PPO's ModelSet.ref): B = 0 at init, KL 0
    lora = apply_lora(policy, r=2, alpha=4)
    ref = reference_from_policy(lora, use_lora_adapters=True)
    c = evaluate_policy(lora, ref, tok, PROMPTS[:3], _scorer(tok), **kw)
    assert c["metrics"]["ref_kl"] == 0.0 and c["metrics"]["win_rate"] == 0.5
    # no reference: policy-only metrics
    d = evaluate_policy(policy, None, tok, PROMPTS, _scorer(tok), **kw)
    assert "ref_kl" not in d["metrics"] and "reference_completion" not in d["samples"][0]
    assert d["metrics"]["reward_mean"] == a["metrics"]["reward_mean"]


# ----------------------------------------------------------------------------------------------- the command


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_report_png_and_samples(capsys, tmp_path, dirs):
    out = tmp_path / "ev"
    code, stdout, err = run_cli(capsys, "evaluate", "--policy", dirs["policy"], "--reference", dirs["reference"],
                                "--prompts", dirs["prompts"], "--reward-fn", dirs["reward_fn"], "--out", out,
                                "--max-new-tokens", 6, "--num-prompts", 5, "--batch-size", 2, "--threads", 1,
                                "--sample-rows", 3)
    assert code == 0, err
    assert "win rate" in stdout and "report.json" in stdout
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    for k in ("reward_mean", "reward_std", "ref_kl", "ref_kl_k3", "response_length", "distinct_1", "distinct_2",
              "win_rate", "ref_reward_mean"):
        assert isinstance(m[k], float), k
    assert report["settings"]["num_prompts"] == 5 and report["settings"]["temperature"] == 0.7
    assert (out / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:5]
    assert all(r["reward"] == len(r["completion"]) for r in rows)
    assert m["reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / 5)
    md = (out / "samples.md").read_text()
    assert "| # | prompt | policy | reward | reference | reward | KL k1 |" in md
    assert md.count("\n| ") == 1 + 3  # header, 3 rows (the separator line starts with |---)


def test_cli_reward_model_and_chat_template_file(capsys, tmp_path, dirs):
    tmpl = tmp_path / "plain.jinja"
    tmpl.write_text("{% for m in messages %}{{ m['content'] }}.{% endfor %}{% if add_generation_prompt %} "
                    "{% endif %}")
    out = tmp_path / "ev"
    code, stdout, err = run_cli(capsys, "evaluate", "--policy", dirs["policy"], "--prompts", dirs["chat"],
                                "--reward-model", dirs["reward_model"], "--chat-template", tmpl, "--out", out,
                                "--max-new-tokens", 4, "--temperature", 0)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert "win_rate" not in report["metrics"] and report["settings"]["temperature"] == 0.0
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}] and len(rows) == len(PROMPTS)
    assert len({r["reward"] for r in rows}) > 1  # a reward model's scores, not a constant


@pytest.mark.parametrize("case", ["no_policy_dir", "plain_lm_reward_model", "missing_column", "auto_no_template",
                                  "neither_reward", "both_rewards", "bad_template"])
def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, dirs, case):
    out = tmp_path / "ev"
    base = {"--policy": dirs["policy"], "--prompts": dirs["prompts"], "--reward-fn": dirs["reward_fn"],
            "--out": out, "--max-new-tokens": 3}
    needles: tuple[str, ...]
    if case == "no_policy_dir":
        base["--policy"] = tmp_path / "nope"
        needles = ("policy directory", "nope", "does not exist")
    elif case == "plain_lm_reward_model":
        del base["--reward-fn"]
        base["--reward-model"] = dirs["reference"]
        needles = ("not a reward model", "GPT2LMHeadModel", "proxrl reward-model")
    elif case == "missing_column":
        base["--prompts"] = dirs["questions"]
        needles = ("no column 'prompt'", "'question'", "'id'", "--prompt-column")
    elif case == "auto_no_template":
        base["--prompts"] = dirs["chat"]
        needles = ("--chat-template auto", "no chat template", "conversational", "none")
    elif case == "neither_reward":
        del base["--reward-fn"]
        needles = ("exactly one of --reward-model", "neither")
    elif case == "both_rewards":
        base["--reward-model"] = dirs["reward_model"]
        needles = ("exactly one of --reward-model", "both")
    else:
        base["--chat-template"] = tmp_path / "missing.jinja"
        needles = ("missing.jinja", "auto", "none")
    argv = ["evaluate"] + [str(x) for kv in base.items() for x in kv]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and line.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in line, (n, line)
    assert not out.exists()  # nothing written


def test_missing_column_hint_names_other_column_when_given(capsys, tmp_path, dirs):
    out = tmp_path / "ev"
    code, _, err = run_cli(capsys, "evaluate", "--policy", dirs["policy"], "--prompts", dirs["questions"],
                           "--prompt-column", "question", "--reward-fn", dirs["reward_fn"], "--out", out,
                           "--max-new-tokens", 2, "--num-prompts", 2, "--sample-rows", 0)
    assert code == 0, err
    assert len((out / "completions.jsonl").read_text().splitlines()) == 2


def test_builtin_task_prompts_are_the_held_out_split():
    from proxrl.lm import tasks
    from proxrl.lm.heldout import load_eval_prompts

    got = load_eval_prompts("arithmetic", num_prompts=5)
    assert got == tasks.task_prompts("arithmetic", split="eval", n=5)
    with pytest.raises(UserError, match="no prompts"):
        load_eval_prompts("")


@pytest.mark.parametrize("fn, timeout, code, needles", [
    ("strings", "300", 2, ("returned '1.5'", "not a real number", "sample 0")),
    ("slow", "0.3", 1, ("did not return within 0.3 s", "--reward-timeout")),
])
def test_cli_reward_function_checks(capsys, tmp_path, dirs, fn, timeout, code, needles):
    out = tmp_path / "ev"
    spec = str(dirs["reward_fn"]).rsplit(":", 1)[0] + ":" + fn
    got, _, err = run_cli(capsys, "evaluate", "--policy", dirs["policy"], "--prompts", dirs["prompts"],
                          "--reward-fn", spec, "--reward-timeout", timeout, "--out", out, "--max-new-tokens", 2)
    assert got == code, err
    line = err.strip()
    assert "\n" not in line and all(n in line for n in needles), line
    assert not out.exists()
