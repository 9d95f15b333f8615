"""Chat data as it comes: JSON Lines or a JSON array of OpenAI-style, ShareGPT or Alpaca records, made into
conversations (lists of {"role", "content"}), each bad record reported with its file and line.

- OpenAI style: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}]}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": optional}
- Alpaca: {"instruction", "input", "output", "history": optional [[user, assistant], ...], "system": optional}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen15.chat_template import DEFAULT_SYSTEM_PROMPT
from qwen15.data.inputs import DataInputError, decode_error

OPENAI_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """One record that cannot be used (the caller adds the file and line, and skips or stops).

    `kind` names the problem in the counts that --skip-bad reports.
    """

    def __init__(self, message: str, kind: str = "invalid record"):
        super().__init__(message)
        self.kind = kind


@dataclass
class Record:
    where: str  # "file:line"
    value: Any = None  # the parsed JSON value, None when `error` is set
    error: str | None = None


class SkipLog:
    """Bad records: without skip_bad the first one stops the run; with it they are counted by kind."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.examples: list[str] = []

    def add(self, where: str, err: RecordError) -> None:
        if not self.skip_bad:
            raise DataInputError(f"{where}: {err} (pass --skip-bad to skip such records and count them)")
        self.count += 1
        self.kinds[err.kind] = self.kinds.get(err.kind, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {err}")

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "kinds": self.kinds, "examples": self.examples}


def read_records(path: Path) -> Iterator[Record]:
    """The records of a JSON Lines file or of a JSON array, with the line each starts on."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                yield from _array_records(path, f.read())
                return
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield Record(f"{path}:{lineno}", json.loads(line))
                except json.JSONDecodeError as e:
                    yield Record(f"{path}:{lineno}", error=f"malformed JSON ({e.msg} at column {e.colno})")
    except UnicodeDecodeError as e:
        raise decode_error(path, e) from None
    except OSError as e:
        raise DataInputError(f"{path}: cannot be read ({e.strerror})") from None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _array_records(path: Path, text: str) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    i = _skip_ws(text, text.index("[") + 1)
    line, counted = 1, 0
    if text.startswith("]", i):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataInputError(
                f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); records of a JSON array cannot be "
                "skipped one by one: fix the file (or write it as JSON Lines, one record per line)"
            ) from None
        line += text.count("\n", counted, i)
        counted = i
        yield Record(f"{path}:{line}", value)
        i = _skip_ws(text, end)
        if text.startswith(",", i):
            i = _skip_ws(text, i + 1)
            continue
        if text.startswith("]", i) and not text[i + 1 :].strip():
            return
        line += text.count("\n", counted, i)
        raise DataInputError(f"{path}:{line}: malformed JSON array (expected ',' or ']' after a record)")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string, got {type(value).__name__}")
    return value


def alpaca_user_text(instruction: str, input_text: str) -> str:
    """The seed's user turn: the instruction alone, or without one trailing '.' then ': ' and the input."""
    if input_text == "":
        return instruction
    return instruction.removesuffix(".") + ": " + input_text


def alpaca_messages(record: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """An Alpaca record (optionally with `history` turns before it) as a conversation, system turn first."""
    instruction = _text(record.get("instruction"), "'instruction'")
    input_text = _text(record.get("input") or "", "'input'")
    if "output" not in record:
        raise RecordError("Alpaca record without 'output'")
    output = _text(record["output"], "'output'")
    system = record.get("system") or system_prompt or DEFAULT_SYSTEM_PROMPT
    messages = [{"role": "system", "content": _text(system, "'system'")}]
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError(f"history[{i}] must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    messages.append({"role": "user", "content": alpaca_user_text(instruction, input_text)})
    messages.append({"role": "assistant", "content": output})
    return messages


def _sharegpt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise RecordError("'conversations' must be a list")
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": _text(record["system"], "'system'")})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"conversations[{i}] must be an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(speaker)
        if role is None:
            raise RecordError(
                f"conversations[{i}]: unknown role {speaker!r}; ShareGPT roles are human, gpt and system "
                "(tool-calling turns such as function_call and observation are not supported)",
                "unknown role",
            )
        messages.append(
            {
                "role": role,
                "content": _text(turn.get("value", turn.get("content")), f"conversations[{i}] value"),
            }
        )
    return messages


def _openai_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = record["messages"]
    if not isinstance(turns, list):
        raise RecordError("'messages' must be a list")
    messages = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in OPENAI_ROLES:
            raise RecordError(
                f"messages[{i}]: unknown role {m.get('role')!r}; expected one of {', '.join(OPENAI_ROLES)}",
                "unknown role",
            )
        messages.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}] content")})
    return messages


def check_conversation(messages: list[dict[str, str]]) -> None:
    """Refuse what would silently train on nothing: no user/assistant turn, or an empty user/assistant turn."""
    if not messages or all(m["role"] == "system" for m in messages):
        raise RecordError("empty conversation (no user or assistant message)", "empty conversation")
    for i, m in enumerate(messages):
        if m["role"] != "system" and not m["content"].strip():
            raise RecordError(f"message {i} ({m['role']}) is empty", "empty message")


def to_messages(value: Any, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation of one record of any supported format; raises RecordError saying what is wrong.

    `system_prompt` is the system turn of Alpaca records (default "You are a helpful assistant.", as the seed)
    and is put in front of other conversations that have none (without it the chat template adds its default).
    """
    if not isinstance(value, dict):
        raise RecordError(f"expected a JSON object, got {type(value).__name__}")
    if "messages" in value:
        messages = _openai_messages(value)
    elif "conversations" in value:
        messages = _sharegpt_messages(value)
    elif "instruction" in value:
        messages = alpaca_messages(value, system_prompt)
    else:
        raise RecordError(
            "unknown record format: expected 'messages' (OpenAI style), 'conversations' (ShareGPT) or "
            f"'instruction' and 'output' (Alpaca); the record has {sorted(value)[:8]}"
        )
    check_conversation(messages)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def alpaca_to_chat(
    inputs: list[Path],
    output: Path,
    *,
    system_prompt: str | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The seed's converter: Alpaca records -> JSON Lines of {"type": "chatml", "messages": [...]}.

    Returns counts: records, written, skipped (with reasons). Without skip_bad the first bad record stops it
    before anything is written.
    """
    from qwen15.atomic import OutputError, atomic_file, check_output_file

    output = Path(output)
    checks = dict(
        overwrite=overwrite, inputs=inputs, looks_ours=_is_chat_jsonl, what="JSON Lines file of ours"
    )
    try:
        check_output_file(output, **checks)  # before reading anything
    except OutputError as e:
        raise DataInputError(str(e)) from None
    lines, skipped, seen = [], SkipLog(skip_bad), 0
    for path in inputs:
        for rec in read_records(path):
            seen += 1
            try:
                if rec.error:
                    raise RecordError(rec.error, "malformed JSON")
                if not isinstance(rec.value, dict) or "instruction" not in rec.value:
                    raise RecordError("not an Alpaca record (expected 'instruction', 'input', 'output')")
                messages = alpaca_messages(rec.value, system_prompt)
                check_conversation(messages)
            except RecordError as e:
                skipped.add(rec.where, e)
                continue
            lines.append(json.dumps({"type": "chatml", "messages": messages}, ensure_ascii=False))
    if seen == 0:
        raise DataInputError(f"{', '.join(map(str, inputs))}: no records (empty input)")
    with atomic_file(output, **checks) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"records": seen, "written": len(lines), "skipped": skipped.summary()}


def _is_chat_jsonl(path: Path) -> bool:
    """What alpaca-to-chat writes: an empty file, or JSON Lines starting with a {"type": "chatml", ...} record."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(1 << 20)
    except (OSError, UnicodeDecodeError):
        return False
    if not first.strip():
        return path.stat().st_size == 0
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and record.get("type") == "chatml" and "messages" in record
