"""Perplexity: the sliding-window plan, and the value against a transformers computation on the same model."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import torch

from qwen15.model_config import get_preset
from qwen15.perplexity import PerplexityError, perplexity, windows

from conftest import load_into_ours, random_hf_model


@pytest.mark.parametrize(
    "n, seq, stride", [(300, 64, 24), (300, 64, 64), (64, 64, 16), (10, 64, 8), (1000, 128, 1)]
)
def test_every_token_but_the_first_is_scored_once(n, seq, stride):
    scored = []
    for begin, end, k in windows(n, seq, stride):
        assert end - begin <= seq and 1 <= k <= end - begin - 1
        scored += range(end - k, end)
    if stride < seq:
        assert scored == list(range(1, n))
    else:  # non-overlapping windows: each window's first token has no context
        assert scored == [t for t in range(1, n) if t % seq]


def hf_reference(hf, ids: torch.Tensor, seq: int, stride: int) -> float:
    """The perplexity guide's loop, with each window's loss weighted by its exact number of scored labels."""
    nll_sum, count, prev_end = 0.0, 0, 0
    n = ids.numel()
    for begin in range(0, n, stride):
        end = min(begin + seq, n)
        trg = end - prev_end
        input_ids = ids[begin:end][None]
        labels = input_ids.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * k
        count += k
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / count)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
@pytest.mark.parametrize("seq, stride", [(64, 24), (48, 48)])
def test_perplexity_equals_transformers(name, seq, stride):
    cfg = get_preset(name).replace(vocab_size=1000)
    hf = random_hf_model(cfg)
    ours = load_into_ours(hf, cfg)
    ids = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(0))
    result = perplexity(ours, ids, seq_length=seq, stride=stride, chunk=16, progress=False)
    ref = hf_reference(hf, ids, seq, stride)
    assert abs(result.perplexity - ref) / ref < 1e-4
    assert result.tokens_scored == sum(k for _, _, k in windows(300, seq, stride))


def test_bad_settings():
    cfg = get_preset("tiny").replace(vocab_size=1000, max_position_embeddings=128)
    from qwen15 import Qwen

    model = Qwen.from_config(cfg, seed=0)
    with pytest.raises(PerplexityError, match="stride"):
        perplexity(model, list(range(50)), seq_length=16, stride=32, progress=False)
    with pytest.raises(PerplexityError, match="context window"):
        perplexity(model, list(range(50)), seq_length=256, stride=32, progress=False)
    with pytest.raises(PerplexityError, match="at least 2"):
        perplexity(model, [5], seq_length=16, stride=8, progress=False)


def test_cli_eval_ppl(tmp_path, tokenizer):
    from qwen15 import Qwen

    model = Qwen.from_config(get_preset("tiny"), seed=0)
    folder = tmp_path / "model"
    model.save_pretrained(str(folder), tokenizer=tokenizer)
    text = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。\n" * 20
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    args = [
        "eval",
        "ppl",
        "--model",
        str(folder),
        "--data",
        str(data),
        "--seq-length",
        "64",
        "--stride",
        "32",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    ids = tokenizer.encode(text)
    expected = perplexity(model, ids, seq_length=64, stride=32, progress=False)
    # the CLI fuses and prepacks the matrices for oneDNN (other fp32 kernels): equal to fp32 rounding
    printed = float(re.search(r"perplexity: ([0-9.]+)", proc.stdout).group(1))
    assert printed == pytest.approx(expected.perplexity, rel=1e-6)
    assert f"tokens: {len(ids)} in the text, {len(ids) - 1} scored" in proc.stdout
    assert "perplexity:" in proc.stderr  # the progress bar
    missing = subprocess.run(
        [sys.executable, "-m", "qwen15.cli", *args[:4], "--data", str(tmp_path / "none.txt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
