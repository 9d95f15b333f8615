"""Golden check: a tiny Qwen1.5-shaped model pretrained on real text (WikiText-2 validation) learns.

As a user would: a tokenizer folder, `qwen15 data preprocess --type wiki` (the seed's cleaning), `qwen15 train`.
Vocabulary: a 512-token byte-level BPE trained on the same text in the test (the 152k vocabulary would make the
output layer dominate a CPU test). The bound, computed from the data in the test:
- at initialisation the loss is ln(512) = 6.24 nats (uniform predictions), checked to 0.05;
- the unigram entropy H1 of the training tokens (about 5.2 nats) is the best any model that ignores context can
  reach; after 60 steps of 16 x 64 tokens the loss on WikiText-2 test (never trained on) must be below
  H1 - 0.3, i.e. the model uses context.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_helpers import checkpoint_weights

from conftest import SHARED_DATA, needs_shared

pytestmark = needs_shared


def test_tiny_model_pretrained_on_wikitext_beats_the_unigram_bound(tmp_path):
    from qwen15 import Qwen, get_preset
    from qwen15.cli import main
    from qwen15.data.dataset import TokenDataset
    from qwen15.demo.bpe import train_bpe
    from qwen15.tokenizer import Tokenizer
    from qwen15.train.config import load_config
    from qwen15.train.trainer import train

    lines = [
        line for line in (SHARED_DATA / "wikitext2_valid.tokens.txt").read_text().splitlines() if line.strip()
    ]
    tok = train_bpe(lines, 512)
    tok.save_pretrained(tmp_path / "tok")
    assert Tokenizer.from_pretrained(tmp_path / "tok").encode(lines[3]) == tok.encode(lines[3])
    for split, out in (("valid", "data"), ("test", "held-out")):
        source = SHARED_DATA / f"wikitext2_{split}.tokens.txt"
        args = [
            "data",
            "preprocess",
            "--type",
            "wiki",
            "--input",
            str(source),
            "--tokenizer",
            str(tmp_path / "tok"),
        ]
        assert main([*args, "--seq-length", "64", "--output", str(tmp_path / out), "--quiet"]) == 0
    rows = np.asarray(TokenDataset(tmp_path / "data").tokens)
    held_out = np.asarray(TokenDataset(tmp_path / "held-out").tokens)[:200]
    counts = np.bincount(rows.ravel(), minlength=len(tok))
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())

    steps = 60
    cfg = load_config(
        None,
        [
            "--model.preset",
            "tiny",
            "--model.vocab_size",
            "512",
            "--model.tokenizer",
            str(tmp_path / "tok"),
            "--data.path",
            str(tmp_path / "data"),
            "--train.steps",
            str(steps),
            "--train.global_batch_size",
            "16",
            "--train.micro_batch_size",
            "16",
            "--optim.lr",
            "3e-3",
            "--optim.min_lr",
            "3e-4",
            "--optim.warmup_steps",
            "10",
            "--train.run_dir",
            str(tmp_path / "run"),
            "--metrics.plot",
            "false",
        ],
    )
    result = train(cfg, echo=lambda m: None)
    assert result.losses[0] == pytest.approx(math.log(512), abs=0.05)

    model = Qwen(get_preset("tiny").replace(vocab_size=512))
    model.load_state_dict(checkpoint_weights(result.last_checkpoint))
    model.tie_weights()
    x = torch.from_numpy(held_out.astype(np.int64))
    with torch.no_grad():
        logits = model.eval()(x[:, :-1])
    held_out_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), x[:, 1:].reshape(-1)).item()
    assert 4.0 < unigram_entropy < 6.0
    assert held_out_loss < unigram_entropy - 0.3, (held_out_loss, unigram_entropy)
    assert sum(result.losses[-10:]) / 10 < unigram_entropy - 0.3
