"""A small char-level GPT trained in seconds on a synthetic grammar, for tests that compare a model with a
reduced-precision form of it (int8 export, int8 torch) on held-out text."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from ulm.config import GPTConfig
from ulm.model import GPT
from ulm.tokenizer import Tokenizer, char_level

BLOCK = 64


def synthetic_text(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old man", "her sister", "a small bird"]
    verb = ["sat on", "ran to", "looked at", "jumped over", "walked past", "sang to"]
    obj = ["the mat", "the park", "a red house", "the river", "an apple tree", "the moon"]
    return " ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n_sentences))


def train_char_model(val_sentences: int) -> tuple[GPT, Tokenizer, str]:
    """(the trained model in eval mode, its tokenizer, held-out text of `val_sentences` sentences)."""
    torch.manual_seed(0)
    text, val = synthetic_text(3000, 0), synthetic_text(val_sentences, 1)
    tok = char_level(text)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK, n_layer=2, n_head=4, n_embd=64, bias=False))
    data = torch.tensor(tok.encode(text, add_bos=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        ix = torch.randint(len(data) - BLOCK - 1, (32,))
        x = torch.stack([data[i:i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1:i + BLOCK + 1] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 1.2, "the test model did not train"
    return model.eval(), tok, val
