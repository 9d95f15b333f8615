"""alpaca-to-chat and `preprocess --type chat` against the seed's rules and transformers' chat rendering."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qwen15.data.inputs import DataInputError
from qwen15.data.records import alpaca_to_chat, read_records, to_messages
from qwen15.data.sft import preprocess_chat

from conftest import SHARED_DATA

ENDOFTEXT = 151643
ALPACA_FILES = [
    "alpaca_data_1k.json",
    "alpaca_data_first200.json",
    "alpaca_gpt4_en_demo_llamafactory.json",
    "alpaca_zh_demo_llamafactory.json",
    "lima_alpaca_history_llamafactory.json",
]
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data absent")


def seed_user(instruction: str, input_text: str) -> str:
    if not input_text:
        return instruction
    stem = instruction[:-1] if instruction[-1:] == "." else instruction
    return f"{stem}: {input_text}"


def hf_ids(hf_tokenizer, messages, **kw) -> list[int]:
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- alpaca-to-chat


@needs_data
@pytest.mark.parametrize("name", ALPACA_FILES)
def test_alpaca_to_chat_seed_user_strings(tmp_path, name):
    source = json.loads((SHARED_DATA / name).read_text(encoding="utf-8"))
    out = tmp_path / "conv.jsonl"
    result = alpaca_to_chat([SHARED_DATA / name], out)
    records = load_jsonl(out)
    assert result["written"] == len(records) == len(source)
    for rec, src in zip(records, source, strict=True):
        expected = [{"role": "system", "content": "You are a helpful assistant."}]
        for user, assistant in src.get("history") or []:
            expected += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        expected += [
            {"role": "user", "content": seed_user(src["instruction"], src["input"])},
            {"role": "assistant", "content": src["output"]},
        ]
        assert rec == {"type": "chatml", "messages": expected}


def test_alpaca_to_chat_rules_and_bad_records(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(
        json.dumps({"instruction": "Sum these..", "input": "1 2", "output": "3"}) + "\n"
        + json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "", "input": "", "output": "x"}) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    with pytest.raises(DataInputError, match=r"a\.jsonl:3: malformed JSON"):
        alpaca_to_chat([src], tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
    result = alpaca_to_chat([src], tmp_path / "o.jsonl", skip_bad=True, system_prompt="Be brief.")
    assert result["skipped"]["count"] == 2 and result["skipped"]["kinds"] == {
        "malformed JSON": 1,
        "empty message": 1,
    }
    recs = load_jsonl(tmp_path / "o.jsonl")
    assert [m["content"] for m in recs[0]["messages"]] == ["Be brief.", "Sum these.: 1 2", "3"]
    assert recs[1]["messages"][1]["content"] == "Say hi"
    with pytest.raises(DataInputError, match="--overwrite"):
        alpaca_to_chat([src], tmp_path / "o.jsonl", skip_bad=True)


# ---------------------------------------------------------------- pad layout = the seed


@needs_data
def test_pad_all_reproduces_seed_rows(tmp_path, tokenizer, hf_tokenizer):
    conv = tmp_path / "conv.jsonl"
    alpaca_to_chat([SHARED_DATA / "alpaca_data_first200.json"], conv)
    seq_length = 200  # some conversations are longer: truncation is exercised too
    meta = preprocess_chat(
        [conv], tmp_path / "ds", tokenizer, seq_length=seq_length, loss_on="all", quiet=True
    )
    tokens = np.load(tmp_path / "ds" / "tokens.npy", mmap_mode="r")
    mask = np.load(tmp_path / "ds" / "loss_mask.npy", mmap_mode="r")
    records = load_jsonl(conv)
    assert tokens.shape == (len(records), seq_length + 1)
    truncated = 0
    for row, rec in enumerate(records):
        # The seed: apply_chat_template(..., padding="max_length", max_length=seq_length + 1, truncation=True);
        # labels are the ids except the padding.
        seed = hf_ids(
            hf_tokenizer, rec["messages"], padding="max_length", max_length=seq_length + 1, truncation=True
        )
        real = min(len(hf_ids(hf_tokenizer, rec["messages"])), seq_length + 1)
        truncated += real == seq_length + 1
        assert tokens[row].tolist() == seed
        assert mask[row].tolist() == [True] * real + [False] * (seq_length + 1 - real)
    assert meta["truncated"] > 0 and meta["truncated"] <= truncated
    assert meta["padding_tokens"] == int((~mask[:]).sum())


def test_real_endoftext_in_content_is_not_padding(tmp_path, tokenizer):
    conv = tmp_path / "c.jsonl"
    messages = [
        {"role": "user", "content": "a<|endoftext|>b"},
        {"role": "assistant", "content": "<|endoftext|>"},
    ]
    conv.write_text(json.dumps({"messages": messages}) + "\n")
    preprocess_chat([conv], tmp_path / "d", tokenizer, seq_length=64, loss_on="all", quiet=True)
    tokens, mask = np.load(tmp_path / "d" / "tokens.npy")[0], np.load(tmp_path / "d" / "loss_mask.npy")[0]
    ids, _ = tokenizer.encode_chat(messages, loss_on="all")
    inside = [i for i, t in enumerate(ids) if t == ENDOFTEXT]
    assert len(inside) == 2 and all(mask[i] for i in inside)
    assert mask.sum() == len(ids) and not mask[len(ids) :].any() and (tokens[len(ids) :] == ENDOFTEXT).all()


# ---------------------------------------------------------------- assistant-only loss


def assistant_runs_ok(ids, mask, messages, hf_tokenizer) -> None:
    """Runs of loss tokens decode to each assistant reply followed by <|im_end|>, in order, and nothing else."""
    mask = np.asarray(mask, bool)
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    runs = [hf_tokenizer.decode(list(ids[a:b])) for a, b in zip(edges[::2], edges[1::2])]
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        # a reply that starts with newlines can share its first token with the header's newline
        assert run == reply or (reply.startswith("\n") and run == "\n" + reply)


@needs_data
@pytest.mark.parametrize("name", ["sharegpt_multiturn_8conv.json", "lima_alpaca_history_llamafactory.json"])
def test_assistant_loss_is_exactly_the_replies(tmp_path, tokenizer, hf_tokenizer, name):
    path = SHARED_DATA / name
    conversations = [to_messages(r.value) for r in read_records(path)]
    if name.startswith("lima"):  # the multi-turn records and a few others
        keep = [i for i, c in enumerate(conversations) if len(c) > 3][:30] + list(range(20))
        conversations = [conversations[i] for i in sorted(set(keep))]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    meta = preprocess_chat([src], tmp_path / "ds", tokenizer, seq_length=16384, quiet=True)
    assert meta["truncated"] == 0
    tokens = np.load(tmp_path / "ds" / "tokens.npy")
    mask = np.load(tmp_path / "ds" / "loss_mask.npy")
    for row, messages in enumerate(conversations):
        expected_ids = hf_ids(hf_tokenizer, messages)
        n = len(expected_ids)
        assert tokens[row, :n].tolist() == expected_ids and not mask[row, n:].any()
        assistant_runs_ok(tokens[row, :n], mask[row, :n], messages, hf_tokenizer)


# ---------------------------------------------------------------- pack layout


def unpack(tokens, mask, doc_ids) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """The documents of packed rows (the trailing padding document removed)."""
    docs = []
    for t, m, d in zip(tokens, mask, doc_ids):
        assert (np.diff(d) >= 0).all() and d[0] == 0 and (np.diff(d) <= 1).all()
        for k in range(int(d[-1]) + 1):
            sel = d == k
            if k == d[-1] and (t[sel] == ENDOFTEXT).all() and not m[sel].any():
                continue  # padding: its own id, no loss
            docs.append((tuple(t[sel].tolist()), tuple(m[sel].tolist())))
    return docs


@needs_data
@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_pack_loses_no_conversation_and_no_token(tmp_path, tokenizer, hf_tokenizer, loss_on):
    conv = tmp_path / "conv.jsonl"
    alpaca_to_chat([SHARED_DATA / "lima_alpaca_history_llamafactory.json"], conv)
    records = load_jsonl(conv)[:300]
    conv.write_text("".join(json.dumps(r) + "\n" for r in records))
    seq_length = 2047
    meta = preprocess_chat(
        [conv], tmp_path / "p", tokenizer, seq_length=seq_length, layout="pack", loss_on=loss_on, quiet=True
    )
    folder = tmp_path / "p"
    tokens, mask, doc_ids = (np.load(folder / f) for f in ("tokens.npy", "loss_mask.npy", "doc_ids.npy"))
    assert doc_ids.dtype == np.int32 and tokens.shape == mask.shape == doc_ids.shape
    expected = []
    for r in records:
        ids = hf_ids(hf_tokenizer, r["messages"])[: seq_length + 1]  # --overlong truncate
        _, m = tokenizer.encode_chat(r["messages"], loss_on=loss_on)
        m = [False] + m[1 : len(ids)]  # the first token of a packed conversation is never a target
        expected.append((tuple(ids), tuple(m)))
    got = unpack(tokens, mask, doc_ids)
    assert Counter(got) == Counter(expected)
    assert meta["conversations"] == len(records) and meta["truncated"] == sum(
        len(hf_ids(hf_tokenizer, r["messages"])) > seq_length + 1 for r in records
    )
    assert meta["tokens"] == sum(len(e[0]) for e in expected)
    assert meta["fill"] > 0.9  # packing, not one conversation per row


def test_overlong_drop_and_truncate_counts(tmp_path, tokenizer):
    src = tmp_path / "c.jsonl"
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    src.write_text(json.dumps(long) + "\n" + json.dumps(short) + "\n")
    meta = preprocess_chat([src], tmp_path / "d", tokenizer, seq_length=64, overlong="drop", quiet=True)
    assert meta["dropped_overlong"] == 1 and meta["rows"] == 1
    meta = preprocess_chat([src], tmp_path / "t", tokenizer, seq_length=64, layout="pack", quiet=True)
    assert meta["truncated"] == 1 and meta["no_loss_conversations"] == 1 and meta["conversations"] == 2


# ---------------------------------------------------------------- input formats and bad input


def test_openai_sharegpt_and_alpaca_inputs_agree(tmp_path, tokenizer):
    turns = [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")]
    openai = {"messages": [{"role": "system", "content": "You are a helpful assistant."}]}
    openai["messages"] += [{"role": r, "content": c} for r, c in turns]
    sharegpt = {
        "conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": c} for r, c in turns]
    }
    alpaca = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["What is 2+2?", "4"]]}
    (tmp_path / "o.jsonl").write_text(json.dumps(openai) + "\n")
    (tmp_path / "s.json").write_text(json.dumps([sharegpt], indent=2))
    (tmp_path / "a.json").write_text(json.dumps([alpaca]))
    for name in ("o.jsonl", "s.json", "a.json"):
        preprocess_chat([tmp_path / name], tmp_path / f"d-{name}", tokenizer, seq_length=80, quiet=True)
    rows = [np.load(tmp_path / f"d-{n}" / "tokens.npy") for n in ("o.jsonl", "s.json", "a.json")]
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(rows[0], rows[2])


def test_bad_records_are_reported_or_counted(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [
        json.dumps(good),
        '{"messages": [',  # line 2: malformed
        json.dumps({"conversations": [{"from": "function_call", "value": "{}"}]}),  # 3: unknown role
        json.dumps({"messages": []}),  # 4: empty conversation
        "",
        json.dumps(
            {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}
        ),  # 6
        json.dumps({"text": "no format"}),  # 7
        json.dumps(good),
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(lines) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataInputError, match=r"mixed\.jsonl:2: malformed JSON"):
        preprocess_chat([src], tmp_path / "out", tokenizer, seq_length=32, quiet=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataInputError, match=r"empty\.jsonl: no records"):
        preprocess_chat([empty], tmp_path / "out", tokenizer, seq_length=32, quiet=True)
    meta = preprocess_chat(
        [src, empty], tmp_path / "out", tokenizer, seq_length=32, skip_bad=True, quiet=True
    )
    skipped = meta["skipped"]
    assert meta["rows"] == 2 and skipped["count"] == 6
    assert skipped["kinds"] == {
        "malformed JSON": 1, "unknown role": 1, "empty conversation": 1, "empty message": 1,
        "invalid record": 1, "empty input": 1,
    }  # fmt: skip
    assert [e.split(": ")[0].rsplit("/", 1)[-1] for e in skipped["examples"]] == [
        "mixed.jsonl:2", "mixed.jsonl:3", "mixed.jsonl:4", "mixed.jsonl:6", "mixed.jsonl:7", "empty.jsonl",
    ]  # fmt: skip
    with pytest.raises(DataInputError, match="--overwrite"):
        preprocess_chat([src], tmp_path / "out", tokenizer, seq_length=32, skip_bad=True, quiet=True)


def test_json_array_errors_name_the_line(tmp_path, tokenizer):
    src = tmp_path / "broken.json"
    src.write_text('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "c",, }\n]')
    with pytest.raises(DataInputError, match=r"broken\.json:3:"):
        preprocess_chat([src], tmp_path / "out", tokenizer, seq_length=32, skip_bad=True, quiet=True)


def test_workers_give_the_same_rows(tmp_path, tokenizer):
    records = [
        {"messages": [{"role": "user", "content": f"question {i} " * (i % 7 + 1)},
                      {"role": "assistant", "content": f"answer {i} " * (i % 5 + 1)}]}
        for i in range(300)
    ]  # fmt: skip
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    for workers in (1, 2):
        preprocess_chat([src], tmp_path / f"w{workers}", tokenizer, seq_length=48, layout="pack", workers=workers,
                        quiet=True)  # fmt: skip
    for name in ("tokens.npy", "loss_mask.npy", "doc_ids.npy"):
        assert np.array_equal(np.load(tmp_path / "w1" / name), np.load(tmp_path / "w2" / name))
