"""One Generate call's text: the scheduler's token outputs in, chunks of final text out.

TextOutput is the sequence's listener (server.sequence.Listener): on the event loop, right after each step, it
turns the token into text (server.detokenize: whole characters, stop strings across tokens) and, when the text
reaches a stop string, ends the sequence with reason "stop" before the scheduler queues its next pass. The
handler reads the chunks with `next()`, which coalesces those a lagging client has not taken yet.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from server.detokenize import TextStream
from server.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from server.sequence import Sequence, TokenOutput
from ulm.tokenizer import Tokenizer


@dataclass
class Chunk:
    """What a call's stream receives: new text and tokens; the last one has finish_reason (or an error)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "eos", or how it failed or left ("cancelled"...)
    error: ServiceError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def merge(self, later: Chunk) -> Chunk:
        return Chunk(self.text + later.text, self.token_ids + later.token_ids, later.finish_reason, later.error,
                     later.prompt_tokens, later.completion_tokens)


def finish_error(reason: str, message: str | None) -> ServiceError | None:
    """The error a call that finished so reports (None: it ended normally, or its client is gone)."""
    if reason == "deadline":
        return DeadlineExceeded("deadline expired during generation")
    if reason == "aborted":
        return Unavailable("server shut down before the request finished")
    if reason == "error":
        return Internal(message or "generation failed")
    return None


class TextOutput:
    def __init__(self, tokenizer: Tokenizer, stop: list[str], end: Callable[[Sequence, str], None]):
        self.stream = TextStream(tokenizer, stop)
        self.end = end  # Scheduler.cancel: ends the sequence with a reason
        self.chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        self.held = Chunk()  # the text of the last token, which goes out with the finish in one message
        self.stopped = False
        self.taken = 0  # tokens passed on: through the one that completed a stop string, none after it

    def on_output(self, seq: Sequence, out: TokenOutput) -> None:
        """The sequence's listener (see the module's docstring)."""
        if out.finish_reason is not None:
            last = Chunk(finish_reason=out.finish_reason, error=finish_error(out.finish_reason, out.error),
                         prompt_tokens=out.prompt_tokens, completion_tokens=self.taken)
            self.chunks.put_nowait(self.held.merge(last))
            self.held = Chunk()
        elif not self.stopped:
            self._on_tokens(seq, out)

    def _on_tokens(self, seq: Sequence, out: TokenOutput) -> None:
        text, taken = "", 0
        for token in out.token_ids:
            piece, self.stopped = self.stream.push(token)
            text, taken = text + piece, taken + 1
            if self.stopped:
                break
        if out.last and not self.stopped:  # no token follows: the held-back tail is final (it may stop too)
            rest, self.stopped = self.stream.flush()
            text += rest
        chunk = Chunk(text, out.token_ids[:taken])
        self.taken += taken
        if self.stopped or out.last:
            self.held = chunk
            if self.stopped:
                self.end(seq, "stop")
        else:
            self.chunks.put_nowait(chunk)

    async def next(self) -> Chunk:
        """The next chunk, merged with every later one already waiting (the client fell behind)."""
        chunk = await self.chunks.get()
        while chunk.finish_reason is None and not self.chunks.empty():
            chunk = chunk.merge(self.chunks.get_nowait())
        return chunk
