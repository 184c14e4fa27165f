"""The synthetic n-digit addition task: `<BOS>12+34=046<EOS>`, made on the fly.

Operands are zero-padded to n digits and the answer to n + 1 (optionally written least-significant digit
first, which a left-to-right model finds easier: each digit then depends only on digits already seen). Every
operand pair belongs to exactly one split (train, val or test) by a seeded hash of the pair, so the splits are
disjoint at any n without enumerating 10^(2n) pairs. The loss is taken on the answer digits and EOS only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ulm.generate import ModelStepper, decode_loop
from ulm.model import GPT
from ulm.tokenizer import Tokenizer, char_level

CHARS = "0123456789+="
SPLITS = ("train", "val", "test")
IGNORE = -100  # F.cross_entropy's ignore_index: targets that carry no loss
MAX_DIGITS = 9  # a pair index a * 10^n + b must fit in 64 bits
ENUMERATE_LIMIT = 1 << 22  # eval splits of spaces up to this many pairs are listed exactly


def addition_tokenizer() -> Tokenizer:
    return char_level(CHARS)  # add_bos=True: every example starts with BOS


@dataclass
class AdditionTask:
    digits: int = 2
    reverse: bool = False  # answer digits least-significant first
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    tokenizer: Tokenizer = field(default_factory=addition_tokenizer, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= MAX_DIGITS:
            raise ValueError(f"digits must be in [1, {MAX_DIGITS}], got {self.digits}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave some pairs for training")
        tok = self.tokenizer
        ids = [tok.token_to_id(c) for c in CHARS]
        self.digit_ids = torch.tensor(ids[:10])  # digit d -> token id
        self.plus_id, self.eq_id = ids[10], ids[11]

    # layout: BOS a(n) + b(n) = c(n+1) EOS
    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 3  # BOS through '='

    @property
    def answer_len(self) -> int:
        return self.digits + 2  # n + 1 digits and EOS

    @property
    def block_size(self) -> int:
        return self.prompt_len + self.answer_len - 1  # the model never sees the final EOS as input

    @property
    def num_pairs(self) -> int:
        return 10 ** (2 * self.digits)

    def to_extra(self) -> dict:
        """What a checkpoint's config.json records so a server (or `ulm eval`) can rebuild the task."""
        return {"task": "addition", "digits": self.digits, "reverse": self.reverse,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "split_seed": self.split_seed}

    @classmethod
    def from_extra(cls, meta: dict) -> AdditionTask:
        keys = ("digits", "reverse", "val_fraction", "test_fraction", "split_seed")
        return cls(**{k: meta[k] for k in keys if k in meta})

    # ------------------------------------------------------------------------------------------------------
    # text

    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def answer(self, a: int, b: int) -> str:
        c = f"{a + b:0{self.digits + 1}d}"
        return c[::-1] if self.reverse else c

    def parse_answer(self, text: str) -> int | None:
        """The sum a generated answer spells, or None if it is not n + 1 digits."""
        text = text.strip()
        if len(text) != self.digits + 1 or not text.isdigit():
            return None
        return int(text[::-1] if self.reverse else text)

    # ------------------------------------------------------------------------------------------------------
    # splits

    def split_of(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Split index (0 train, 1 val, 2 test) of each pair: a seeded hash, uniform in [0, 1), thresholded."""
        index = np.asarray(a, dtype=np.uint64) * np.uint64(10**self.digits) + np.asarray(b, dtype=np.uint64)
        u = (_mix64(index ^ _mix64(np.array([self.split_seed], dtype=np.uint64))) >> np.uint64(11)) / 2.0**53
        return np.where(u < self.test_fraction, 2, np.where(u < self.test_fraction + self.val_fraction, 1, 0))

    def pairs(self, split: str, limit: int = 0) -> np.ndarray:
        """The (N, 2) operand pairs of a split, in a fixed order: all of them when the space is small enough
        to list, capped at `limit` (0 = no cap) by a fixed random subset."""
        want = _split_index(split)
        rng = np.random.default_rng(self.split_seed + 1000 * want)
        if self.num_pairs <= ENUMERATE_LIMIT:
            flat = np.arange(self.num_pairs, dtype=np.int64)
            a, b = flat // 10**self.digits, flat % 10**self.digits
            keep = self.split_of(a, b) == want
            out = np.stack([a[keep], b[keep]], axis=1)
            if limit and limit < len(out):
                out = out[np.sort(rng.choice(len(out), limit, replace=False))]
            return out
        if not limit:
            raise ValueError(f"{self.digits}-digit addition has too many pairs to list; give a limit")
        chunks, have = [], 0
        while have < limit:  # rejection sampling; a split holds >= 1% of pairs in practice
            ab = rng.integers(0, 10**self.digits, size=(4 * limit, 2))
            ab = ab[self.split_of(ab[:, 0], ab[:, 1]) == want]
            chunks.append(ab)
            have += len(ab)
        return np.concatenate(chunks)[:limit]

    def sample_pairs(self, split: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """n uniformly random pairs of a split, (n, 2) int64 (rejection sampling from all pairs)."""
        want = _split_index(split)
        chunks, have = [], 0
        while have < n:
            ab = torch.randint(10**self.digits, (2 * n + 16, 2), generator=generator)
            ab = ab[torch.from_numpy(self.split_of(ab[:, 0].numpy(), ab[:, 1].numpy()) == want)]
            chunks.append(ab)
            have += len(ab)
        return torch.cat(chunks)[:n]

    # ------------------------------------------------------------------------------------------------------
    # tokens

    def encode(self, pairs: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, 2) operand pairs -> (N, prompt_len + answer_len) token ids, BOS ... EOS."""
        pairs = torch.as_tensor(pairs, dtype=torch.int64)
        n, N = self.digits, pairs.shape[0]
        a, b = pairs[:, 0:1], pairs[:, 1:2]  # (N, 1)
        powers = 10 ** torch.arange(n, -1, -1)  # (n + 1,): 10^n ... 1
        da = a // powers[1:] % 10  # (N, n) most significant first
        db = b // powers[1:] % 10
        dc = (a + b) // powers % 10  # (N, n + 1)
        if self.reverse:
            dc = dc.flip(1)
        tok = self.tokenizer

        def col(i: int) -> torch.Tensor:
            return torch.full((N, 1), i, dtype=torch.int64)

        ids = self.digit_ids
        return torch.cat([col(tok.bos_id), ids[da], col(self.plus_id), ids[db], col(self.eq_id), ids[dc],
                          col(tok.eos_id)], dim=1)

    def batch(self, pairs: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (N, T) and targets (N, T), T = block_size; targets are IGNORE except at the answer and EOS."""
        seq = self.encode(pairs)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, : self.prompt_len - 1] = IGNORE  # predictions of prompt tokens carry no loss
        return x, y

    def sample(self, split: str, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.sample_pairs(split, n, generator))


@torch.inference_mode()
def greedy_batch(model: GPT, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation of equal-length prompts (N, P) with the KV cache -> (N, steps) token ids."""
    N, P = prompts.shape
    out = decode_loop(ModelStepper(model, N, P + steps), prompts.tolist(), steps)
    return torch.tensor(out, dtype=torch.long, device=prompts.device).view(N, steps)


@torch.inference_mode()
def exact_match(model: GPT, task: AdditionTask, pairs: np.ndarray | torch.Tensor, batch_size: int = 1024,
                device: torch.device | str = "cpu") -> float:
    """Fraction of pairs whose greedy answer (n + 1 digits, then EOS) is exactly right."""
    seq = task.encode(pairs).to(device)
    if len(seq) == 0:
        raise ValueError("no examples to evaluate")
    P = task.prompt_len
    correct = 0
    for i in range(0, len(seq), batch_size):
        chunk = seq[i: i + batch_size]
        got = greedy_batch(model, chunk[:, :P], task.answer_len)
        correct += int((got == chunk[:, P:]).all(dim=1).sum())
    return correct / len(seq)


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit hash (wrapping uint64 arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
