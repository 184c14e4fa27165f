"""Sampling (greedy, temperature, top-k, top-p; a seeded generator per sequence) and in-process generation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ulm.model import GPT, KVCache
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
    with topk, not a full sort: torch's CPU sort takes ~3.4 ms over 50k tokens, which made 16 sampled streams
    spend longer sampling than decoding.
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
            order = torch.from_numpy(np.argsort(-probs.numpy()))  # numpy's sort is ~7x faster than torch's here
        probs = probs[order]
    cdf = probs.cumsum(-1)
    n = int((cdf - probs < top_p).sum())  # a prefix: the mass before a token only grows
    return order[:n], cdf[:n]


def argmax(logits: torch.Tensor) -> int | list[int]:
    """The index of the largest logit (the first one on a tie) along the last dimension, as Python ints. On the
    CPU numpy's: torch's CPU argmax is ~8x slower over a 50k vocabulary (1 thread: 31 us a row against 4; 16
    rows 0.53 ms against 0.04)."""
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
    device = next(model.parameters()).device
    cache = KVCache.for_model(model.config, 1, min(context, len(prompt_ids) + max_new_tokens),
                              next(model.parameters()).dtype, device)
    generator = params.make_generator()

    def prefill(window: list[int]) -> torch.Tensor:
        pos = torch.arange(len(window), device=device)[None]
        return model(torch.tensor([window], device=device), pos, cache, logits_at=pos[:, -1])

    ids, start = list(prompt_ids), 0  # the cache holds ids[start:]
    logits = prefill(ids)
    for step in range(max_new_tokens):
        tok = sample_token(logits[0, -1], params, generator)
        ids.append(tok)
        if tok == eos_id or step == max_new_tokens - 1:
            break
        p = len(ids) - 1 - start
        if p == context:  # the context is full
            window = slide_window(ids, context)
            start = len(ids) - len(window)
            logits = prefill(window)
        else:
            logits = model(torch.tensor([[tok]], device=device), torch.tensor([[p]], device=device), cache)
    return ids[len(prompt_ids):]


def generate_text(model: GPT, tokenizer: Tokenizer, prompt: str, max_new_tokens: int,
                  params: SamplingParams | None = None) -> str:
    ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, params, tokenizer.eos_id)
    return tokenizer.decode(ids)
