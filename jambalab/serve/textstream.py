"""Token ids -> text, incrementally, with stop strings: what the server streams.

- ByteDetokenizer: jambalab's byte tokenizer. An incremental UTF-8 decoder emits only complete
  characters: a character cut between tokens waits for its last byte; an invalid byte (or an id
  >= 256) becomes U+FFFD at once, so nothing stalls.
- Detokenizer: any other tokenizer, by decoding a short window of ids twice (with and without the
  newest ids) and emitting the difference once it no longer ends in U+FFFD (a byte-fallback
  character still incomplete). The window starts in the prompt, so a first token's leading space
  (SentencePiece "▁") is kept.
- StopMatcher: stop strings are matched on the text, and text that could be the start of a stop
  string is held back until it is known not to be one, so a stream never shows a stop string.

The streaming and non-streaming paths both run these, so they give the same text.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from jambalab.tokenizer import ByteTokenizer

PROMPT_CONTEXT = 5  # prompt ids decoded ahead of the first new one (for its leading space)
MAX_HELD_IDS = 8  # ids held while the text ends in U+FFFD before they are emitted anyway


class ByteDetokenizer:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(bytes([token_id if 0 <= token_id < 256 else 0xFF]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Detokenizer:
    def __init__(self, tok, prompt_ids: Sequence[int]) -> None:
        self.tok = tok
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])  # ids[:read] were emitted (the context), ids[read:] not yet
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") and len(self.ids) - self.read < MAX_HELD_IDS:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return self._advance(self.tok.decode(self.ids)) if self.read < len(self.ids) else ""

    def _advance(self, text: str) -> str:
        before = self.tok.decode(self.ids[:self.read])
        # A tokenizer may rewrite the end of the window once more ids follow; emit only what is new.
        new = text[len(before):] if text.startswith(before) else text[_common_prefix(text, before):]
        self.ids = self.ids[self.read:]  # the ids just emitted are the next window's context
        self.read = len(self.ids)
        return new


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def detokenizer(tok, prompt_ids: Sequence[int]) -> ByteDetokenizer | Detokenizer:
    return ByteDetokenizer() if isinstance(tok, ByteTokenizer) else Detokenizer(tok, prompt_ids)


class StopMatcher:
    """feed(text) -> (text safe to show, stopped). On a match the text ends just before the stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        # The stop string completed first wins (the one whose match ends first), as if fed char by char.
        hits = [(i + len(s), i) for s, i in ((s, buf.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)[1]], True
        keep = self._partial_match(buf)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out

    def _partial_match(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Generated ids in, visible text out: detokenization, then stop strings."""

    def __init__(self, tok, prompt_ids: Sequence[int], stops: Sequence[str]) -> None:
        self.detok = detokenizer(tok, prompt_ids)
        self.stop = StopMatcher(stops)
        self.stopped = False

    def add(self, token_id: int) -> str:
        text, self.stopped = self.stop.feed(self.detok.add(token_id))
        return text

    def finish(self) -> str:
        """The text still held back, once generation has ended without a stop string."""
        text, self.stopped = self.stop.feed(self.detok.flush())
        return text if self.stopped else text + self.stop.flush()
