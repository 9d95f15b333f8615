"""The demo's synthetic task: adding two multi-digit numbers, asked in words, answered through the chat template.

Pairs (a, b) are split into training and held-out sets by a hash of the pair, so no held-out question (in any
wording) was ever seen in training, and its reverse (b, a) is held out with it.
"""

from __future__ import annotations

import random
import re
import zlib

QUESTION_TEMPLATES = (
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Please add {a} to {b}.",
    "What do you get when you add {a} and {b}?",
    "Compute the sum of {a} and {b}.",
    "How much is {a} plus {b}?",
    "What is the sum of {a} and {b}?",
    "If I have {a} apples and get {b} more, how many apples do I have?",
    "Calculate {a} + {b}, please.",
)


def answer_text(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}."


def is_held_out(a: int, b: int, fraction: float = 0.1) -> bool:
    lo, hi = min(a, b), max(a, b)
    return zlib.crc32(f"{lo}+{hi}".encode()) % 1000 < fraction * 1000


def sample_pair(rng: random.Random, digits: tuple[int, int]) -> tuple[int, int]:
    lo, hi = 10 ** (digits[0] - 1), 10 ** digits[1] - 1
    return rng.randint(lo, hi), rng.randint(lo, hi)


def training_conversations(n: int, seed: int, digits: tuple[int, int]) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        a, b = sample_pair(rng, digits)
        if is_held_out(a, b):
            continue
        question = rng.choice(QUESTION_TEMPLATES).format(a=a, b=b)
        out.append(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer_text(a, b)}]
        )
    return out


def sample_texts(n: int, seed: int, digits: tuple[int, int]) -> list[tuple[str, str]]:
    """(question, answer) texts of training pairs (for the tokenizer's training text)."""
    return [(c[0]["content"], c[1]["content"]) for c in training_conversations(n, seed + 3, digits)]


def held_out_questions(n: int, seed: int, digits: tuple[int, int]) -> list[tuple[str, int, int]]:
    rng = random.Random(seed + 1)
    out = []
    while len(out) < n:
        a, b = sample_pair(rng, digits)
        if is_held_out(a, b):
            out.append((rng.choice(QUESTION_TEMPLATES).format(a=a, b=b), a, b))
    return out


def is_correct(reply: str, a: int, b: int) -> bool:
    """The reply's last number is the sum (digits only; a reply that trails off without one is wrong)."""
    numbers = re.findall(r"\d+", reply)
    return bool(numbers) and int(numbers[-1]) == a + b
