"""Chat templates: from a prompt, a conversation or a preference pair to the text and token ids a model sees.

``--chat-template auto|none|PATH.jinja`` (``sft``, ``reward-model``, ``ppo``, ``generate``, ``evaluate``) is
resolved once by :func:`resolve_chat_template` into a Jinja template string, or None for plain text. Every other
function takes ``(tokenizer, template, ...)`` and is pure: same inputs, same output.

Data layouts (the ones TRL documents):

* a prompt is a plain string, or a list of messages ``[{"role": "user", "content": "..."}, ...]``;
* SFT: ``{"messages": [...]}``, loss on the assistant turns only (:func:`sft_example`);
* preferences: ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (or plain strings, or the "implicit
  prompt" layout with only ``chosen``/``rejected`` holding whole conversations) (:func:`preference_texts`).

With a template, a plain-string prompt becomes one user message and is rendered with the generation prompt
(e.g. ``<|im_start|>assistant\\n``); a completion ends with the template's end-of-turn marker (e.g. ``<|im_end|>``),
whose token counts as EOS for stopping and for the missing-EOS penalty (:func:`end_of_turn_token_ids`). Rendered
text already holds the template's special tokens (BOS included, when the template writes one), so it is tokenized
with ``add_special_tokens=False`` (:func:`encode`).

Without a template (None): strings stay as they are; a list of messages becomes the plain concatenation of the
contents (one user message is exactly its content string), and each assistant turn is followed by the EOS token,
as in proxrl's plain ``{"prompt", "completion"}`` data.

Token boundaries of assistant turns are found by rendering prefixes of the conversation (``messages[:k]`` with
and without the generation prompt) and tokenizing the pieces separately, so any template works, with or without
``{% generation %}`` markers; the pieces are tokenized exactly as PPO later sees a prompt and its response.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from proxrl.errors import UserError

__all__ = [
    "Messages", "Prompt", "resolve_chat_template", "require_template", "is_conversational", "check_messages",
    "render_messages", "render_prompt", "encode", "prompt_token_ids", "sft_example", "preference_texts",
    "end_of_turn_token_ids",
]

Messages = Sequence[Mapping[str, Any]]
Prompt = Union[str, Messages]

CHAT_TEMPLATE_CHOICES = ("auto", "none")
_PROBE: list[dict[str, str]] = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _one_line(exc: BaseException, limit: int = 240) -> str:
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _at(where: str) -> str:
    return f"{where}: " if where else ""


# ----------------------------------------------------------------------------------------------- templates


def _tokenizer_template(tokenizer: Any) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # several named templates: the default one
        t = t.get("default")
    return t if isinstance(t, str) and t.strip() else None


def resolve_chat_template(tokenizer: Any, spec: str | None) -> str | None:
    """The Jinja chat template to use for ``--chat-template spec``, or None for plain text.

    Args:
        tokenizer: a HF tokenizer (its own ``chat_template`` is used by ``auto``).
        spec: ``"auto"`` (the tokenizer's template when it has one, else None), ``"none"`` (None; also for
            ``None`` or ``""``), or the path of a Jinja file holding a template.

    Returns:
        the template source, checked to render a two-message conversation, or None.

    Raises:
        UserError (one line): a missing/unreadable/empty template file, a value that is none of the above, or a
        template (the file's or the tokenizer's) that fails to compile or render (the Jinja error is named).
        ``auto`` on a tokenizer without a template is not an error here; see :func:`require_template`.
    """
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    s = str(spec).strip()
    if s.lower() == "auto":
        template = _tokenizer_template(tokenizer)
        source = "the tokenizer's own chat template"
    else:
        p = Path(s).expanduser()
        if not p.exists():
            raise UserError(f"chat template {s!r} is neither 'auto', 'none' nor an existing file; pass "
                            f"--chat-template auto, none or PATH.jinja")
        if not p.is_file():
            raise UserError(f"chat template path {s!r} is not a file; pass a .jinja file holding the template")
        try:
            template = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read chat template file {s!r} ({_one_line(e)}); save it as UTF-8 text") from e
        if not template.strip():
            raise UserError(f"chat template file {s!r} is empty; put a Jinja chat template in it")
        source = f"chat template file {s!r}"
    if template is None:
        return None
    try:
        _apply(tokenizer, template, _PROBE, add_generation_prompt=False)
        _apply(tokenizer, template, _PROBE[:1], add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad template from the user's point of view
        raise UserError(f"{source} fails to render a user/assistant conversation ({_one_line(e)}); fix it or pass "
                        f"--chat-template none or another .jinja file") from e
    return template


def require_template(template: str | None, spec: str | None, conversational: bool,
                     tokenizer_source: str = "the tokenizer") -> str | None:
    """Refuse ``--chat-template auto`` without a template when the data holds lists of messages.

    Returns ``template`` unchanged otherwise (``none`` with conversational data is allowed: the messages' contents
    are then joined as plain text, see the module docstring).

    Raises:
        UserError: ``spec`` is ``auto`` (or unset), ``template`` is None and ``conversational`` is True.
    """
    if template is None and conversational and (spec is None or str(spec).strip().lower() in ("", "auto")):
        raise UserError(f"--chat-template auto: {tokenizer_source} has no chat template but the data is "
                        f"conversational (lists of messages); pass --chat-template PATH.jinja, or --chat-template "
                        f"none to join the message contents as plain text")
    return template


# ----------------------------------------------------------------------------------------------- rendering


def is_conversational(x: Any) -> bool:
    """True for a list of messages (dicts with a ``role``), False for a string (or anything else)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, Mapping) and "role" in m for m in x)


def check_messages(messages: Any, where: str = "") -> list[dict[str, Any]]:
    """``messages`` as a list of dicts, each with a string ``role`` and a string ``content``.

    Raises:
        UserError: not a non-empty list of such dicts (``where`` names the row, e.g. ``"data.jsonl line 3"``).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UserError(f"{_at(where)}expected a non-empty list of messages like [{{\"role\": \"user\", "
                        f"\"content\": \"...\"}}], got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = sorted(m)[:5] if isinstance(m, Mapping) else type(m).__name__
            raise UserError(f"{_at(where)}message {i} needs string 'role' and 'content' (got {got}); fix the row")
        out.append(dict(m))
    return out


def _apply(tokenizer: Any, template: str, messages: Messages, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # pragma: no cover - transformers returns a str for tokenize=False
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, not str")
    return text


def render_messages(tokenizer: Any, template: str | None, messages: Messages, add_generation_prompt: bool,
                    where: str = "") -> str:
    """Render a list of messages with ``template`` (None: the contents joined, no EOS).

    Raises:
        UserError: the template fails to render (the Jinja error is named, with ``where``).
    """
    msgs = check_messages(messages, where)
    if template is None:
        return "".join(m["content"] for m in msgs)
    try:
        return _apply(tokenizer, template, msgs, add_generation_prompt)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{_at(where)}the chat template fails to render these {len(msgs)} messages "
                        f"({_one_line(e)}); fix the data or the template (or pass --chat-template none)") from e


def render_prompt(tokenizer: Any, template: str | None, prompt: Prompt, where: str = "") -> str:
    """The text of a prompt as the policy sees it before generating.

    * a string and no template: unchanged;
    * a string and a template: rendered as ``[{"role": "user", "content": prompt}]`` with the generation prompt;
    * a list of messages: rendered with ``add_generation_prompt=True`` (no template: the contents joined).

    Raises:
        UserError: a malformed message list, or a template that fails to render.
    """
    if isinstance(prompt, str):
        if template is None:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    return render_messages(tokenizer, template, prompt, add_generation_prompt=True, where=where)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (a rendered template writes its own BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_token_ids(tokenizer: Any, template: str | None, prompt: Prompt, where: str = "") -> list[int]:
    """``encode(render_prompt(...))``: the ids of a prompt, ready to left-pad for generation."""
    return encode(tokenizer, render_prompt(tokenizer, template, prompt, where))


def _turn_end(text: str, start: int, raw_end: int, content: str) -> int:
    """End (exclusive) of an assistant turn in ``text[start:raw_end]``: the content and the end-of-turn marker
    that follows it (e.g. ``<|im_end|>``), without the whitespace a template writes between turns."""
    pos = text.rfind(content, start, raw_end) if content else -1
    if pos < 0:  # the template rewrote the content (e.g. stripped it): trim trailing whitespace of the span
        end = raw_end
        while end > start and text[end - 1].isspace():
            end -= 1
        return end
    content_end = pos + len(content)
    end = raw_end
    while end > content_end and text[end - 1].isspace():
        end -= 1
    return end


def _segments(tokenizer: Any, template: str, msgs: list[dict[str, Any]], where: str
              ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character spans of its assistant turns."""
    full = render_messages(tokenizer, template, msgs, add_generation_prompt=False, where=where)
    spans: list[tuple[int, int]] = []
    last = 0
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = render_messages(tokenizer, template, msgs[:k], True, where) if k else ""
        upto = render_messages(tokenizer, template, msgs[:k + 1], False, where)
        if not (full.startswith(head) and full.startswith(upto) and upto.startswith(head) and len(head) >= last):
            raise UserError(f"{_at(where)}the chat template renders the first {k} messages (with the generation "
                            f"prompt) or {k + 1} messages differently from the start of the whole conversation, so "
                            f"assistant turn {k} cannot be located; use a template whose renderings of shorter "
                            f"conversations are prefixes of longer ones (or train on the last turn only)")
        start = len(head)
        end = _turn_end(full, start, len(upto), m["content"])
        spans.append((start, end))
        last = end
    return full, spans


def sft_example(tokenizer: Any, template: str | None, messages: Messages, max_length: int | None = None,
                where: str = "") -> tuple[list[int], list[int]]:
    """Token ids of a conversation and the mask of the tokens to train on (assistant turns only).

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``; any roles, any number of assistant turns.
        max_length: keep the first ``max_length`` tokens (None: all).

    Returns:
        ``(input_ids, labels_mask)``, two lists of length T: ``labels_mask[t]`` is 1 exactly on the tokens of an
        assistant turn: its content and the end-of-turn marker that closes it (``<|im_end|>`` in ChatML; the EOS
        token when ``template`` is None), 0 on system/user turns, turn headers (``<|im_start|>assistant\\n``) and
        the whitespace between turns. Each piece (text before a turn, the turn) is tokenized separately and the
        ids concatenated, so the ids before an assistant turn are those of its prompt rendered with the
        generation prompt, as in PPO. The mask may be all 0 after truncation (callers drop such examples).

    Raises:
        UserError: malformed messages, a template that fails to render, a template whose renderings of prefixes
        are not prefixes of the whole conversation, or no EOS token when ``template`` is None.
    """
    msgs = check_messages(messages, where)
    ids: list[int] = []
    mask: list[int] = []
    if template is None:
        eos = tokenizer.eos_token_id
        if eos is None and any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{_at(where)}the tokenizer has no EOS token to end assistant turns without a chat "
                            f"template; pass --chat-template PATH.jinja or use a tokenizer with an EOS token")
        for m in msgs:
            piece = encode(tokenizer, m["content"])
            if m["role"] == "assistant":
                piece = piece + [int(eos)]
                mask += [1] * len(piece)
            else:
                mask += [0] * len(piece)
            ids += piece
    else:
        full, spans = _segments(tokenizer, template, msgs, where)
        pos = 0
        for start, end in spans:
            before = encode(tokenizer, full[pos:start])
            turn = encode(tokenizer, full[start:end])
            ids += before + turn
            mask += [0] * len(before) + [1] * len(turn)
            pos = end
        tail = encode(tokenizer, full[pos:])
        ids += tail
        mask += [0] * len(tail)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def _completion_text(tokenizer: Any, template: str | None, prompt_msgs: list[dict[str, Any]], prompt_text: str,
                     completion: Prompt, where: str) -> str:
    if template is None:
        return completion if isinstance(completion, str) else "".join(
            m["content"] for m in check_messages(completion, where))
    comp = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
            else check_messages(completion, where))
    full = render_messages(tokenizer, template, prompt_msgs + comp, add_generation_prompt=False, where=where)
    if not full.startswith(prompt_text):
        raise UserError(f"{_at(where)}the chat template renders the prompt with the generation prompt differently "
                        f"from the start of prompt + completion; use a template whose renderings of shorter "
                        f"conversations are prefixes of longer ones")
    return full[len(prompt_text):_turn_end(full, len(prompt_text), len(full), comp[-1]["content"])]


def preference_texts(tokenizer: Any, template: str | None, prompt: Prompt | None, chosen: Prompt,
                     rejected: Prompt, where: str = "") -> tuple[str, str, str]:
    """``(prompt_text, chosen_text, rejected_text)`` of a preference pair, rendered consistently.

    ``prompt_text`` is :func:`render_prompt` (generation prompt included); each completion text is what follows
    it in the rendered prompt + completion, up to and including the end-of-turn marker (``<|im_end|>``), so
    ``prompt_text + chosen_text`` is the sequence the policy would produce. Layouts:

    * plain strings (``prompt`` may be ``""``): with a template the prompt is a user message and each completion
      an assistant message; without one they are returned unchanged;
    * TRL conversational: ``prompt`` a list of messages, ``chosen``/``rejected`` lists of (assistant) messages
      (a string completion is taken as one assistant message);
    * TRL implicit prompt: ``prompt`` None (or empty) and ``chosen``/``rejected`` whole conversations: their
      common leading messages are the prompt.

    Without a template no EOS is added; with one the texts end with the end-of-turn marker, so a caller should
    append EOS only when ``template`` is None.

    Raises:
        UserError: malformed messages, an implicit-prompt pair with no common leading messages or nothing after
        them, or a template that fails to render.
    """
    if (prompt is None or (not isinstance(prompt, str) and not prompt)) and (
            is_conversational(chosen) or is_conversational(rejected)):
        c, r = check_messages(chosen, where), check_messages(rejected, where)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        if n == 0 or n == len(c) or n == len(r):
            raise UserError(f"{_at(where)}no prompt given and chosen/rejected share no leading messages followed "
                            f"by different completions; give a 'prompt' column")
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
    if prompt is None:
        prompt = ""
    if isinstance(prompt, str) and template is None:
        prompt_text = prompt
        prompt_msgs: list[dict[str, Any]] = []
    else:
        prompt_msgs = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                       else check_messages(prompt, where))
        prompt_text = render_prompt(tokenizer, template, prompt_msgs, where)
    return (prompt_text, _completion_text(tokenizer, template, prompt_msgs, prompt_text, chosen, where),
            _completion_text(tokenizer, template, prompt_msgs, prompt_text, rejected, where))


def _is_added(tokenizer: Any, tid: int) -> bool:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return tid in decoder or tid in set(getattr(tokenizer, "all_special_ids", ()) or ())


def end_of_turn_token_ids(tokenizer: Any, template: str | None) -> list[int]:
    """The token ids that end an assistant turn: the template's end-of-turn token (if any), then EOS.

    The end-of-turn token is found by rendering a user/assistant probe: the first special/added token after
    the assistant's content (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3), or the single token there when
    the marker is one ordinary token. Pass the result as ``eos_token_id`` to generation: a row then stops on any
    of them and counts as finished (no missing-EOS penalty). Without a template: ``[eos]`` (or ``[]``).
    """
    out: list[int] = []
    if template is not None:
        try:
            full, spans = _segments(tokenizer, template, _PROBE, "")
        except UserError:
            spans = []
        if spans:
            start, end = spans[0]
            content = _PROBE[1]["content"]
            pos = full.rfind(content, start, end)
            tail_ids = encode(tokenizer, full[pos + len(content):end] if pos >= 0 else "")
            added = [t for t in tail_ids if _is_added(tokenizer, t)]
            if added:
                out.append(int(added[0]))
            elif len(tail_ids) == 1:
                out.append(int(tail_ids[0]))
    eos = tokenizer.eos_token_id
    if eos is not None and int(eos) not in out:
        out.append(int(eos))
    return out
