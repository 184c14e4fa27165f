"""Continuous batching on token ids: one loop shares every forward pass among all running sequences.

Each iteration: drop cancelled or expired sequences (freeing their slots), admit waiting ones into free slots
and prefill them together, then run one decode step over every running sequence. Each sampled token goes to its
sequence's listener (server.sequence.Listener); a finished sequence leaves at once and its slot is reused in the
next iteration. Forward passes and sampling run in one model thread (server.model_runner; torch releases the
GIL), so the event loop keeps streaming; all scheduler state is touched only on the event loop.

The loop works one decode step ahead: it queues step n+1 while step n runs, then reports step n's tokens, so the
model thread starts the next pass as soon as one ends instead of waiting for the loop. Step n+1 feeds each
sequence the token that step n samples, which only the model thread knows in time: it keeps it on the sequence
(`Sequence.next`) and skips a sequence whose token ends it by id alone (EOS, max_new_tokens). A sequence that its
listener (a stop string), a cancellation or its deadline ends while its next step is queued just loses that
step's token. A sequence's generator draws once per step it takes part in, in step order, so seeded sampling
is unchanged; admission waits for at most the one step already queued.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.backends.base import Backend
from server.metrics import Metrics
from server.model_runner import ModelRunner
from server.sequence import Listener, Sequence, TokenOutput, TokenRequest

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """As many sequences wait as the queue holds."""


class NotAccepting(Exception):
    """The scheduler is draining."""


@dataclass
class Step:
    """A forward pass handed to the model thread; its result is (the sequences it advanced, their tokens)."""

    seqs: list[Sequence]
    result: asyncio.Future
    prefill: bool


class Scheduler:
    def __init__(self, backend: Backend, max_queue: int, metrics: Metrics,
                 executor: ThreadPoolExecutor | None = None):
        self.max_batch = backend.max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.runner = ModelRunner(backend, metrics)
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="ulm-model")
        self.free = list(range(backend.max_batch - 1, -1, -1))  # pop() hands out slot 0 first
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
        self.metrics.queue_depth.set(len(self.waiting))
        self._idle.clear()
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """End a sequence early ("cancelled", "deadline", "stop"); idempotent. From its listener, it takes no
        further step; otherwise its slot is freed before the next forward pass."""
        if not seq.finished and not seq.cancelled:
            seq.cancelled = reason
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
        self.executor.shutdown(wait=True)

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
        return new

    def _submit(self, seqs: list[Sequence], prefill: bool) -> Step:
        """The slots go along as they are now: the loop may finish a sequence before its pass runs."""
        released, self.to_release = self.to_release, []
        work = self.runner.prefill if prefill else self.runner.decode
        result = asyncio.get_running_loop().run_in_executor(self.executor, work, released, seqs,
                                                            [s.slot for s in seqs])
        return Step(seqs, result, prefill)

    async def _collect(self, step: Step) -> None:
        try:
            seqs, tokens = await step.result
        except Exception as e:  # a failed pass fails its sequences only; the server keeps serving
            log.exception("%s failed for %d requests", "prefill" if step.prefill else "decode", len(step.seqs))
            for seq in step.seqs:
                self._finish(seq, "error", f"model forward pass failed: {e}")
            return
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            if step.prefill:
                self.metrics.prompt_tokens.inc(len(seq.req.prompt_ids))
            if reason := seq.dropped(now):
                self._finish(seq, reason)
            elif not seq.finished:
                try:
                    self._on_token(seq, token, now)
                except Exception as e:  # e.g. its listener's tokenizer failed: this one fails, the others go on
                    log.exception("request failed after token %d", token)
                    self._finish(seq, "error", f"could not process token {token}: {e}")
        if not step.prefill and seqs:
            self.metrics.batch_size.observe(len(seqs))

    # -- outputs, on the event loop ---------------------------------------------------------------------

    def _on_token(self, seq: Sequence, token: int, now: float) -> None:
        (self.metrics.inter_token_latency if seq.tokens else self.metrics.time_to_first_token).observe(
            now - seq.last)
        seq.last = now
        seq.tokens.append(token)
        self.metrics.generated_tokens.inc()
        ends = seq.end_reason(token, len(seq.tokens))
        seq.listener(seq, TokenOutput([token], last=ends is not None))
        if reason := seq.cancelled or ends:  # its listener may have ended it just now (a stop string)
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.slot is not None:
            del self.running[seq.slot]
            self.to_release.append(seq.slot)
            self.free.append(seq.slot)
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
