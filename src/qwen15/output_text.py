"""The text of one generated sequence as its tokens arrive: detokenization, stop strings, and streaming deltas.

This is the layer above the token-level engine (qwen15.engine): `generate`, `chat` and the HTTP server feed it
each new token and stream its deltas — never half of a multi-byte character, never a tail that may still turn
out to be the start of a stop string; the deltas joined equal the final text.
"""

from __future__ import annotations


class OutputText:
    """Token ids, text and finish state of one sequence. A stop string found in the text ends it (finish "stop",
    the text cut before it; the tokens that completed it stay in `ids`): the caller then cancels the sequence."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        if stops and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish: str | None = None
        self.stop: int | str | None = None
        self._stops = tuple(s for s in stops if s)
        self._decoder = tokenizer.stream_decoder() if tokenizer is not None else None

    def add(self, token: int) -> None:
        """A new token (never a stop id). Sets finish when it completes a stop string."""
        self.ids.append(token)
        if self._decoder is None:
            return
        before = len(self.text)
        self.text += self._decoder.add(token)
        if self._stops:
            self._cut_at_stop(max(0, before - max(map(len, self._stops)) + 1))

    def end(self, reason: str, stop_id: int | None = None) -> None:
        """The engine ended the sequence (a stop id, max_tokens or the context); flushes the decoder."""
        if self.finish is not None:
            return
        if self._decoder is not None:
            before = len(self.text)
            self.text += self._decoder.flush()  # an incomplete UTF-8 tail becomes U+FFFD, as decode() gives
            if self._stops and len(self.text) > before and self._cut_at_stop(0):
                return
        self.finish, self.stop = reason, stop_id

    def _cut_at_stop(self, search_from: int) -> bool:
        hits = [(i, s) for s in self._stops if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        idx, s = min(hits)
        self.text = self.text[:idx]
        self.finish, self.stop = "stop", s
        return True

    def delta(self) -> str:
        """Text not streamed yet, minus a tail that could still turn out to be the start of a stop string."""
        end = len(self.text)
        if self.finish is None and self._stops:
            end -= held_back(self.text, self._stops)
        out = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
