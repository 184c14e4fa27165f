"""Sampling against a reference written the plain way (a full torch.sort): which tokens may be drawn, and how often."""
from __future__ import annotations

import pytest
import torch

from ulm.generate import NUCLEUS_GUESS, SamplingParams, argmax, nucleus, sample_batch, sample_token

V = 300  # more than NUCLEUS_GUESS, so a flat distribution's nucleus needs the full sort


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution sampling should follow: softmax(logits / T), cut to the top k, then to the smallest set of
    most likely tokens whose mass reaches top_p, renormalised."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.ones(len(probs), dtype=torch.bool)
    if p.top_k:
        keep[p.top_k:] = False
    if 0 < p.top_p < 1:
        cut = sorted_probs * keep
        cut = cut / cut.sum()
        keep &= cut.cumsum(-1) - cut < p.top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_probs[keep]
    return out / out.sum()


def peaked(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, generator=g)
    logits[:6] += torch.tensor([6.0, 5.5, 5.0, 4.0, 3.0, 2.0])
    return logits


def flat(seed: int) -> torch.Tensor:
    return 0.3 * torch.randn(V, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("logits", [peaked(0), flat(1)], ids=["peaked", "flat"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.97])
def test_nucleus_is_the_reference_set(logits, top_p):
    probs = torch.softmax(logits, -1)
    order, cdf = nucleus(probs, None, top_p)
    ref = reference_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert sorted(order.tolist()) == torch.nonzero(ref).flatten().tolist()
    assert torch.all(probs[order][:-1] >= probs[order][1:])  # most likely first
    assert torch.allclose(cdf, probs[order].cumsum(-1)) and cdf[-1] >= top_p > cdf[-2]


def test_flat_nucleus_needs_the_full_sort():  # so the test above covers both ways of finding it
    ref = reference_probs(flat(1), SamplingParams(temperature=1.0, top_p=0.97))
    assert int((ref > 0).sum()) > NUCLEUS_GUESS


@pytest.mark.parametrize("params, logits", [
    (SamplingParams(temperature=0.7), peaked(2)),
    (SamplingParams(temperature=1.3, top_k=20), peaked(3)),
    (SamplingParams(temperature=1.0, top_p=0.9), peaked(4)),
    (SamplingParams(temperature=0.8, top_k=50, top_p=0.8), peaked(5)),
    (SamplingParams(temperature=1.0, top_p=0.97), flat(6)),
], ids=["temperature", "top_k", "top_p", "top_k+top_p", "top_p_flat"])
def test_draws_follow_the_reference_distribution(params, logits):
    ref = reference_probs(logits, params)
    n = 3000
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(logits, params, g) for _ in range(n)])
    counts = torch.bincount(draws, minlength=V).double()
    assert counts[ref == 0].sum() == 0  # nothing outside the top-k / nucleus
    # frequencies within 5 standard deviations of the probabilities: each token expected 20+ times, and the
    # rest together (the normal approximation fails for rare tokens one by one)
    common = ref * n >= 20
    freq = torch.cat([counts[common], counts[~common].sum()[None]]) / n
    prob = torch.cat([ref[common], ref[~common].sum()[None]])
    assert torch.all((freq - prob).abs() <= 5 * torch.sqrt(prob * (1 - prob) / n) + 1e-9)
    # and the spread: a flat nucleus is drawn across most of its tokens
    if params.top_p == 0.97:
        assert int((counts > 0).sum()) > 0.9 * int((ref > 0).sum())


def test_seeded_draws_repeat_and_greedy_rows_take_the_argmax():
    logits = torch.stack([peaked(7), flat(8), peaked(9)])
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=5), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.9, top_k=40, seed=6)]

    def run() -> list[list[int]]:
        gens = [p.make_generator() for p in params]
        return [sample_batch(logits, params, gens) for _ in range(20)]

    first = run()
    assert first == run()
    assert all(picks[1] == int(logits[1].argmax()) for picks in first)
    assert len({picks[0] for picks in first}) > 1  # sampled rows vary from step to step


def test_argmax_is_torchs_first_maximum():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 1000, generator=g)
    logits[1, [10, 500, 900]] = 9.0  # a tie: the first index wins
    logits[2] = 0.0
    logits[3, 7] = float("inf")
    assert argmax(logits) == logits.argmax(-1).tolist() and argmax(logits)[1:3] == [10, 0]
    assert argmax(logits[4]) == int(logits[4].argmax())
    assert argmax(logits.bfloat16()) == logits.bfloat16().argmax(-1).tolist()
    assert argmax(logits[:, ::2]) == logits[:, ::2].argmax(-1).tolist()  # a strided view


@pytest.mark.parametrize("temperature", [1e-45, 1e-38, 1e-30, 1e-12], ids=lambda t: f"T={t:g}")
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (40, 1.0), (0, 0.9)], ids=["full", "top-k", "top-p"])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature, top_k, top_p):
    """logits / T overflowed to inf for T up to ~1e-38, and the softmax gave NaN (the pick was a padding id)."""
    for seed in range(5):
        logits = 20 * torch.randn(V, generator=torch.Generator().manual_seed(seed))
        params = SamplingParams(temperature, top_k, top_p, seed)
        params.validate()
        assert sample_token(logits, params, params.make_generator()) == int(logits.argmax())
        picks = sample_batch(torch.stack([logits, -logits]), [params, params], [params.make_generator()] * 2)
        assert picks == [int(logits.argmax()), int((-logits).argmax())]


def test_ulm_generate_with_a_tiny_temperature_prints_the_greedy_text(toy_checkpoint, capsys):
    from ulm.cli import main

    args = ["generate", "12+34=", "--checkpoint", str(toy_checkpoint), "--max-new-tokens", "8", "--seed", "1"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == greedy and greedy.strip()
