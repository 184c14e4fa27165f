"""Sampling (greedy, temperature, top-k, top-p; a seeded generator per sequence) and the one decode loop.

decode_loop drives any Stepper (prefill prompts into slots, then decode steps over them): a GPT over its own KV
cache (ModelStepper: generate_ids, the adder's exact match), the server's backends (warm-up, benchmarks) and the
export check's ONNX Runtime graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ulm.kv_cache import KVCache
from ulm.model import GPT
from ulm.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 (or 0) = off
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


# top-p: the candidates are first the most likely few (topk is cheap); a full sort only when their mass falls short
NUCLEUS_GUESS = 256


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of logits (V,).

    Uses one uniform draw and the inverse CDF over the candidates, so a seeded sequence picks the same token even
    when its logits differ in the last bits (as they do when the batch around it changes). The candidates are the
    vocabulary in its own order, or for top-k / top-p the most likely tokens, most likely first. They are found
    with topk, not a full sort: torch's CPU sort over a 50k vocabulary costs more than a decode step.
    """
    if params.greedy:
        return argmax(logits)
    logits = logits.float()
    logits = (logits - logits.max()) / params.temperature  # <= 0: a tiny temperature gives -inf, never inf or NaN
    order = None  # candidate i is token order[i] (None: token i)
    if params.top_k and params.top_k < logits.shape[-1]:
        logits, order = torch.topk(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < params.top_p < 1.0:
        order, cdf = nucleus(probs, order, params.top_p)
    else:
        cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator) * cdf[-1]
    i = min(int(torch.searchsorted(cdf, u, right=True)), cdf.shape[-1] - 1)
    return i if order is None else int(order[i])


def nucleus(probs: torch.Tensor, order: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and cumulative probabilities of the top-p nucleus (the smallest set of most likely tokens whose
    mass reaches top_p), most likely first. order: the token ids of probs when they are sorted already (top-k)."""
    if order is None:  # the most likely few (topk is cheap); every token sorted only when they fall short
        order = torch.topk(probs, min(NUCLEUS_GUESS, probs.shape[-1])).indices
        if probs[order].cumsum(-1)[-1] < top_p:
            order = torch.from_numpy(np.argsort(-probs.numpy()))  # numpy's sort: several times torch's speed
        probs = probs[order]
    cdf = probs.cumsum(-1)
    n = int((cdf - probs < top_p).sum())  # a prefix: the mass before a token only grows
    return order[:n], cdf[:n]


def argmax(logits: torch.Tensor) -> int | list[int]:
    """The index of the largest logit (the first one on a tie) along the last dimension, as Python ints. On the
    CPU numpy's: torch's CPU argmax is several times slower over a 50k vocabulary."""
    if logits.device.type != "cpu":
        return logits.argmax(-1).tolist()
    return np.argmax(logits.detach().float().numpy(), axis=-1).tolist()


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """Next token for each row of logits (B, V); greedy rows in one argmax."""
    logits = logits.float().cpu()
    picks = argmax(logits)
    for b, p in enumerate(params):
        if not p.greedy:
            picks[b] = sample_token(logits[b], p, generators[b])
    return picks


def slide_window(ids: list[int], context: int) -> list[int]:
    """What a full context goes on from, to generate past it: its last half (at least one token).

    The kept tokens are prefilled again at positions 0.. (with learned positions the cached keys cannot shift),
    so going on costs one prefill of context // 2 tokens per context // 2 new ones, and every token is sampled
    with at least that much context before it: nanoGPT crops to the last `context` tokens at every step, without
    a cache, which costs a full forward pass per token."""
    return ids[-max(1, context // 2):]



# ----------------------------------------------------------------------------------------------------------
# The decode loop


class Stepper(Protocol):
    """A model over a KV cache of slots, one sequence each: what decode_loop drives. Logits come back as torch
    tensors, one row per slot asked for, in the order asked for."""

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Run each prompt into its (free) slot from position 0. Returns last-position logits (n, V)."""
        ...

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step: tokens[i] at positions[i] for slots[i], each extending that slot's cache. Logits (n, V)."""
        ...

    def release(self, slot: int) -> None:
        """Forget the slot's sequence; the slot may be prefilled again."""
        ...


# (logits (n, V) of the loop's rows `rows`, rows) -> the next token of each of those rows
Chooser = Callable[[torch.Tensor, list[int]], list[int]]


def greedy(logits: torch.Tensor, rows: list[int]) -> list[int]:
    return argmax(logits)


def sampler(params: list[SamplingParams], generators: list[torch.Generator]) -> Chooser:
    """Row r samples with params[r] and generators[r] (sample_batch)."""
    n = len(params)

    def choose(logits: torch.Tensor, rows: list[int]) -> list[int]:
        if len(rows) == n:  # every row still running: the lists as they are
            return sample_batch(logits, params, generators)
        return sample_batch(logits, [params[r] for r in rows], [generators[r] for r in rows])
    return choose


def decode_loop(stepper: Stepper, prompts: list[list[int]], max_new_tokens: int | list[int],
                choose: Chooser = greedy, eos_id: int | None = None, context: int | None = None,
                on_step: Callable[[], None] | None = None) -> list[list[int]]:
    """Prefill prompts[r] into slot r, then one batched decode step per token over the rows still running;
    returns each row's new tokens.

    Row r stops after max_new_tokens (one count for all, or per row) or after eos_id, which it keeps. With a
    `context`, a row whose next position would be past it goes on from slide_window of its ids, prefilled again
    in its slot. on_step runs after the prefill and after each decode step (timing). Every slot is released.
    A step does little per-row work besides the chooser's: benchmarks time it with the model's.
    """
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    stops = set(limits)  # the counts at which some row stops: only then are the running rows filtered
    base = [len(p) - 1 for p in prompts]  # row r's token number k (from 1) goes in at position base[r] + k
    history: list[tuple[list[int], list[int]]] = []  # each step's running rows and their tokens
    held = set(range(n))
    logits = stepper.prefill(list(range(n)), prompts)
    try:
        live = [r for r in range(n) if limits[r] > 0]
        if len(live) < n:
            logits = logits[live]
        offsets, count = row_offsets(base, live), 0  # count: the tokens each running row has
        width = len(live)
        if on_step is not None:
            on_step()
        while live:
            tokens, count = choose(logits, live), count + 1
            history.append((live, tokens))
            if count in stops or (eos_id is not None and eos_id in tokens):
                going = [i for i, (r, t) in enumerate(zip(live, tokens)) if t != eos_id and count < limits[r]]
                live, tokens = [live[i] for i in going], [tokens[i] for i in going]
                if not live:
                    break
                offsets, width = row_offsets(base, live), len(live)
            positions = [offsets + count] * width if type(offsets) is int else [o + count for o in offsets]
            if context is not None and max(positions) >= context:
                logits = slide_step(stepper, live, tokens, positions, prompts, history, base, held, context)
                offsets = row_offsets(base, live)
            else:
                logits = stepper.decode(live, tokens, positions)
            if on_step is not None:
                on_step()
    finally:
        for s in sorted(held):
            stepper.release(s)
    return new_tokens(history, n)


def row_offsets(base: list[int], live: list[int]) -> int | list[int]:
    """The running rows' base positions: one int when they are all the same (equal prompts: no per-row work)."""
    offsets = [base[r] for r in live]
    return offsets[0] if offsets and min(offsets) == max(offsets) else offsets


def new_tokens(history: list[tuple[list[int], list[int]]], n: int) -> list[list[int]]:
    """Each of n rows' tokens, from decode_loop's history of steps."""
    out: list[list[int]] = [[] for _ in range(n)]
    for rows, tokens in history:
        for r, t in zip(rows, tokens):
            out[r].append(t)
    return out


def slide_step(stepper: Stepper, live: list[int], tokens: list[int], positions: list[int], prompts: list[list[int]],
               history: list[tuple[list[int], list[int]]], base: list[int], held: set[int],
               context: int) -> torch.Tensor:
    """decode_loop's step when some rows' caches are full: those go on from slide_window of their ids (prefilled
    again in their slots, which moves their positions: `base`), the others decode. Logits in `live`'s order."""
    full = [i for i, p in enumerate(positions) if p >= context]
    rest = [i for i, p in enumerate(positions) if p < context]
    out = new_tokens(history, len(prompts))
    parts: list[torch.Tensor | None] = [None] * len(live)
    for i in full:
        r = live[i]
        window = slide_window(prompts[r] + out[r], context)
        stepper.release(r)
        held.discard(r)
        parts[i] = stepper.prefill([r], [window])[0]
        held.add(r)
        base[r] = len(window) - 1 - len(out[r])  # the next token goes in at position len(window)
    if rest:
        got = stepper.decode([live[i] for i in rest], [tokens[i] for i in rest], [positions[i] for i in rest])
        for j, i in enumerate(rest):
            parts[i] = got[j]
    return torch.stack(parts)


class ModelStepper:
    """A GPT over a KV cache of its own, slot r in cache row r: the in-process Stepper. Call it under
    torch.inference_mode() (once around the loop: entering it per step would cost more than a small step)."""

    def __init__(self, model: GPT, max_batch: int, max_len: int):
        p = next(model.parameters())
        self.model, self.device = model, p.device
        self.cache = KVCache.for_model(model.config, max_batch, max_len, p.dtype, p.device)

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Right-padded into adjacent slots: padding writes junk keys past a prompt's end, which decode overwrites
        before attending to them."""
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        idx = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=self.device)  # (n, T)
        pos = torch.arange(T, device=self.device).expand(len(prompts), T)
        last = torch.tensor(lengths, device=self.device) - 1
        return self.model(idx, pos, self.cache, adjacent(slots), logits_at=last)[:, -1]  # (n, V)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        if slots[-1] - slots[0] != len(slots) - 1:  # rows with gaps between them (some stopped): one by one
            return torch.cat([self.decode([s], [t], [p]) for s, t, p in zip(slots, tokens, positions)])
        idx = torch.tensor([[t] for t in tokens], device=self.device)  # (n, 1)
        pos = torch.tensor([[p] for p in positions], device=self.device)
        return self.model(idx, pos, self.cache, adjacent(slots))[:, -1]  # (n, V)

    def release(self, slot: int) -> None:
        pass  # the next prefill of the slot writes its cache row from position 0


def adjacent(slots: list[int]) -> slice:
    """The cache rows of ascending adjacent slots."""
    if slots[-1] - slots[0] != len(slots) - 1:
        raise ValueError(f"slots must be adjacent and ascending, got {slots}")
    return slice(slots[0], slots[-1] + 1)


@torch.inference_mode()
def generate_ids(model: GPT, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams | None = None,
                 eos_id: int | None = None) -> list[int]:
    """Prefill the prompt, then decode one token at a time with the KV cache, past the context if asked to (see
    slide_window). Returns the new ids."""
    params = params or SamplingParams()
    context = model.config.block_size
    if not prompt_ids:
        raise ValueError("prompt must not be empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if len(prompt_ids) > context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) exceeds the context length {context}")
    stepper = ModelStepper(model, 1, min(context, len(prompt_ids) + max_new_tokens))
    choose = sampler([params], [params.make_generator()])
    return decode_loop(stepper, [list(prompt_ids)], max_new_tokens, choose, eos_id, context)[0]


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                  params: SamplingParams | None = None) -> str:
    ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, params, tokenizer.eos_id)
    return tokenizer.decode(ids)
