"""Checks of an exported graph against the PyTorch model it came from, run after every export.

Parity: ONNX Runtime logits against GPT.forward (a full pass without a cache, row by row) at past lengths 0,
1 and N, batch 1 and 3 (rows of different lengths: the prefixes go in right-padded, each row's new tokens at its
own length), for one new token and for a chunk. Greedy: ulm.generate.generate_ids against the same decode loop
over the graph (OrtStepper: each step's present is fed back as the next past). Perplexity: mean next-token loss
over block-size windows of held-out tokens.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from export.runtime import empty_cache, run
from ulm.generate import decode_loop, generate_ids
from ulm.model import GPT
from ulm.progress import progress_bar

ATOL = 1e-4  # max abs logits difference accepted in fp32
GREEDY_STEPS = 64


@torch.inference_mode()
def parity_case(model: GPT, session: ort.InferenceSession, rows: list[list[int]], past_lens: list[int]) -> float:
    """Max abs logits difference, ORT vs PyTorch, for rows whose first past_lens[b] tokens go in as the past.

    Step 1 writes the right-padded prefixes into an empty cache (if any row has one), step 2 the remaining
    tokens of every row (the same count per row) at each row's own length: over the first step's padding.
    """
    cfg = model.config
    B, P = len(rows), max(past_lens)
    T = len(rows[0]) - past_lens[0]
    assert all(len(r) - p == T for r, p in zip(rows, past_lens)), "every row must add the same number of tokens"
    refs = [model(torch.tensor([r]))[0].numpy() for r in rows]  # (len, V) each
    worst = 0.0
    cache = empty_cache(cfg, B, P + T)
    if P:
        ids = np.zeros((B, P), np.int64)
        for b, (r, p) in enumerate(zip(rows, past_lens)):
            ids[b, :p] = r[:p]
        logits, cache = run(session, ids, np.zeros(B), np.broadcast_to(np.arange(P), (B, P)), cache)
        worst = max(worst, *(float(np.abs(logits[b, :p] - refs[b][:p]).max()) for b, p in enumerate(past_lens) if p))
    ids = np.array([r[p:] for r, p in zip(rows, past_lens)])
    logits, _ = run(session, ids, np.array(past_lens), np.broadcast_to(np.arange(T), (B, T)), cache)
    return max(worst, *(float(np.abs(logits[b] - refs[b][p:]).max()) for b, p in enumerate(past_lens)))


def check_parity(model: GPT, session: ort.InferenceSession, atol: float = ATOL, seed: int = 0,
                 on_case: Callable[[dict], None] | None = None) -> dict:
    cfg = model.config
    rng = np.random.default_rng(seed)
    n = max(2, min(64, cfg.block_size // 2))  # "N": a longer past, well inside the context
    cases = []
    for past_lens in ([0], [1], [n], [0, 0, 0], [1, 1, 1], [n, n // 2, 1]):
        for new in (1, 4):
            if max(past_lens) + new > cfg.block_size:
                continue
            rows = [rng.integers(0, cfg.vocab_size, p + new).tolist() for p in past_lens]
            diff = parity_case(model, session, rows, past_lens)
            cases.append({"batch": len(past_lens), "past_lens": past_lens, "new_tokens": new, "max_abs_diff": diff})
            if on_case:
                on_case(cases[-1])
    worst = max(c["max_abs_diff"] for c in cases)
    return {"cases": cases, "max_abs_diff": worst, "atol": atol, "passed": worst <= atol}


class OrtStepper:
    """The graph as a ulm.generate.Stepper over numpy caches of `length` positions per row, one row per slot:
    each call's present keys/values become the rows' past."""

    def __init__(self, session: ort.InferenceSession, model_cfg, max_batch: int, length: int):
        self.session, self.cache = session, empty_cache(model_cfg, max_batch, length)

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        ids = np.zeros((len(prompts), max(lengths)), np.int64)  # right-padded: padding's keys are never read
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        return self._run(slots, ids, np.zeros(len(prompts)), np.array(lengths)[:, None] - 1)

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self._run(slots, [[t] for t in tokens], positions, [[0]] * len(slots))

    def release(self, slot: int) -> None:
        pass  # the next prefill writes the row from position 0

    def _run(self, slots: list[int], ids, past_lengths, logits_index) -> torch.Tensor:
        rows = np.asarray(slots)
        logits, present = run(self.session, ids, past_lengths, logits_index, [a[rows] for a in self.cache])
        for a, p in zip(self.cache, present):
            a[rows] = p
        return torch.from_numpy(logits[:, -1])  # (n, V)


def ort_greedy(session: ort.InferenceSession, model_cfg, prompt: list[int], steps: int,
               eos_id: int | None = None) -> list[int]:
    """Greedy decoding with the graph alone: prefill, then one token per call with the present fed back."""
    return decode_loop(OrtStepper(session, model_cfg, 1, len(prompt) + steps), [prompt], steps, eos_id=eos_id)[0]


def check_greedy(model: GPT, session: ort.InferenceSession, prompt: list[int], steps: int = GREEDY_STEPS) -> dict:
    steps = min(steps, model.config.block_size - len(prompt))
    ref = generate_ids(model, prompt, steps)
    got = ort_greedy(session, model.config, prompt, steps)
    agree = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return {"prompt_tokens": len(prompt), "steps": steps, "identical": ref == got, "agreeing_prefix": agree}


def eval_windows(tokens: np.ndarray, block_size: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping (n, block_size + 1) windows of inputs+targets from the start of `tokens`."""
    tokens = np.asarray(tokens[: max_tokens + 1], np.int64)
    n = (len(tokens) - 1) // block_size
    if n == 0:
        raise ValueError(f"evaluation data has {len(tokens)} tokens; need more than the context ({block_size})")
    starts = np.arange(n) * block_size
    return np.stack([tokens[s:s + block_size + 1] for s in starts])


def perplexity_ort(session: ort.InferenceSession, model_cfg, windows: np.ndarray, batch: int = 8) -> float:
    B_all, L = windows.shape[0], windows.shape[1] - 1
    total = 0.0
    for i in progress_bar(range(0, B_all, batch), desc="perplexity", leave=False, unit="batch"):
        w = windows[i:i + batch]
        B = len(w)
        logits, _ = run(session, w[:, :-1], np.zeros(B), np.broadcast_to(np.arange(L), (B, L)),
                        empty_cache(model_cfg, B, L))
        total += float(F.cross_entropy(torch.from_numpy(logits).flatten(0, 1), torch.from_numpy(w[:, 1:]).flatten(),
                                       reduction="sum"))
    return math.exp(total / windows[:, 1:].size)


@torch.inference_mode()
def perplexity_torch(model: GPT, windows: np.ndarray, batch: int = 8) -> float:
    total = 0.0
    for i in range(0, len(windows), batch):
        w = torch.from_numpy(windows[i:i + batch])
        total += float(F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
    return math.exp(total / windows[:, 1:].size)
