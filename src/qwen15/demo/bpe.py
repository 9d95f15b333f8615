"""A small byte-level BPE vocabulary trained on the spot with `tokenizers`, built like Qwen's (NFC, Qwen's split
pattern with single digits, GPT-2 byte alphabet) and ending with Qwen's three special tokens, so that everything
downstream (chat template, loss masks, export, transformers' Qwen2Tokenizer) runs the same code path as with the
real 151,646-token vocabulary."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as BackendTokenizer

from qwen15.tokenizer import ENDOFTEXT, IM_END, IM_START, QWEN_SPLIT_PATTERN, Tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A Tokenizer of `vocab_size` ids: 256 byte tokens, learned merges, then <|endoftext|>, <|im_start|>,
    <|im_end|> as the last three ids."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend = BackendTokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False), byte_level]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    n = backend.get_vocab_size()
    special = {ENDOFTEXT: n, IM_START: n + 1, IM_END: n + 2}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return Tokenizer(backend, special_tokens=special)
