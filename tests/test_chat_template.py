"""Chat rendering against transformers' apply_chat_template, and loss masks from message spans."""

import json

import pytest

from qwen15 import Tokenizer
from qwen15.chat_template import ChatTemplateError

from conftest import SHARED_DATA

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "给我讲一个故事。"},
        {"role": "assistant", "content": "\n\n  Once upon a time...\n"},
    ],
    [{"role": "user", "content": "empty answer"}, {"role": "assistant", "content": ""}],
    [
        {"role": "user", "content": "tricky <|im_end|> inside"},
        {"role": "assistant", "content": "ok <|endoftext|>"},
    ],
]


def sharegpt_conversations():
    path = SHARED_DATA / "sharegpt_multiturn_8conv.json"
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    convs = []
    for record in json.loads(path.read_text(encoding="utf-8")):
        convs.append([{"role": roles[m["from"]], "content": m["value"]} for m in record["conversations"]])
    return convs


def hf_ids(hf_tokenizer, messages, add_generation_prompt):
    out = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("builtin", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers(tokenizer, hf_tokenizer, builtin, add_generation_prompt):
    tok = Tokenizer(tokenizer.backend, chat_template=None) if builtin else tokenizer
    for messages in CONVERSATIONS + sharegpt_conversations():
        assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == hf_ids(
            hf_tokenizer, messages, add_generation_prompt
        )
        text = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert (
            tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            == text
        )


def test_checkpoint_template_is_used(tokenizer):
    custom = Tokenizer(
        tokenizer.backend,
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    text = custom.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert text == "<|im_start|>user\nx<|im_end|>\n"  # no default system prompt in this template


def _masked_spans(ids, mask):
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


def test_assistant_mask_covers_exactly_the_assistant_content(tokenizer):
    for messages in CONVERSATIONS + sharegpt_conversations():
        ids, mask = tokenizer.encode_chat(messages, loss_on="assistant")
        assert ids == tokenizer.apply_chat_template(messages)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        spans = _masked_spans(ids, mask)
        assert len(spans) == len(answers)
        for span, answer in zip(spans, answers):
            assert span[-1] == tokenizer.im_end_id
            text = tokenizer.decode(span[:-1])
            # A newline run that starts the answer merges with the header's newline into one token.
            assert text == answer or (text.startswith("\n") and text[1:] == answer)
        # Role headers, system and user turns, and the newline after <|im_end|> carry no loss.
        for i, (tid, m) in enumerate(zip(ids, mask)):
            if tid == tokenizer.im_start_id or (i > 0 and ids[i - 1] == tokenizer.im_end_id):
                assert not m


def test_mask_of_content_that_starts_with_newlines(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nanswer"}]
    ids, mask = tokenizer.encode_chat(messages)
    masked = [i for i, m in zip(ids, mask) if m]
    assert (
        tokenizer.decode(masked) == "\n\n\nanswer<|im_end|>"
    )  # the straddling "\n\n\n" token counts as content


def test_all_mode_marks_every_token(tokenizer):
    ids, mask = tokenizer.encode_chat(CONVERSATIONS[2], loss_on="all")
    assert all(mask) and len(mask) == len(ids)


def test_bad_conversations_are_refused(tokenizer):
    with pytest.raises(ChatTemplateError, match="unknown role 'robot'"):
        tokenizer.encode_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="non-empty list"):
        tokenizer.encode_chat([])
    with pytest.raises(ChatTemplateError, match="message 0: content must be a string"):
        tokenizer.encode_chat([{"role": "user", "content": None}])
    with pytest.raises(ChatTemplateError, match="loss_on"):
        tokenizer.encode_chat(CONVERSATIONS[0], loss_on="user")
