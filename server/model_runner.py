"""The forward passes of the scheduler's steps: prefill, decode, sampling, context sliding.

ModelRunner runs them where the model is: in the model process (server.model_process, the server's way), or in a
thread of the scheduler's own process (ThreadRunner: tests drive the scheduler over an instrumented backend so).
Every call releases the slots of sequences that left since the last one, then runs its pass and samples each
row (ulm.generate.sample_batch, one batch). A sequence whose next position is past the model's context goes on
from the last half of it (ulm.generate.slide_window, as in-process generation does), prefilled again in its slot
within the decode step.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from server.backends.base import Backend
from server.sequence import Sequence
from ulm.generate import sample_batch, slide_window


class ThreadRunner:
    """A ModelRunner in one thread of this process; each pass's future gives (each slot's tokens, context slides)."""

    def __init__(self, backend: Backend, executor: ThreadPoolExecutor):
        self.runner, self.executor = ModelRunner(backend), executor
        self.requests_wait = False
        self.runner.requests_wait = lambda: self.requests_wait
        self.ready = asyncio.Event()  # always: nothing to restart
        self.ready.set()

    def prefill(self, released: list[int], seqs: list[Sequence], slots: list[int]) -> asyncio.Future:
        return self._run(self.runner.prefill, released, seqs, slots)

    def decode(self, released: list[int], seqs: list[Sequence], slots: list[int], steps: int,
               seconds: float) -> asyncio.Future:
        return self._run(self.runner.decode, released, seqs, slots, steps, seconds)

    def left(self, seq: Sequence) -> None:
        """The runner reads the sequence's own flags."""

    def waiting(self, yes: bool) -> None:
        self.requests_wait = yes

    async def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _run(self, work, *args) -> asyncio.Future:
        def counted():
            slides = self.runner.slides
            return work(*args), self.runner.slides - slides
        return asyncio.get_running_loop().run_in_executor(self.executor, counted)


class ModelRunner:
    def __init__(self, backend: Backend):
        self.backend = backend
        self.held: set[int] = set()  # the slots the backend holds
        self.slides = 0  # sequences that went on past the context (the server counts them)
        self.requests_wait: Callable[[], bool] = lambda: False  # for free slots: decode passes are shorter

    def prefill(self, released: list[int], seqs: list[Sequence], slots: list[int]) -> list[list[int]]:
        logits = self._prefill(released, slots, [s.req.prompt_ids for s in seqs])
        tokens = sample_batch(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            seq.sampled(token)
        return [[token] for token in tokens]

    def decode(self, released: list[int], seqs: list[Sequence], slots: list[int], steps: int = 1,
               seconds: float = 0.0) -> list[list[int]]:
        """Decode steps back to back, up to `steps` of them, and no more once `seconds` have passed, or a quarter of
        them while requests wait for free slots (they wait less; every step of a pass is a message per stream
        less): each sequence's tokens, in step order. A sequence leaves at its first token that ends it by id, or
        at the first step after the loop ended it (cancelled, a stop string, its deadline)."""
        start = time.perf_counter()
        self._release(released)
        tokens: dict[int, list[int]] = {slot: [] for slot in slots}
        for _ in range(steps):
            now = time.monotonic()
            live = [(seq, slot) for seq, slot in zip(seqs, slots) if seq.next is not None and not seq.dropped(now)]
            # sequences that ended are released now, not a step later: left in the backend they would be holes in
            # the batch (torch would split its rows into several passes, onnx would rebuild)
            kept = {slot for _, slot in live}
            self._release([slot for slot in slots if slot not in kept])
            if not live:
                break
            for (seq, slot), token in zip(live, self._step([seq for seq, _ in live], [slot for _, slot in live])):
                tokens[slot].append(token)
            if time.perf_counter() - start >= (seconds / 4 if self.requests_wait() else seconds):
                break
        return [tokens[slot] for slot in slots]

    def _step(self, seqs: list[Sequence], slots: list[int]) -> list[int]:
        try:
            logits = self._step_logits(seqs, slots)
            tokens = sample_batch(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        except Exception:
            for seq in seqs:  # the loop fails them; the step queued behind this one skips them
                seq.next = None
            raise
        for seq, token in zip(seqs, tokens):
            seq.sampled(token)
        return tokens

    def _release(self, slots: list[int]) -> None:
        for slot in slots:
            if slot in self.held:  # not after a failed prefill, nor twice (see decode)
                self.held.remove(slot)
                self.backend.release(slot)

    def _prefill(self, release: list[int], slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Release `release`, then prefill `prompts` into `slots`, which the backend holds from then on."""
        self._release(release)
        logits = self.backend.prefill(slots, prompts)
        self.held.update(slots)
        return logits

    def _step_logits(self, seqs: list[Sequence], slots: list[int]) -> torch.Tensor:
        """The next-token logits (n, V) of a decode step. A sequence whose next position is past the context goes
        on from the last half of it: released and prefilled again in its slot, beside the others' decode."""
        context = self.backend.config.block_size
        full = [i for i, s in enumerate(seqs) if s.next[1] == context]
        if not full:
            return self.backend.decode(slots, [s.next[0] for s in seqs], [s.next[1] for s in seqs])
        windows = [slide_window(seqs[i].ids, context) for i in full]
        for i, window in zip(full, windows):
            seqs[i].start = len(seqs[i].ids) - len(window)
        refill = [slots[i] for i in full]
        self.slides += len(refill)
        logits = torch.empty(len(seqs), self.backend.config.vocab_size)
        logits[full] = self._prefill(refill, refill, windows)
        rest = [i for i in range(len(seqs)) if seqs[i].next[1] < context]
        if rest:
            logits[rest] = self.backend.decode([slots[i] for i in rest], [seqs[i].next[0] for i in rest],
                                               [seqs[i].next[1] for i in rest])
        return logits
