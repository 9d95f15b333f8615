"""The Qwen1.5 tokenizer: byte-level BPE on the `tokenizers` library, special tokens, decoding and streaming.

Chat rendering lives in qwen15.chat_template; `Tokenizer.apply_chat_template` renders and encodes a conversation,
`Tokenizer.encode_chat` adds the loss mask built from the assistant messages' spans.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from qwen15.chat_template import (
    BUILTIN_CHATML_TEMPLATE,
    LOSS_MODES,
    ChatTemplateError,
    assistant_spans,
    render_chat,
    validate_messages,
)
from qwen15.errors import UserError
from qwen15.model_config import ENDOFTEXT_ID, IM_END_ID, IM_START_ID
from qwen15.paths import local_folder

# Pre-tokenizer split of Qwen (cl100k-like, but single digits: \p{N} alone).
QWEN_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SPECIAL_TOKENS = {ENDOFTEXT: ENDOFTEXT_ID, IM_START: IM_START_ID, IM_END: IM_END_ID}


class TokenizerError(UserError):
    """A tokenizer folder or file that cannot be used; the message names the file and what to do."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the alphabet of vocab.json)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_backend(
    vocab_file: str | Path, merges_file: str | Path, special_tokens: dict[str, int] | None = None
) -> BackendTokenizer:
    """A `tokenizers` pipeline equal to Qwen2Tokenizer: NFC, Qwen split, byte-level BPE, special tokens."""
    for f in (vocab_file, merges_file):
        if not Path(f).is_file():
            raise TokenizerError(
                f"{f}: not found; a Qwen tokenizer needs vocab.json and merges.txt "
                "(or tokenizer.json) in the model folder"
            )
    try:
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
    except Exception as e:  # the Rust reader reports the line; say which files
        raise TokenizerError(f"{vocab_file} / {merges_file}: cannot be read as BPE files ({e})") from None
    backend = BackendTokenizer(bpe)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, special_tokens or DEFAULT_SPECIAL_TOKENS, str(vocab_file))
    return backend


def _add_special_tokens(backend: BackendTokenizer, special_tokens: dict[str, int], where: str) -> None:
    for content, wanted in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        existing = backend.token_to_id(content)
        if existing is None and backend.get_vocab_size(with_added_tokens=True) != wanted:
            raise TokenizerError(
                f"{where}: special token {content!r} should have id {wanted} but the vocabulary has "
                f"{backend.get_vocab_size(with_added_tokens=True)} entries before it"
            )
        backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if backend.token_to_id(content) != wanted:
            raise TokenizerError(
                f"{where}: special token {content!r} got id {backend.token_to_id(content)}, expected {wanted}"
            )


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back an incomplete UTF-8 character until it completes."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if self._skip and token_id in self._tokenizer.special_ids:
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Qwen1.5 tokenizer. `Tokenizer.from_pretrained(folder)` reads vocab.json + merges.txt or tokenizer.json."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, int] | None = None,
        eos_token: str = ENDOFTEXT,
        pad_token: str = ENDOFTEXT,
        model_max_length: int = 32768,
        source: str | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or DEFAULT_SPECIAL_TOKENS)
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.model_max_length = model_max_length
        self.source = source
        self._literal_backend: BackendTokenizer | None = None
        vocab = backend.get_vocab(with_added_tokens=True)
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        size = max(vocab.values()) + 1
        table: list[bytes | None] = [None] * size
        special = set(self.special_tokens)
        for token, idx in vocab.items():
            if token in special:
                table[idx] = token.encode("utf-8")
            else:
                try:
                    table[idx] = bytes(byte_of[ch] for ch in token)
                except KeyError:
                    table[idx] = token.encode("utf-8")  # added non-special text token
        self._id_bytes = table
        self.special_ids = frozenset(self.special_tokens.values())

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        folder = local_folder(path, "tokenizer", "vocab.json + merges.txt, or tokenizer.json")
        config = (
            _read_json(folder / "tokenizer_config.json")
            if (folder / "tokenizer_config.json").exists()
            else {}
        )
        special = _special_tokens_from_config(config, folder / "tokenizer_config.json")
        if (folder / "vocab.json").exists() or (folder / "merges.txt").exists():
            backend = build_backend(folder / "vocab.json", folder / "merges.txt", special)
        elif (folder / "tokenizer.json").exists():
            try:
                backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: cannot be read ({e})") from None
            _add_special_tokens(backend, special, str(folder / "tokenizer.json"))
        else:
            raise TokenizerError(
                f"{folder}: no tokenizer files; expected vocab.json + merges.txt or tokenizer.json"
            )
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        eos = _token_text(config.get("eos_token")) or ENDOFTEXT
        pad = _token_text(config.get("pad_token")) or ENDOFTEXT
        return cls(
            backend,
            chat_template=template,
            special_tokens=special,
            eos_token=eos,
            pad_token=pad,
            model_max_length=int(config.get("model_max_length", 32768)),
            source=str(folder),
        )

    @classmethod
    def from_files(
        cls, vocab_file: str | Path, merges_file: str | Path, chat_template: str | None = None
    ) -> Tokenizer:
        """From bare vocab.json + merges.txt (the seed's --vocab_file/--merges_file form)."""
        return cls(
            build_backend(vocab_file, merges_file),
            chat_template=chat_template,
            source=str(Path(vocab_file).parent),
        )

    def save_pretrained(self, path: str | Path) -> None:
        """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json, loadable by transformers."""
        from qwen15.atomic import atomic_write_text

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        source = Path(self.source) if self.source else None
        for name in ("vocab.json", "merges.txt"):
            if source is not None and (source / name).is_file():
                (folder / name).write_bytes((source / name).read_bytes())
        if not (folder / "vocab.json").exists():
            self._write_vocab_merges(folder)
        atomic_write_text(folder / "tokenizer.json", self.backend.to_str())
        atomic_write_text(
            folder / "tokenizer_config.json",
            json.dumps(self.hf_tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
        )

    def _write_vocab_merges(self, folder: Path) -> None:
        from qwen15.atomic import atomic_write_text

        model = json.loads(self.backend.to_str())["model"]
        vocab = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
        atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))

    def hf_tokenizer_config(self) -> dict[str, Any]:
        added = {
            str(idx): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for content, idx in sorted(self.special_tokens.items(), key=lambda kv: kv[1])
        }
        return {
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [
                t for t in self.special_tokens if t not in (self.eos_token, self.pad_token)
            ],
            "bos_token": None,
            "chat_template": self.chat_template or BUILTIN_CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": self.eos_token,
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self.pad_token,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }

    # ------------------------------------------------------------------ ids

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def eos_id(self) -> int:
        return self.special_tokens.get(self.eos_token, ENDOFTEXT_ID)

    @property
    def pad_id(self) -> int:
        return self.special_tokens.get(self.pad_token, ENDOFTEXT_ID)

    @property
    def endoftext_id(self) -> int:
        return self.special_tokens.get(ENDOFTEXT, ENDOFTEXT_ID)

    @property
    def im_start_id(self) -> int:
        return self.special_tokens.get(IM_START, IM_START_ID)

    @property
    def im_end_id(self) -> int:
        return self.special_tokens.get(IM_END, IM_END_ID)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _literal(self) -> BackendTokenizer:
        if self._literal_backend is None:
            self._literal_backend = BackendTokenizer.from_str(self.backend.to_str())
            self._literal_backend.encode_special_tokens = True
        return self._literal_backend

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; no BOS or EOS is added. allow_special=False encodes special-token text literally
        (for untrusted user content)."""
        backend = self.backend if allow_special else self._literal()
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = True) -> list[list[int]]:
        backend = self.backend if allow_special else self._literal()
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        table = self._id_bytes
        if not 0 <= token_id < len(table) or table[token_id] is None:
            raise ValueError(
                f"token id {token_id} is not in the tokenizer's vocabulary ({len(self)} tokens); "
                "ids beyond it are embedding padding rows and must never be generated"
            )
        return table[token_id]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`: bytes joined, invalid UTF-8 replaced, no spaces added around special tokens."""
        special = self.special_ids
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in special:
                continue
            out += self.token_bytes(i)
        return out.decode("utf-8", errors="replace")

    def decode_batch(self, batch, *, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the token -> id mapping and pre-tokenization; datasets record it to refuse a mismatch."""
        spec = json.loads(self.backend.to_str())
        h = hashlib.sha256()
        for key in ("normalizer", "pre_tokenizer"):
            h.update(json.dumps(spec.get(key), sort_keys=True).encode())
        model = spec["model"]
        h.update(
            json.dumps(sorted(model["vocab"].items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
        )
        h.update(json.dumps(model["merges"], ensure_ascii=False).encode())
        h.update(json.dumps(sorted(self.special_tokens.items(), key=lambda kv: kv[1])).encode())
        return "sha256:" + h.hexdigest()[:32]

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **template_kwargs: Any,
    ):
        """ChatML ids (or text with tokenize=False) equal to transformers' apply_chat_template."""
        text = render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            **self._template_tokens(),
            **template_kwargs,
        )
        return self.encode(text) if tokenize else text

    def _template_tokens(self) -> dict[str, str]:
        return {"eos_token": self.eos_token, "pad_token": self.pad_token}

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        loss_on: str = "assistant",
        add_generation_prompt: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Ids of the rendered conversation and a per-token loss mask built from the message spans.

        loss_on="assistant": True on the tokens of each assistant message's content and on the <|im_end|> that
        closes it; never on role headers, the newline after <|im_end|>, or system and user turns. A token that
        straddles the start of the content (a newline run merged with the header's newline) counts as content.
        loss_on="all": True everywhere (the seed's behaviour).
        """
        if loss_on not in LOSS_MODES:
            raise ChatTemplateError(f"loss_on must be one of {LOSS_MODES}, got {loss_on!r}")
        validate_messages(messages)
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        enc = self.backend.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        if loss_on == "all":
            return ids, [True] * len(ids)
        mask = [False] * len(ids)
        t = 0
        for start, end in assistant_spans(self.chat_template, messages, text, **self._template_tokens()):
            while t < len(ids) and offsets[t][1] <= start:
                t += 1
            while t < len(ids) and offsets[t][0] < end:
                mask[t] = True
                t += 1
            if t < len(ids) and ids[t] == self.im_end_id and offsets[t][0] == end:
                mask[t] = True
                t += 1
        return ids, mask


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _special_tokens_from_config(config: dict[str, Any], where: Path) -> dict[str, int]:
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        return dict(DEFAULT_SPECIAL_TOKENS)
    special = {}
    for idx, spec in decoder.items():
        try:
            special[spec["content"]] = int(idx)
        except (KeyError, TypeError, ValueError):
            raise TokenizerError(f"{where}: added_tokens_decoder entry {idx!r} is malformed") from None
    return special
