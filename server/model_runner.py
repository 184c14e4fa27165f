"""The forward passes of the scheduler's steps, run in the model thread: prefill, decode, sampling, context sliding.

Every call releases the slots of sequences that left since the last one, then runs its pass and samples each
row (ulm.generate.sample_batch, one batch). A sequence whose next position is past the model's context goes on
from the last half of it (ulm.generate.slide_window, as in-process generation does), prefilled again in its slot
within the decode step.
"""
from __future__ import annotations

import torch

from server.backends.base import Backend
from server.metrics import Metrics
from server.sequence import Sequence
from ulm.generate import sample_batch, slide_window


class ModelRunner:
    def __init__(self, backend: Backend, metrics: Metrics):
        self.backend = backend
        self.metrics = metrics
        self.held: set[int] = set()  # the slots the backend holds

    def prefill(self, released: list[int], seqs: list[Sequence],
                slots: list[int]) -> tuple[list[Sequence], list[int]]:
        logits = self._prefill(released, slots, [s.req.prompt_ids for s in seqs])
        tokens = sample_batch(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        for seq, token in zip(seqs, tokens):
            seq.sampled(token)
        return seqs, tokens

    def decode(self, released: list[int], seqs: list[Sequence],
               slots: list[int]) -> tuple[list[Sequence], list[int]]:
        # sequences that their last token ended are released now, not a step later: left in the backend they would
        # be holes in the batch (torch would split its rows into several passes, onnx would rebuild)
        ended = [slot for seq, slot in zip(seqs, slots) if seq.next is None]
        self._release(released + ended)
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
        self.metrics.context_slides.inc(len(refill))
        logits = torch.empty(len(seqs), self.backend.config.vocab_size)
        logits[full] = self._prefill(refill, refill, windows)
        rest = [i for i in range(len(seqs)) if seqs[i].next[1] < context]
        if rest:
            logits[rest] = self.backend.decode([slots[i] for i in rest], [seqs[i].next[0] for i in rest],
                                               [seqs[i].next[1] for i in rest])
        return logits
