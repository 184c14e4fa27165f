"""The scheduler driven directly (no gRPC) over a toy model with a short context, through a backend that checks
the Backend contract, each stream's text made by the generation service's TextOutput (its stop strings end the
sequence): sequences leaving a running batch at every kind of end while the next decode step is already queued,
failed passes, and the next step queued behind the running one."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.backends.torch_backend import TorchBackend
from server.detokenize import TextStream
from server.generate_request import TextRequest
from server.metrics import Metrics
from server.model_runner import ThreadRunner
from server.scheduler import Scheduler
from server.sequence import Sequence
from server.text_output import TextOutput
from ulm.checkpoint import load_checkpoint, save_checkpoint
from ulm.config import gpt_preset
from ulm.generate import SamplingParams, generate_ids
from ulm.model import GPT

pytestmark = pytest.mark.usefixtures("single_thread")
CONTEXT = 64  # short, so that a request can run into it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("toy64"), GPT(gpt_preset("toy", block_size=CONTEXT)),
                           extra={"preset": "toy"})


@pytest.fixture(scope="module")
def reference(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    return model, tokenizer


class StrictBackend:
    """The toy TorchBackend behind checks of the Backend contract: calls from one thread, one at a time; prefill
    into free slots only; decode held slots only, each at its next position, inside the context; release held
    slots only. Records decode calls; can fail a call, or hold a decode call until told to go on."""

    def __init__(self, checkpoint, eos_id: int | None = None, max_batch: int = 8):
        self.inner = TorchBackend(checkpoint, max_batch=max_batch)
        self.tokenizer = copy.copy(self.inner.tokenizer)
        if eos_id is not None:
            self.tokenizer.eos_id = eos_id
        self.config, self.max_batch = self.inner.config, max_batch
        self.length: dict[int, int] = {}  # held slot -> positions cached
        self.decodes: list[list[int]] = []  # the slots of each decode call
        self.idle: list[int] = []  # slots held but left out of a decode call (a hole in the batch)
        self.prefilled: set[int] = set()  # slots prefilled since the last decode call
        self.prefills = 0
        self.violations: list[str] = []
        self.fail: set[tuple[str, int]] = set()  # ("decode", 2): the second decode call raises
        self.hold = 0  # the decode call (1-based) that waits for `proceed` once `entered` is set
        self.entered, self.proceed = threading.Event(), threading.Event()
        self._thread: int | None = None
        self._busy = threading.Lock()

    def prefill(self, slots, prompts):
        with self._call():
            self.prefills += 1
            self._check(all(s not in self.length for s in slots), f"prefill into held slots {slots}")
            self._check(max(map(len, prompts)) <= CONTEXT, "prompt longer than the context")
            self._maybe_fail("prefill", self.prefills)
            logits = self.inner.prefill(slots, prompts)
            self.length.update((s, len(p)) for s, p in zip(slots, prompts))
            self.prefilled.update(slots)
            return logits

    def decode(self, slots, tokens, positions):
        with self._call():
            self.decodes.append(list(slots))
            self.idle += sorted(set(self.length) - set(slots) - self.prefilled)  # not a window refilled now
            self.prefilled.clear()
            n = len(self.decodes)
            for s, p in zip(slots, positions):
                self._check(s in self.length, f"decode call {n}: slot {s} holds no sequence")
                self._check(p == self.length[s], f"decode call {n}: slot {s} at {p}, cached {self.length[s]}")
                self._check(p < CONTEXT, f"decode call {n}: position {p} is outside the context")
            if n == self.hold:
                self.entered.set()
                self.proceed.wait(10)
            self._maybe_fail("decode", n)
            logits = self.inner.decode(slots, tokens, positions)
            for s in slots:
                self.length[s] += 1
            return logits

    def release(self, slot):
        with self._call():
            self._check(slot in self.length, f"release of slot {slot}, which holds no sequence")
            self.inner.release(slot)
            del self.length[slot]

    @contextlib.contextmanager
    def _call(self):
        self._thread = self._thread or threading.get_ident()
        self._check(self._thread == threading.get_ident(), "backend called from a second thread")
        self._check(self._busy.acquire(blocking=False), "two backend calls at once")
        try:
            yield
        finally:
            self._busy.release()

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)
            raise AssertionError(what)

    def _maybe_fail(self, kind: str, n: int) -> None:
        if (kind, n) in self.fail:
            raise RuntimeError(f"injected failure of {kind} call {n}")


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self):
        super().__init__(1, thread_name_prefix="test-model")
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


def request(tokenizer, prompt: str, max_new_tokens: int, stop=(), **params) -> TextRequest:
    return TextRequest(tokenizer.encode(prompt), max_new_tokens, SamplingParams(**params), list(stop))


class Stream:
    """A request submitted as the generation service submits it: token ids to the scheduler, TextOutput listening."""

    def __init__(self, scheduler: Scheduler, tokenizer, req: TextRequest):
        self.output = TextOutput(tokenizer, req.stop, scheduler.cancel)
        self.seq: Sequence = scheduler.submit(req.tokens(tokenizer.eos_id), self.output.on_output)
        self.out, self.tokens = self.output.chunks, self.seq.tokens


def expected(reference, req: TextRequest, eos_id: int) -> tuple[list[int], str, str]:
    """(tokens, text, finish reason) from in-process generation: no batching, no step ahead."""
    model, tokenizer = reference
    ids = generate_ids(model, req.prompt_ids, req.max_new_tokens, req.params, eos_id)
    stream, text = TextStream(tokenizer, req.stop), ""
    for i, token in enumerate(ids):
        piece, stopped = stream.push(token)
        text += piece
        if stopped:
            return ids[:i + 1], text, "stop"
    piece, stopped = stream.flush()
    return ids, text + piece, "stop" if stopped else "eos" if ids[-1] == eos_id else "length"


async def read(seq: Stream, cancel_after: int = 0, scheduler: Scheduler | None = None):
    """(tokens, text, finish reason) of one stream; cancel_after: cancel it once it has that many tokens."""
    ids, text = [], ""
    while True:
        chunk = await seq.out.get()
        ids += chunk.token_ids
        text += chunk.text
        if chunk.finish_reason is not None:
            return ids, text, chunk.finish_reason
        if cancel_after and len(ids) >= cancel_after:
            scheduler.cancel(seq.seq)


EOS_PARAMS = dict(temperature=1.0, seed=5)


def fake_eos(reference) -> int:
    """A token that the continuation of "eos" (EOS_PARAMS) reaches after a few others: an EOS id to end it with."""
    model, tokenizer = reference
    ids = generate_ids(model, tokenizer.encode("eos"), 20, SamplingParams(**EOS_PARAMS))
    return next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])


def scheduler(backend, executor: ThreadPoolExecutor | None = None, interval: int = 1) -> Scheduler:
    """The scheduler over `backend` in a thread of this process, `interval` decode steps at most per pass."""
    runner = ThreadRunner(backend, executor or ThreadPoolExecutor(1, thread_name_prefix="test-model"))
    return Scheduler(runner, backend.max_batch, 8, Metrics(), stream_interval=interval)


@pytest.mark.parametrize("interval", [1, 16])
def test_sequences_leaving_a_running_batch_keep_every_stream_exact(checkpoint, reference, interval):
    """One batch, every way out at a different step, while the others go on: each stream equals in-process
    generation, and the backend sees a valid call sequence (no position past the context, slots released). A
    sequence that its token id ends takes no further step; one that a stop string ends, at most one pass's worth
    (one step when a pass is one step; with several steps per pass, the stream's text still ends at the stop). One
    runs past the context: its window slides once (a prefill in its slot within a decode step), beside the others."""
    eos = fake_eos(reference)
    backend = StrictBackend(checkpoint, eos_id=eos)
    tok = backend.tokenizer
    full = expected(reference, request(tok, "stop here", 30), eos)[1]
    reqs = [request(tok, "greedy", 40),
            request(tok, "sampled", 30, temperature=1.0, top_k=20, seed=1),
            request(tok, "one", 1),
            request(tok, "two", 2, temperature=0.8, seed=2),
            request(tok, "stop here", 30, stop=[full[6:9]]),
            request(tok, "c" * (CONTEXT - 14), 40),  # 51 + 40 tokens: past the context after 14
            request(tok, "eos", 40, **EOS_PARAMS),
            request(tok, "cancelled", 40, temperature=1.0, seed=3)]

    async def main():
        s = scheduler(backend, interval=interval)
        s.start()
        seqs = [Stream(s, tok, r) for r in reqs]
        out = await asyncio.gather(*(read(q, cancel_after=3 if i == 7 else 0, scheduler=s)
                                     for i, q in enumerate(seqs)))
        await s.close()
        return out, set(s.to_release)

    out, pending = asyncio.run(main())
    for req, (ids, text, reason) in zip(reqs[:7], out):
        assert (ids, text, reason) == expected(reference, req, eos), tok.decode(req.prompt_ids)
    assert [out[i][2] for i in (4, 5, 6)] == ["stop", "length", "eos"]
    assert len(out[2][0]) == 1 and len(out[4][0]) < 30 and len(out[5][0]) == 40
    ids, _, reason = out[7]
    assert reason == "cancelled" and len(ids) < 40
    assert ids == expected(reference, reqs[7], eos)[0][:len(ids)]
    assert backend.prefills == 2  # the batch, then the sliding window
    for slot, (ids, _, reason) in enumerate(out[:7]):  # slots are handed out in order
        steps = sum(slot in call for call in backend.decodes) + (slot == 5)  # slot 5: one step was a prefill
        if reason == "stop":  # the step queued before the loop saw the stop string; with longer passes, two passes
            assert len(ids) - 1 <= steps <= len(ids) - 1 + (1 if interval == 1 else 2 * interval), (slot, steps)
        else:
            assert steps == len(ids) - 1, (slot, steps, len(ids), reason)
    assert not backend.violations
    assert not backend.idle  # an ended sequence leaves the batch at the next pass
    assert set(backend.length) <= pending  # all else released; these go before the next pass


def test_next_decode_step_is_queued_while_the_loop_handles_the_last(checkpoint, reference):
    """While decode step 3 runs, step 2's token has reached the stream and step 4 waits in the executor: the
    model thread never waits for the event loop between steps."""
    backend = StrictBackend(checkpoint)
    backend.hold = 3
    executor = CountingExecutor()
    req = request(backend.tokenizer, "ahead", 8)

    async def main():
        s = scheduler(backend, executor)
        s.start()
        seq = Stream(s, backend.tokenizer, req)
        reader = asyncio.create_task(read(seq))
        assert await asyncio.to_thread(backend.entered.wait, 10)
        for _ in range(500):
            if executor.submitted == 5:
                break
            await asyncio.sleep(0.01)
        seen = executor.submitted, len(seq.tokens)
        backend.proceed.set()
        result = await reader
        await s.close()
        return seen, result

    (submitted, delivered), result = asyncio.run(main())
    assert submitted == 1 + 3 + 1  # the prefill, decode steps 1-3, and step 4 queued behind step 3
    assert delivered == 3  # the prefill's token and those of steps 1 and 2
    assert result == expected(reference, req, backend.tokenizer.eos_id)
    assert not backend.violations


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_a_failed_pass_fails_its_requests_and_the_scheduler_goes_on(checkpoint, reference, kind):
    """The failed sequences' slots are released (not before a failed prefill held them) and the step already
    queued behind the failed one skips them; later requests are exact."""
    backend = StrictBackend(checkpoint)
    backend.fail = {(kind, 2 if kind == "decode" else 1)}
    tok = backend.tokenizer
    first = [request(tok, f"first {i}", 10, temperature=1.0, seed=i) for i in range(3)]
    later = [request(tok, f"later {i}", 6) for i in range(2)]

    async def main():
        s = scheduler(backend)
        s.start()
        failed = await asyncio.gather(*(read(Stream(s, tok, r)) for r in first))
        calls = len(backend.decodes)
        done = await asyncio.gather(*(read(Stream(s, tok, r)) for r in later))
        await s.close()
        return failed, calls, done

    failed, calls, done = asyncio.run(main())
    assert [reason for *_, reason in failed] == ["error"] * 3
    assert calls == (2 if kind == "decode" else 0)  # nothing decoded the failed sequences again
    for req, result in zip(later, done):
        assert result == expected(reference, req, tok.eos_id)
    assert not backend.violations


def test_requests_wait_while_the_model_is_replaced_and_then_run_exactly(checkpoint, reference):
    """While the runner is not ready (a dead model process being replaced), a request neither runs nor fails; a
    cancelled one finishes; once the runner is ready again the request runs and equals in-process generation."""
    backend = StrictBackend(checkpoint)
    tok = backend.tokenizer
    req, gone = request(tok, "held", 8), request(tok, "cancelled", 8)

    async def main():
        s = scheduler(backend)
        s.runner.ready.clear()
        s.start()
        held, cancelled = Stream(s, tok, req), Stream(s, tok, gone)
        s.cancel(cancelled.seq)
        gone_result = await asyncio.wait_for(read(cancelled), 5)
        await asyncio.sleep(0.3)
        untouched = (held.out.empty(), backend.prefills, held.seq.finished)
        s.runner.ready.set()
        result = await asyncio.wait_for(read(held), 30)
        await s.close()
        return gone_result, untouched, result

    gone_result, untouched, result = asyncio.run(main())
    assert gone_result[2] == "cancelled"
    assert untouched == (True, 0, False)
    assert result == expected(reference, req, tok.eos_id)
    assert not backend.violations
