"""Multi-turn chat: the conversation, its rendering in the checkpoint's chat template, and the context window.

`ChatSession.ask(question)` streams the reply (text deltas) and adds both turns to the history. With
history off each question is answered alone. The session keeps one engine (qwen15.generation.Generator with
prefix reuse), so a turn does not recompute the KV of the conversation before it. When the rendered conversation
plus room for the reply (max_new_tokens, at most half the window) no longer fits the context window, the oldest
user/assistant exchanges are dropped first; the system prompt and the current question are never dropped. A reply
gets max_new_tokens or the room the conversation leaves in the window, whichever is less (as `generate` clamps);
only a question that leaves no room at all is refused. The terminal loop lives in qwen15.commands.chat.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from qwen15.chat_template import DEFAULT_SYSTEM_PROMPT
from qwen15.errors import UserError
from qwen15.generation import Completion, Generator, default_stop_ids
from qwen15.sampling import SamplingParams

DEMO_QUESTIONS = ("你好", "给我讲一个年轻人奋斗创业最终取得成功的故事。", "给这个故事起一个标题")


class ChatError(UserError):
    """A question that cannot be answered within the context window, or a bad chat setting."""


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    history: bool = True
    max_new_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    context_window: int | None = None  # default: the model's max_position_embeddings
    seed: int | None = None
    stop_token_ids: list[int] | None = (
        None  # default: the checkpoint's eos ids plus <|im_end|> and <|endoftext|>
    )
    turns: list[dict[str, str]] = field(default_factory=list)  # user/assistant messages, oldest first
    dropped_turns: int = 0  # exchanges dropped from the front to fit the window, since the last clear
    last_completion: Completion | None = None
    draft: Any = None  # a draft model for speculative decoding (qwen15.speculative), or None
    draft_tokens: int = 4
    _generator: Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        limit = self.model.config.max_position_embeddings
        if self.context_window is not None and not 1 <= self.context_window <= limit:
            raise ChatError(
                f"--context-window {self.context_window}: must lie between 1 and the model's context, {limit} tokens"
            )
        if self.max_new_tokens < 1:
            raise ChatError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")

    @property
    def window(self) -> int:
        return (
            self.model.config.max_position_embeddings if self.context_window is None else self.context_window
        )

    def clear(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        self.turns = []
        self.dropped_turns = 0

    def messages(self, question: str | None = None) -> list[dict[str, str]]:
        """The conversation as the model sees it: system prompt, kept history, then the question."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        msgs += self.turns if self.history else []
        if question is not None:
            msgs.append({"role": "user", "content": question})
        return msgs

    @property
    def reply_room(self) -> int:
        """Tokens kept free for the reply when old exchanges are dropped: max_new_tokens, but at most half the
        window, so that a max_new_tokens beyond the context still leaves room for a conversation."""
        return max(1, min(self.max_new_tokens, self.window // 2))

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the conversation with the generation prompt, after dropping the oldest exchanges as needed
        to leave `reply_room` tokens in the window."""
        while True:
            ids = self.tokenizer.apply_chat_template(self.messages(question), add_generation_prompt=True)
            if len(ids) + self.reply_room <= self.window or not (self.history and self.turns):
                break
            self._drop_oldest_exchange()
        if len(ids) >= self.window:
            limit = self.model.config.max_position_embeddings
            raise ChatError(
                f"the question needs {len(ids)} tokens with the system prompt, which leaves no room for a reply in "
                f"the context window of {self.window} tokens (--context-window; the model allows up to {limit}); "
                "shorten it"
            )
        return ids

    def reply_budget(self, prompt_length: int) -> int:
        """New tokens the reply may have: max_new_tokens, or what the window has left if that is less."""
        return min(self.max_new_tokens, self.window - prompt_length)

    def _drop_oldest_exchange(self) -> None:
        # an exchange is a user message and the replies up to the next user message
        end = 1
        while end < len(self.turns) and self.turns[end]["role"] != "user":
            end += 1
        del self.turns[:end]
        self.dropped_turns += 1

    def ask(self, question: str) -> Iterator[str]:
        """Stream the reply to `question` (text deltas); the exchange joins the history when the reply is done."""
        ids = self.prompt_ids(question)
        if self.draft is not None:
            completion = yield from self._speculative(ids)
        else:
            if self._generator is None or self._generator.model is not self.model:
                self._generator = Generator(self.model, self.tokenizer, prefix_reuse=True)
            it = self._generator.stream(
                [ids],
                max_new_tokens=self.reply_budget(len(ids)),
                sampling=self.sampling,
                stop_token_ids=self._stop_ids(),
                seed=self.seed,
            )
            while True:
                try:
                    _, delta = next(it)
                except StopIteration as done:
                    completion = done.value[0]
                    break
                yield delta
        self.last_completion = completion
        if self.history:
            self.turns.append({"role": "user", "content": question})
            self.turns.append({"role": "assistant", "content": completion.text})

    def _speculative(self, ids: list[int]) -> Iterator[str]:
        """The reply drafted by self.draft and checked by the model (same distribution); returns the completion."""
        from qwen15.speculative import speculative_stream

        s = self.sampling
        stream = speculative_stream(
            self.model,
            self.draft,
            self.tokenizer,
            ids,
            k=self.draft_tokens,
            max_new_tokens=self.reply_budget(len(ids)),
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            stop_token_ids=self._stop_ids(),
            seed=self.seed,
        )
        yield from stream
        return stream.completion

    def _stop_ids(self) -> list[int]:
        if self.stop_token_ids is not None:
            return list(self.stop_token_ids)
        return chat_stop_ids(self.model, self.tokenizer)

    def reply(self, question: str) -> str:
        """The whole reply to `question` (non-streaming form of `ask`)."""
        return "".join(self.ask(question))


def chat_stop_ids(model, tokenizer) -> list[int]:
    """A chat reply ends at the checkpoint's eos ids and always at <|im_end|> and <|endoftext|> (a base model
    finetuned on chat data names only <|endoftext|> and would otherwise run on)."""
    ids = default_stop_ids(model, tokenizer)
    return sorted(set(ids) | {tokenizer.im_end_id, tokenizer.endoftext_id})
