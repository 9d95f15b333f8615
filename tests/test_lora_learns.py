"""A LoRA finetune learns a skill its base lacks: the parity of numbers it never saw in finetuning.

The base is the demo's own (qwen15.demo.pipeline: its BPE tokenizer, then a brief pretrain on docstrings); the
finetune is `qwen15 train` with a `lora` section (adapters only, base frozen) on chat questions "Is 428 even or
odd?" -> "even.". Held out: every number n with n % 7 == 3, in any phrasing, so an answer is right only if the
adapted model reads the last digit of a number it never saw and maps it to its parity (digits are single tokens).
Measured (seed 0, 1 thread): the base answers 0/40 held-out questions (it babbles "ssssssss"), the adapted model
40/40; a model saying "even." to everything would score about half. (A phrasing never seen in finetuning is not asked: there the adapted model is near chance.)

Why parity and not the demo's addition: the output layer (tied embeddings, final norm) of a briefly pretrained
model is weak (embedding norms ~0.2-0.4, so a unit-RMS hidden state reaches a logit of at most ~2-4, against
ln V ~6), and LoRA leaves it frozen. A full finetune grows it (addition: loss 0.99 after 200 steps); adapters on the
same base and data plateau at loss 3.3 (lr 1e-3) or 3.6 (lr 1e-2) and answer 0/40, since a 12-token sum needs
confident tokens. A short answer chosen from two words needs only the right argmax, which adapters do reach.
"""

from __future__ import annotations

import dataclasses
import json
import random

from train_helpers import deterministic

from qwen15.demo.answer import answer
from qwen15.demo.pipeline import QUICK, Demo, _schedule, _train, pretrain, train_tokenizer

TEMPLATES = ("Is {n} even or odd?", "Is the number {n} odd or even?", "Even or odd: {n}?")


def is_held_out(n: int) -> bool:
    return n % 7 == 3


def reply(n: int) -> str:
    return "odd." if n % 2 else "even."


def accuracy(model, tokenizer, questions) -> tuple[int, list[str]]:
    replies = [answer(model, tokenizer, q, max_new_tokens=4) for q, _ in questions]
    return sum(r.strip() == reply(n) for r, (_, n) in zip(replies, questions)), replies


def test_lora_learns_parity_of_held_out_numbers(tmp_path):
    from qwen15 import Qwen, load_adapter
    from qwen15.data.sft import preprocess_chat

    with deterministic(threads=1):
        budget = dataclasses.replace(
            QUICK, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, pretrain_steps=60
        )
        demo = Demo(tmp_path, budget, echo=lambda m: None)
        train_tokenizer(demo)
        pretrain(demo)

        rng = random.Random(0)
        conversations = []
        while len(conversations) < 2000:
            n = rng.randint(100, 999)
            if not is_held_out(n):
                question = rng.choice(TEMPLATES).format(n=n)
                conversations.append(
                    [{"role": "user", "content": question}, {"role": "assistant", "content": reply(n)}]
                )
        held_out = rng.sample([n for n in range(100, 1000) if is_held_out(n)], 40)
        questions = [(rng.choice(TEMPLATES).format(n=n), n) for n in held_out]

        source = tmp_path / "parity.jsonl"
        source.write_text(
            "".join(json.dumps({"messages": c}) + "\n" for c in conversations), encoding="utf-8"
        )
        preprocess_chat(
            [source],
            tmp_path / "parity",
            demo.tokenizer,
            seq_length=128,
            layout="pack",
            loss_on="assistant",
            overwrite=True,
            quiet=True,
        )
        lines = []
        _train(
            {
                **demo.common_settings(),
                "train.mode": "finetune",
                "model.path": demo.pretrained,
                "data.path": tmp_path / "parity",
                "train.run_dir": tmp_path / "lora",
                **_schedule(300, 8, 3e-3),
                "optim.weight_decay": 0.0,
                "lora.r": 16,
                "lora.alpha": 32,
            },
            lines.append,
        )
        assert any("adapter parameters" in m for m in lines), lines

        base_correct, base_replies = accuracy(
            Qwen.from_pretrained(demo.pretrained), demo.tokenizer, questions
        )
        adapted = load_adapter(Qwen.from_pretrained(demo.pretrained), tmp_path / "lora" / "adapter")
        lora_correct, lora_replies = accuracy(adapted, demo.tokenizer, questions)
    assert base_correct <= 4, base_replies  # <= 10%: the base cannot do it
    assert lora_correct >= 36, lora_replies  # >= 90%: far above the base and above always-one-answer (~50%)
