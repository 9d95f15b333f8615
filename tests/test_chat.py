"""Chat: the prompt equals transformers' apply_chat_template, history carried and cleared, window trimming, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qwen15.chat import ChatError, ChatSession
from qwen15.model_config import get_preset
from qwen15.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    from qwen15 import Qwen

    m = Qwen.from_config(get_preset("tiny"), seed=0)
    m.generation_config = {"eos_token_id": [151645, 151643], "do_sample": False}
    return m


def hf_ids(hf_tokenizer, messages):
    out = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def session(model, tokenizer, **kw):
    kw.setdefault("max_new_tokens", 6)
    return ChatSession(model, tokenizer, sampling=SamplingParams(), **kw)


def test_prompt_equals_transformers_chat_template_and_history_is_carried(model, tokenizer, hf_tokenizer):
    s = session(model, tokenizer)
    q1, q2 = "你好", "What is 2+2?"
    assert s.prompt_ids(q1) == hf_ids(hf_tokenizer, [{"role": "user", "content": q1}])
    a1 = s.reply(q1)
    assert s.last_completion.text == a1
    expected = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": q1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
    ]
    assert s.prompt_ids(q2) == hf_ids(hf_tokenizer, expected)
    s.reply(q2)
    assert [m["role"] for m in s.turns] == ["user", "assistant", "user", "assistant"]


def test_clear_and_no_history(model, tokenizer, hf_tokenizer):
    s = session(model, tokenizer)
    s.reply("first question")
    s.clear()
    assert s.turns == []
    alone = hf_ids(hf_tokenizer, [{"role": "user", "content": "second"}])
    assert s.prompt_ids("second") == alone
    s2 = session(model, tokenizer, history=False)
    s2.reply("first question")
    assert s2.turns == [] and s2.prompt_ids("second") == alone


def test_custom_system_prompt(model, tokenizer, hf_tokenizer):
    s = session(model, tokenizer, system_prompt="Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert s.prompt_ids("hi") == hf_ids(hf_tokenizer, msgs)


def test_oldest_exchanges_dropped_never_system_or_question(model, tokenizer):
    s = session(model, tokenizer, context_window=90, system_prompt="SYSTEM PROMPT KEPT")
    for i in range(6):
        s.turns += [
            {"role": "user", "content": f"question number {i} " * 2},
            {"role": "assistant", "content": f"answer number {i} " * 2},
        ]
    ids = s.prompt_ids("the current question")
    assert len(ids) <= 90 - s.max_new_tokens
    text = tokenizer.decode(ids)
    assert "SYSTEM PROMPT KEPT" in text and "the current question" in text
    assert s.dropped_turns > 0 and "question number 0" not in text
    assert f"question number {5}" in text  # the newest exchange stays while it fits
    kept = [m["content"] for m in s.turns if m["role"] == "user"]
    assert kept == [f"question number {i} " * 2 for i in range(6 - len(kept), 6)]


def test_question_too_long_for_window_is_explained(model, tokenizer):
    s = session(model, tokenizer, context_window=40)
    with pytest.raises(ChatError, match="shorten it"):
        s.prompt_ids("word " * 100)
    with pytest.raises(ChatError, match="no room"):
        session(model, tokenizer, context_window=5, max_new_tokens=5).prompt_ids("x")


def test_reply_stops_at_im_end_even_if_checkpoint_names_only_endoftext(tokenizer):
    """A base model finetuned on chat data names only <|endoftext|>; chat still stops at <|im_end|>."""
    scripted = tokenizer.encode("Sure.") + [tokenizer.im_end_id] + tokenizer.encode(" and on")

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = get_preset("tiny")
            self.generation_config = {"eos_token_id": 151643}
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, input_ids, **_):
            logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
            logits[:, 0, scripted[min(self.calls, len(scripted) - 1)]] = 1
            self.calls += 1
            return logits

    s = session(Scripted(), tokenizer, max_new_tokens=10)
    assert s.reply("hi") == "Sure."
    assert s.last_completion.stop == tokenizer.im_end_id


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer, model):
    path = tmp_path_factory.mktemp("chat") / "model"
    model.save_pretrained(str(path), tokenizer=tokenizer, generation_config=model.generation_config)
    return path


def run_cli(args, stdin_text=None):
    return subprocess.run(
        [sys.executable, "-m", "qwen15.cli", "chat", *args],
        input=stdin_text,
        stdin=None if stdin_text is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_predict_data_without_terminal(tiny_dir, model, tokenizer):
    proc = run_cli(["--model", str(tiny_dir), "--predict-data", "你好", "再见", "--max-new-tokens", "5"])
    assert proc.returncode == 0, proc.stderr
    s = session(model, tokenizer, max_new_tokens=5)
    a1, a2 = s.reply("你好"), s.reply("再见")  # greedy (the saved generation_config does not sample)
    assert proc.stdout == f"User: 你好\nAssistant: {a1}\nUser: 再见\nAssistant: {a2}\n"


def test_cli_piped_input_clear_and_exit(tiny_dir, model, tokenizer):
    proc = run_cli(
        ["--model", str(tiny_dir), "--max-new-tokens", "4"], "hello\n/clear\nhello\n/exit\nnever\n"
    )
    assert proc.returncode == 0, proc.stderr
    replies = [line for line in proc.stdout.split("\n") if line.startswith("Assistant: ")]
    assert (
        len(replies) == 2 and replies[0] == replies[1]
    )  # after /clear the same question gets the same answer
    assert "[new conversation]" in proc.stderr


def test_cli_help_names_the_sampling_defaults():
    proc = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", "chat", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.split())
    assert "temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.1" in flat
    for flag in ("--no-history", "--system-prompt", "--predict-data", "--run-demo"):
        assert flag in proc.stdout


def test_cli_run_demo_asks_the_three_seed_questions_in_one_conversation(tiny_dir):
    from qwen15.chat import DEMO_QUESTIONS

    proc = run_cli(["--model", str(tiny_dir), "--run-demo", "--max-new-tokens", "3"])
    assert proc.returncode == 0, proc.stderr
    asked = [line[len("User: ") :] for line in proc.stdout.split("\n") if line.startswith("User: ")]
    assert asked == list(DEMO_QUESTIONS)
