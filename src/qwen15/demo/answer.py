"""Answering a question through the chat path (qwen15.chat.ChatSession, as `qwen15 chat` does): the ChatML prompt
with the default system message and the generation prompt, greedy decoding, stop at <|im_end|> or <|endoftext|>."""

from __future__ import annotations

from qwen15.model import Qwen
from qwen15.tokenizer import Tokenizer


def answer(model: Qwen, tokenizer: Tokenizer, question: str, max_new_tokens: int = 32) -> str:
    from qwen15.chat import ChatSession
    from qwen15.sampling import SamplingParams

    session = ChatSession(
        model.eval(), tokenizer, history=False, max_new_tokens=max_new_tokens, sampling=SamplingParams()
    )
    return session.reply(question)
