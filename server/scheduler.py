"""Continuous batching: one loop shares every forward pass among all running requests.

Each iteration: drop cancelled or expired requests (freeing their slots), admit waiting requests into free
slots and prefill them together, then run one decode step over every running request. Sampled tokens go
through each request's TextStream into its output queue; a finished request leaves at once and its slot is
reused in the next iteration. Forward passes and sampling run in one worker thread (torch releases the GIL),
so the event loop keeps streaming; all scheduler state is touched only on the event loop.

The loop works one decode step ahead: it queues step n+1 while step n runs, then turns step n's tokens into
text, so the worker starts the next pass as soon as one ends instead of waiting for the loop. Step n+1 feeds
each sequence the token that step n samples, which only the worker knows in time: the worker keeps it on the
sequence (`Sequence.next`) and skips a sequence whose token ends it by id alone (EOS, max_new_tokens). A
sequence that a stop string, a cancellation or its deadline ends while its next step is queued just loses that
step's token. A sequence's generator draws once per step it takes part in, in step order, so seeded sampling
is unchanged; admission waits for at most the one step already queued.

A sequence may run past the model's context: when it fills the context, it goes on from the last half of it
(ulm.generate.slide_window, as in-process generation does), prefilled again in its slot within the decode step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.backends.base import Backend
from server.detokenize import TextStream
from server.errors import DeadlineExceeded, Internal, ResourceExhausted, ServiceError, Unavailable
from server.metrics import Metrics
from ulm.generate import SamplingParams, sample_batch, slide_window

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() after which the request is dropped


@dataclass
class Chunk:
    """What a request's stream receives: new text and tokens; the last one has finish_reason (or an error)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length" | "stop" | "eos"
    error: ServiceError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def merge(self, later: "Chunk") -> "Chunk":
        return Chunk(self.text + later.text, self.token_ids + later.token_ids, later.finish_reason, later.error,
                     later.prompt_tokens, later.completion_tokens)


class Sequence:
    """A request inside the scheduler: its slot, its sampled tokens and its output queue."""

    def __init__(self, req: GenerationRequest, stream: TextStream, eos_id: int):
        self.req = req
        self.generator = None if req.params.greedy else req.params.make_generator()
        self.stream = stream
        self.eos_id = eos_id
        self.tokens: list[int] = []
        self.slot: int | None = None
        # worker thread only: the prompt and every sampled token; the slot caches ids[start:] (see slide_window)
        self.ids, self.start = list(req.prompt_ids), 0
        self.next: tuple[int, int] | None = None  # worker thread only: (token, position) the next decode feeds
        self.out: asyncio.Queue[Chunk] = asyncio.Queue()
        self.cancelled: str | None = None  # why the client went away: "cancelled" or "deadline"
        self.aborted = False  # the server is shutting down
        self.finished = False
        self.arrival = self.last = time.monotonic()

    def ends(self, token: int, count: int) -> bool:
        """Whether its count-th generated token ends it whatever the text: EOS or max_new_tokens."""
        return token == self.eos_id or count >= self.req.max_new_tokens

    def sampled(self, token: int) -> None:
        """Worker thread: the next decode feeds `token` after the cached ones, unless the token ends the sequence."""
        self.ids.append(token)
        ended = self.ends(token, len(self.ids) - len(self.req.prompt_ids))
        self.next = None if ended else (token, len(self.ids) - 1 - self.start)

    def dropped(self, now: float) -> str | None:
        if self.aborted:
            return "aborted"
        if self.req.deadline is not None and now >= self.req.deadline:
            return "deadline"
        return self.cancelled


@dataclass
class Step:
    """A forward pass handed to the worker thread; its result is (the sequences it advanced, their tokens)."""

    seqs: list[Sequence]
    result: asyncio.Future
    prefill: bool


class Scheduler:
    def __init__(self, backend: Backend, max_queue: int, metrics: Metrics,
                 executor: ThreadPoolExecutor | None = None):
        self.backend = backend
        self.max_queue = max_queue
        self.metrics = metrics
        self.eos_id = backend.tokenizer.eos_id
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="ulm-model")
        self.free = list(range(backend.max_batch - 1, -1, -1))  # pop() hands out slot 0 first
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.to_release: list[int] = []  # slots of finished sequences; released before the next pass
        self.held: set[int] = set()  # worker thread only: the slots the backend holds
        self.ahead: Step | None = None  # the decode step queued while the loop handles the one before
        self.accepting = True
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

    # -- called from request handlers -----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    def submit(self, req: GenerationRequest) -> Sequence:
        if not self.accepting:
            raise Unavailable("server is shutting down")
        if len(self.waiting) >= self.max_queue + len(self.free):
            raise ResourceExhausted(f"queue is full: {len(self.waiting)} requests waiting for "
                                    f"{self.backend.max_batch} slots (--max-queue {self.max_queue})")
        seq = Sequence(req, TextStream(self.backend.tokenizer, req.stop), self.eos_id)
        self.waiting.append(seq)
        self.metrics.queue_depth.set(len(self.waiting))
        self._idle.clear()
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Idempotent; the slot is freed before the next forward pass."""
        if not seq.finished and not seq.cancelled:
            seq.cancelled = reason
            self._wake.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait for the accepted ones; after `timeout`, abort the rest (UNAVAILABLE)."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            for seq in [*self.waiting, *self.running.values()]:
                seq.aborted = True  # the loop finishes them before its next pass
            self._wake.set()
            try:
                await asyncio.wait_for(self._idle.wait(), 1.0)
            except asyncio.TimeoutError:
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
        return self.backend.max_batch - len(self.free)

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
                    self._finish(seq, "error", error=Internal(f"scheduler error: {e}"))

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
        """Finish cancelled and expired requests, waiting or running."""
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
        work = self._prefill_sync if prefill else self._decode_sync
        result = asyncio.get_running_loop().run_in_executor(self.executor, work, released, seqs,
                                                            [s.slot for s in seqs])
        return Step(seqs, result, prefill)

    async def _collect(self, step: Step) -> None:
        try:
            seqs, tokens = await step.result
        except Exception as e:  # a failed pass fails its requests only; the server keeps serving
            log.exception("%s failed for %d requests", "prefill" if step.prefill else "decode", len(step.seqs))
            for seq in step.seqs:
                self._finish(seq, "error", error=Internal(f"model forward pass failed: {e}"))
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
                except Exception as e:  # e.g. a tokenizer error: this request fails, the others go on
                    log.exception("request failed after token %d", token)
                    self._finish(seq, "error", error=Internal(f"could not process token {token}: {e}"))
        if not step.prefill and seqs:
            self.metrics.batch_size.observe(len(seqs))

    # forward passes, in the worker thread

    def _release_sync(self, slots: list[int]) -> None:
        for slot in slots:
            if slot in self.held:  # not after a failed prefill, nor twice (see _decode_sync)
                self.held.remove(slot)
                self.backend.release(slot)

    def _prefill(self, release: list[int], slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Release `release`, then prefill `prompts` into `slots`, which the backend holds from then on."""
        self._release_sync(release)
        logits = self.backend.prefill(slots, prompts)
        self.held.update(slots)
        return logits

    def _prefill_sync(self, released: list[int], seqs: list[Sequence],
                      slots: list[int]) -> tuple[list[Sequence], list[int]]:
        logits = self._prefill(released, slots, [s.req.prompt_ids for s in seqs])
        tokens = sample_batch(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            seq.sampled(token)
        return seqs, tokens

    def _decode_sync(self, released: list[int], seqs: list[Sequence],
                     slots: list[int]) -> tuple[list[Sequence], list[int]]:
        # sequences that their last token ended are released now, not a step later: left in the backend they would
        # be holes in the batch (torch would split its rows into several passes, onnx would rebuild)
        ended = [slot for seq, slot in zip(seqs, slots) if seq.next is None]
        self._release_sync(released + ended)
        live = [(seq, slot) for seq, slot in zip(seqs, slots) if seq.next is not None]
        if not live:
            return [], []
        seqs, slots = [seq for seq, _ in live], [slot for _, slot in live]
        try:
            logits = self._step_logits(seqs, slots)
            tokens = sample_batch(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        except Exception:
            for seq in seqs:  # the loop fails them; the step queued behind this one skips them
                seq.next = None
            raise
        for seq, token in zip(seqs, tokens):
            seq.sampled(token)
        return seqs, tokens

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
        self.metrics.context_slides.inc(len(refill))
        logits = torch.empty(len(seqs), self.backend.config.vocab_size)
        logits[full] = self._prefill(refill, refill, windows)
        rest = [i for i in range(len(seqs)) if seqs[i].next[1] < context]
        if rest:
            logits[rest] = self.backend.decode([slots[i] for i in rest], [seqs[i].next[0] for i in rest],
                                               [seqs[i].next[1] for i in rest])
        return logits

    # results, on the event loop

    def _on_token(self, seq: Sequence, token: int, now: float) -> None:
        (self.metrics.inter_token_latency if seq.tokens else self.metrics.time_to_first_token).observe(
            now - seq.last)
        seq.last = now
        seq.tokens.append(token)
        self.metrics.generated_tokens.inc()
        text, stopped = seq.stream.push(token)
        reason = "stop" if stopped else None
        if not stopped and seq.ends(token, len(seq.tokens)):
            rest, stopped = seq.stream.flush()
            text += rest
            reason = "stop" if stopped else "eos" if token == self.eos_id else "length"
        if reason is None:
            seq.out.put_nowait(Chunk(text, [token]))
        else:
            self._finish(seq, reason, Chunk(text, [token]))

    def _finish(self, seq: Sequence, reason: str, last: Chunk | None = None,
                error: ServiceError | None = None) -> None:
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
        if reason == "deadline":
            error = DeadlineExceeded("deadline expired during generation")
        elif reason == "aborted":
            error = Unavailable("server shut down before the request finished")
        last = last or Chunk()
        last.finish_reason = reason
        last.error = error
        last.prompt_tokens, last.completion_tokens = len(seq.req.prompt_ids), len(seq.tokens)
        seq.out.put_nowait(last)
