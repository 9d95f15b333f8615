"""`qwen15 demo` with a reduced budget: every stage runs and connects (accuracy is not judged at this budget), with
runtime dependencies only; the pieces (task generator, grading, BPE, chat answering) checked on their own."""

from __future__ import annotations

import json
import sys

import pytest
import torch


def test_quick_demo_runs_every_stage_without_optional_packages(tmp_path, monkeypatch, capsys):
    # matplotlib and transformers are development extras: the demo must not need them.
    blocked = [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "transformers")]
    for name in {*blocked, "matplotlib", "matplotlib.figure", "matplotlib.pyplot", "transformers"}:
        monkeypatch.setitem(sys.modules, name, None)
    from qwen15.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    for n in range(1, 7):
        assert f"[{n}/6]" in out
    assert "accuracy on held-out questions:" in out and "Q: " in out and "A: " in out
    assert "▁" in out or "█" in out  # the text loss curve stands in for the PNG
    model = tmp_path / "demo" / "model"
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    ids = {spec["content"]: int(i) for i, spec in tok_cfg["added_tokens_decoder"].items()}
    config = json.loads((model / "config.json").read_text())
    generation = json.loads((model / "generation_config.json").read_text())
    assert config["eos_token_id"] == ids["<|im_end|>"]  # a chat model of the demo's own vocabulary
    assert generation["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert config["vocab_size"] == len(ids) + min(ids.values())


def test_exported_demo_model_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from qwen15 import Qwen
    from qwen15.demo.pipeline import QUICK, run_demo

    result = run_demo(tmp_path / "demo", QUICK, echo=lambda m: None)
    folder = result["model"]
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ids).logits - Qwen.from_pretrained(folder)(ids)).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    from qwen15 import Tokenizer

    ours = Tokenizer.from_pretrained(folder)
    text = "<|im_start|>user\nWhat is 482 plus 317?<|im_end|>\n"
    assert hf_tok(text)["input_ids"] == ours.encode(text)


def test_addition_task_splits_and_grading():
    from qwen15.demo import addition

    convs = addition.training_conversations(300, seed=0, digits=(3, 3))
    held = addition.held_out_questions(50, seed=0, digits=(3, 3))
    train_pairs = set()
    for c in convs:
        a, b = (int(x) for x in c[1]["content"].rstrip(".").split(" = ")[0].split(" + "))
        assert not addition.is_held_out(a, b) and 100 <= a <= 999 and 100 <= b <= 999
        train_pairs |= {(a, b), (b, a)}
        assert str(a) in c[0]["content"] and str(b) in c[0]["content"]
    assert all(addition.is_held_out(a, b) and (a, b) not in train_pairs for _, a, b in held)
    assert addition.is_correct("482 + 317 = 799.", 482, 317)
    assert not addition.is_correct("482 + 317 = 798.", 482, 317)
    assert not addition.is_correct("482 + 317 =", 482, 317)


def test_small_bpe_round_trips_through_its_saved_files(tmp_path):
    from qwen15 import Tokenizer
    from qwen15.demo.bpe import train_bpe

    texts = ["The quick brown fox jumps over 12 lazy dogs.", "Sum: 482 + 317 = 799."] * 50
    tok = train_bpe(texts, 300)
    n = len(tok)  # at most 300: this small text has fewer merges to learn
    assert (
        256 < n <= 300 and tok.im_end_id == n - 1 and tok.im_start_id == n - 2 and tok.endoftext_id == n - 3
    )
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    text = "<|im_start|>user\nWhat is 482 plus 317?<|im_end|>"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text
    assert [again.decode([i]) for i in again.encode("4821")] == ["4", "8", "2", "1"]  # single digits, as Qwen


def test_demo_answers_through_the_chat_path_greedily(tmp_path):
    """The demo's answer is the reply of a greedy ChatSession: the ChatML prompt with the default system message,
    decoded token by token until <|im_end|>; checked against recomputing the whole sequence at every step."""
    from qwen15 import Qwen, Tokenizer
    from qwen15.demo.answer import answer
    from qwen15.demo.bpe import train_bpe

    tok = train_bpe(["What is 12 plus 34? 12 + 34 = 46. The quick brown fox."] * 20, 300)
    tok.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    model = Qwen.from_config(get_tiny(len(tok)), seed=0).eval()
    reply = answer(model, tok, "What is 12 plus 34?", max_new_tokens=6)
    seq = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 plus 34?"}], add_generation_prompt=True
    )
    assert tok.decode(seq).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    out = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([seq + out]))[0, -1].argmax())
            if nxt in (tok.im_end_id, tok.endoftext_id):
                break
            out.append(nxt)
    assert reply == tok.decode(out)


def get_tiny(vocab: int):
    from qwen15 import get_preset

    return get_preset("tiny").replace(vocab_size=vocab)
