"""ChatML rendering: the checkpoint's own Jinja chat template (as transformers renders it) or the built-in one, and
where each assistant message's content lies in the rendered text (the loss mask is built from these spans by
`Tokenizer.encode_chat`). Works on strings only: the template and the special-token texts.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from qwen15.errors import UserError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML with the default system message inserted when the conversation does not start with one.
BUILTIN_CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LOSS_MODES = ("assistant", "all")
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(UserError):
    """A conversation or template that cannot be rendered; the message says which message and why."""


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


@lru_cache(maxsize=16)
def _compile(template: str):
    import json

    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The same environment settings as transformers, so that a checkpoint's template renders identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from None


def validate_messages(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(
                f"message {i}: expected an object with 'role' and 'content', got {m!r:.80}"
            )
        if m["role"] not in ROLES:
            raise ChatTemplateError(
                f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise ChatTemplateError(
                f"message {i}: content must be a string, got {type(m['content']).__name__}"
            )


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|endoftext|>",
    **kwargs: Any,
) -> str:
    """The conversation rendered by `template` (None: the built-in ChatML), as transformers renders it."""
    from jinja2 import TemplateError

    compiled = _compile(template or BUILTIN_CHATML_TEMPLATE)
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token="",
            **kwargs,
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None


def assistant_spans(
    template: str | None, messages: list[dict[str, Any]], text: str, **tokens: str
) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content in `text` (the rendered conversation).

    Each span starts where the rendering of the preceding messages plus the generation prompt ends — the template
    itself says where the assistant's words begin — and runs for the content's length.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(template, messages[:i], add_generation_prompt=True, **tokens) if i else ""
        start = len(prefix)
        end = start + len(m["content"])
        if i == 0 or not text.startswith(prefix) or text[start:end] != m["content"]:
            raise ChatTemplateError(
                f"message {i}: cannot locate the assistant content in the rendered conversation (the chat "
                "template must render messages in order, verbatim, after the generation prompt)"
            )
        spans.append((start, end))
    return spans
