"""Streaming text out of tokens: incremental UTF-8-safe detokenization, then stop-sequence matching.

A token may hold part of a character (byte-level vocabularies split multi-byte characters), and a stop
string may span tokens. TextStream emits only text that is final: whole characters that cannot be the start
of a stop string. The concatenation of everything it emits equals tokenizer.decode(all tokens), cut before the
first stop string.
"""
from __future__ import annotations

from ulm.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding yields for an incomplete character


class IncrementalDetokenizer:
    """Decodes a growing token list by re-decoding a short window (as vLLM and TGI do).

    The window starts at the last point where the decoded text ended on a whole character; decoding
    tokens[prefix:] and dropping the text of tokens[prefix:read] (already emitted) gives the new text, which is
    held back while it ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens up to here have been emitted
        self.byte_fallback = tokenizer.byte_fallback_ids
        self.special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}  # decoded as nothing
        self.last_visible: int | None = None

    def push(self, token: int) -> str:
        self.ids.append(token)
        if token not in self.special:
            self.last_visible = token
        if self.last_visible in self.byte_fallback:  # a run of byte tokens decodes as a whole: held until it ends
            return ""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """The held-back rest (an incomplete character decodes to U+FFFD, as in a full decode)."""
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


class StopMatcher:
    """Finds stop strings across pushes; holds back any tail that could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""  # text not yet emitted

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found: then nothing more may follow)."""
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0 if final else self._partial_len()
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def _partial_len(self) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        longest = min(len(self.buf), max((len(s) for s in self.stops), default=1) - 1)
        for k in range(longest, 0, -1):
            tail = self.buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


class TextStream:
    """Token ids in, final text out: detokenizer then stop matcher."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(stops)

    def push(self, token: int) -> tuple[str, bool]:
        return self.stop.push(self.detok.push(token))

    def flush(self) -> tuple[str, bool]:
        return self.stop.push(self.detok.flush(), final=True)
