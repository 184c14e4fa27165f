"""Continuous batching on token ids: one loop shares every forward pass among all running sequences.

Each iteration: drop cancelled or expired sequences (freeing their slots), admit waiting ones into free slots
and prefill them together, then run one decode step over every running sequence. Each sampled token goes to its
sequence's listener (server.sequence.Listener); a finished sequence leaves at once and its slot is reused in the
next iteration. Forward passes and sampling run in the model process (server.model_process), so the event loop
keeps streaming while the model computes; all scheduler state is touched only on the event loop.

The loop works one decode pass ahead: it queues pass n+1 while pass n runs, then reports pass n's tokens, so the
model starts the next pass as soon as one ends instead of waiting for the loop. Pass n+1 feeds each
sequence the token that pass n samples, which only the model's side knows in time: it keeps it on the sequence
(`Sequence.next`) and skips a sequence whose token ends it by id alone (EOS, max_new_tokens). A pass runs one
decode step, or several back to back while they take under PASS_SECONDS (at most --stream-interval): each stream
then gets that pass's tokens in one output, one message, so the per-stream work on the loop (text, messages,
gRPC writes) is paid once per pass rather than once per token where a model is fast. A sequence that its
listener (a stop string), a cancellation or its deadline ends leaves the pass at its next step; the tokens it got
meanwhile are dropped. A sequence's generator draws once per step it takes part in, in step order, so seeded
sampling is unchanged; admission waits for at most the one pass already queued.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from server.metrics import Metrics
from server.sequence import Listener, Sequence, TokenOutput, TokenRequest

log = logging.getLogger(__name__)

# A decode pass stops taking steps once it has run this long, so that a stream gets a message at least this often
# while it generates faster than that (a slower model's pass is one step: a message per token).
PASS_SECONDS = 0.01


class Runner(Protocol):
    """Where the forward passes run (server.model_process.ProcessRunner, server.model_runner.ThreadRunner): each
    call queues a pass behind the last and returns its future, (each sequence's tokens, context slides)."""

    ready: asyncio.Event  # cleared while the model's process is being replaced: requests wait for the new one

    def prefill(self, released: list[int], seqs: list[Sequence], slots: list[int]) -> asyncio.Future: ...

    def decode(self, released: list[int], seqs: list[Sequence], slots: list[int], steps: int,
               seconds: float) -> asyncio.Future: ...

    def left(self, seq: Sequence) -> None:
        """Its caller or the server ended `seq` (it still holds its slot): its next step leaves it out."""

    def waiting(self, yes: bool) -> None:
        """Whether requests wait for free slots: decode passes are shorter meanwhile."""

    async def close(self) -> None: ...


class QueueFull(Exception):
    """As many sequences wait as the queue holds."""


class NotAccepting(Exception):
    """The scheduler is draining."""


@dataclass
class Step:
    """A forward pass handed to the runner; its result is (each sequence's tokens, context slides)."""

    seqs: list[Sequence]
    result: asyncio.Future
    prefill: bool


class Scheduler:
    def __init__(self, runner: Runner, max_batch: int, max_queue: int, metrics: Metrics, stream_interval: int = 1):
        self.max_batch = max_batch
        self.stream_interval = stream_interval  # the most decode steps in one pass of the model
        self.max_queue = max_queue
        self.metrics = metrics
        self.runner = runner
        self.free = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.to_release: list[int] = []  # slots of finished sequences; released before the next pass
        self.ahead: Step | None = None  # the decode step queued while the loop handles the one before
        self.accepting = True
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    # -- called by the engine ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    def submit(self, req: TokenRequest, listener: Listener) -> Sequence:
        """Queue a sequence; `listener` gets its outputs. Raises NotAccepting or QueueFull."""
        if not self.accepting:
            raise NotAccepting("the scheduler is draining")
        if len(self.waiting) >= self.max_queue + len(self.free):
            raise QueueFull(f"{len(self.waiting)} requests waiting for {self.max_batch} slots")
        seq = Sequence(req, listener)
        self.waiting.append(seq)
        if self.free:
            self.runner.waiting(True)
        self.metrics.queue_depth.set(len(self.waiting))
        self._idle.clear()
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """End a sequence early ("cancelled", "deadline", "stop"); idempotent. From its listener, it takes no
        further step; otherwise its slot is freed before the next forward pass."""
        if not seq.finished and not seq.cancelled:
            seq.cancelled = reason
            self.runner.left(seq)
            self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new sequences and wait for the accepted ones; after `timeout`, abort the rest ("aborted")."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            for seq in [*self.waiting, *self.running.values()]:
                seq.aborted = True  # the loop finishes them before its next pass
                self.runner.left(seq)
            self._wake.set()
            try:
                await asyncio.wait_for(self._idle.wait(), 1.0)
            except TimeoutError:
                log.warning("scheduler still busy after aborting requests")
            return False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.runner.close()

    @property
    def busy_slots(self) -> int:
        return self.max_batch - len(self.free)

    # -- the loop ---------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self.waiting and not self.running and self.ahead is None:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            self._wake.clear()
            try:
                await self._iteration()
            except Exception as e:  # a bug here must not leave every stream hanging: fail the batch, go on
                log.exception("scheduler iteration failed")
                for seq in list(self.running.values()):
                    self._finish(seq, "error", f"scheduler error: {e}")

    async def _iteration(self) -> None:
        """Queue the next passes behind the decode step in flight, then handle that step's tokens."""
        self._drop()
        if not self.runner.ready.is_set():  # the model process died: its passes fail; new requests wait for the next
            previous, self.ahead = self.ahead, None
            if previous is not None:
                await self._collect(previous)
            else:
                try:  # a while at a time: the waiting ones' deadlines and cancellations still apply
                    await asyncio.wait_for(self.runner.ready.wait(), 0.1)
                except TimeoutError:
                    pass
            return
        new = self._admit()
        prefill = self._submit(new, prefill=True) if new else None
        previous = self.ahead
        self.ahead = self._submit(list(self.running.values()), prefill=False) if self.running else None
        for step in (previous, prefill):
            if step is not None:
                await self._collect(step)
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.running.set(len(self.running))

    def _drop(self) -> None:
        """Finish cancelled and expired sequences, waiting or running."""
        now = time.monotonic()
        for seq in list(self.running.values()):
            if reason := seq.dropped(now):
                self._finish(seq, reason)
        if any(seq.dropped(now) for seq in self.waiting):
            keep = deque()
            for seq in self.waiting:
                if reason := seq.dropped(now):
                    self._finish(seq, reason)
                else:
                    keep.append(seq)
            self.waiting = keep

    def _admit(self) -> list[Sequence]:
        new = []
        now = time.monotonic()
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            if reason := seq.dropped(now):
                self._finish(seq, reason)
                continue
            seq.slot = self.free.pop()
            self.running[seq.slot] = seq
            new.append(seq)
        self.runner.waiting(bool(self.waiting and self.free))
        return new

    def _submit(self, seqs: list[Sequence], prefill: bool) -> Step:
        """The slots go along as they are now: the loop may finish a sequence before its pass runs."""
        released, self.to_release = self.to_release, []
        slots = [s.slot for s in seqs]
        if prefill:
            result = self.runner.prefill(released, seqs, slots)
        else:
            result = self.runner.decode(released, seqs, slots, self.stream_interval, PASS_SECONDS)
        return Step(seqs, result, prefill)

    async def _collect(self, step: Step) -> None:
        try:
            tokens, slides = await step.result  # each sequence's tokens
        except Exception as e:  # a failed pass fails its sequences only; the server keeps serving
            log.exception("%s failed for %d requests", "prefill" if step.prefill else "decode", len(step.seqs))
            for seq in step.seqs:
                self._finish(seq, "error", f"model forward pass failed: {e}")
            return
        seqs = step.seqs
        self.metrics.context_slides.inc(slides)
        now = time.monotonic()
        if step.prefill:
            self.metrics.prompt_tokens.inc(sum(len(seq.req.prompt_ids) for seq in seqs))
        delivered = 0
        for seq, new in zip(seqs, tokens):
            if reason := seq.dropped(now):
                self._finish(seq, reason)
            elif new and not seq.finished:
                delivered += len(new)
                try:
                    self._on_tokens(seq, new, now)
                except Exception as e:  # e.g. its listener's tokenizer failed: this one fails, the others go on
                    log.exception("request failed after tokens %s", new)
                    self._finish(seq, "error", f"could not process tokens {new}: {e}")
        self.metrics.generated_tokens.inc(delivered)
        if not step.prefill and seqs:
            self.metrics.batch_size.observe(len(seqs))

    # -- outputs, on the event loop ---------------------------------------------------------------------

    def _on_tokens(self, seq: Sequence, tokens: list[int], now: float) -> None:
        """A pass's tokens of one sequence, to its listener in one output (a pass of several steps: the gap since
        the last output is shared among them, as a client sees it)."""
        gaps = len(tokens)
        if not seq.tokens:
            self.metrics.time_to_first_token.observe(now - seq.last)
            gaps -= 1
        for _ in range(gaps):
            self.metrics.inter_token_latency.observe((now - seq.last) / len(tokens))
        seq.last = now
        seq.tokens += tokens
        ends = seq.end_reason(tokens[-1], len(seq.tokens))
        seq.listener(seq, TokenOutput(tokens, last=ends is not None))
        if reason := seq.cancelled or ends:  # its listener may have ended it just now (a stop string)
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.slot is not None:
            self.runner.left(seq)
            del self.running[seq.slot]
            self.to_release.append(seq.slot)
            self.free.append(seq.slot)
            if self.waiting:
                self.runner.waiting(True)
            seq.slot = None
        self.metrics.finished.labels(reason).inc()
        log.debug("request done (%s): %d prompt + %d generated tokens in %.3f s", reason, len(seq.req.prompt_ids),
                  len(seq.tokens), time.monotonic() - seq.arrival)
        last = TokenOutput(finish_reason=reason, error=error, prompt_tokens=len(seq.req.prompt_ids),
                           completion_tokens=len(seq.tokens))
        try:
            seq.listener(seq, last)
        except Exception:  # the sequence has left already; the others must not fail with it
            log.exception("listener failed on the finish of a request (%s)", reason)
