"""proxrl.lm.chat: template resolution, prompt rendering, assistant-only SFT masks, preference pairs, end of turn.

All tokenizers are trained offline here (byte-level BPE) with ChatML / Llama-3 style special tokens added.
"""
import json

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from proxrl.errors import UserError  # noqa: E402
from proxrl.lm import chat as C  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEXTS = ["hello world how are you today", "I am fine thanks, and you?", "what is two plus three", "it is five",
         "the cat sat on the mat", "tell me a story about a dog"] * 10

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "what is two plus three"},
    {"role": "assistant", "content": "it is five"},
    {"role": "user", "content": "tell me a story"},
    {"role": "assistant", "content": "the cat sat on the mat."},
]


@pytest.fixture(scope="module")
def tok():
    from proxrl.lm.tokenization import train_bpe_tokenizer

    t = train_bpe_tokenizer(TEXTS, 300)
    t.add_tokens(["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 special_tokens=True)
    return t


def _id(tok, s):
    return tok.convert_tokens_to_ids(s)


def _masked_runs(tok, ids, mask):
    """Decoded text of each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


# ----------------------------------------------------------------------------------------------- resolve


def test_resolve_none_auto_and_file(tok, tmp_path):
    assert C.resolve_chat_template(tok, "none") is None
    assert C.resolve_chat_template(tok, None) is None
    assert tok.chat_template is None
    assert C.resolve_chat_template(tok, "auto") is None  # auto without a template is fine here
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML)
    assert C.resolve_chat_template(tok, str(f)) == CHATML
    import copy

    own = copy.deepcopy(tok)
    own.chat_template = LLAMA3
    assert C.resolve_chat_template(own, "auto") == LLAMA3
    assert C.resolve_chat_template(own, "none") is None


@pytest.mark.parametrize("content, expect", [
    (None, "neither 'auto', 'none' nor an existing file"),
    ("", "is empty"),
    ("{% for m in messages %}", "TemplateSyntaxError"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_resolve_bad_templates_one_line(tok, tmp_path, content, expect):
    f = tmp_path / "t.jinja"
    if content is not None:
        f.write_text(content)
    with pytest.raises(UserError) as e:
        C.resolve_chat_template(tok, str(f))
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_resolve_directory_is_refused(tok, tmp_path):
    with pytest.raises(UserError, match="not a file"):
        C.resolve_chat_template(tok, str(tmp_path))


def test_require_template(tok):
    with pytest.raises(UserError) as e:
        C.require_template(None, "auto", conversational=True, tokenizer_source="tokenizer in 'm/'")
    msg = str(e.value)
    assert "tokenizer in 'm/' has no chat template" in msg and "none" in msg and ".jinja" in msg
    assert "\n" not in msg
    assert C.require_template(None, "auto", conversational=False) is None
    assert C.require_template(None, "none", conversational=True) is None
    assert C.require_template(CHATML, "auto", conversational=True) == CHATML


# ----------------------------------------------------------------------------------------------- prompts


def test_render_prompt_layouts(tok):
    assert C.render_prompt(tok, None, "plain text ") == "plain text "
    want = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert C.render_prompt(tok, CHATML, "hi there") == want
    assert C.render_prompt(tok, CHATML, [{"role": "user", "content": "hi there"}]) == want
    # no template: the contents joined
    two = [{"role": "system", "content": "S. "}, {"role": "user", "content": "U"}]
    assert C.render_prompt(tok, None, two) == "S. U"


def test_prompt_token_ids_no_added_specials(tok):
    ids = C.prompt_token_ids(tok, CHATML, "hi")
    assert ids[0] == _id(tok, "<|im_start|>") and ids[-1] == tok("\n", add_special_tokens=False)["input_ids"][-1]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the Llama-3 style template writes BOS itself: exactly one BOS
    ids = C.prompt_token_ids(tok, LLAMA3, "hi")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_render_failure_and_bad_messages_are_one_line(tok):
    picky = "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}" \
            "{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError) as e:
        C.render_prompt(tok, picky, [{"role": "tool", "content": "x"}], where="p.jsonl line 4")
    assert str(e.value).startswith("p.jsonl line 4: ") and "no tools here" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="message 1 needs string 'role' and 'content'"):
        C.render_prompt(tok, CHATML, [{"role": "user", "content": "a"}, {"role": "assistant"}])
    with pytest.raises(UserError, match="non-empty list of messages"):
        C.render_prompt(tok, CHATML, [])


def test_is_conversational():
    assert C.is_conversational([{"role": "user", "content": "x"}])
    assert not C.is_conversational("x") and not C.is_conversational([]) and not C.is_conversational(["x"])


# ----------------------------------------------------------------------------------------------- SFT masks


def test_sft_mask_chatml_is_exactly_the_assistant_turns(tok):
    ids, mask = C.sft_example(tok, CHATML, CONV)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    # the whole sequence is the rendered conversation
    assert tok.decode(ids) == tok.apply_chat_template(CONV, chat_template=CHATML, tokenize=False)
    # the masked tokens are the assistant contents, each followed by <|im_end|>, and nothing else
    assert _masked_runs(tok, ids, mask) == ["it is five<|im_end|>", "the cat sat on the mat.<|im_end|>"]
    im_end = _id(tok, "<|im_end|>")
    assert [m for i, m in zip(ids, mask) if i == im_end] == [0, 0, 1, 0, 1]  # system, user, asst, user, asst
    # the ids before each assistant turn are its prompt as PPO tokenizes it (rendered with the generation prompt)
    for k in (2, 4):
        prompt = C.prompt_token_ids(tok, CHATML, CONV[:k])
        assert ids[:len(prompt)] == prompt
        assert mask[len(prompt) - 1] == 0 and mask[len(prompt)] == 1


def test_sft_mask_llama3_style(tok):
    conv = CONV[1:3]
    ids, mask = C.sft_example(tok, LLAMA3, conv)
    assert ids[0] == tok.bos_token_id and mask[0] == 0
    assert _masked_runs(tok, ids, mask) == ["it is five<|eot_id|>"]
    assert mask[-1] == 1  # nothing after the last end-of-turn


def test_sft_without_template_matches_prompt_completion_data(tok):
    from proxrl.lm.sft import tokenize_records

    ids, mask = C.sft_example(tok, None, CONV[1:3])
    (ex,) = tokenize_records([{"prompt": CONV[1]["content"], "completion": CONV[2]["content"]}], tok, 128)
    assert tuple(ids) == ex.ids
    assert mask == [0] * ex.n_prompt + [1] * (len(ids) - ex.n_prompt)
    assert ids[-1] == tok.eos_token_id


def test_sft_truncation(tok):
    ids, mask = C.sft_example(tok, CHATML, CONV)
    short_ids, short_mask = C.sft_example(tok, CHATML, CONV, max_length=7)
    assert short_ids == ids[:7] and short_mask == mask[:7] and sum(short_mask) == 0


def test_sft_template_not_prefix_consistent_is_refused(tok):
    last_special = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}<|im_end|>"
                    "{% endfor %}")
    with pytest.raises(UserError) as e:
        C.sft_example(tok, last_special, CONV[1:3], where="d.jsonl line 2")
    assert "assistant turn 1 cannot be located" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- preferences


def test_preference_texts_conversational_and_plain(tok):
    p = [{"role": "user", "content": "what is two plus three"}]
    good, bad = [{"role": "assistant", "content": "it is five"}], [{"role": "assistant", "content": "a cat"}]
    pt, ct, rt = C.preference_texts(tok, CHATML, p, good, bad)
    assert pt == "<|im_start|>user\nwhat is two plus three<|im_end|>\n<|im_start|>assistant\n"
    assert (ct, rt) == ("it is five<|im_end|>", "a cat<|im_end|>")
    # plain strings with a template: the same texts
    assert C.preference_texts(tok, CHATML, p[0]["content"], "it is five", "a cat") == (pt, ct, rt)
    # TRL's implicit-prompt layout: whole conversations, the common start is the prompt
    assert C.preference_texts(tok, CHATML, None, p + good, p + bad) == (pt, ct, rt)
    # plain strings without a template: unchanged (the caller appends EOS)
    assert C.preference_texts(tok, None, "Q: ", "yes", "no") == ("Q: ", "yes", "no")
    assert C.preference_texts(tok, None, p, good, bad) == ("what is two plus three", "it is five", "a cat")


def test_preference_implicit_prompt_needs_common_start(tok):
    with pytest.raises(UserError, match="give a 'prompt' column"):
        C.preference_texts(tok, CHATML, None, [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}])


def test_preference_texts_multi_turn_prompt(tok):
    pt, ct, rt = C.preference_texts(tok, CHATML, CONV[:4], [CONV[4]], [{"role": "assistant", "content": "no."}])
    assert pt == C.render_prompt(tok, CHATML, CONV[:4])
    assert pt + ct + "\n" == tok.apply_chat_template(CONV, chat_template=CHATML, tokenize=False)
    assert rt == "no.<|im_end|>"


# ----------------------------------------------------------------------------------------------- end of turn


def test_end_of_turn_token_ids(tok):
    assert C.end_of_turn_token_ids(tok, CHATML) == [_id(tok, "<|im_end|>"), tok.eos_token_id]
    assert C.end_of_turn_token_ids(tok, LLAMA3) == [_id(tok, "<|eot_id|>"), tok.eos_token_id]
    assert C.end_of_turn_token_ids(tok, None) == [tok.eos_token_id]
    # a template that ends turns with EOS itself: no duplicate
    eos_turns = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}" \
                "{% if add_generation_prompt %}assistant: {% endif %}"
    assert C.end_of_turn_token_ids(tok, eos_turns) == [tok.eos_token_id]
    # a template with no end-of-turn marker: EOS only
    bare = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert C.end_of_turn_token_ids(tok, bare) == [tok.eos_token_id]


def test_generation_stops_on_end_of_turn(tok):
    """A model that always emits <|im_end|> finishes after one token when the end-of-turn ids are the EOS ids."""
    import torch

    from proxrl.lm.generation import generate
    from proxrl.lm.builders import build_tiny_gpt2

    model = build_tiny_gpt2(tok, n_layer=1, n_embd=16, n_head=2, n_positions=64, seed=0).eval()
    im_end = _id(tok, "<|im_end|>")
    head = torch.nn.Linear(model.config.n_embd, len(tok))  # untied head whose bias makes <|im_end|> certain
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[im_end] = 50.0
    model.lm_head = head
    ids = torch.tensor([C.prompt_token_ids(tok, CHATML, "hi")])
    eot = C.end_of_turn_token_ids(tok, CHATML)
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=5, temperature=0.0, eos_token_id=eot)
    assert out.responses[0, 0].item() == im_end and bool(out.finished[0]) and int(out.response_mask.sum()) == 1
    plain = generate(model, ids, torch.ones_like(ids), max_new_tokens=5, temperature=0.0,
                     eos_token_id=tok.eos_token_id)
    assert not bool(plain.finished[0])  # with EOS alone the row would run on (and pay the missing-EOS penalty)


def test_template_file_roundtrip_json_safe(tok, tmp_path):
    """A template read from a file renders the same as the string (and survives JSON, e.g. in a run config)."""
    f = tmp_path / "t.jinja"
    f.write_text(CHATML)
    t = C.resolve_chat_template(tok, str(f))
    assert json.loads(json.dumps(t)) == CHATML
    assert C.render_prompt(tok, t, "x") == C.render_prompt(tok, CHATML, "x")


SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_smollm2_template_default_system_prompt_is_not_trained(tok):
    """SmolLM2-Instruct's own template (ChatML plus a default system turn) with its EOS = <|im_end|>."""
    import copy

    t = copy.deepcopy(tok)
    t.eos_token = "<|im_end|>"
    ids, mask = C.sft_example(t, SMOLLM2, CONV[1:])
    assert t.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert _masked_runs(t, ids, mask) == ["it is five<|im_end|>", "the cat sat on the mat.<|im_end|>"]
    assert C.end_of_turn_token_ids(t, SMOLLM2) == [_id(t, "<|im_end|>")]  # EOS is the end of turn: listed once


def test_template_that_rewrites_content(tok):
    """Llama-3 style templates trim the content: the turn is still found (content + <|eot_id|>)."""
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  it is five \n"}]
    ids, mask = C.sft_example(tok, LLAMA3, conv)
    assert _masked_runs(tok, ids, mask) == ["it is five<|eot_id|>"]
    _, ct, _ = C.preference_texts(tok, LLAMA3, "hi", "  it is five \n", "no")
    assert ct == "it is five<|eot_id|>"
