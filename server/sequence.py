"""What the scheduler works on: token-level requests in, token outputs out, and the sequence that links them.

Nothing here knows text, gRPC or status codes: a request is prompt token ids, sampling parameters, a token budget,
an EOS id and a deadline; an output is new token ids, or why the sequence finished.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ulm.generate import SamplingParams

# why a sequence finished: by its ids ("length", "eos"), by its caller ("stop", "cancelled", "deadline"), by the
# server ("aborted": shutting down; "error": a failed pass or output callback)
FINISH_REASONS = ("length", "eos", "stop", "cancelled", "deadline", "aborted", "error")


@dataclass
class TokenRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    eos_id: int | None = None  # None: only max_new_tokens ends it
    deadline: float | None = None  # time.monotonic() after which the request is dropped


@dataclass
class TokenOutput:
    """One report to a sequence's listener: a sampled token, or (the last report) why it finished."""

    token_ids: list[int] = field(default_factory=list)
    last: bool = False  # no token follows this one: it is EOS or the max_new_tokens-th (the finish comes next)
    finish_reason: str | None = None  # one of FINISH_REASONS, on the last report only
    error: str | None = None  # what failed, when finish_reason is "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


# Called on the event loop with each output, before the scheduler queues its next pass: a listener that ends the
# sequence there (Scheduler.cancel) takes it out of that pass.
Listener = Callable[["Sequence", TokenOutput], None]


class Sequence:
    """A request inside the scheduler: its slot, its sampled tokens and its listener."""

    def __init__(self, req: TokenRequest, listener: Listener):
        self.req = req
        self.listener = listener
        self.generator = None if req.params.greedy else req.params.make_generator()
        self.tokens: list[int] = []  # the tokens reported so far
        self.slot: int | None = None
        # the model's side only: the prompt and every sampled token; the slot caches ids[start:] (see slide_window)
        self.ids, self.start = list(req.prompt_ids), 0
        self.next: tuple[int, int] | None = None  # the model's side only: (token, position) the next decode feeds
        self.cancelled: str | None = None  # why its caller ended it: "cancelled", "deadline" or "stop"
        self.aborted = False  # the server is shutting down
        self.finished = False
        self.arrival = self.last = time.monotonic()

    def end_reason(self, token: int, count: int) -> str | None:
        """Whether its count-th generated token ends it by id alone: "eos", "length" or None."""
        if token == self.req.eos_id:
            return "eos"
        return "length" if count >= self.req.max_new_tokens else None

    def sampled(self, token: int) -> None:
        """Model thread: the next decode feeds `token` after the cached ones, unless the token ends the sequence."""
        self.ids.append(token)
        ended = self.end_reason(token, len(self.ids) - len(self.req.prompt_ids)) is not None
        self.next = None if ended else (token, len(self.ids) - 1 - self.start)

    def dropped(self, now: float) -> str | None:
        if self.aborted:
            return "aborted"
        if self.req.deadline is not None and now >= self.req.deadline:
            return "deadline"
        return self.cancelled
