"""Word-problem task: generator, splits, answer parser, final-number checker, reward function, prompt files."""
from __future__ import annotations

import json

import jinja2
import pytest

from proxrl.lm.tasks import word_problems as W

# SmolLM2-135M-Instruct's chat template (ChatML, with a default system prompt when none is given)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_CHATML = jinja2.Template(SMOLLM2_TEMPLATE)


def chatml(messages: list[dict[str, str]]) -> str:
    """The prompt as SmolLM2's tokenizer renders it with the generation prompt."""
    return _CHATML.render(messages=messages, add_generation_prompt=True)


# ----------------------------------------------------------------------------------------------- generator


def test_make_problems_is_deterministic_and_seeded():
    a = W.make_problems(60, seed=3, split="train")
    assert a == W.make_problems(60, seed=3, split="train")
    assert [r["text"] for r in a] != [r["text"] for r in W.make_problems(60, seed=4, split="train")]
    # a prefix of a longer draw: n does not change the first problems
    assert W.make_problems(20, seed=3, split="train") == a[:20]
    assert len({r["text"] for r in a}) == 60


def test_row_layout():
    r = W.make_problems(1, seed=0, split="eval")[0]
    assert set(r) == {"prompt", "answer", "text", "kind"}
    assert r["prompt"] == [{"role": "system", "content": W.SYSTEM}, {"role": "user", "content": r["text"]}]
    assert isinstance(r["answer"], int)
    assert "number" in W.SYSTEM


@pytest.mark.parametrize("spec_name", sorted(W.SPECS))
def test_splits_disjoint_and_answers_round_trip(spec_name):
    spec = W.SPECS[spec_name]
    train = W.make_problems(1500, seed=0, split="train", spec=spec)
    held = W.make_problems(300, seed=0, split="eval", spec=spec)
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    train_words = set(" ".join(r["text"] for r in train).replace(".", " ").replace("'s", " ").split())
    held_words = set(" ".join(r["text"] for r in held).replace(".", " ").replace("'s", " ").split())
    for name, _, _ in W._NAMES["eval"]:
        assert name not in train_words
    for name, _, _ in W._NAMES["train"]:
        assert name not in held_words
    for obj in W._OBJECTS["eval"]:
        assert obj not in train_words
    for obj in W._OBJECTS["train"]:
        assert obj not in held_words
    for r in train + held:
        assert r["answer"] >= 1
        # the answer is recovered from the text alone, whatever the rendering
        assert W.solve(r["text"]) == r["answer"], r["text"]
        assert W.solve(chatml(r["prompt"])) == r["answer"], r["text"]
    assert {r["kind"] for r in train} == {"+".join(k) for k in spec.kinds}


def test_every_template_is_used_and_parsed():
    rows = W.make_problems(3000, seed=1, split="train", spec=W.SPECS["two_step"])
    used = set()
    for r in rows:
        for op, pat in W._PATTERNS:
            if pat.search(r["text"]):
                used.add(pat.pattern)
    assert used == {pat.pattern for _, pat in W._PATTERNS}


def test_spec_ranges_respected():
    spec = W.ProblemSpec(kinds=(("start", "add"),), start_range=(3, 4), step_range=(2, 2))
    answers = {r["answer"] for r in W.make_problems(40, seed=0, split="train", spec=spec)}
    assert answers == {5, 6}
    spec = W.ProblemSpec(kinds=(("start_mul",),), factor_range=(2, 3))
    answers = {r["answer"] for r in W.make_problems(30, seed=0, split="train", spec=spec)}
    assert answers == {4, 6, 9}


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        W.make_problems(3, split="test")
    with pytest.raises(ValueError, match="n must be"):
        W.make_problems(-1)
    with pytest.raises(ValueError, match="start_range"):
        W.ProblemSpec(start_range=(0, 5))
    with pytest.raises(ValueError, match="bad kind"):
        W.ProblemSpec(kinds=(("add", "start"),))
    tiny = W.ProblemSpec(kinds=(("start", "add"),), start_range=(3, 3), step_range=(2, 2))
    with pytest.raises(ValueError, match="distinct"):
        W.make_problems(10_000, split="eval", spec=tiny)


# ----------------------------------------------------------------------------------------------- solve


@pytest.mark.parametrize("text, answer", [
    ("Tom has 7 apples. He buys 5 more. How many apples does Tom have now?", 12),
    ("Anna had 12 stamps this morning. She gives 5 stamps to Ben. How many stamps does Anna have now?", 7),
    ("There are 9 shells in Leo's bag. Mia gives him 4 more shells. How many shells does Leo have now?", 13),
    ("Zoe has 3 boxes of books, and each box holds 4 books. How many books does Zoe have now?", 12),
    ("Max buys 6 packs with 7 stickers in each pack. He loses 5 of them. How many stickers does Max have now?", 37),
    ("Lily has 20 cookies. Then she sells 8 cookies. Then she gets 3 more cookies. How many?", 15),
    ("Sam has 10 marbles. Emma takes 4 marbles from him. How many marbles does Sam have in the end?", 6),
    ("Ben has 30 pencils. He finds 12 more pencils. How many pencils does Ben have now?", 42),
])
def test_solve_hand_cases(text, answer):
    assert W.solve(text) == answer


def test_solve_reads_the_last_problem_not_the_system_example():
    assert W.solve(W.SYSTEM) == 5  # the example in the system prompt is itself a problem
    msgs = W.messages("Tom has 7 apples. He buys 5 more. How many apples does Tom have now?")
    assert W.solve(chatml(msgs)) == 12
    assert W.solve(str(msgs)) == 12  # str() of the message list, as a plain-text fallback would pass it
    assert W.solve(json.dumps(msgs)) == 12
    assert W.solve("What is the capital of France?") is None
    assert W.solve("") is None


# ----------------------------------------------------------------------------------------------- checker


@pytest.mark.parametrize("text, expected", [
    ("12", 12), (" 12 ", 12), ("12\n", 12), ("The answer is 12.", 12), ("= 12", 12), ("7 + 5 = 12", 12),
    ("Tom has 7 + 5 = 12 apples.", 12), ("**12**", 12), ("$12", 12), ("12 apples", 12), ("Answer: 12<|im_end|>", 12),
    ("1,234", 1234), ("He has 12,000 apples.", 12000), ("1,234,567", 1234567), ("12.0", 12), ("12.00.", 12),
    ("-3", -3), ("= -3", -3), ("7-3", 3), ("7 - 3 = 4", 4), ("(2)-3", 3), ("answer:12", 12),
    ("12. Then he buys 3 more.", 3), ("7, 5 and 3", 3), ("1,2345", 2345), ("12,", 12), ("1, 234", 234),
    ("12.5", None), ("The answer is 2.5 apples", None), ("twelve", None), ("", None), ("no digits here", None),
    ("v1.2.3", None), ("x = 4.", 4), ("\u22125", -5),
])
def test_extract_final_number(text, expected):
    assert W.extract_final_number(text) == expected


# ----------------------------------------------------------------------------------------------- reward


def test_reward_fn_from_prompt_text():
    p = "Tom has 7 apples. He buys 5 more. How many apples does Tom have now?"
    chat = chatml(W.messages(p))
    plain = W.plain_prompt({"text": p})
    completions = ["12", "The answer is 12.", "7 + 5 = 12", "13", "12 apples, then 3 more", "", "twelve"]
    expected = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    for prompt in (p, chat, plain, str(W.messages(p))):
        assert W.reward_fn([prompt] * len(completions), completions) == expected


def test_reward_fn_answers_override_and_errors():
    p = "Tom has 7 apples. He buys 5 more. How many apples does Tom have now?"
    assert W.reward_fn([p, p], ["12", "13"], answers=[13, 13]) == [0.0, 1.0]
    assert W.reward_fn([p, p], ["12", "13"], answer=[13, 12]) == [0.0, 0.0]
    assert W.reward_fn(["anything"], ["4"], answers=[4]) == [1.0]
    with pytest.raises(ValueError, match="no word problem"):
        W.reward_fn(["What is 2+2?"], ["4"])
    with pytest.raises(ValueError, match="2 prompts, 1 completions"):
        W.reward_fn([p, p], ["12"])
    with pytest.raises(ValueError, match="answers"):
        W.reward_fn([p], ["12"], answers=[1, 2])
    assert W.accuracy([p, p, p, p], ["12", "1", "12", "x"]) == 0.5


def test_reward_fn_through_proxrl_loader():
    from proxrl.lm.rewards import call_reward_fn, load_reward_fn

    fn = load_reward_fn("proxrl.lm.tasks.word_problems:reward_fn")
    rows = W.make_problems(4, seed=0, split="eval")
    prompts = [chatml(r["prompt"]) for r in rows]
    completions = [str(r["answer"]) if i % 2 == 0 else str(r["answer"] + 1) for i, r in enumerate(rows)]
    assert call_reward_fn(fn, prompts, completions).tolist() == [1.0, 0.0, 1.0, 0.0]


# ----------------------------------------------------------------------------------------------- files


def test_write_prompt_files(tmp_path):
    paths = W.write_prompt_files(tmp_path / "wp", n_train=30, n_eval=10, seed=2)
    assert sorted(paths) == ["eval", "eval_plain", "train", "train_plain"]
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("train", "eval", "train_plain", "eval_plain")] == [30, 10, 30, 10]
    want = W.make_problems(10, seed=2, split="eval")
    assert [r["prompt"] for r in rows["eval"]] == [w["prompt"] for w in want]
    for k in paths:
        for r in rows[k]:
            assert set(r) == {"prompt", "answer"}
            if k.endswith("_plain"):
                assert isinstance(r["prompt"], str) and r["prompt"].endswith("\nAnswer:")
                assert W.solve(r["prompt"]) == r["answer"]
            else:
                assert [m["role"] for m in r["prompt"]] == ["system", "user"]
                assert W.solve(chatml(r["prompt"])) == r["answer"]
    assert not list((tmp_path / "wp").glob("*.tmp"))
    # same call, same bytes
    again = W.write_prompt_files(tmp_path / "wp2", n_train=30, n_eval=10, seed=2)
    assert all(paths[k].read_bytes() == again[k].read_bytes() for k in paths)


def _tiny_chat_tokenizer(template: str | None):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>")
    tok.chat_template = template
    return tok


def test_write_prompt_files_rendered_with_a_chat_template(tmp_path):
    tok = _tiny_chat_tokenizer(SMOLLM2_TEMPLATE)
    tok.save_pretrained(tmp_path / "tok")
    for given in (tok, tmp_path / "tok", str(tmp_path / "tok")):
        paths = W.write_prompt_files(tmp_path / "wp", n_train=5, n_eval=4, seed=1, chat_tokenizer=given)
        assert sorted(paths) == ["eval", "eval_plain", "eval_rendered", "train", "train_plain", "train_rendered"]
        conv = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
        rendered = [json.loads(line) for line in paths["eval_rendered"].read_text().splitlines()]
        assert [r["prompt"] for r in rendered] == [chatml(c["prompt"]) for c in conv]
        assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rendered)
        assert [W.solve(r["prompt"]) for r in rendered] == [r["answer"] for r in rendered]
    with pytest.raises(ValueError, match="no chat template"):
        W.write_prompt_files(tmp_path / "wp3", n_train=1, n_eval=1, chat_tokenizer=_tiny_chat_tokenizer(None))
