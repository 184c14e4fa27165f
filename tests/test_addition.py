"""The synthetic addition task: text format, disjoint splits, loss mask, batched greedy decoding."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulm.addition import IGNORE, SPLITS, AdditionTask, exact_match, greedy_batch
from ulm.config import GPTConfig
from ulm.generate import generate_ids
from ulm.model import GPT
from ulm.training.loss import lm_loss


@pytest.mark.parametrize("reverse", [False, True])
def test_format_matches_the_tokenizer(reverse):
    task = AdditionTask(digits=2, reverse=reverse)
    tok = task.tokenizer
    pairs = np.array([[12, 34], [6, 90], [99, 99], [0, 0], [50, 7]])
    seq = task.encode(pairs)
    assert seq.shape == (5, task.prompt_len + task.answer_len) == (5, 11)
    for (a, b), row in zip(pairs, seq.tolist()):
        answer = f"{a + b:03d}"[::-1] if reverse else f"{a + b:03d}"
        text = f"{a:02d}+{b:02d}={answer}"
        assert row == tok.encode(text) + [tok.eos_id]  # encode() puts BOS first
        assert row[0] == tok.bos_id and tok.decode(row) == text
        assert task.prompt(int(a), int(b)) + task.answer(int(a), int(b)) == text
        assert task.parse_answer(answer) == a + b
    assert tok.decode(seq[1].tolist()) == ("06+90=690" if reverse else "06+90=096")


def test_format_three_digits():
    task = AdditionTask(digits=3)
    row = task.encode(np.array([[999, 1]]))[0].tolist()
    assert task.tokenizer.decode(row) == "999+001=1000"
    assert task.block_size == len(row) - 1 == 13
    assert task.parse_answer("12") is None and task.parse_answer("1000") == 1000


def test_splits_are_disjoint_and_cover_every_pair():
    task = AdditionTask(digits=2, val_fraction=0.1, test_fraction=0.1)
    sets = {s: {tuple(p) for p in task.pairs(s).tolist()} for s in SPLITS}
    assert sum(len(s) for s in sets.values()) == 10_000
    assert set.union(*sets.values()) == {(a, b) for a in range(100) for b in range(100)}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert 800 < len(sets["val"]) < 1200 and 800 < len(sets["test"]) < 1200
    # the split of a pair depends on the pair and split_seed only
    assert {tuple(p) for p in AdditionTask(digits=2).pairs("test").tolist()} == sets["test"]
    assert {tuple(p) for p in AdditionTask(digits=2, split_seed=1).pairs("test").tolist()} != sets["test"]
    # training batches never contain a held-out pair
    g = torch.Generator().manual_seed(0)
    drawn = {tuple(p) for p in task.sample_pairs("train", 5000, g).tolist()}
    assert drawn <= sets["train"] and len(drawn) > 3000
    # a capped eval split is a fixed subset
    sub = task.pairs("val", 100)
    assert len(sub) == 100 and {tuple(p) for p in sub.tolist()} <= sets["val"]
    assert np.array_equal(sub, task.pairs("val", 100))


def test_large_digit_splits_are_sampled_but_still_disjoint():
    task = AdditionTask(digits=7)
    test = task.pairs("test", 300)
    assert len(test) == 300 and (task.split_of(test[:, 0], test[:, 1]) == 2).all()
    g = torch.Generator().manual_seed(0)
    train = task.sample_pairs("train", 1000, g).numpy()
    assert (task.split_of(train[:, 0], train[:, 1]) == 0).all()
    with pytest.raises(ValueError, match="limit"):
        task.pairs("val")


def test_loss_mask_covers_the_answer_and_eos_only():
    task = AdditionTask(digits=2)
    pairs = np.array([[12, 34], [6, 90]])
    x, y = task.batch(pairs)
    seq = task.encode(pairs)
    assert torch.equal(x, seq[:, :-1])
    keep = y != IGNORE
    assert keep.sum(1).tolist() == [task.answer_len] * 2  # 3 answer digits + EOS
    assert torch.equal(y[keep], seq[:, task.prompt_len:].flatten())
    assert not keep[:, : task.prompt_len - 1].any()
    # the loss equals the mean cross-entropy over answer positions, whatever the logits at prompt positions
    V = task.tokenizer.vocab_size
    logits = torch.randn(2, x.shape[1], V)
    ref = -torch.stack([F.log_softmax(logits[b, t], -1)[y[b, t]] for b in range(2)
                        for t in range(x.shape[1]) if y[b, t] != IGNORE]).mean()
    assert torch.allclose(lm_loss(logits, y), ref)
    logits[:, : task.prompt_len - 1] = torch.randn(2, task.prompt_len - 1, V) * 10
    assert torch.allclose(lm_loss(logits, y), ref)


def test_bad_task_fields():
    cases = [({"digits": 0}, "digits"), ({"digits": 10}, "digits"), ({"val_fraction": 0.0}, "val_fraction"),
             ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction")]
    for kwargs, field in cases:
        with pytest.raises(ValueError, match=field):
            AdditionTask(**kwargs)
    with pytest.raises(ValueError, match="split"):
        AdditionTask().pairs("dev")


def test_batched_greedy_equals_one_at_a_time_generation():
    task = AdditionTask(digits=2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    pairs = task.pairs("test", 16)
    prompts = task.encode(pairs)[:, : task.prompt_len]
    got = greedy_batch(model, prompts, task.answer_len)
    for row, prompt in zip(got.tolist(), prompts.tolist()):
        ref = generate_ids(model, prompt, task.answer_len)  # the reference: one sequence, KV cache, greedy
        assert row[: len(ref)] == ref
    # and with a full forward pass over the growing sequences
    seq = prompts
    for _ in range(task.answer_len):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq[:, task.prompt_len:], got)


def test_exact_match_counts_whole_answers():
    """A model that copies a fixed answer: right exactly where the true answer is that answer."""
    task = AdditionTask(digits=1, val_fraction=0.2, test_fraction=0.2)

    class Oracle(torch.nn.Module):  # answers "10" + EOS whatever the prompt: right iff a + b == 10
        def __init__(self):
            super().__init__()
            self.config = GPTConfig(vocab_size=task.tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, input_pos=None, kv_cache=None, rows=slice(None), logits_at=None):
            want = [task.digit_ids[1], task.digit_ids[0], task.tokenizer.eos_id]
            step = (input_pos[:, -1] - (task.prompt_len - 1)).clamp(0, 2)  # answer position of the next token
            logits = torch.zeros(idx.shape[0], 1, self.config.vocab_size)
            logits[torch.arange(idx.shape[0]), 0, torch.tensor(want)[step]] = 1.0
            return logits

    pairs = task.pairs("test")
    acc = exact_match(Oracle(), task, pairs, batch_size=7)
    assert acc == pytest.approx(np.mean(pairs.sum(1) == 10))
    assert 0 < acc < 1
